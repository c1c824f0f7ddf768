"""Strict conversion between frozen config dataclasses and JSON-ready dicts.

A checkpoint's config.json is ``config_to_dict(config)``; ``config_from_dict`` rebuilds the config
and fails on an unknown or mistyped key, naming it, before any model is built.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def require(condition: bool, key: str, message: str) -> None:
    """Config validation helper: raise ValueError naming the offending key."""
    if not condition:
        raise ValueError(f"config key '{key}' {message}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Dataclass -> dict of JSON types (tuples become lists)."""
    return {field.name: _to_json(getattr(config, field.name)) for field in dataclasses.fields(config)}


def _to_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_from_dict(config_class: type, values: dict[str, Any], what: str) -> Any:
    """Build ``config_class`` from ``values``; missing keys take defaults.

    ``what`` names the config in error messages (e.g. "vq tokenizer config").
    """
    if not isinstance(values, dict):
        raise TypeError(f"{what} must be a dict, got {type(values).__name__}")
    hints = typing.get_type_hints(config_class)
    names = [field.name for field in dataclasses.fields(config_class) if field.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown key(s) in {what}: {', '.join(repr(k) for k in unknown)}; valid keys: {', '.join(names)}"
        )
    coerced = {key: _coerce(value, hints[key], key, what) for key, value in values.items()}
    return config_class(**coerced)


def _coerce(value: Any, hint: Any, key: str, what: str) -> Any:
    def fail() -> typing.NoReturn:
        raise ValueError(f"{what}: key '{key}' must be {_describe(hint)}, got {value!r}")

    if hint is bool:
        return value if isinstance(value, bool) else fail()
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail()
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else fail()
    if typing.get_origin(hint) is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            fail()
        return tuple(_coerce(item, item_hint, key, what) for item in value)
    raise TypeError(f"{what}: key '{key}' has unsupported type {hint}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return hint.__name__
