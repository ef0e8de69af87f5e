"""The decoder families, one module each: everything that makes a family that family (structural
defaults, per-layer pattern, chat template, HF config and tensor names). `base.Family` says what
a module declares; adding a family is its file plus its name in NAMES below.

    from vlm_jax.models import families
    families.get("gemma2").defaults["post_norms"]      # True
    families.for_hf_model_type("gemma3_text").name     # "gemma3"
"""
from __future__ import annotations

import importlib

from vlm_jax.errors import ConfigError, ConversionError
from vlm_jax.models.families.base import Family

NAMES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "smollm3", "mistral")

FAMILIES: dict[str, Family] = {
    name: importlib.import_module(f"{__name__}.{name}").FAMILY for name in NAMES}
_BY_HF_MODEL_TYPE = {family.hf_model_type: family for family in FAMILIES.values()}
HF_MODEL_TYPES = tuple(_BY_HF_MODEL_TYPE)


def get(name: str) -> Family:
    """The family called `name`; an unknown name is a ConfigError listing the known ones."""
    if name not in FAMILIES:
        raise ConfigError(f"decoder family {name!r}; supported: {NAMES}")
    return FAMILIES[name]


def for_hf_model_type(model_type: str | None) -> Family:
    """The family of an HF text config's `model_type` (gemma3_text -> gemma3, ...)."""
    if model_type not in _BY_HF_MODEL_TYPE:
        raise ConversionError(f"HF config field model_type={model_type!r} is not supported "
                              f"(supported: {HF_MODEL_TYPES})")
    return _BY_HF_MODEL_TYPE[model_type]
