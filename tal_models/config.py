"""Frozen config dataclasses <-> plain dicts <-> YAML.

Configs are built in code and validated by their own ``__post_init__``; YAML is only their
stored form (presets, checkpoints, MLflow params). ``config_from_dict`` rebuilds nested
dataclasses field by field, turns YAML lists back into tuples, and refuses unknown keys naming
the path and the keys it knows, so a typo in a preset is an error, not a silently ignored line.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def require_int(value: Any, name: str, minimum: int = 1, hint: str = "") -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; otherwise a ``ValueError``
    naming ``name`` (and ``hint``, e.g. a paper's value). The one check every config and entry point uses."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}{hint}")
    return value


def require_positive_int(value: Any, name: str, hint: str = "") -> int:
    """``require_int(value, name, 1, hint)``."""
    return require_int(value, name, 1, hint)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass (nested ones included) -> a dict of plain Python values (tuples -> lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict takes a dataclass instance, got {type(config).__name__}")
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Rebuild ``cls`` from ``data`` (as ``config_to_dict`` or YAML gives it); missing keys take
    the dataclass defaults. Raises ``ValueError`` for unknown keys or invalid values, naming the
    dotted path (``where`` prefixes it)."""
    name = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{name}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc}") from exc


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Turn a YAML value into what the type hint asks for: nested dataclasses and tuples."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return config_from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        for option in options:  # first a dataclass or tuple that fits, else the value as is
            if (dataclasses.is_dataclass(option) and isinstance(value, Mapping)) or (
                typing.get_origin(option) is tuple and isinstance(value, list | tuple)
            ):
                return _convert(option, value, where)
        return value
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    return value


def dump_yaml(config: Any) -> str:
    """A config dataclass as YAML text (block style, keys in field order)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a ``cls`` config from a YAML file; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    return config_from_dict(cls, data or {}, where=path.name)


def parse_value(raw: str) -> Any:
    """A ``--set`` value parsed as YAML, except that numbers in exponent notation without a dot
    (``3e-4``, ``1E5``), which YAML 1.1 reads as strings, are numbers."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...], example: str = "section.key=value") -> list[str]:
    """Apply ``key=value`` strings to the nested dict ``data`` in place (dotted keys; values parsed as YAML, so
    ``3e-4``, ``[7, 7]`` and ``null`` mean what they say); returns the keys set, in order.

    Only existing keys can be set, and only to values (not whole sections): a ``ValueError`` names the key
    and what exists there. Validating the result is the caller's (``config_from_dict``).
    """
    done = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. {example}")
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                sections = sorted(k for k, v in node.items() if isinstance(v, dict))
                raise ValueError(f"--set {key}: {part!r} is not a section (sections here: {sections})")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"--set {key}: no such key; {'.'.join(parts[:-1]) or 'the top level'} has {sorted(node)}")
        if isinstance(node[parts[-1]], dict):
            raise ValueError(f"--set {key}: a section, not a value; set one of its keys {sorted(node[parts[-1]])}")
        node[parts[-1]] = parse_value(raw)
        done.append(key)
    return done
