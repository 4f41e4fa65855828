"""The pseudo-image bank (PURER's *dynamic dataset*): P learnable images per zoo class.

The bank exposes its images in pixel units (``[0, 1]`` is the valid range) at one
resolution and channel count; each teacher sees them through its own
:meth:`purer.zoo.Teacher.prepare` (channels, size, normalisation), so a
heterogeneous zoo shares one bank.

Two parameterisations (``space``):

* ``pixel`` (default): ``image = sigmoid(logit)``.  A sigmoid keeps every pixel
  inside ``[0, 1]`` without a projection step, and, unlike clamping, never zeroes
  the gradient of a pixel that touches a bound, so no pixel gets stuck at black or white.
* ``normalized`` (the release's): an unbounded ``z`` in the teachers' normalised
  space, ``image = mean + std * z``, neither squashed nor clamped, so images may
  leave ``[0, 1]``.  ``mean`` and ``std`` are the per-channel averages of the
  teachers' normalisations: exactly their normalisation when they share one (the
  release's zoo); a teacher normalised differently then sees an affine map of ``z``
  (the glyph zoo's teachers each normalise by their own training images'
  statistics, means 0.21-0.28, stds 0.38-0.43).

Either way the raw tensors are ``logits`` (one name, so checkpoints read the same)
and start standard normal.  Each class is its own ``nn.Parameter`` ``[P, C, S, S]``:
a loss built from a few classes gives gradients to those classes only, and an
optimizer that skips parameters without a gradient (``torch.optim.Adam`` does)
updates and keeps moments for the touched classes alone (see
:mod:`purer.inversion.synthesizer`).

The bank is a :class:`purer.data.EpisodeSource`: sample pseudo episodes with
:class:`purer.data.EpisodeSampler` over ``bank.class_sizes()`` exactly like real
ones; the episode's images stay differentiable in the bank.

Example:
    >>> bank = PseudoBank(teachers, images_per_class=16)           # doctest: +SKIP
    >>> sampler = EpisodeSampler(bank.class_sizes(), way=5, shot=1, query=15)  # doctest: +SKIP
    >>> ep = bank.episode(sampler.task(0))                           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from einops import rearrange
from torch import nn

from ..data.episodes import Episode, TaskSpec, episode_labels
from ..host import to_device
from ..zoo.teacher import Teacher, convert_input

SPACES = ("pixel", "normalized")


class PseudoBank(nn.Module):
    """``images_per_class`` learnable ``[C, S, S]`` images for every class the zoo knows.

    Args:
        teachers: the zoo, in a fixed order (teacher ``i`` is ``teachers[i]``).
        images_per_class: P, the images of each class; K + Q (one episode's
            support + query of the class) as in the release.
        image_size: S, the bank's side in pixels (default: the largest teacher input).
        channels: C (default: the most channels any teacher takes; grey teachers see
            colour images averaged to one channel).
        merge_shared_classes: if ``True``, teachers that give an output the same
            ``class_id`` share one bank class; otherwise a class is
            ``(teacher, local label)`` and names read ``"<model_id>/<class_id>"``.
        seed: seed of the initial raw tensors (standard normal: mid-grey noise in
            ``pixel`` space, noise of the teachers' mean and spread in ``normalized``).
        space: ``pixel`` (``image = sigmoid(logit)``) or ``normalized``
            (``image = mean + std * z``); see the module docstring.
        own_contract: keep each class's images in its teacher's input contract (its
            channels and size; the largest of several teachers sharing the class), so
            a grey teacher's class is grey and has no colour its teacher cannot see, and
            a class of a 40 px teacher is not resampled from 32 px.  Pseudo episodes and
            snapshots still come in the bank's common shape (``channels``, ``image_size``),
            converted as :func:`purer.zoo.prepare_input` converts (grey repeated to three
            channels, colour averaged to one, bilinear resizing).  With one contract in
            the zoo (and ``image_size``/``channels`` its own) nothing changes.
        device: where the bank lives (default the CPU); its initial tensors are drawn on
            the CPU from ``seed`` (the same on every device) and moved there in one copy each.

    Attributes:
        class_names: ``[M]`` names of the bank classes.
        teacher_classes: for each teacher, ``[num_classes_i]`` bank class of each local label.
        class_teachers: for each bank class, the teachers that know it.
        logits: ``[M]`` parameters ``[P, C, S, S]`` (``[P, C_k, S_k, S_k]`` with ``own_contract``),
            the raw tensor of each class (sigmoid logits, or ``z`` in ``normalized`` space).
        class_shapes: ``[M]`` ``(C_k, S_k)`` of each class's stored images.
        mean, std: ``[C, 1, 1]`` buffers of the ``normalized`` space (``None`` in ``pixel``).
    """

    def __init__(self, teachers: Sequence[Teacher], images_per_class: int, image_size: int | None = None,
                 channels: int | None = None, merge_shared_classes: bool = False, seed: int = 0,
                 space: str = "pixel", own_contract: bool = False, device: torch.device | str | None = None):
        super().__init__()
        if not teachers:
            raise ValueError("PseudoBank needs at least one teacher")
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be positive, got {images_per_class}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        configs = [t.config for t in teachers]
        self.image_size = int(image_size or max(c.image_size for c in configs))
        self.channels = int(channels or max(c.in_channels for c in configs))
        self.images_per_class = int(images_per_class)
        for i, c in enumerate(configs):
            if c.in_channels not in (1, self.channels) and self.channels != 1:
                raise ValueError(f"teacher {i} ({teachers[i].model_id or c.arch}) takes {c.in_channels} channels; "
                                 f"a {self.channels}-channel bank can feed 1- or {self.channels}-channel teachers only")

        keys: dict[object, int] = {}
        self.class_names: list[str] = []
        self.teacher_classes: list[list[int]] = []
        for i, (t, c) in enumerate(zip(teachers, configs)):
            mine = []
            for label, cid in enumerate(c.class_ids):
                key = cid if merge_shared_classes else (i, label)
                if key not in keys:
                    keys[key] = len(self.class_names)
                    self.class_names.append(cid if merge_shared_classes else f"{t.model_id or f'teacher{i}'}/{cid}")
                mine.append(keys[key])
            self.teacher_classes.append(mine)
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("two teachers share a model_id, so their classes get the same name; "
                             "give every teacher a distinct model_id")
        self.class_teachers: list[list[int]] = [[] for _ in self.class_names]
        for i, mine in enumerate(self.teacher_classes):
            for k in mine:
                self.class_teachers[k].append(i)

        self.class_shapes: list[tuple[int, int]] = []
        for k in range(len(self.class_names)):
            if own_contract:
                mine = [configs[i] for i in self.class_teachers[k]]
                self.class_shapes.append((max(c.in_channels for c in mine), max(c.image_size for c in mine)))
            else:
                self.class_shapes.append((self.channels, self.image_size))
        if space == "normalized" and len(set(self.class_shapes)) > 1:
            raise ValueError("a normalized-space bank needs one image shape for all classes; use the pixel space "
                             "for a zoo of several input contracts")
        g = torch.Generator().manual_seed(seed)
        device = torch.device(device or "cpu")
        self.logits = nn.ParameterList([nn.Parameter(to_device(torch.randn((self.images_per_class, c, s, s),
                                                                           generator=g), device))
                                        for c, s in self.class_shapes])
        self._touched: set[int] = set()
        self.space = space
        normalized = space == "normalized"
        # Not persistent: the teachers define them, and both spaces keep the same checkpoint keys.
        self.register_buffer("mean", to_device(self._average(teachers, "mean"), device) if normalized else None,
                             persistent=False)
        self.register_buffer("std", to_device(self._average(teachers, "std"), device) if normalized else None,
                             persistent=False)

    def _average(self, teachers: Sequence[Teacher], name: str) -> torch.Tensor:
        """The per-channel mean over teachers of their ``name`` (``mean`` or ``std``), ``[C, 1, 1]``."""
        rows = []
        for i, t in enumerate(teachers):
            v = torch.tensor(getattr(t.config, name), dtype=torch.float32)
            if len(v) not in (1, self.channels):
                raise ValueError(f"teacher {i} ({t.model_id or t.config.arch}) has {len(v)} {name} values; a "
                                 f"normalized-space bank of {self.channels} channel(s) needs 1 or {self.channels}; "
                                 "use the pixel space for this zoo")
            rows.append(v.expand(self.channels))
        return torch.stack(rows).mean(0).view(-1, 1, 1)

    def to_images(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw tensors ``[..., C, S, S]`` of this bank's space -> images in pixel units, differentiably."""
        return torch.sigmoid(raw) if self.space == "pixel" else self.mean + self.std * raw

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def class_sizes(self) -> list[int]:
        return [self.images_per_class] * self.num_classes

    def class_images(self, c: int, index: np.ndarray | torch.Tensor | None = None, touch: bool = True
                     ) -> torch.Tensor:
        """Images ``[P, C, S, S]`` of class ``c`` (or ``[len(index), C, S, S]``) in pixel units, differentiable.

        A read marks ``c`` as touched (unless ``touch=False``), so an inversion step knows
        which classes its loss depends on without scanning the whole bank.  ``index``: a
        tensor on the bank's device (host indices are copied there, one copy per call).
        """
        if not 0 <= c < self.num_classes:
            raise IndexError(f"bank class {c} out of range 0..{self.num_classes - 1}")
        if touch:
            self._touched.add(int(c))
        z = self.logits[c]
        if index is not None:
            z = z[to_device(torch.as_tensor(index, dtype=torch.long), z.device)]
        return self.to_images(z)

    def _as(self, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Images ``[B, C, S, S]`` in another shape ``(channels, size)`` (unchanged if they have it)."""
        return x if (x.shape[1], x.shape[-1]) == shape else convert_input(x, *shape)

    def teacher_shape(self, i: int) -> tuple[int, int]:
        """The ``(channels, size)`` teacher ``i``'s classes come in (its contract's, or the bank's)."""
        shapes = {self.class_shapes[k] for k in self.teacher_classes[i]}
        return shapes.pop() if len(shapes) == 1 else (self.channels, self.image_size)

    def teacher_batch(self, i: int, touch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of teacher ``i``'s classes and its local labels.

        Returns:
            ``x [n_i * P, C, S, S]`` in pixel units (class-major, local label order; in
            :meth:`teacher_shape`; differentiable in the bank, and marking its classes
            touched, unless ``touch=False``) and ``y [n_i * P]`` int64 local labels ``0..n_i-1``.
        """
        classes, shape = self.teacher_classes[i], self.teacher_shape(i)
        x = torch.cat([self._as(self.class_images(c, touch=touch), shape) for c in classes])
        return x, episode_labels(len(classes), self.images_per_class, device=x.device)

    @torch.no_grad()
    def teacher_images(self, i: int) -> torch.Tensor:
        """:meth:`teacher_batch`'s images, detached; does not mark them touched."""
        return self.teacher_batch(i, touch=False)[0]

    def episode(self, spec: TaskSpec) -> Episode:
        """The pseudo episode of ``spec``; ``support_x [N*K, C, S, S]``, ``query_x [N*Q, C, S, S]`` in the
        bank's common shape, class-major, labels ``0..N-1``; images differentiable in the bank."""
        common = (self.channels, self.image_size)
        dev = self.logits[0].device
        shot = spec.support.shape[1]
        # The task's instance indices reach the device in one copy, not one per class.
        index = to_device(torch.as_tensor(np.concatenate([spec.support, spec.query], 1), dtype=torch.long), dev)

        def gather(part: slice) -> torch.Tensor:
            x = torch.stack([self._as(self.class_images(int(c), index[j, part]), common)
                             for j, c in enumerate(spec.classes)])
            return rearrange(x, "n k c h w -> (n k) c h w")

        return Episode(gather(slice(0, shot)), episode_labels(spec.way, shot, device=dev),
                       gather(slice(shot, None)), episode_labels(spec.way, spec.query.shape[1], device=dev),
                       tuple(self.class_names[int(c)] for c in spec.classes))

    @torch.no_grad()
    def write(self, c: int, images: torch.Tensor) -> None:
        """Set class ``c``'s images to ``images [P, C', S', S']`` in pixel units (any shape: converted to the
        class's, as :meth:`episode` converts); the raw tensor becomes what this space maps to them (in ``pixel``
        space the logit of the images clamped to ``[1e-6, 1 - 1e-6]``)."""
        x = self._as(images, self.class_shapes[c])
        raw = torch.logit(x, eps=1e-6) if self.space == "pixel" else (x - self.mean) / self.std
        self.logits[c].copy_(raw)

    def pop_touched(self) -> list[int]:
        """The classes read since the last call (sorted), and forget them."""
        touched, self._touched = sorted(self._touched), set()
        return touched

    @torch.no_grad()
    def snapshot(self, classes: Sequence[int] | None = None) -> torch.Tensor:
        """Detached images ``[M, P, C, S, S]`` of ``classes`` (default all) in pixel units and the bank's common
        shape, unclamped; does not mark them touched."""
        classes = range(self.num_classes) if classes is None else classes
        common = (self.channels, self.image_size)
        return torch.stack([self._as(self.to_images(self.logits[c]), common) for c in classes])
