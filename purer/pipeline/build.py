"""Building a run's objects: the zoo's teachers, the pseudo-image bank and the meta-learner at its start."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch

from ..yaml_config import load_config
from ..baselines import teacher_scores
from ..data import ImageSet, TaskSpec
from ..meta import (ANIL, E3BM, MAML, MTL, MatchingNetwork, MetaLearner, ProtoNet, RelationNetwork,
                    TaskAdaptiveConfig, TaskAdaptiveMAML)
from ..meta.base import InputSpec
from ..meta.init import average_teachers, random_model, with_new_head
from ..inversion import PseudoBank
from ..zoo.architectures import Classifier
from ..zoo.pretrain import PretrainConfig, pretrain_zoo
from ..zoo.store import Zoo, default_zoo_dir
from ..zoo.teacher import Teacher
from .run_config import TASK_ADAPTIVE, MetaConfig, RunConfig, RunError, ZooConfig
from .distributed import Dist


def zoo_path(cfg: RunConfig) -> Path:
    z = cfg.zoo
    if z.path:
        return Path(z.path)
    if z.spec:
        return default_zoo_dir(Path(z.spec).stem)
    name = f"{cfg.data.dataset}-{z.arch}-{z.num_models}x{z.classes_per_model}-{z.subsets}-{cfg.data.image_size}px"
    # Every recipe field names the default directory, else a finished zoo built with other
    # epochs or another seed would be reused silently; defaults keep the short name.
    if z.epochs != ZooConfig.epochs:
        name += f"-{z.epochs}ep"
    if z.seed != ZooConfig.seed:
        name += f"-seed{z.seed}"
    return default_zoo_dir(name)


def check_zoo(cfg: RunConfig) -> PretrainConfig | None:
    """Decide from ``zoo.json`` alone (no data is read) what the run does with its zoo: the spec to pre-train it
    (or finish it) with, or ``None`` to use it as it is.

    A zoo of registered models (its ``zoo.json`` holds no pre-training record) is used as it
    is, whatever its size and class ids, and never written to; so is a pre-trained zoo holding
    models its spec would not train.  Otherwise the zoo this recipe's spec pre-trains is
    built when missing or finished when short, if ``zoo.build_if_missing`` allows.

    Raises:
        RunError: no zoo (or an empty one) and ``build_if_missing`` false; a pre-trained zoo holding
            fewer of its spec's models than asked for and ``build_if_missing`` false; an unreadable zoo.
    """
    path = zoo_path(cfg)
    z = cfg.zoo
    try:
        spec = load_config(PretrainConfig, z.spec) if z.spec else PretrainConfig(
            dataset=cfg.data.dataset, data_root=cfg.data.root, image_size=cfg.data.image_size,
            num_models=z.num_models, classes_per_model=z.classes_per_model, arch=z.arch, subsets=z.subsets,
            epochs=z.epochs, seed=z.seed)
        zoo = Zoo(path) if (path / "zoo.json").exists() else None
        present, recorded = (zoo.ids(), zoo.pretrain_spec()) if zoo is not None else ([], None)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"zoo at {path}: {e}") from None
    expected = [prefix + part.model_id(i) for prefix, part in spec.expanded() for i in range(part.num_models)]
    if present and (recorded is None or not set(present) <= set(expected)):
        return None  # registered models, or other models than this spec trains: the zoo as it is
    if len(present) >= len(expected):
        return None
    if not z.build_if_missing:
        if present:
            raise RunError(f"the zoo at {path} holds {len(present)} of the {len(expected)} models zoo.num_models "
                           f"asks for (an interrupted pre-training?); finish it with zoo.build_if_missing=true, or "
                           f"use it as it is with zoo.num_models={len(present)}")
        raise RunError(f"no model zoo at {path}" + (" (its zoo.json lists no models)" if zoo is not None else "")
                       + f"; build one with `purer-zoo pretrain --zoo {path}` or `purer-zoo register`, or set "
                         "zoo.build_if_missing=true")
    return spec


def load_zoo(cfg: RunConfig, dist: Dist, progress: bool) -> tuple[list[Teacher], ZooConfig]:
    """The zoo's teachers, kept in memory (pre-trained on first use when allowed, see :func:`check_zoo`), and
    ``cfg.zoo`` as used.

    The second value records what the run used rather than what it was told: the zoo's
    path, its number of models and, for a zoo the recipe (or ``purer-zoo pretrain``)
    built, the pretraining settings recorded in its ``zoo.json``; for a zoo of
    registered models, their common class count and architecture, and
    ``build_if_missing: false`` (the recipe never writes into such a zoo).
    """
    path = zoo_path(cfg)
    spec = check_zoo(cfg)
    if spec is not None:
        if dist.main:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small teachers train fastest on one thread each
            try:
                print(f"pre-training a {sum(p.num_models for _, p in spec.expanded())}-model zoo at {path} "
                      "(once; later runs reuse it)")
                pretrain_zoo(spec, Zoo(path, create=True), progress=progress, log=print, device=dist.device)
            except (FileNotFoundError, ValueError) as e:  # a zoo recipe the data cannot satisfy, or another spec
                raise RunError(f"cannot pre-train the zoo at {path}: {e}") from None
            finally:
                torch.set_num_threads(threads)
        dist.barrier()
    z = cfg.zoo
    try:
        zoo = Zoo(path)
        teachers, recorded = zoo.load_teachers(), zoo.pretrain_spec()
    except (FileNotFoundError, ValueError) as e:  # a corrupt or foreign zoo directory
        raise RunError(str(e)) from None
    used = dataclasses.replace(z, path=str(path), num_models=len(teachers))
    if recorded is not None:
        used = dataclasses.replace(used, **{k: recorded[k] for k in ("classes_per_model", "arch", "subsets", "epochs",
                                                                   "seed") if k in recorded})
    else:
        sizes, archs = {t.config.num_classes for t in teachers}, {t.config.arch for t in teachers}
        used = dataclasses.replace(used, build_if_missing=False,
                                   classes_per_model=sizes.pop() if len(sizes) == 1 else z.classes_per_model,
                                   arch=archs.pop() if len(archs) == 1 else z.arch)
    return teachers, used


def build_learner(cfg: RunConfig, teachers: Sequence[Teacher], channels: int, size: int,
                  start: Classifier | Teacher | None = None) -> MetaLearner:
    """The meta-learner of ``cfg.meta`` at its initialisation.

    ``start`` is the network an initialisation that needs the run's data starts from: the
    zoo's student (:func:`purer.student.zoo_student`) for ``init: zoo-student``, or the
    teacher :func:`best_start_teacher` picks for ``init: best-teacher`` (the learner then
    reads images as that teacher does).  The learner takes its encoder and a fresh
    ``way``-output head (ProtoNet, Matching and Relation Networks use the encoder only; MTL
    freezes it).  On a ``zoo-student`` ``--resume`` there is no student: a random model of
    the same shape stands in until the checkpoint's weights are loaded.
    """
    m = cfg.meta
    try:
        if m.init == "avg-teachers":
            model = average_teachers(teachers, m.way)
            spec = InputSpec.of(teachers[0].config)
        elif isinstance(start, Teacher):
            model = with_new_head(start.model, m.way, seed=cfg.seed)
            spec = InputSpec.of(start.config)
        elif start is not None:
            model = with_new_head(start, m.way, seed=cfg.seed)
            spec = InputSpec(channels, size)
        else:
            model = random_model(m.arch, m.way, channels, size, m.arch_args, seed=cfg.seed)
            spec = InputSpec(channels, size)
        return wrap_learner(m, model, spec, seed=cfg.seed)
    except ValueError as e:  # an unknown meta.arch or bad arch_args, a zoo that cannot be averaged, or a network
        # the learner cannot take (e.g. a Relation Network over an encoder without feature maps)
        raise RunError(f"meta (learner={m.learner}, init={m.init}, arch={m.arch}): {e}") from None


def best_start_teacher(m: MetaConfig, teachers: Sequence[Teacher], val_sets: dict[str, ImageSet],
                       val_tasks: dict[str, Sequence[TaskSpec]], channels: int, size: int,
                       autocast: torch.dtype | None = None) -> tuple[Teacher, float] | None:
    """``meta.init: best-teacher``'s start and its meta-val accuracy (percent): of the teachers the learner can
    be (``meta.arch`` with ``meta.arch_args``, ``channels`` x ``size`` inputs), the one whose features are best by
    nearest centroid on the run's meta-val tasks (the mean over datasets), as ``nc-best-teacher`` chooses.
    ``None`` when no teacher of the zoo has the learner's architecture and input (see :func:`teacher_kinds`): the
    learner then starts from random initialisation.

    Raises:
        RunError: no teacher fits a learner that freezes its start's encoder (MTL), which a random start cannot be.
    """
    try:
        want = _encoder_shapes(random_model(m.arch, m.way, channels, size, m.arch_args))
    except ValueError as e:  # an unknown meta.arch or bad arch_args
        raise RunError(f"meta (init={m.init}, arch={m.arch}): {e}") from None
    # The learner's network, whatever arguments spell it (a teacher's recorded width may be the default's).
    fits = [t for t in teachers
            if (t.config.arch, t.config.in_channels, t.config.image_size) == (m.arch, channels, size)
            and _encoder_shapes(t.model) == want]
    if not fits and m.freezes_encoder:
        raise RunError(f"meta.init=best-teacher: {m.learner} freezes a pre-trained encoder and no teacher is a "
                       f"{m.arch} (arch_args {m.arch_args}) on {channels}x{size}px images (the zoo has "
                       f"{teacher_kinds(teachers)}): set meta.arch to one of them, or meta.init=zoo-student")
    if not fits:
        return None
    per_set = [teacher_scores(fits, v, val_tasks[name], autocast) for name, v in val_sets.items()]
    scores = [sum(s) / len(s) for s in zip(*per_set)]
    i = max(range(len(fits)), key=scores.__getitem__)
    return fits[i], scores[i]


def teacher_kinds(teachers: Sequence[Teacher]) -> str:
    """The zoo's networks and inputs, e.g. ``conv4 1x32px, resnet10 1x32px`` (for messages)."""
    return ", ".join(sorted({f"{t.config.arch} {t.config.in_channels}x{t.config.image_size}px" for t in teachers}))


