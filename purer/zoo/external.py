"""Networks defined outside purer: torchvision and timm models, and a user's own class by import path.

Each is built as the whole classifier its library defines, then split at its
final linear layer: everything before it becomes the :class:`~purer.zoo.Classifier`'s
encoder (``encoder.0.<the library's own names>``), the linear layer becomes its
``head``.  :func:`native_names` maps the Classifier's tensor names back to the
library's own (``conv1.weight``, ``fc.weight`` ...), so a checkpoint saved from
the library's model loads as it is.

Architecture names:

- ``tv:<name>``: ``torchvision.models.get_model(name, weights=None, num_classes=...)``;
  the head is the last ``nn.Linear``.
- ``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``
  (``pip install timm``); the head is the module timm's pretrained config names
  (``classifier``: ``fc``, ``head.fc``, ...).  Nothing is downloaded.
- ``package.module:Name`` or ``path/to/file.py:Name``: ``Name(**arch_args)``, also given
  ``num_classes`` and ``in_channels`` (or timm's ``in_chans``) when its signature takes
  them; the head is the last ``nn.Linear``.  A file is imported from its absolute
  path (:func:`canonical_arch` records it so), with its folder appended to
  ``sys.path`` for its own imports, so every process (accelerate workers, the
  baselines worker) finds it; a module must be importable there (an installed
  package, or on ``PYTHONPATH``).

For the first three, a network whose first convolution takes other than
``in_channels`` channels gets that convolution replaced by one that does (timm
builds it so itself).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

TIMM_INSTALL = 'pip install -e ".[timm]" (or pip install timm)'


def is_import_path(arch: str) -> bool:
    """``True`` for ``package.module:Name`` and ``path/to/file.py:Name`` (not ``tv:`` / ``timm:``)."""
    module, sep, name = arch.rpartition(":")
    return bool(sep and module and name) and not arch.startswith(("tv:", "timm:"))


def canonical_arch(arch: str, base: Path | None = None) -> str:
    """``arch`` as every process can resolve it: a ``file.py:Name`` path made absolute (relative to ``base``,
    default the current folder); other names unchanged."""
    if not is_import_path(arch):
        return arch
    module, _, name = arch.rpartition(":")
    if not module.endswith(".py"):
        return arch
    path = Path(module).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return f"{path.resolve()}:{name}"


def arch_slug(arch: str) -> str:
    """A short name of ``arch`` fit for a model id (``tv:resnet18`` -> ``tv_resnet18``, ``pkg.nets:MyNet`` ->
    ``MyNet``)."""
    if is_import_path(arch):
        arch = arch.rpartition(":")[2]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in arch)


def import_object(spec: str) -> Any:
    """The object named by ``package.module:Name`` or ``path/to/file.py:Name``.

    Raises:
        ValueError: the module cannot be imported (one line saying how to make it importable) or has no ``Name``.
    """
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except FileNotFoundError:
        raise ValueError(f"architecture {spec!r}: no file {module_name}") from None
    except ModuleNotFoundError as e:
        raise ValueError(f"architecture {spec!r}: cannot import {module_name} ({e}); install its package, add "
                         f"its folder to PYTHONPATH, or name the file instead: path/to/{module_name.rpartition('.')[2]}"
                         f".py:{attr}") from None
    except Exception as e:  # the user's module failed while it was imported
        raise ValueError(f"architecture {spec!r}: importing {module_name} raised "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"architecture {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _import_file(path: Path):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    # One module per file, whatever its name (a user's "nets.py" must not shadow or be shadowed by another).
    name = f"_purer_arch_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # the file's own sibling imports, as for a script; appended: shadows nothing
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def split_classifier(net: nn.Module, in_channels: int, what: str, head: str | None = None
                     ) -> tuple[nn.Module, str]:
    """``net`` (a whole classifier) as ``(encoder, head name)``: the head replaced by ``nn.Identity`` in ``net``.

    Args:
        net: the classifier; ``net(x)`` maps ``[B, C, H, W]`` to logits.
        in_channels: the channels it must take; a first ``nn.Conv2d`` taking others is replaced.
        what: how errors name the network (e.g. ``"torchvision model 'resnet18'"``).
        head: the dotted name of the head (default: the last ``nn.Linear``).

    Returns:
        ``nn.Sequential(net, nn.Flatten())`` mapping images to ``[B, D]`` features, and the head's name in ``net``.
    """
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[0][1].in_channels != in_channels:
        n, c = convs[0]
        _replace(net, n, nn.Conv2d(in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                                   c.groups, c.bias is not None, c.padding_mode))
    if head is None:
        linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{what} has no nn.Linear to use as the head (purer needs a final linear classifier)")
        head = linears[-1]
    try:
        module = net.get_submodule(head)
    except AttributeError:
        raise ValueError(f"{what} has no module {head!r} to use as the head") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{what}'s head {head!r} is a {type(module).__name__}, not an nn.Linear; purer needs a "
                         "final linear classifier")
    _replace(net, head, nn.Identity())
    return nn.Sequential(net, nn.Flatten()), head


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _call(fn: Callable[..., Any], what: str, arch_args: dict, **kwargs) -> Any:
    try:
        return fn(**kwargs, **arch_args)
    except TypeError as e:
        raise ValueError(f"bad arch_args {arch_args} for {what}: {e}") from None


def torchvision_classifier(name: str, num_classes: int, in_channels: int, arch_args: dict) -> tuple[nn.Module, str]:
    """``tv:<name>`` as ``(encoder, head name)`` (see :func:`split_classifier`)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision model {name!r}; see torchvision.models.list_models("
                         "module=torchvision.models)")
    what = f"torchvision model {name!r}"
    net = _call(torchvision.models.get_model, what, arch_args, name=name, weights=None, num_classes=num_classes)
    return split_classifier(net, in_channels, what)


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm:<name> architectures need timm: {TIMM_INSTALL}") from None
    return timm


