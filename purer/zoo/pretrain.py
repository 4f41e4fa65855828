"""Pre-training a model zoo: teachers on class subsets of a dataset's meta-train split.

Protocol (METHOD.md, as in the PURER release): each teacher learns
``classes_per_model`` classes, trains on 80% of each class's images and keeps the
epoch that is best on the other 20%. Class subsets are consecutive blocks of one
seeded permutation (``disjoint``, the release's 13-teacher zoo) or seeded random
subsets that may overlap (``random``, the 100-teacher zoos of later papers).

Model ``i`` depends only on ``(seed, i)`` and the data, never on ``num_models``,
so a killed run resumes where it stopped and a larger zoo extends a smaller one.

Example:
    >>> cfg = PretrainConfig(dataset="glyphs", num_models=10, epochs=30)
    >>> pretrain_zoo(cfg, Zoo("/tmp/zoo10", create=True))
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn
from tqdm.auto import tqdm

from ..data.episodes import ImageSet
from .architectures import available, is_known
from .external import arch_slug, canonical_arch
from .store import Zoo
from .teacher import ModelConfig, prepare_input

SUBSET_MODES = ("disjoint", "random")
MIX = ("conv4", "resnet10", "resnet18")


@dataclass
class PretrainConfig:
    """How to pre-train a zoo (the keys of a ``model_zoo/specs/*.yaml`` file).

    Attributes:
        dataset: name given to :func:`purer.data.load_split` (meta-train split only).
        data_root: where the dataset lies (``None``: the dataset's default).
        image_size: side of the square training images; Conv4 at 32 px ends in
            2x2x32 = 128 features, at 28 px in only 32.
        num_models: teachers in the zoo.
        classes_per_model: classes each teacher learns (5 in the paper).
        arch: ``conv4`` | ``resnet10`` | ``resnet12`` | ``resnet18`` | ``tv:<name>`` |
            ``timm:<name>`` | a user's ``package.module:Name`` or ``path/to/file.py:Name`` (see
            :mod:`purer.zoo.architectures`), or ``mix`` to cycle through conv4, resnet10,
            resnet18 (the SH scenario).
        arch_args: architecture keyword arguments, for every model (e.g. ``{"width": 32}``).
        subsets: ``disjoint`` (blocks of a seeded class permutation, the last one smaller
            when the classes run out) or ``random`` (seeded subsets, overlaps allowed).
        epochs: training epochs; the epoch best on the held-out images is kept.
        batch_size, lr, weight_decay: Adam on the cross-entropy.
        heldout_fraction: share of each class's images held out to pick the epoch.
        max_shift, max_rotation, max_scale: light random affine augmentation
            (shift as a fraction of the side, degrees, +- relative scale); all 0 disables it.
        seed: seeds the subsets, the held-out split, initialisation and batching.
        parts: several zoos in one (the MH scenario: teachers of several datasets):
            each part is a mapping of the keys above that override this spec's (e.g.
            ``{dataset: icons, image_size: 40, num_models: 6}``); a part's model ids start
            with its dataset (``icons-conv4-000``).  Empty: one zoo of this spec.
    """

    dataset: str = "glyphs"
    data_root: str | None = None
    image_size: int = 32
    num_models: int = 13
    classes_per_model: int = 5
    arch: str = "conv4"
    arch_args: dict = field(default_factory=dict)
    subsets: str = "disjoint"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    heldout_fraction: float = 0.2
    max_shift: float = 0.08
    max_rotation: float = 10.0
    max_scale: float = 0.1
    seed: int = 0
    parts: list[dict] = field(default_factory=list)

    def __post_init__(self):
        for name in ("image_size", "num_models", "classes_per_model", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.subsets not in SUBSET_MODES:
            raise ValueError(f"subsets must be one of {SUBSET_MODES}, got {self.subsets!r}")
        if not (self.arch == "mix" or is_known(self.arch)):
            raise ValueError(f"unknown arch {self.arch!r}; use mix or one of {', '.join(available())}")
        self.arch = canonical_arch(self.arch)  # a file path as every process (and config.json) finds it
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if not (0 <= self.max_shift < 0.5 and 0 <= self.max_rotation <= 180 and 0 <= self.max_scale < 1):
            raise ValueError("augmentation needs 0 <= max_shift < 0.5, 0 <= max_rotation <= 180, 0 <= max_scale < 1")
        for part in self.parts:
            if not isinstance(part, dict) or "parts" in part:
                raise ValueError(f"each of parts must be a mapping of pretraining keys (no nested parts), got {part!r}")
            unknown = set(part) - {f.name for f in dataclasses.fields(self)}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} in a part of the zoo spec")
        datasets = [p.get("dataset", self.dataset) for p in self.parts]
        if len(set(datasets)) != len(datasets):
            raise ValueError(f"the parts of a zoo need distinct datasets (their model ids start with it), got {datasets}")

    def expanded(self) -> list[tuple[str, "PretrainConfig"]]:
        """``(model id prefix, spec)`` of each part (``[("", self)]`` for a zoo of one spec)."""
        if not self.parts:
            return [("", self)]
        return [(f"{p.get('dataset', self.dataset)}-", dataclasses.replace(self, parts=[], **p)) for p in self.parts]

    def arch_of(self, i: int) -> str:
        """The architecture of model ``i``."""
        return MIX[i % len(MIX)] if self.arch == "mix" else self.arch

    def model_id(self, i: int) -> str:
        return f"{arch_slug(self.arch_of(i))}-{i:03d}"


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def class_subsets(num_classes: int, num_models: int, classes_per_model: int, mode: str, seed: int) -> list[list[int]]:
    """Class indices of each model, ``[num_models][classes_per_model]``, each sorted.

    ``disjoint``: consecutive blocks of one seeded permutation; the last block may be smaller
    when the classes run out (13 models of 5 on 64 classes: the last has 4, as in the release).

    Raises:
        ValueError: fewer classes than one subset needs, or (``disjoint``) too few for the last model to get one.
    """
    if classes_per_model > num_classes:
        raise ValueError(f"{classes_per_model} classes per model but the data has only {num_classes} classes")
    if mode == "disjoint":
        if (num_models - 1) * classes_per_model >= num_classes:
            raise ValueError(f"{num_models} disjoint models x {classes_per_model} classes need "
                             f"{num_models * classes_per_model} classes (more than "
                             f"{(num_models - 1) * classes_per_model} with a smaller last model), the data has "
                             f"{num_classes}; use fewer models or --subsets random")
        # The last block keeps the classes left when fewer than classes_per_model remain: the release's 13th
        # CIFAR-FS / MiniImageNet teacher knows 4 of the 64 meta-train classes.
        perm = _rng(seed, 0).permutation(num_classes)
        return [sorted(perm[i * classes_per_model:(i + 1) * classes_per_model].tolist()) for i in range(num_models)]
    if mode == "random":
        return [sorted(_rng(seed, 1, i).choice(num_classes, classes_per_model, replace=False).tolist())
                for i in range(num_models)]
    raise ValueError(f"unknown subset mode {mode!r}; expected one of {SUBSET_MODES}")


def heldout_split(data: ImageSet, classes: list[int], fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each class's images ``1 - fraction`` / ``fraction``, seeded per class.

    Returns:
        ``train_idx [M1]``, ``train_y [M1]``, ``heldout_idx [M2]``, ``heldout_y [M2]``:
        indices into ``data.images`` and local labels ``0..len(classes)-1``.
    """
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for label, c in enumerate(classes):
        members = data.members(c)
        n = len(members)
        if n < 2:
            raise ValueError(f"class {data.class_names[c]!r} of {data.name or 'the data'} has {n} image(s); "
                             "need at least 2 to hold one out")
        n_held = min(n - 1, max(1, round(n * fraction)))
        perm = torch.from_numpy(_rng(seed, 2, c).permutation(n))
        held, train = members[perm[:n_held]], members[perm[n_held:]]
        parts[0].append(train)
        parts[1].append(torch.full((len(train),), label))
        parts[2].append(held)
        parts[3].append(torch.full((len(held),), label))
    return tuple(torch.cat(p) for p in parts)  # type: ignore[return-value]


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``[M, C, H, W]`` images."""
    mean = reduce(x, "m c h w -> c", "mean")
    std = reduce((x - mean.view(1, -1, 1, 1)) ** 2, "m c h w -> c", "mean").sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def _augmenter(cfg: PretrainConfig) -> nn.Module:
    if cfg.max_shift == cfg.max_rotation == cfg.max_scale == 0:
        return nn.Identity()
    # Border padding keeps the background colour whatever it is (ink on paper or the reverse).
    return K.RandomAffine(degrees=cfg.max_rotation, translate=(cfg.max_shift, cfg.max_shift),
                          scale=(1 - cfg.max_scale, 1 + cfg.max_scale), padding_mode="border", p=1.0)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             batch_size: int = 256) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` (eval mode) on ``[M, C, H, W]`` images in ``[0, 1]``."""
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(prepare_input(xb, xb.shape[1], xb.shape[-1], mean, std))
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


def train_teacher(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, heldout_x: torch.Tensor,
                  heldout_y: torch.Tensor, mean: list[float], std: list[float], cfg: PretrainConfig,
                  desc: str = "", progress: bool = True) -> dict:
    """Train ``model`` in place with Adam; leave it at its best held-out epoch.

    Runs on the device of ``model`` and the images (one device for all).

    Args:
        train_x, heldout_x: ``[M, C, H, W]`` float images in ``[0, 1]``.
        train_y, heldout_y: ``[M]`` int64 labels.
        mean, std: per-channel normalisation, applied after augmentation.

    Returns:
        metrics ``{"heldout_acc", "heldout_loss", "best_epoch", "epochs", "train_images",
        "heldout_images", "seconds"}`` (best epoch by accuracy, ties broken by loss; 1-based).
    """
    start = time.perf_counter()
    device = train_x.device
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    augment = _augmenter(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (-1.0, float("inf"))
    best_state, best_epoch = None, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=True)
    for epoch in bar:
        model.train()
        # The batching draws from the CPU generator, so the order is the same on every device.
        for batch in torch.randperm(len(train_y)).to(device).split(cfg.batch_size):
            if len(batch) < 2:  # BatchNorm cannot train on a single image
                continue
            x = prepare_input(augment(train_x[batch]), train_x.shape[1], train_x.shape[-1], mean_t, std_t)
            loss = F.cross_entropy(model(x), train_y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc, held_loss = evaluate(model, heldout_x, heldout_y, mean_t, std_t)
        if (acc, -held_loss) > (best[0], -best[1]):
            best, best_epoch = (acc, held_loss), epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(heldout_acc=f"{acc:.3f}", best=f"{best[0]:.3f}")
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return {"heldout_acc": best[0], "heldout_loss": best[1], "best_epoch": best_epoch, "epochs": cfg.epochs,
            "train_images": len(train_y), "heldout_images": len(heldout_y),
            "seconds": round(time.perf_counter() - start, 2)}


def pretrain_teacher(data: ImageSet, classes: list[int], i: int, cfg: PretrainConfig,
                     progress: bool = True) -> tuple[nn.Module, ModelConfig]:
    """Train model ``i`` of the zoo on ``classes`` of ``data`` (on ``data``'s device); return it with its config."""
    train_idx, train_y, held_idx, held_y = heldout_split(data, classes, cfg.heldout_fraction, cfg.seed)
    dev = data.device
    train_x, held_x = data.float_images(train_idx.to(dev)), data.float_images(held_idx.to(dev))
    train_y, held_y = train_y.to(dev), held_y.to(dev)
    mean, std = channel_stats(train_x)
    channels, size = data.image_shape[0], data.image_shape[-1]
    # Initialisation, batching and augmentation draw from torch's global RNG; forking it
    # makes model i reproducible on its own (resume) without disturbing the caller's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_rng(cfg.seed, 3, i).integers(2 ** 62)))
        config = ModelConfig(arch=cfg.arch_of(i), num_classes=len(classes),
                             class_ids=[data.class_names[c] for c in classes], in_channels=channels,
                             image_size=size, mean=mean, std=std, dataset=cfg.dataset, arch_args=dict(cfg.arch_args))
        model = config.build().to(dev)
        config.metrics = train_teacher(model, train_x, train_y, held_x, held_y, mean, std, cfg,
                                       desc=cfg.model_id(i), progress=progress)
    return model, config


def zoo_spec(cfg: PretrainConfig) -> dict:
    """What ``zoo.json`` records of ``cfg``: every setting a model depends on (``data_root`` only says where
    the data lies), and ``num_models``, how many models the zoo is meant to hold (for a zoo of several
    parts, the sum over parts)."""
    spec = dataclasses.asdict(cfg)
    del spec["data_root"]
    spec["parts"] = [{k: v for k, v in p.items() if k != "data_root"} for p in cfg.parts]
    if cfg.parts:
        spec["num_models"] = sum(part.num_models for _, part in cfg.expanded())
    return spec


def pretrain_zoo(cfg: PretrainConfig, zoo: Zoo, data: ImageSet | None = None, progress: bool = True,
                 log: Callable[[str], None] = lambda msg: None, device: torch.device | str = "cpu") -> list[str]:
    """Pre-train the zoo ``cfg`` describes into ``zoo`` on ``device``, adding each model as soon as it is trained.

    Models already in ``zoo`` (same id, same architecture and classes) are skipped, so an
    interrupted run resumes. The zoo's writer lock is held throughout: a second process
    pre-training the same zoo waits for this one, then skips the models it added.

    Args:
        cfg: the zoo to build.
        zoo: where to store it.
        data: the meta-train images; default ``load_split(cfg.dataset, "train", cfg.data_root, cfg.image_size)``.
        progress: show a tqdm bar per model.
        log: receives one line per skipped or finished model, and one if another process holds the zoo.
        device: where to train (the images are moved there once).

    Returns:
        the ids of the zoo's ``cfg.num_models`` models, trained now or before.

    Raises:
        ValueError: the data has too few classes or images, the zoo's recorded spec
            (``zoo.json``'s ``pretrain``, written here) differs from ``cfg`` in anything but
            ``num_models``, the zoo holds models but no record (registered ones: such a zoo
            never gets one), or a model with the same id but other classes or architecture.
    """
    with zoo.writing(on_wait=log):  # a second run building this zoo waits, then skips what the first added
        spec, recorded = zoo_spec(cfg), zoo.pretrain_spec()
        if recorded is None and zoo.ids():
            raise ValueError(f"zoo {zoo.path} holds models it has no pre-training record of (registered ones, or "
                             "pre-trained before zoo.json recorded its settings); it is used as it is, never trained "
                             "into: pre-train into another directory")
        if recorded is not None:
            differ = [k for k in spec if k != "num_models" and recorded.get(k) != spec[k]]
            if differ:
                raise ValueError(f"zoo {zoo.path} was pre-trained with "
                                 f"{', '.join(f'{k}={recorded.get(k)!r}' for k in differ)}, not "
                                 f"{', '.join(f'{k}={spec[k]!r}' for k in differ)}; finish it with its own settings or "
                                 "use another zoo directory")
        # Recorded before the first model trains, so a zoo killed half-way says how many models it was meant to hold.
        zoo.set_pretrain_spec({**spec, "num_models": max(spec["num_models"], (recorded or {}).get("num_models", 0))})
        if cfg.parts and data is not None:
            raise ValueError("a zoo of several parts loads each part's data itself; pass no data")
        ids = []
        for prefix, part in cfg.expanded():
            ids += _pretrain_part(part, prefix, zoo, data, progress, log, device)
        return ids


def _pretrain_part(cfg: PretrainConfig, prefix: str, zoo: Zoo, data: ImageSet | None, progress: bool,
                   log: Callable[[str], None], device: torch.device | str) -> list[str]:
    """:func:`pretrain_zoo` of one part (one dataset): its models, ids starting with ``prefix``."""
    if data is None:
        from ..data import load_split

        data = load_split(cfg.dataset, "train", cfg.data_root, cfg.image_size)
    c, h, w = data.image_shape
    if h != w or h != cfg.image_size:
        raise ValueError(f"data images are {h}x{w} but image_size is {cfg.image_size}; load them at that size")
    data = data.to(device)
    subsets = class_subsets(len(data.class_names), cfg.num_models, cfg.classes_per_model, cfg.subsets, cfg.seed)
    present = set(zoo.ids())
    ids = []
    for i, classes in enumerate(subsets):
        model_id = prefix + cfg.model_id(i)
        ids.append(model_id)
        class_ids = [data.class_names[c] for c in classes]
        if model_id in present:
            old = zoo.config(model_id)
            if old.arch != cfg.arch_of(i) or old.class_ids != class_ids:
                raise ValueError(f"zoo {zoo.path} already holds {model_id!r} with arch {old.arch} and classes "
                                 f"{old.class_ids}, not {cfg.arch_of(i)} on {class_ids}; "
                                 "use another zoo directory for a different spec or seed")
            log(f"{model_id}: already in {zoo.path}, skipped")
            continue
        model, config = pretrain_teacher(data, classes, i, cfg, progress)
        zoo.add(model_id, model, config)
        m = config.metrics
        log(f"{model_id}: held-out accuracy {m['heldout_acc']:.3f} (epoch {m['best_epoch']}/{m['epochs']}, "
            f"{m['seconds']:.1f}s)")
    return ids
