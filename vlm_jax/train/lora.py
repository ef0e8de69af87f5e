"""LoRA adapters for the LLM's dense kernels, merged functionally (W + alpha/r * A @ B) before apply.

Adapters live in their own tree that mirrors the params, each adapted kernel replaced by a pair:

    {'llm': {'layers': {'attention': {'q': {'kernel': {'a': f32[L, D, r], 'b': f32[L, r, H, hd]}}}}}}

A kernel is f32[*lead, *in, *out] (`layers.Dense` layout; `lead` is the scanned 'layers' axis);
A is f32[*lead, *in, r] (random, fan-in scaled) and B is f32[*lead, r, *out] (zeros), so a fresh
adapter leaves the model unchanged. Which dims are "in" is read from the kernel's logical names:
every decoder kernel reads from or writes into the residual stream ('embed'), so a kernel whose
first (non-'layers') dim is 'embed' has one in-dim (q/k/v, gate/up, lm_head) and any other has
one out-dim (o: [heads, head_dim] -> embed, down: [mlp] -> embed).

The model code needs no change: the step merges the adapters into a copy of the kernels and calls
`model.apply` as usual; gradients flow to A and B only, the base LLM is frozen.
"""
from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import ConfigError
from vlm_jax.train import param_groups

DEFAULT_TARGETS = ("llm/layers/(attention/(q|k|v|o)|mlp/(gate|up|down))/kernel",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes over param paths (full match)

    def __post_init__(self):
        if self.rank <= 0:
            raise ConfigError(f"train.phase.lora.rank={self.rank}; must be a positive integer")
        if isinstance(self.targets, str):
            raise ConfigError("train.phase.lora.targets must be a list of regexes, not one string")
        for index, pattern in enumerate(self.targets):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"train.phase.lora.targets[{index}]={pattern!r} is not a regex: "
                                  f"{e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _split_dims(names: tuple) -> tuple[int, int, int]:
    """(leading 'layers' dims, in dims, out dims) of a kernel from its logical axis names."""
    lead = 0
    while lead < len(names) and names[lead] == "layers":
        lead += 1
    rest = names[lead:]
    if len(rest) < 2:
        raise ConfigError(f"LoRA target with logical names {names} is not a 2+-dim kernel")
    num_in = 1 if rest[0] == "embed" else len(rest) - 1
    return lead, num_in, len(rest) - num_in


def init_lora(rng: jax.Array, boxed_params: dict, config: LoraConfig) -> dict:
    """Adapters for every kernel matching `config.targets`, boxed in nn.LogicallyPartitioned so
    they get shardings like any param. `boxed_params`: the params still boxed (`init_params(...,
    boxed=True)` or the output of `jax.eval_shape` on a boxed init)."""
    flat = param_groups.flatten(boxed_params)
    compiled = [re.compile(p) for p in config.targets]
    targets = [p for p in flat if any(c.fullmatch(p) for c in compiled)]
    if not targets:
        raise ConfigError(f"train.phase.lora.targets={list(config.targets)} match no param; kernels "
                          f"of the LLM look like 'llm/layers/attention/q/kernel'")
    adapters = {}
    for i, path in enumerate(targets):
        leaf = flat[path]
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError(f"init_lora needs boxed params (logical names); {path} is a plain array")
        kernel, names = leaf.value, tuple(leaf.names)
        lead, num_in, _ = _split_dims(names)
        lead_shape, in_shape = kernel.shape[:lead], kernel.shape[lead:lead + num_in]
        out_shape = kernel.shape[lead + num_in:]
        fan_in = math.prod(in_shape)
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead_shape, *in_shape, config.rank),
                              jnp.float32) * fan_in ** -0.5
        b = jnp.zeros((*lead_shape, config.rank, *out_shape), jnp.float32)
        adapters[f"{path}/a"] = nn.LogicallyPartitioned(a, names[:lead + num_in] + (None,))
        adapters[f"{path}/b"] = nn.LogicallyPartitioned(b, names[:lead] + (None,) + names[lead + num_in:])
    return param_groups.unflatten(adapters)


def lora_delta(kernel: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B reshaped to the kernel's shape: f32[*lead, *in, *out]."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    num_in = a.ndim - lead - 1
    lead_shape = kernel.shape[:lead]
    in_size = math.prod(kernel.shape[lead:lead + num_in])
    a2 = a.reshape(*lead_shape, in_size, a.shape[-1])          # [*lead, I, r]
    b2 = b.reshape(*lead_shape, b.shape[lead], -1)             # [*lead, r, O]
    return jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)).reshape(kernel.shape)


def merge_lora(params: dict, lora: dict, alpha: float) -> dict:
    """params with W + (alpha / rank) * A @ B in every adapted kernel (the export form too)."""
    flat = param_groups.flatten(params)
    adapters = param_groups.flatten(lora)
    for path in sorted({p.rsplit("/", 1)[0] for p in adapters}):
        if path not in flat:
            raise ValueError(f"LoRA adapter for {path!r} but the params have no such kernel")
        kernel, a, b = flat[path], adapters[f"{path}/a"], adapters[f"{path}/b"]
        scale = alpha / a.shape[-1]
        delta = lora_delta(kernel, a, b)
        flat[path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return param_groups.unflatten(flat)
