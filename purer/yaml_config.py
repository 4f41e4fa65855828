"""Dataclass configs: loaded from YAML, overridden by ``key=value`` arguments.

Any nested dataclass tree works; a key that the dataclasses do not declare is an
error that lists the valid keys, so a typo never silently does nothing.

Example (``RunConfig`` with a nested ``meta`` section)::

    cfg = load_config(RunConfig, "recipes/configs/default.yaml", ["meta.inner_lr=0.1", "shots=[1, 5]"])
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclasses."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _dataclass_of(tp) -> type | None:
    if is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):  # Optional[SomeConfig]
        if is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints may stand for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any or value is None and (origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)):
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {tp}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(v, arg, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not isinstance(value, tp) or tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a (nested) mapping; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(types_)}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_of(types_[name])
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, types_[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[leaf] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b=1", "c=[1, 5]"]`` -> ``{"a": {"b": 1}, "c": [1, 5]}`` (values parsed as YAML)."""
    data: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides."""
    data = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        from_dict(cls, loaded)  # unknown keys in the file are reported against the file
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