def _encoder_shapes(model: Classifier) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.encoder.state_dict().items()]


def wrap_learner(m: MetaConfig, model: Classifier, spec: InputSpec, seed: int) -> MetaLearner:
    """``model`` as the meta-learner ``m.learner`` (one of :data:`purer.pipeline.run_config.LEARNERS`) with the
    settings of its section of ``m``; the learner's own modules (L2F's, ALFA's and MeTAL's networks, the
    relation module, full context embeddings, E3BM's hyperpriors, MTL's head) drawn from ``seed``, so that a
    run is the same run in every process and every time (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _wrap(m, model, spec)


def _wrap(m: MetaConfig, model: Classifier, spec: InputSpec) -> MetaLearner:
    kind = m.learner
    if kind == "protonet":
        return ProtoNet(model, spec)
    if kind == "matching":
        return MatchingNetwork(model, spec, m.matching)
    if kind == "relation":
        return RelationNetwork(model, spec, m.relation)
    if kind == "mtl":
        return MTL(model, m.way, spec, m.mtl)
    if kind == "e3bm":
        return E3BM.over(model, m.way, spec, m.e3bm, maml=m.maml, mtl=m.mtl)
    if kind in TASK_ADAPTIVE:
        return TaskAdaptiveMAML(model, m.way, spec, m.maml, TaskAdaptiveConfig.member(kind))
    return (ANIL if kind == "anil" else MAML)(model, m.way, spec, m.maml)


def build_bank(cfg: RunConfig, teachers: Sequence[Teacher], channels: int,
               device: torch.device | str | None = None) -> PseudoBank:
    """The run's pseudo-image bank at its initialisation, on ``device``: each class in its teacher's input
    contract, pseudo episodes in the data's shape (``channels`` and ``data.image_size``)."""
    m = cfg.meta
    return PseudoBank(teachers, m.images_per_class or (m.shot + m.query), image_size=cfg.data.image_size,
                      channels=channels, merge_shared_classes=cfg.zoo.merge_shared_classes, seed=cfg.seed,
                      space=cfg.inversion.space, own_contract=len({(t.config.in_channels, t.config.image_size)
                                                                    for t in teachers}) > 1, device=device)


def load_meta_learner(path: str | os.PathLike) -> MetaLearner:
    """:meth:`MetaLearner.from_pretrained` for a run's ``<output_dir>/meta_learner``, a :class:`RunError` if it
    cannot be read."""
    try:
        return MetaLearner.from_pretrained(path)
    except ValueError as e:
        raise RunError(str(e)) from None