def timm_classifier(name: str, num_classes: int, in_channels: int, arch_args: dict) -> tuple[nn.Module, str]:
    """``timm:<name>`` as ``(encoder, head name)``, built with ``pretrained=False`` (no download)."""
    timm = _timm()
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    what = f"timm model {name!r}"
    net = _call(timm.create_model, what, arch_args, model_name=name, pretrained=False, num_classes=num_classes,
                in_chans=in_channels)
    head = net.pretrained_cfg.get("classifier")
    if not isinstance(head, str):
        raise ValueError(f"{what} has {len(head or ())} classifier heads ({head}); purer needs one linear head")
    return split_classifier(net, in_channels, what, head)


def timm_defaults(name: str) -> dict:
    """What timm's pretrained config says of ``timm:<name>``: ``{"mean", "std", "image_size", "in_channels"}``
    (mean and std from timm's data config)."""
    timm = _timm()
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    cfg = get_pretrained_cfg(name)
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    channels, height, width = data["input_size"]
    return {"mean": list(data["mean"]), "std": list(data["std"]), "image_size": int(height),
            "in_channels": int(channels)}


def user_classifier(spec: str, num_classes: int, in_channels: int, arch_args: dict) -> tuple[nn.Module, str]:
    """A user's class (or factory) named ``package.module:Name`` / ``file.py:Name`` as ``(encoder, head name)``."""
    factory = import_object(spec)
    if not callable(factory):
        raise ValueError(f"architecture {spec!r} is a {type(factory).__name__}, not a class or function")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    given = {"num_classes": num_classes} if "num_classes" in params else {}
    for key in ("in_channels", "in_chans"):
        if key in params:
            given[key] = in_channels
            break
    net = _call(factory, f"architecture {spec!r}", arch_args, **given)
    if not isinstance(net, nn.Module):
        raise ValueError(f"architecture {spec!r} returned a {type(net).__name__}, not a torch nn.Module")
    return split_classifier(net, in_channels, f"architecture {spec!r}")
