"""Typed model configs: frozen dataclasses built from plain dicts with errors that name the field."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from vlm_jax.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], values: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `values`, refusing unknown keys (nested dataclasses recurse).

    `where` is the dotted path used in error messages, e.g. "model.llm".
    """
    if values is None:
        values = {}
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)
    if hasattr(values, "to_dict"):  # ml_collections.ConfigDict
        values = values.to_dict()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        sub = dataclass_in(hints.get(name))
        path = f"{where}.{name}" if where else name
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, path)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a part's own check (__post_init__) or a wrong type
        raise ConfigError(f"{where}: {e}" if where and where not in str(e) else str(e)) from None


def to_dict(obj: Any) -> dict:
    """Inverse of `from_dict` (tuples become lists so the result is JSON-serialisable)."""
    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [fix(x) for x in v]
        return v
    return fix(dataclasses.asdict(obj))


def dataclass_in(hint: Any) -> type | None:
    """The dataclass inside a type hint such as `VisionConfig | None`, else None."""
    if hint is None:
        return None
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
