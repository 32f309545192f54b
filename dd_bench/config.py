"""Typed configuration from plain mappings: dataclasses filled from YAML, with one clear error per bad field.

Used for method configs (``params``) and every section of a suite. An unknown key or a value of
the wrong type is a ``ConfigError`` naming the field (``methods[2].params.lr_img``) and the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dd_bench.errors import ConfigError


def build_config(config_type: type, params: dict[str, Any], where: str = "params") -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys and wrong types."""
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping, got {params!r}")
    hints = typing.get_type_hints(config_type)
    known = {f.name for f in dataclasses.fields(config_type) if f.init}
    values = {}
    for key, value in params.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown parameter (value {value!r}); known: {', '.join(sorted(known))}")
        values[key] = _coerce(hints.get(key, Any), value, f"{where}.{key}")
    try:
        return config_type(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(arg, value, where)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{where}: invalid value {value!r} (expected {_hint_name(hint)})")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: invalid value {value!r} (expected one of {', '.join(map(repr, args))})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a list)")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a mapping)")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a number)")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: invalid value {value!r} (expected an integer)")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: invalid value {value!r} (expected true or false)")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: invalid value {value!r} (expected a string)")
        return value
    return value


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")
