"""The one interface every meta-learner (MAML and its task-adaptive family, ANIL, ProtoNet, Matching and Relation
Networks, MTL, E3BM) offers, and its model folder.

The curriculum (GradientSwitch), ICFIL, the evaluation and the baselines only rely
on this interface.  A meta-learner saves itself as a Hugging Face style folder
(:meth:`MetaLearner.save_pretrained`: ``config.json`` + ``model.safetensors``,
nothing pickled) and :meth:`MetaLearner.from_pretrained` rebuilds it, ready to
classify a new few-shot task:

Example:
    >>> learner = MetaLearner.from_pretrained("runs/purer-glyphs/meta_learner")          # doctest: +SKIP
    >>> state = learner.adapt(support_x, support_y, way=5, **learner.test_time_settings(shot=1))  # doctest: +SKIP
    >>> labels = learner.predict(state, query_x).argmax(-1)                               # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..data.episodes import Episode, TaskBatch
from ..zoo.architectures import Classifier, build_model
from ..zoo.store import read_safetensors
from ..zoo.teacher import ModelConfig, prepare_input

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TASK_BATCHING = ("auto", "loop", "vmap")


@contextlib.contextmanager
def slow_vmap_operators() -> Iterator[list[str]]:
    """The operators (``aten::...``) that ran vmapped in the block without a batching rule, i.e. through
    torch.func's slow per-sample fallback loop: what tasks vmapped together must not hit on a GPU.

    Yields a list, filled when the block ends (sorted, each once).  torch warns about fallbacks only when
    asked (through a private switch, used here alone); this asks for the block and turns the warnings off
    again after.
    """
    found: list[str] = []
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        for w in caught:
            m = re.search(r"batching rule for (\S+?)\.? ", str(w.message))
            if m:
                found.append(m.group(1))
            else:  # any other warning goes on to the caller
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        found[:] = sorted(set(found))
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)


def nearest_shot(shots, shot: int) -> int:
    """Of ``shots`` (settings chosen per shot on meta-val), the one nearest ``shot``, the smaller on a tie."""
    return min(shots, key=lambda s: (abs(s - shot), s))


@dataclass(frozen=True)
class InputSpec:
    """What a meta-learner's network expects; images arrive in ``[0, 1]``.

    Attributes:
        in_channels, image_size: the network's input (other images are converted
            and resized by :func:`purer.zoo.prepare_input`).
        mean, std: per-channel normalisation (one value or one per channel).
    """

    in_channels: int
    image_size: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def of(cls, config: ModelConfig) -> "InputSpec":
        """The input contract of a zoo model (e.g. ``InputSpec.of(teacher.config)``)."""
        return cls(config.in_channels, config.image_size, tuple(config.mean), tuple(config.std))


def check_head_way(head_way: int, way: int) -> None:
    """A learner whose head has ``head_way`` outputs cannot adapt to a ``way``-way task: a one-line error naming
    what can (its features, read by SimpleShot)."""
    if way != head_way:
        raise ValueError(f"this learner's head was built for {head_way}-way tasks, got a {way}-way episode; its "
                         "features classify any way: purer.calibrate.SimpleShot().adapt(learner, support_x, "
                         "support_y, way)")


class MetaLearner(nn.Module, ABC):
    """Adapt to an episode's support set, predict its query set, give the outer loss.

    ``adapt`` returns an opaque *adapted state* (fast weights for MAML/ANIL,
    prototypes for ProtoNet); the meta-learner's own weights are never changed by
    ``adapt``, so tasks never leak into each other.

    Args:
        input_spec: how ``[0, 1]`` images are turned into the network's input;
            ``None`` feeds them unchanged.

    Class attributes:
        tunable: names of ``adapt`` keyword arguments that test-time model
            selection may set (e.g. ``("lr", "steps")`` for an inner loop).
        transductive: ``adapt`` also reads the task's unlabelled query images
            (``query_x=``; MeTAL's inner loss does), never their labels;
            :meth:`query_logits` and :meth:`batch_query_logits` pass them.
        kind: the learner's name in a saved folder's ``config.json`` (``maml``,
            ``anil``, ``protonet``); a subclass declares it as
            ``class MyLearner(MetaLearner, kind="mine")`` to be loadable by
            :meth:`from_pretrained`.

    Attributes:
        test_time: the test-time settings chosen per shot (``{1: {"lr": 0.1, "steps": 10}}``),
            saved with the learner; see :meth:`test_time_settings`.
        task_batching: how :meth:`batch_query_logits` runs a batch of tasks: ``vmap``
            (together), ``loop`` (one after another) or ``auto`` (``vmap`` on a GPU, where
            it saves kernel launches; ``loop`` on a CPU, where vmapped per-task weights
            become grouped convolutions that measured about 2x slower here).
    """

    tunable: tuple[str, ...] = ()
    transductive: bool = False
    kind: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type["MetaLearner"]]] = {}

    def __init_subclass__(cls, kind: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if kind:
            cls.kind = kind
            MetaLearner._kinds[kind] = cls

    def __init__(self, input_spec: InputSpec | None = None):
        super().__init__()
        self.input_spec = input_spec
        self.test_time: dict[int, dict] = {}
        self.task_batching = "auto"
        if input_spec is not None:
            self.register_buffer("input_mean", torch.tensor(input_spec.mean), persistent=False)
            self.register_buffer("input_std", torch.tensor(input_spec.std), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` images in ``[0, 1]`` -> the network's input, differentiably.

        On a CPU the input is laid out channels-last, so that oneDNN runs the whole network
        channels-last: about twice as fast here, forward, and 1.4-1.7x forward and backward
        (the same numbers up to float rounding).  ``.to``, not ``.contiguous``: a one-channel
        image counts as channels-last in either layout, and only the explicit channels-last
        strides make the convolution take that path.
        """
        if self.input_spec is not None:
            x = prepare_input(x, self.input_spec.in_channels, self.input_spec.image_size, self.input_mean,
                              self.input_std)
        if x.ndim == 4 and x.device.type == "cpu":
            x = x.to(memory_format=torch.channels_last)
        return x

    def prepare_tasks(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`prepare` for ``[T, B, C, H, W]`` (T tasks' images at once)."""
        flat = self.prepare(x.flatten(0, 1))
        return flat.view(*x.shape[:2], *flat.shape[1:])

    @abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *,
              create_graph: bool = False, **test_time: Any) -> Any:
        """Support ``[N*K, C, H, W]`` in ``[0, 1]``, labels ``[N*K]`` -> adapted state.

        ``create_graph=True`` keeps the graph of the adaptation, so a loss on the
        adapted state differentiates through it (to the meta-parameters and to
        ``support_x``). ``test_time`` holds overrides of the :attr:`tunable` settings.
        """

    @abstractmethod
    def predict(self, adapted: Any, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, N]`` under the adapted state."""

    def adapt_task(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, query_x: torch.Tensor, *,
                   create_graph: bool = False, **test_time: Any) -> Any:
        """:meth:`adapt` for a task whose queries ``[B, C, H, W]`` are at hand: a :attr:`transductive` learner
        gets them (their images only), the others not."""
        extra = {"query_x": query_x} if self.transductive else {}
        return self.adapt(support_x, support_y, way, create_graph=create_graph, **extra, **test_time)

    def query_logits(self, episode: Episode) -> torch.Tensor:
        """Logits ``[N*Q, N]`` of the episode's queries after adapting on its support (the graph through
        the inner loop is kept whenever grad mode is on)."""
        adapted = self.adapt_task(episode.support_x, episode.support_y, episode.way, episode.query_x,
                                  create_graph=torch.is_grad_enabled())
        return self.predict(adapted, episode.query_x)

    def query_loss(self, logits: torch.Tensor, query_y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The outer loss of query logits ``[B, N]`` with labels ``[B]``: per query ``[B]`` (``reduction="none"``)
        or their mean.  Cross-entropy; a learner whose paper trains another loss (Relation Networks: squared
        error to the one-hot label) overrides this, and the outer step, the curriculum's adversarial term and
        :meth:`outer_loss` follow."""
        return nn.functional.cross_entropy(logits, query_y, reduction=reduction)

    def batch_query_logits(self, batch: TaskBatch, **test_time: Any) -> torch.Tensor:
        """Query logits ``[T, N*Q, N]`` of every task of ``batch`` after adapting on its own support (the
        graph through the inner loop is kept whenever grad mode is on).

        Learners that can adapt to the tasks together (MAML, ANIL, ProtoNet: ``vmap``
        over tasks, each task's BatchNorm on its own batch) do so when
        :attr:`task_batching` says so; otherwise the tasks are adapted one after
        another.  Either way the result is the per-task one (tests/test_meta.py); a
        random layer (Dropout) draws for each task apart either way, but not the same
        numbers.
        """
        if self.tasks_together(batch.support_x.device):
            return self._query_logits_together(batch, **test_time)
        create_graph = torch.is_grad_enabled()
        return torch.stack([self.predict(self.adapt_task(batch.support_x[t], batch.support_y, batch.way,
                                                         batch.query_x[t], create_graph=create_graph, **test_time),
                                         batch.query_x[t])
                            for t in range(len(batch))])

    def tasks_together(self, device: torch.device) -> bool:
        """Whether :meth:`batch_query_logits` adapts to a batch of tasks on ``device`` all at once."""
        can = type(self)._query_logits_together is not MetaLearner._query_logits_together
        mode = self.task_batching
        return can and (mode == "vmap" or (mode == "auto" and device.type == "cuda"))

    def _query_logits_together(self, batch: TaskBatch, **test_time: Any) -> torch.Tensor:
        """:meth:`batch_query_logits` for all tasks at once (learners that can override it)."""
        raise NotImplementedError

    @property
    def task_batching(self) -> str:
        return self._task_batching

    @task_batching.setter
    def task_batching(self, mode: str) -> None:
        if mode not in TASK_BATCHING:
            raise ValueError(f"task_batching must be one of {TASK_BATCHING}, got {mode!r}")
        self._task_batching = mode

    def outer_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss (:meth:`query_loss`) after adaptation, and query accuracy (a 0-dim tensor).

        Differentiable in the meta-parameters and in the episode's images (support
        through the inner loop) whenever grad mode is on, which the adversarial
        curriculum needs even while the learner is in eval mode.
        """
        logits = self.query_logits(episode)
        loss = self.query_loss(logits, episode.query_y)
        acc = (logits.argmax(-1) == episode.query_y).float().mean()
        return loss, acc.detach()

    def test_cost(self) -> dict:
        """What a test task needs: ``{"params": <weights used>, "models": <networks run>}``."""
        return {"params": sum(p.numel() for p in self.parameters()), "models": 1}

    def test_time_settings(self, shot: int) -> dict:
        """The ``adapt`` settings chosen on meta-val for ``shot``-shot tasks (those of the nearest shot
        chosen for, the smaller on a tie; ``{}`` if none were)."""
        if not self.test_time:
            return {}
        return dict(self.test_time[nearest_shot(self.test_time, shot)])

    # -- the model folder -------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in ``[0, 1]`` -> the meta-parameters' features ``[B, D]`` (before any
        adaptation; what zoo distillation shapes, see :class:`purer.distill.ZooDistillation`)."""
        raise NotImplementedError(f"{type(self).__name__} has no feature embedding")

    def _network(self) -> tuple[dict | None, int | None]:
        """The network's ``build_args`` (see :class:`~purer.zoo.Classifier`) and its head's outputs (``None``:
        no head); a saved folder records both."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved as a model folder")

    def _folder_config(self) -> dict:
        """The learner's own constructor settings for ``config.json`` (beyond network and input)."""
        return {}

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict) -> "MetaLearner":
        """A learner of this kind around ``network`` from its ``config.json`` (weights loaded afterwards)."""
        raise NotImplementedError

    def save_pretrained(self, path: str | os.PathLike, **info: Any) -> None:
        """Write the learner as a model folder: ``config.json`` + ``model.safetensors`` (nothing pickled).

        ``config.json`` holds the learner kind, its network (``arch``, ``arch_args``,
        ``way``: the head's outputs, ``null`` for ProtoNet, which takes any way), its input (``in_channels``, ``image_size``, ``mean``, ``std``), its own
        settings (e.g. the inner loop), :attr:`test_time` and the JSON values of ``info``
        (e.g. the meta-val selection).

        Raises:
            ValueError: the learner's network was not built by :func:`purer.zoo.build_model`.
        """
        build, way = self._network()
        if self.kind not in MetaLearner._kinds or build is None:
            raise ValueError(f"{type(self).__name__} over a hand-made network cannot be saved as a model folder; "
                             "build its network with purer.zoo.build_model (or purer.meta.random_model)")
        spec = self.input_spec
        config = {"learner": self.kind, "arch": build["arch"], "arch_args": build["arch_args"],
                  "way": way, "in_channels": build["in_channels"],
                  "image_size": build["image_size"], "mean": list(spec.mean) if spec else None,
                  "std": list(spec.std) if spec else None, **self._folder_config(),
                  "test_time": {str(k): v for k, v in sorted(self.test_time.items())}, **info}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        tmp = path / (CONFIG + ".tmp")
        tmp.write_text(json.dumps(config, indent=1))
        os.replace(tmp, path / CONFIG)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "MetaLearner":
        """The learner saved at ``path`` by :meth:`save_pretrained`, in eval mode, on ``device`` (the weights are
        read on the CPU and moved once, so a folder written on a GPU machine reads anywhere).

        Raises:
            ValueError: a missing, foreign or corrupt folder (one line naming it).
        """
        path = Path(path)
        try:
            c = json.loads((path / CONFIG).read_text())
            kind = MetaLearner._kinds[c["learner"]]
            network = build_model(c["arch"], c["way"] or 1, c["in_channels"], c["image_size"], c["arch_args"])
            spec = None if c["mean"] is None else InputSpec(c["in_channels"], c["image_size"], tuple(c["mean"]),
                                                            tuple(c["std"]))
            learner = kind._from_folder_config(network, spec, c)
            learner.load_state_dict(read_safetensors(path / WEIGHTS))
            learner.test_time = {int(k): dict(v) for k, v in c.get("test_time", {}).items()}
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:  # missing, foreign or corrupt files
            raise ValueError(f"cannot load a meta-learner from {path}: {' '.join(str(e).split())[:300]}") from None
        if not isinstance(learner, cls):
            raise ValueError(f"{path} holds a {type(learner).__name__}, not a {cls.__name__}")
        return learner.to(device).eval()
