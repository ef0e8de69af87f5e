"""Command-line overrides and config arguments, typed by the dataclass schema they land in.

    apply_overrides(config, ["train.optimizer.learning_rate=1e-4"], schema=RunConfig)
    parse_arg("phase=align,res=224", phase="instruct", res=224)   # a config file's argument

Unknown keys are refused with the closest known key suggested; values are typed by the field
they replace (or, for an unset optional field, by its annotation).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import typing
from typing import Any, Sequence

import ml_collections

from vlm_jax.config.fields import dataclass_in
from vlm_jax.errors import ConfigError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """`"phase=align,res=224"` -> ConfigDict(phase="align", res=224), typed by `defaults` (which
    also lists the accepted keys). A bare key means True: `"lora"` == `"lora=True"`."""
    values = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, has_value, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"config argument {key!r} is not one of {sorted(defaults)}"
                              + suggestion(key, defaults))
        values[key] = _typed(text if has_value else "True", defaults[key], f"config argument {key}")
    return values


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str], schema: type
                    ) -> ml_collections.ConfigDict:
    """Apply `a.b.c=value` overrides to `config` (whose layout is the dataclass `schema`) in
    place, each value typed by the field it replaces."""
    for override in overrides:
        dotted, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r}: expected key=value")
        keys = dotted.split(".")
        node, section = config, schema
        for depth, key in enumerate(keys):
            where = ".".join(keys[:depth + 1])
            field_type = _field_type(section, key)
            known = set(node.keys()) | _field_names(section)
            if key not in known:
                raise ConfigError(f"unknown config key {where}" + suggestion(key, known, keys[:depth]))
            if depth == len(keys) - 1:
                current = node.get(key)
                if isinstance(current, (ml_collections.ConfigDict, dict)) and current:
                    if text.strip().lower() == "none" and type(None) in typing.get_args(field_type):
                        node[key] = None  # drop an optional section, e.g. eval_data=None
                        continue
                    raise ConfigError(f"{where} is a section; override one of its keys")
                node[key] = _typed(text, current, where, field_type)
            else:
                if node.get(key) is None:
                    node[key] = ml_collections.ConfigDict()
                node = node[key]
                section = dataclass_in(field_type)
    return config


def _field_names(schema: type | None) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)} if schema is not None else set()


def _field_type(schema: type | None, key: str) -> Any:
    if schema is None:
        return None
    return typing.get_type_hints(schema).get(key)


def _typed(text: str, current: Any, where: str, hint: Any = None) -> Any:
    """Parse `text` as the type of `current` (or of the dataclass field `hint` when unset)."""
    kind = type(current) if current is not None else _scalar_type(hint)
    text = text.strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ConfigError("expected true/false")
            return text.lower() in ("true", "1")
        if text.lower() == "none" and (current is None or type(None) in typing.get_args(hint)):
            return None  # an optional field (e.g. train.epochs=None)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    except ValueError as e:
        raise ConfigError(f"{where}={text!r}: not a valid {kind.__name__} ({e})") from None


def _scalar_type(hint: Any) -> type | None:
    if hint in (bool, int, float, str):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float, str) else None


def suggestion(key: str, known, prefix: Sequence[str] = ()) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5) or [
        k for k in sorted(known)  # abbreviations: lr -> learning_rate
        if "".join(word[:1] for word in k.split("_")) == key or k.startswith(key)][:1]
    base = ".".join(prefix) + "." if prefix else ""
    hint = f"; did you mean {base}{close[0]}?" if close else ""
    return f"{hint} (known: {', '.join(sorted(known))})"
