"""Registering the checkpoints people already have: one file or folder, or many from a manifest.

A model to register is a :class:`ModelSource`: a weights file (``.safetensors``, or a
torch state dict ``.pth`` / ``.pt`` / ``.bin`` read with ``weights_only=True``) or a
model folder, and what is known of it (architecture, class ids, input contract).
A folder brings its own ``config.json``:

- purer's (``{"arch", "class_ids", "mean", "std", ...}``, e.g. a model folder of
  another zoo) with ``model.safetensors``;
- timm's Hugging Face export (``{"architecture", "num_classes", "pretrained_cfg":
  {"mean", "std", "input_size", ...}, "label_names"}``, as ``timm.models.save_for_hf``
  writes it) with ``model.safetensors`` or ``pytorch_model.bin``.

Values given explicitly win over the folder's.  Then, for each field:

- ``arch``, ``class_ids``: required (given, or from the folder);
- ``in_channels``: read from the weights (the first convolution) unless given; given and
  different is an error;
- ``mean`` / ``std``: given, or the folder's, or for ``timm:`` architectures timm's
  data config; otherwise refused (a teacher fed inputs of the wrong normalisation
  makes every inversion against it quietly wrong; ``--mean 0 --std 1`` states "none");
- ``image_size``: given, or the folder's, or timm's pretrained config; otherwise refused.

Tensor names may be purer's own (``encoder.*`` / ``head.*``) or, for ``tv:``, ``timm:``
and a user's class, the library's own (``conv1.*`` / ``fc.*``, see
:meth:`purer.zoo.Classifier.native_names`).

A manifest (``models.csv``, or ``.yaml`` / ``.yml``) lists one model per row with the
keys of :class:`ModelSource` (``file`` required; relative paths are relative to the
manifest's folder).  :func:`register_models` registers all rows or none.

Example:
    >>> sources = read_manifest("models.csv")            # doctest: +SKIP
    >>> register_models(Path("my_zoo"), sources, log=print, warn=print)  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from torch import nn

from .architectures import Classifier, build_model, is_known
from .external import canonical_arch, timm_defaults
from .store import (CONFIG, MANIFEST, NO_BN_WARNING, WEIGHTS, Zoo, check_finite, check_state_dict, has_batch_norm,
                    read_json, read_safetensors, validate_model_id)
from .teacher import ModelConfig

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
MANIFEST_FIELDS = ("file", "id", "arch", "arch_args", "class_ids", "in_channels", "image_size", "mean", "std",
                   "dataset")
NORMALISATION_HINT = ("state the normalisation it was trained with: --mean/--std (the manifest's mean and std "
                      "columns), e.g. 0.485,0.456,0.406 and 0.229,0.224,0.225, or 0 and 1 for none")


@dataclass
class ModelSource:
    """One model to register: a weights file or model folder and what is known of it (``None``: not given).

    Attributes:
        file: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, or a model folder.
        id: its id in the zoo (default: the file's name without extension, or the folder's name).
        arch, arch_args: the architecture (see :func:`purer.zoo.build_model`) and its arguments.
        class_ids: the global name of each output class, in output order.
        in_channels, image_size: the input it was trained on.
        mean, std: the per-channel normalisation of ``[0, 1]`` images it was trained with.
        dataset: where its training data came from.
        label: how errors name this model (e.g. ``"models.csv row 3"``).
    """

    file: Path
    id: str | None = None
    arch: str | None = None
    arch_args: dict | None = None
    class_ids: list[str] | None = None
    in_channels: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    dataset: str | None = None
    label: str = ""


@dataclass
class Plan:
    """A :class:`ModelSource` with every value settled but ``in_channels`` (which the weights may tell).

    Attributes:
        notes: where values came from, when not given (e.g. ``"mean/std from timm's data config"``).
    """

    source: ModelSource
    model_id: str
    weights: Path
    config: ModelConfig
    channels_given: bool
    metrics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as ``{name: tensor}``: safetensors, or a torch state dict read with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, or a torch file holding anything but one flat state dict (one line).
    """
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format; give a .safetensors file, a torch state dict "
                         f"({', '.join(TORCH_SUFFIXES)}) or a model folder")
    try:
        with warnings.catch_warnings():
            # torch warns (two lines) about pickle protocols before refusing a file; purer's one line says it all.
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a malformed file fails inside the unpickler in many ways, all the file's fault
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it: not a torch file, or it holds "
                         "objects other than tensors; save model.state_dict() (or use safetensors)") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        keys = list(state)[:5] if isinstance(state, dict) else []
        raise ValueError(f"{path}: expected a state dict (tensor name -> tensor), found {type(state).__name__}"
                         + (f" with keys {keys}; save model.state_dict() itself" if keys else ""))
    return state


