"""Labelled image sets, the ``Episode`` type and the seeded N-way K-shot task sampler.

Every source of few-shot tasks in purer (real images on disk, the built-in glyphs,
the pseudo-image bank) hands out the same :class:`Episode`, sampled from a
:class:`TaskSpec` drawn by one :class:`EpisodeSampler`.  The sampler only sees how
many images each class has, so real and pseudo sources share one sampling rule.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from einops import rearrange

from .. import host
from ..host import to_device

# The splits of every real dataset: meta-train classes (teachers, baselines), meta-val (selection), meta-test.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """Which classes and which instances make one task.

    Attributes:
        classes: ``[N]`` class indices into the source, in episode-label order.
        support: ``[N, K]`` instance indices (into each class's own list).
        query: ``[N, Q]`` instance indices (into each class's own list).
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray

    @property
    def way(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {"classes": self.classes.tolist(), "support": self.support.tolist(), "query": self.query.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "TaskSpec":
        return cls(*(np.asarray(d[k], dtype=np.int64).reshape(len(d["classes"]), -1) if k != "classes"
                     else np.asarray(d[k], dtype=np.int64) for k in ("classes", "support", "query")))


@dataclass
class Episode:
    """One N-way K-shot Q-query task.

    Attributes:
        support_x: ``[N*K, C, H, W]`` float images in ``[0, 1]``, class-major
            (the K images of label 0 first, then label 1, ...).
        support_y: ``[N*K]`` int64 labels in ``0..N-1``.
        query_x: ``[N*Q, C, H, W]`` float images in ``[0, 1]``, class-major.
        query_y: ``[N*Q]`` int64 labels in ``0..N-1``.
        classes: the ``N`` original class names, ``classes[label]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def way(self) -> int:
        return len(self.classes) if self.classes else int(self.support_y.max()) + 1

    @property
    def shot(self) -> int:
        return self.support_y.numel() // self.way

    @property
    def query(self) -> int:
        return self.query_y.numel() // self.way

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(self.support_x.to(device), self.support_y.to(device), self.query_x.to(device),
                       self.query_y.to(device), self.classes)

    def detach(self) -> "Episode":
        """The same episode with its images cut from any graph (e.g. a pseudo episode from the bank)."""
        return Episode(self.support_x.detach(), self.support_y, self.query_x.detach(), self.query_y, self.classes)


@dataclass
class TaskBatch:
    """``T`` episodes of one shape (way, shot, query), stacked for batched adaptation and evaluation.

    Attributes:
        support_x: ``[T, N*K, C, H, W]`` float images in ``[0, 1]``, each task class-major
            (or ``[T, N*K, D]`` features, see :class:`purer.baselines.FeatureSet`).
        support_y: ``[N*K]`` int64 labels, the same for every task (class-major ``0..N-1``).
        query_x: ``[T, N*Q, ...]`` like ``support_x``.
        query_y: ``[N*Q]``.
        way: N (given, so that nothing is read back from the device to learn it).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    way: int

    def __post_init__(self):
        if self.support_x.ndim < 3 or self.support_x.shape[0] != self.query_x.shape[0] \
                or self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(f"a TaskBatch holds support [T, N*K, ...] and query [T, N*Q, ...] of one item shape, "
                             f"got {tuple(self.support_x.shape)} and {tuple(self.query_x.shape)}")
        if self.support_y.numel() % self.way or self.query_y.numel() % self.way:
            raise ValueError(f"{self.support_y.numel()} support and {self.query_y.numel()} query labels do not split "
                             f"into {self.way} classes")

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(self.support_x.to(device), self.support_y.to(device), self.query_x.to(device),
                         self.query_y.to(device), self.way)

    @classmethod
    def stack(cls, episodes: Sequence["Episode"]) -> "TaskBatch":
        """Stack episodes of one shape (way, shot, query) whose labels agree, as a sampler's class-major labels
        do (checked where that needs no read from a device: on the CPU)."""
        first = episodes[0]
        for ep in episodes[1:]:
            if ep.support_y.shape != first.support_y.shape or ep.query_y.shape != first.query_y.shape or \
                    ep.way != first.way:
                raise ValueError("episodes of a TaskBatch must share way, shot and query")
            if first.support_y.device.type == "cpu" and not (torch.equal(ep.support_y, first.support_y)
                                                             and torch.equal(ep.query_y, first.query_y)):
                raise ValueError("episodes of a TaskBatch must share their label order")
        return cls(torch.stack([e.support_x for e in episodes]), first.support_y,
                   torch.stack([e.query_x for e in episodes]), first.query_y, first.way)


def episode_labels(way: int, per_class: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Class-major labels ``[way * per_class]``: ``0,0,..,1,1,..``."""
    return torch.arange(way, device=device).repeat_interleave(per_class)


class EpisodeSource(Protocol):
    """Anything tasks can be sampled from: real image sets and the pseudo bank."""

    class_names: list[str]

    def class_sizes(self) -> list[int]: ...

    def episode(self, spec: TaskSpec) -> Episode: ...


class ImageSet:
    """A labelled set of images kept in memory as ``uint8``.

    Args:
        images: ``[M, C, H, W]`` uint8 tensor (or float in ``[0, 1]``, stored as uint8).
        labels: ``[M]`` int64 class indices into ``class_names``.
        class_names: names of the classes, ``class_names[label]``.
        name: a human-readable name of the set (e.g. ``"glyphs/train"``).

    Example:
        >>> s = ImageSet(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1, 1]), ["a", "b"])
        >>> s.class_sizes()
        [3, 3]
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], name: str = ""):
        if images.ndim != 4:
            raise ValueError(f"images must be [M, C, H, W], got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be [M] with M={images.shape[0]}, got shape {tuple(labels.shape)}")
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        self.images = images
        self.labels = labels.long()
        self.class_names = list(class_names)
        self.name = name
        self._fingerprint: str | None = None
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}")
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        self._members = list(torch.split(order, counts))
        # members as one [classes, largest class] table, so a batch of tasks is gathered with one index
        self._table = np.zeros((len(counts), max(counts, default=0)), dtype=np.int64)
        for c, m in enumerate(self._members):
            self._table[c, :len(m)] = m.numpy()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> "ImageSet":
        """This set with its images on ``device`` (moved once; episodes are then gathered there)."""
        if torch.device(device) == self.device:
            return self
        if self.device.type == "cpu":
            self.fingerprint()  # while the images are on the host
        moved = copy.copy(self)
        moved.images = self.images.to(device)
        return moved

    def fingerprint(self) -> str:
        """A hash of every image, label and class name (computed once; a set moved off the CPU keeps it): two
        sets with one fingerprint hold the same data."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([list(self.images.shape), self.class_names]).encode())
            h.update(host.read(self.images, "cache").contiguous().numpy().tobytes())
            h.update(host.read(self.labels, "cache").numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_sizes(self) -> list[int]:
        return [len(m) for m in self._members]

    def members(self, c: int) -> torch.Tensor:
        """Indices (into ``images``) of the instances of class ``c``, in a fixed order."""
        return self._members[c]

    def float_images(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        x = self.images if idx is None else self.images[idx]
        return x.float().div_(255)

    def subset(self, classes: Sequence[int], name: str | None = None) -> "ImageSet":
        """The images of ``classes``, relabelled ``0..len(classes)-1`` in that order."""
        idx = torch.cat([self._members[c] for c in classes]) if classes else torch.zeros(0, dtype=torch.long)
        new = torch.cat([torch.full((len(self._members[c]),), i) for i, c in enumerate(classes)]) if classes \
            else torch.zeros(0, dtype=torch.long)
        return ImageSet(self.images[idx], new, [self.class_names[c] for c in classes], name or self.name)

    def index(self, classes: np.ndarray, inst: np.ndarray) -> torch.Tensor:
        """Row indices ``[..., N*K]`` (on :attr:`device`) of instances ``inst [..., N, K]`` (into each class's
        own list) of ``classes [..., N]``, class-major."""
        idx = to_device(torch.as_tensor(self._table[classes[..., None], inst]), self.device)
        return rearrange(idx, "... n k -> ... (n k)")

    def _gather(self, classes: np.ndarray, inst: np.ndarray) -> torch.Tensor:
        return self.float_images(self.index(classes, inst))

    def episode(self, spec: TaskSpec) -> Episode:
        way, dev = spec.way, self.device
        return Episode(self._gather(spec.classes, spec.support), episode_labels(way, spec.support.shape[1], dev),
                       self._gather(spec.classes, spec.query), episode_labels(way, spec.query.shape[1], dev),
                       tuple(self.class_names[c] for c in spec.classes))

    def episodes(self, specs: Sequence[TaskSpec]) -> TaskBatch:
        """The tasks of ``specs`` (one shape) as a :class:`TaskBatch`, gathered with one index per part."""
        shapes = {(s.way, s.support.shape[1], s.query.shape[1]) for s in specs}
        if len(shapes) != 1:
            raise ValueError(f"a TaskBatch needs tasks of one (way, shot, query), got {sorted(shapes)}")
        (way, shot, query), dev = shapes.pop(), self.device
        classes = np.stack([s.classes for s in specs])
        return TaskBatch(self._gather(classes, np.stack([s.support for s in specs])), episode_labels(way, shot, dev),
                         self._gather(classes, np.stack([s.query for s in specs])), episode_labels(way, query, dev),
                         way)


class EpisodeSampler:
    """Seeded sampler of N-way K-shot Q-query :class:`TaskSpec` s.

    Task ``i`` depends only on ``(seed, i)`` and the class sizes (NumPy's PCG64 on a
    ``SeedSequence``), so a task list is the same on every machine and can be
    regenerated instead of stored.

    Args:
        class_sizes: number of instances of each class in the source.
        way: classes per task (N).
        shot: support images per class (K).
        query: query images per class (Q).  ``None`` or a number larger than what the
            classes allow means "as many as every chosen class has after the support".
        seed: the task-list seed.

    Raises:
        ValueError: if the source has fewer than ``way`` classes with more than ``shot``
            instances.
    """

    def __init__(self, class_sizes: Sequence[int], way: int, shot: int, query: int | None = 15, seed: int = 0,
                 min_query: int = 1):
        if way < 1 or shot < 1:
            raise ValueError(f"way and shot must be positive, got way={way} shot={shot}")
        sizes = np.asarray(list(class_sizes), dtype=np.int64)
        self.eligible = np.flatnonzero(sizes >= shot + min_query)
        if len(self.eligible) < way:
            raise ValueError(
                f"cannot sample {way}-way {shot}-shot tasks: only {len(self.eligible)} of {len(sizes)} classes have "
                f"at least {shot + min_query} images (shot + {min_query} query)")
        self.sizes, self.way, self.shot, self.query, self.seed = sizes, way, shot, query, seed

    def task(self, i: int) -> TaskSpec:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, i])))
        classes = rng.choice(self.eligible, size=self.way, replace=False)
        room = int(self.sizes[classes].min()) - self.shot
        q = room if self.query is None else min(self.query, room)
        picks = np.stack([rng.choice(self.sizes[c], size=self.shot + q, replace=False) for c in classes])
        return TaskSpec(classes.astype(np.int64), picks[:, :self.shot], picks[:, self.shot:])

    def tasks(self, n: int, start: int = 0) -> list[TaskSpec]:
        return [self.task(i) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[TaskSpec]:
        i = 0
        while True:
            yield self.task(i)
            i += 1
