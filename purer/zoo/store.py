"""The model zoo on disk: one directory per model plus a manifest.

Layout (Hugging Face style)::

    <zoo>/zoo.json                     {"format_version": 1, "models": [{"id", "arch", "class_ids", ...}],
                                        "pretrain": {the PretrainConfig its models were trained with}}
    <zoo>/<model_id>/model.safetensors the state dict of a :class:`~purer.zoo.Classifier`
    <zoo>/<model_id>/config.json       :meth:`ModelConfig.to_dict` with ``sha256`` of the weights

The manifest is the source of truth for which models a zoo holds. Every write
is atomic: model directories are written under hidden temporary names and
renamed into place, then ``zoo.json`` is replaced (temp file + ``os.replace``).
A killed writer therefore leaves the zoo as it was, plus every model whose
write finished (:meth:`Zoo.add_many` adds all its models or none). Files and
folders get the permissions the user's umask gives any new file (the temporary
names alone would make them private). Weights are only ever read with
safetensors; nothing is unpickled. Writers take the zoo's lock (:meth:`Zoo.writing`, a
``flock`` on the zoo's folder), so two processes that add to or pre-train one zoo take
turns; the second sees what the first wrote.

The default location of a named zoo is ``model_zoo/zoos/<name>`` in the
repository (``$PURER_ZOO_ROOT/<name>`` when that variable is set); any path works.

Example:
    >>> zoo = Zoo("/tmp/my-zoo", create=True)
    >>> zoo.add("conv4-000", model, ModelConfig("conv4", 5, list("abcde"), in_channels=1))
    >>> teachers = zoo.load_teachers()
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows has no flock: there the one-writer-at-a-time rule is the user's to keep
    fcntl = None

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .teacher import ModelConfig, Teacher

FORMAT_VERSION = 1
MANIFEST = "zoo.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TMP_PREFIX = ".tmp-"
_locked: set[tuple[Path, int]] = set()  # (zoo folder, thread) pairs inside a Zoo.writing block


def default_zoo_dir(name: str) -> Path:
    """Where the zoo called ``name`` lives unless a path is given.

    ``$PURER_ZOO_ROOT/<name>`` if set, else ``<repo>/model_zoo/zoos/<name>`` in a
    source checkout, else ``~/.cache/purer/zoos/<name>`` for an installed package.
    """
    if os.environ.get("PURER_ZOO_ROOT"):
        return Path(os.environ["PURER_ZOO_ROOT"]) / name
    repo = Path(__file__).resolve().parents[2]
    if (repo / "model_zoo").is_dir():
        return repo / "model_zoo" / "zoos" / name
    return Path.home() / ".cache" / "purer" / "zoos" / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     names: Mapping[str, str] | None = None) -> None:
    """Raise ValueError unless ``state`` has exactly ``model``'s tensor names and shapes.

    Args:
        names: ``{model's name: name in state}`` when ``state`` uses other names (a network's
            own library's, see :meth:`purer.zoo.Classifier.native_names`); default: the same names.

    The message names the architecture tried and the first missing and unexpected tensor
    (or the first with another shape, expected and found), so a user registering foreign
    weights sees what does not fit.
    """
    expected = {(names or {}).get(k, k): v for k, v in model.state_dict().items()}
    build = getattr(model, "build_args", None)
    arch = f"the architecture {build['arch']!r}" if build else "the architecture"
    if names:
        arch += " (its library's own tensor names)"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), first {missing[0]!r} "
                         f"(expected shape {list(expected[missing[0]].shape)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}")
        raise ValueError(f"{source}: weights do not fit {arch}: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {list(state[k].shape)}, "
                             f"{arch} expects {list(v.shape)}")


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer, whose running statistics R_bn inverts."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


NO_BN_WARNING = ("has no BatchNorm layer, so R_bn cannot shape its pseudo images: only the cross-entropy and the "
                 "image priors will")


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ValueError if a floating-point tensor of ``state`` holds NaN or Inf (a diverged training run):
    such a teacher classifies nothing and makes every loss built on it NaN."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{source}: tensor {k!r} holds NaN or Inf values (a diverged training?); "
                             "retrain or re-export the model")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or truncated file into a ValueError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); re-create or remove this model") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, directory: bool = False) -> None:
    """Give a ``tempfile`` file (0600) or folder (0700) the mode a plain new one gets under the user's umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json", dir=path.parent)
    try:
        _as_if_created(Path(tmp))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def validate_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _ID_PATTERN.fullmatch(model_id):
        raise ValueError(f"invalid model id {model_id!r}: use letters, digits, '.', '_' or '-' "
                         "(at most 128 characters, not starting with '.', '_' or '-')")
    return model_id


class Zoo:
    """A model zoo directory.

    Args:
        path: the zoo directory.
        create: make the directory and an empty manifest if they do not exist;
            otherwise a missing zoo is a FileNotFoundError.

    Raises:
        FileNotFoundError: ``path`` holds no ``zoo.json`` and ``create`` is False.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST
        if not self.manifest_path.exists():
            if not create:
                raise FileNotFoundError(
                    f"no model zoo at {self.path} (expected {self.manifest_path}); "
                    "build one with `purer-zoo pretrain` or `purer-zoo register`")
            if self.path.exists() and not self.path.is_dir():
                raise ValueError(f"zoo path {self.path} exists and is not a directory")
            if self.path.is_dir() and any(not p.name.startswith(".") for p in self.path.iterdir()):
                # Guards against turning an unrelated folder (a typo'd --zoo) into a zoo.
                raise ValueError(f"{self.path} is not empty and holds no {MANIFEST}; "
                                 "give a new or empty directory for the zoo")
            self.path.mkdir(parents=True, exist_ok=True)
            with self.writing():
                if not self.manifest_path.exists():  # another process may have made it meanwhile
                    self._write_manifest([])

    def __repr__(self) -> str:
        return f"Zoo({str(self.path)!r})"

    @contextlib.contextmanager
    def writing(self, on_wait: Callable[[str], None] = lambda msg: None) -> Iterator[None]:
        """Hold the zoo's writer lock for the block, waiting while another process holds it.

        Every method that changes the zoo takes it; hold it around a read-then-write of your own
        (as pre-training does) so no other process writes in between. Nested blocks in one process
        share the lock; other threads wait as other processes do. ``on_wait`` receives one line
        if the block has to wait.
        """
        key = (self.path.resolve(), threading.get_ident())
        if key in _locked:  # a nested block: the outer one holds the lock and releases it
            yield
            return
        folder = os.open(self.path, os.O_RDONLY) if fcntl is not None else None
        try:
            if folder is not None:
                try:
                    fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    on_wait(f"zoo {self.path} is being written by another process; waiting for it to finish")
                    fcntl.flock(folder, fcntl.LOCK_EX)
            _locked.add(key)
            try:
                yield
            finally:
                _locked.discard(key)
        finally:
            if folder is not None:
                os.close(folder)  # releases the flock

    # -- manifest -------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """The manifest entries, one dict per model, in insertion order."""
        data = read_json(self.manifest_path)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.manifest_path}: format_version {data.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}; this purer version cannot read it")
        models = data.get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in models):
            raise ValueError(f"{self.manifest_path}: 'models' must be a list of objects with an 'id'")
        return models

    def _write_manifest(self, models: list[dict], pretrain: dict | None = None) -> None:
        """Replace the manifest's models (and its pretraining spec, if given; else keep the recorded one)."""
        data = {"format_version": FORMAT_VERSION, "models": models}
        spec = pretrain if pretrain is not None else (self.pretrain_spec() if self.manifest_path.exists() else None)
        if spec is not None:
            data["pretrain"] = spec
        _write_json_atomic(self.manifest_path, data)

    def pretrain_spec(self) -> dict | None:
        """The settings ``purer-zoo pretrain`` (or the recipe) trained this zoo's models with, as recorded
        in ``zoo.json`` (``None``: a zoo of registered models, or one older than the record)."""
        spec = read_json(self.manifest_path).get("pretrain")
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"{self.manifest_path}: 'pretrain' must be an object")
        return spec

    def set_pretrain_spec(self, spec: dict) -> None:
        """Record the pretraining settings in ``zoo.json`` (see :func:`purer.zoo.pretrain.pretrain_zoo`)."""
        with self.writing():
            self._write_manifest(self.entries(), pretrain=spec)

    def ids(self) -> list[str]:
        return [m["id"] for m in self.entries()]

    def __contains__(self, model_id: str) -> bool:
        return model_id in self.ids()

    def __len__(self) -> int:
        return len(self.entries())

    def _require(self, model_id: str) -> Path:
        ids = self.ids()
        if model_id not in ids:
            raise KeyError(f"no model {model_id!r} in zoo {self.path}; it holds: {', '.join(ids) or 'nothing'}")
        return self.path / model_id

    # -- reading --------------------------------------------------------------------
    def config(self, model_id: str) -> ModelConfig:
        """The :class:`ModelConfig` of ``model_id`` (its ``config.json``)."""
        path = self._require(model_id) / CONFIG
        data = read_json(path)
        try:
            return ModelConfig.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid model config ({e})") from None

    def load_model(self, model_id: str, check_sha256: bool = True) -> tuple[nn.Module, ModelConfig]:
        """Build ``model_id``'s architecture and load its weights strictly.

        Raises:
            ValueError: corrupt weights, a checksum mismatch, or a tensor that does not
                fit the architecture (named, with expected and found shape).
        """
        cfg = self.config(model_id)
        weights = self.path / model_id / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        if check_sha256 and cfg.sha256 and sha256_file(weights) != cfg.sha256:
            raise ValueError(f"{weights}: sha256 does not match config.json; the file is corrupt or was replaced")
        state = read_safetensors(weights)
        try:
            model = cfg.build()
        except ValueError as e:  # an unknown or unimportable architecture, or arguments it does not take
            raise ValueError(f"model {model_id!r} of zoo {self.path}: {e}") from None
        check_state_dict(model, state, str(weights))
        check_finite(state, str(weights))
        model.load_state_dict(state, strict=True)
        return model.eval(), cfg

    def load_teacher(self, model_id: str) -> Teacher:
        """``model_id`` as an eval-mode :class:`Teacher` taking ``[B, C, H, W]`` images in ``[0, 1]``."""
        model, cfg = self.load_model(model_id)
        return Teacher(model, cfg, model_id)

    def load_teachers(self, ids: list[str] | None = None) -> list[Teacher]:
        """Teachers for ``ids`` (default: the whole zoo, in manifest order)."""
        return [self.load_teacher(i) for i in (self.ids() if ids is None else ids)]

    # -- writing --------------------------------------------------------------------
    def add(self, model_id: str, model: nn.Module, config: ModelConfig) -> ModelConfig:
        """Store ``model`` under ``model_id``; return the config as written (with ``sha256``).

        The weights must fit ``config.build()`` exactly. Writes the model directory
        under a temporary name, renames it into place, then replaces the manifest.

        Raises:
            ValueError: invalid or duplicate id, or weights that do not fit the config.
        """
        return self.add_many([(model_id, model, config)])[0]

    def add_many(self, models: Iterable[tuple[str, nn.Module, ModelConfig]]) -> list[ModelConfig]:
        """Store several models at once: all of them appear in the manifest, or none.

        Args:
            models: ``(model_id, model, config)`` triples; may be a generator that loads each
                model only when asked, so one model at a time is in memory.  An exception it
                raises (a bad checkpoint) leaves the zoo as it was.

        Returns:
            the configs as written (with ``sha256``), in order.

        Raises:
            ValueError: an invalid id, one already in the zoo or given twice, or weights that do
                not fit their config; nothing is added then.
        """
        with self.writing():
            entries = self.entries()
            taken = {m["id"] for m in entries}
            staged: list[tuple[Path, str, ModelConfig]] = []  # (temporary folder, id, config as written)
            placed: list[Path] = []
            try:
                for model_id, model, config in models:
                    validate_model_id(model_id)
                    if model_id in taken:
                        raise ValueError(f"model {model_id!r} is already in zoo {self.path}; remove it first or pick "
                                         "another id")
                    taken.add(model_id)
                    staged.append(self._stage(model_id, model, config))
                for tmp, model_id, _ in staged:
                    final = self.path / model_id
                    if final.exists():
                        # Not in the manifest, so it is the leftover of an add killed between the
                        # rename and the manifest write; the caller's model supersedes it.
                        shutil.rmtree(final)
                    os.replace(tmp, final)
                    placed.append(final)
            except BaseException:
                for folder in [tmp for tmp, _, _ in staged] + placed:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            # Killed before this replace, the zoo is as it was but for unlisted folders, which verify reports and
            # a later add of the same id replaces.
            self._write_manifest(entries + [_manifest_entry(model_id, config) for _, model_id, config in staged])
            return [config for _, _, config in staged]

    def _stage(self, model_id: str, model: nn.Module, config: ModelConfig) -> tuple[Path, str, ModelConfig]:
        """Write ``model``'s folder under a hidden temporary name; return it, the id and the config with ``sha256``."""
        # Cloning drops shared storage (safetensors refuses aliased tensors) and detaches.
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        check_state_dict(config.build(), state, f"model {model_id!r}")
        check_finite(state, f"model {model_id!r}")
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{model_id}-", dir=self.path))
        try:
            _as_if_created(tmp, directory=True)
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
            _as_if_created(tmp / WEIGHTS)  # safetensors writes its files 0600 whatever the umask
            config = dataclasses.replace(config, sha256=sha256_file(tmp / WEIGHTS))
            _write_json_atomic(tmp / CONFIG, config.to_dict())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, model_id, config

    def remove(self, model_id: str) -> None:
        """Drop ``model_id`` from the manifest, then delete its directory."""
        with self.writing():
            path = self._require(model_id)
            self._write_manifest([m for m in self.entries() if m["id"] != model_id])
            shutil.rmtree(path, ignore_errors=True)

    # -- integrity ------------------------------------------------------------------
    def verify(self, warn: Callable[[str], None] | None = None) -> list[str]:
        """Check every model; return one message per problem (empty: all good).

        Checks that files exist, JSON parses, configs agree with the manifest, the
        sha256 of each weights file matches, and the weights fit the architecture.
        Directories that the manifest does not list are reported too.  ``warn`` receives
        one line per model that loads but has no BatchNorm layer (R_bn cannot invert it).
        """
        try:
            entries = self.entries()
        except (OSError, ValueError) as e:
            return [str(e)]
        problems = []
        seen = set()
        for entry in entries:
            model_id = entry["id"]
            if model_id in seen:
                problems.append(f"{model_id}: listed twice in {self.manifest_path}")
                continue
            seen.add(model_id)
            try:
                cfg = self.config(model_id)
                for key in ("arch", "class_ids"):
                    if entry.get(key) != getattr(cfg, key):
                        raise ValueError(f"{key} in {self.manifest_path} differs from its config.json")
                weights = self.path / model_id / WEIGHTS
                if not weights.is_file():
                    raise FileNotFoundError(f"weights file not found: {weights}")
                digest = sha256_file(weights)
                if digest != cfg.sha256:
                    raise ValueError(f"{weights}: sha256 {digest[:12]}... does not match "
                                     f"config.json ({cfg.sha256[:12] or 'none'}...)")
                model, _ = self.load_model(model_id, check_sha256=False)
                if warn is not None and not has_batch_norm(model):
                    warn(f"{model_id} {NO_BN_WARNING}")
            except (OSError, ValueError) as e:
                problems.append(f"{model_id}: {e}")
        for child in sorted(self.path.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child.name not in seen:
                problems.append(f"{child.name}: directory {child} is not listed in {self.manifest_path} "
                                "(left by an interrupted write? delete it or register its weights)")
        return problems

    def describe(self, model_id: str) -> dict:
        """``config.json`` plus the model's path, weight-file size and parameter count (no weights loaded)."""
        cfg = self.config(model_id)
        weights = self.path / model_id / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        try:
            with safe_open(str(weights), framework="pt") as f:
                numel = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        except SafetensorError as e:
            raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
        return {"id": model_id, "path": str(self.path / model_id), "bytes": weights.stat().st_size,
                "tensor_elements": numel, **cfg.to_dict()}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _manifest_entry(model_id: str, cfg: ModelConfig) -> dict:
    entry = {"id": model_id, "arch": cfg.arch, "class_ids": list(cfg.class_ids), "dataset": cfg.dataset,
             "num_classes": cfg.num_classes, "in_channels": cfg.in_channels, "image_size": cfg.image_size,
             "sha256": cfg.sha256}
    if "heldout_acc" in cfg.metrics:
        entry["heldout_acc"] = cfg.metrics["heldout_acc"]
    return entry