def fit_state_dict(model: Classifier, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` under ``model``'s own tensor names, from purer's names or the network's library's own.

    Raises:
        ValueError: the tensors fit neither (one line naming the architecture and the first
            missing and unexpected tensors in the names closest to ``state``'s, or the first
            tensor of another shape).
    """
    native = model.native_names()
    ours = set(model.state_dict())
    if native and len(set(state) & set(native.values())) >= len(set(state) & ours):
        check_state_dict(model, state, source, names=native)
        return {k: state[n] for k, n in native.items()}
    check_state_dict(model, state, source)
    return state


def _first_conv(model: Classifier) -> str | None:
    """The state-dict name of the weight of ``model``'s first convolution (the one that takes the image)."""
    for name, module in model.encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"encoder.{name}.weight"
    return None


def _channels_in(model: Classifier, state: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """``(name, channels)`` of the first convolution's weight in ``state`` (in ``state``'s own names), if there."""
    key = _first_conv(model)
    if key is None:
        return None
    for name in (key, (model.native_names() or {}).get(key)):
        if name in state and state[name].ndim == 4:
            return name, int(state[name].shape[1])
    return None


# -------------------------------------------------------------------------------------- folders

def _folder_config(folder: Path) -> tuple[dict, Path, str]:
    """``(values, weights file, kind)`` of a model folder; values use :class:`ModelSource`'s field names."""
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is a folder without {CONFIG}; give a weights file or a model folder "
                                f"({CONFIG} + {WEIGHTS})")
    data = read_json(path)
    if "arch" in data:
        try:
            cfg = ModelConfig.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid purer model config ({e})") from None
        # Only what the file says: a key it leaves out is not given (ModelConfig's defaults would be silent).
        values = {k: getattr(cfg, k) for k in ("arch", "arch_args", "class_ids", "in_channels", "image_size", "mean",
                                               "std", "dataset", "metrics") if k in data}
        return values, folder / WEIGHTS, "purer"
    if "architecture" in data:
        return _timm_folder(folder, data, path)
    raise ValueError(f"{path}: neither purer's model config (arch, class_ids, ...) nor timm's "
                     "(architecture, pretrained_cfg); other folders (e.g. transformers' *ForImageClassification) "
                     "cannot be imported: export the model's state dict and name its architecture")


def _timm_folder(folder: Path, data: dict, path: Path) -> tuple[dict, Path, str]:
    pretrained = data.get("pretrained_cfg") or {}
    args = dict(data.get("model_args") or {})
    values: dict[str, Any] = {"arch": f"timm:{data['architecture']}"}
    if "in_chans" in args:
        values["in_channels"] = int(args.pop("in_chans"))
    args.pop("num_classes", None)
    values["arch_args"] = args
    labels = data.get("label_names") or pretrained.get("label_names")
    if isinstance(labels, dict):
        labels = [labels[k] for k in sorted(labels, key=int)]
    if labels:
        values["class_ids"] = [str(c) for c in labels]
    if "mean" in pretrained and "std" in pretrained:
        values["mean"], values["std"] = list(pretrained["mean"]), list(pretrained["std"])
    if pretrained.get("input_size"):
        values["image_size"] = int(pretrained["input_size"][-1])
    for name in (WEIGHTS, "pytorch_model.bin"):
        if (folder / name).is_file():
            return values, folder / name, "timm"
    raise FileNotFoundError(f"{folder}: timm's {CONFIG} but no weights ({WEIGHTS} or pytorch_model.bin)")


# -------------------------------------------------------------------------------------- settling values

def plan(source: ModelSource) -> Plan:
    """Settle every value of ``source`` without reading its weights (see the module docstring for the rules).

    Raises:
        FileNotFoundError, ValueError: a missing file, an unknown architecture, missing class ids, mean/std
            or image size, or values that contradict each other (one line each).
    """
    file = source.file
    given = {f.name: getattr(source, f.name) for f in dataclasses.fields(source)
             if f.name not in ("file", "id", "label") and getattr(source, f.name) is not None}
    folder: dict = {}
    kind = ""
    if file.is_dir():
        folder, weights, kind = _folder_config(file)
        model_id = source.id or file.name
    else:
        if not file.is_file():
            raise FileNotFoundError(f"weights file not found: {file}")
        weights = file
        model_id = source.id or file.name.split(".")[0]
    try:
        validate_model_id(model_id)
    except ValueError as e:
        raise ValueError(f"{e}; pass --id (the manifest's id column)" if source.id is None else str(e)) from None
    values = {**{k: v for k, v in folder.items() if k != "metrics"}, **given}
    notes = [f"{what} from its {CONFIG}" for k, what in (("class_ids", "class ids"), ("mean", "mean/std"),
                                                          ("image_size", "image size"))
             if k in folder and k not in given]
    arch = values.get("arch")
    if not arch:
        raise ValueError(f"{file}: no architecture given; state --arch (the manifest's arch column), e.g. "
                         "tv:resnet18, timm:resnet18, resnet12 or mypkg.nets:MyNet")
    if not is_known(arch):
        raise ValueError(f"{file}: unknown architecture {arch!r}; use conv4, resnet10, resnet12, resnet18, "
                         "tv:<torchvision name>, timm:<timm name> or package.module:Class / path/to/file.py:Class")
    values["arch"] = canonical_arch(arch)
    if not values.get("class_ids"):
        raise ValueError(f"{file}: no class ids; state --class-ids (the manifest's class_ids column): the global "
                         "name of each output, in output order")
    normalisation_given = bool({"mean", "std"} & set(values))  # one of them given alone is an error below
    if arch.startswith("timm:") and not (normalisation_given and "image_size" in values):
        defaults = timm_defaults(arch[5:])
        if not normalisation_given:
            values["mean"], values["std"] = defaults["mean"], defaults["std"]
            notes.append(f"mean/std from timm's data config ({values['mean']}, {values['std']})")
        if "image_size" not in values:
            values["image_size"] = defaults["image_size"]
            notes.append(f"image size from timm's pretrained config ({values['image_size']})")
    if "mean" not in values or "std" not in values:
        missing = "mean and std" if "mean" not in values and "std" not in values else \
            ("mean" if "mean" not in values else "std")
        raise ValueError(f"{file}: no {missing}, and {arch} checkpoints do not carry them; {NORMALISATION_HINT}")
    if "image_size" not in values:
        raise ValueError(f"{file}: no image size; state --image-size (the manifest's image_size column): the side "
                         "of the square images it was trained on")
    channels = values.get("in_channels")
    try:
        config = ModelConfig(arch=values["arch"], num_classes=len(values["class_ids"]),
                             class_ids=list(values["class_ids"]), in_channels=channels or len(values["mean"]),
                             image_size=int(values["image_size"]), mean=list(values["mean"]),
                             std=list(values["std"]), dataset=values.get("dataset") or "",
                             arch_args=dict(values.get("arch_args") or {}))
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return Plan(source, model_id, weights, config, channels_given="in_channels" in values,
                metrics=dict(folder.get("metrics") or {}), notes=notes + ([f"a {kind} model folder"] if kind else []))


def load(p: Plan) -> tuple[Classifier, ModelConfig]:
    """Read ``p``'s weights into its architecture; settle ``in_channels`` from them unless given.

    Raises:
        ValueError: unreadable weights, a channel count other than the one given, tensors that fit
            neither purer's names nor the library's own, or NaN / Inf values (one line each).
    """
    state = read_state_dict(p.weights)
    config = p.config
    source = str(p.weights)
    model = config.build()
    found = _channels_in(model, state)
    if found is None and not p.channels_given and _first_conv(model) is None:
        raise ValueError(f"{source}: no convolution tells its input channels; state in_channels (--in-channels, "
                         "the manifest's in_channels column)")
    if found is not None and not p.channels_given:
        name, channels = found
        if len(config.mean) not in (1, channels):
            raise ValueError(f"{source}: its first convolution {name!r} takes {channels} input channel(s), but "
                             f"mean/std have {len(config.mean)} values; state {channels} (or 1) of each")
        if channels != config.in_channels:
            config = dataclasses.replace(config, in_channels=channels)
            model = config.build()
        p.notes.append(f"in_channels read from {name!r}")
    elif found is not None and found[1] != config.in_channels:
        name, channels = found
        raise ValueError(f"{source}: its first convolution {name!r} takes {channels} input channel(s), not the "
                         f"{config.in_channels} stated; state in_channels={channels} (or leave it out: the "
                         "weights tell)")
    state = fit_state_dict(model, state, source)
    check_finite(state, source)
    model.load_state_dict(state, strict=True)
    return model.eval(), dataclasses.replace(config, metrics=p.metrics)


def register_models(zoo_path: Path, sources: list[ModelSource], log: Callable[[str], None],
                    warn: Callable[[str], None]) -> list[str]:
    """Register every model of ``sources`` into the zoo at ``zoo_path`` (created if missing): all or none.

    Every source is settled (:func:`plan`) before any weights are read; then each is read
    (:func:`load`) and written in turn; the manifest lists them only once all are written.
    ``log`` gets one line per model registered, saying where values not given came from;
    ``warn`` one line per model without BatchNorm.

    Returns:
        the ids registered, in order.

    Raises:
        FileNotFoundError, ValueError: the first bad source, named by its label; nothing is registered then.
    """
    plans = []
    for s in sources:
        try:
            plans.append(plan(s))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{s.label}: {e}" if s.label else str(e)) from None
    seen: dict[str, Plan] = {}
    for p in plans:
        if p.model_id in seen:
            raise ValueError(f"{p.source.label or p.source.file}: id {p.model_id!r} is already the id of "
                             f"{seen[p.model_id].source.label or seen[p.model_id].source.file}; give each model "
                             "its own id (the manifest's id column)")
        seen[p.model_id] = p
    ids = list(seen)
    existed, folder_existed = (zoo_path / MANIFEST).exists(), zoo_path.exists()
    if existed:
        present = set(Zoo(zoo_path).ids())
        for p in plans:
            if p.model_id in present:
                raise ValueError(f"{p.source.label + ': ' if p.source.label else ''}model {p.model_id!r} is already "
                                 f"in zoo {zoo_path}; pass another id (--id, the manifest's id column)")
    zoo = Zoo(zoo_path, create=True)
    done: list[tuple[Plan, ModelConfig]] = []

    def loaded() -> Iterator[tuple[str, nn.Module, ModelConfig]]:
        for p in plans:
            try:
                model, config = load(p)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{p.source.label}: {e}" if p.source.label else str(e)) from None
            done.append((p, config))
            if not has_batch_norm(model):
                warn(f"{p.model_id} {NO_BN_WARNING}")
            yield p.model_id, model, config

    try:
        zoo.add_many(loaded())
    except BaseException:
        if not existed:  # the zoo was made for these models: leave nothing behind
            (zoo_path / MANIFEST).unlink(missing_ok=True)
            if not folder_existed:
                shutil.rmtree(zoo_path, ignore_errors=True)
        raise
    for p, config in done:
        log(f"registered {p.model_id} in {zoo.path}: {config.arch}, {config.in_channels}x{config.image_size}x"
            f"{config.image_size}, {config.num_classes} classes" + (f" ({'; '.join(p.notes)})" if p.notes else ""))
    return ids


# -------------------------------------------------------------------------------------- manifests

def read_manifest(path: Path) -> list[ModelSource]:
    """The rows of a ``.csv`` (header: :data:`MANIFEST_FIELDS`, any subset with ``file``) or ``.yaml`` manifest
    (a list of mappings, or ``{models: [...]}``) as :class:`ModelSource`, labelled ``"<file> row <n>"``.

    In CSV, list values are comma-separated inside one cell (``"cat,dog,fox"``), ``arch_args`` is JSON, an
    empty cell is "not given".

    Raises:
        FileNotFoundError, ValueError: no such file, unknown columns, or a bad value (naming the row).
    """
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            unknown = sorted(set(reader.fieldnames or []) - set(MANIFEST_FIELDS))
            if unknown or "file" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: the header must name 'file' and any of {', '.join(MANIFEST_FIELDS[1:])}"
                                 + (f"; unknown column(s) {unknown}" if unknown else ""))
            rows = [{k: v for k, v in r.items() if v is not None and v.strip() != ""} for r in reader]
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        rows = data.get("models") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected a list of models (mappings with a 'file' key), or 'models:' holding one")
    else:
        raise ValueError(f"{path}: a manifest is a .csv or .yaml file")
    if not rows:
        raise ValueError(f"{path}: lists no models")
    return [_row(path, i, r) for i, r in enumerate(rows, 1)]


def _row(manifest: Path, n: int, row: dict) -> ModelSource:
    label = f"{manifest.name} row {n}"
    try:
        unknown = sorted(set(row) - set(MANIFEST_FIELDS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; use {', '.join(MANIFEST_FIELDS)}")
        if "file" not in row:
            raise ValueError("no file")
        base = manifest.parent
        file = Path(str(row["file"])).expanduser()
        values: dict[str, Any] = {"file": file if file.is_absolute() else base / file, "label": label}
        for key in ("id", "dataset"):
            if key in row:
                values[key] = str(row[key]).strip()
        if "arch" in row:
            values["arch"] = canonical_arch(str(row["arch"]).strip(), base)
        if "class_ids" in row:
            values["class_ids"] = _names(row["class_ids"])
        for key in ("in_channels", "image_size"):
            if key in row:
                values[key] = _positive_int(row[key], key)
        for key in ("mean", "std"):
            if key in row:
                values[key] = _floats(row[key], key)
        if "arch_args" in row:
            args = row["arch_args"]
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError as e:
                    raise ValueError(f"arch_args is not JSON ({e})") from None
            if not isinstance(args, dict):
                raise ValueError(f"arch_args must be a mapping like {{\"width\": 32}}, got {args!r}")
            values["arch_args"] = args
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    return ModelSource(**values)


def parse_names(text: str) -> list[str]:
    """``"cat, dog,fox"`` -> ``["cat", "dog", "fox"]``; an empty name is an error."""
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise ValueError(f"class ids hold an empty name: {text!r}")
    return names


def _names(value: Any) -> list[str]:
    if isinstance(value, list):
        names = [str(v).strip() for v in value]
        if not all(names):
            raise ValueError(f"class_ids hold an empty name: {value!r}")
        return names
    return parse_names(str(value))


def parse_floats(text: str) -> list[float]:
    """``"0.5,0.5,0.5"`` -> ``[0.5, 0.5, 0.5]``."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _floats(value: Any, key: str) -> list[float]:
    try:
        if isinstance(value, (int, float)):
            return [float(value)]
        if isinstance(value, list):
            return [float(v) for v in value]
        return parse_floats(str(value))
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be numbers, got {value!r}") from None


def _positive_int(value: Any, key: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{key} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{key} must be positive, got {number}")
    return number
