"""The optimizer: AdamW with a weight-decay mask, per-group lr multipliers, grad clipping, lr schedules.

Built over the TRAINABLE tree only (frozen params never reach it, so they hold no state):

    clip_by_global_norm -> adamw(schedule, decay mask) -> scale by per-leaf lr multiplier

The schedule counts optimizer steps, or, with `unit="examples"` (a run that says `train.epochs`),
the examples trained on: `lr(examples seen before this step)`, with `warmup_steps` and
`total_steps` then counted in examples. With packing a step holds a varying number of examples,
so only the example count says how far through the data a run is; the count lives in the
optimizer state (`ExampleCountState`), exact across resumes. AdamW in that case is the same
chain optax's `adamw` is (scale_by_adam -> add_decayed_weights -> scale by -lr).

Scaling AdamW's final update by m is the same as running that leaf at lr * m (the decoupled
weight-decay term scales with it, as in PyTorch's per-group lr). Weight decay applies where the
decay rules say True; by default only to '.../kernel' leaves, so norms, biases, embedding tables,
position tables, the MAP probe, SigLIP's temperature/bias and LoRA adapters are not decayed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vlm_jax.config import from_dict
from vlm_jax.errors import ConfigError
from vlm_jax.train import param_groups

SCHEDULES = ("cosine", "linear", "constant")
UNITS = ("steps", "examples")
DEFAULT_WEIGHT_DECAY_RULES = ((".*/kernel", True), (".*", False))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4       # peak lr, reached after warmup
    schedule: str = "cosine"          # after warmup: cosine / linear decay to end_lr_ratio, or constant
    warmup_steps: int = 0             # linear warmup from 0
    total_steps: int = 1000           # warmup + decay
    warmup_ratio: float | None = None  # warmup = this fraction of total_steps (LLaVA: 0.03)
    end_lr_ratio: float = 0.0         # final lr = learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float | None = 1.0  # global-norm clipping; None = off
    # (regex, bool) prepended to DEFAULT_WEIGHT_DECAY_RULES.
    weight_decay_rules: tuple = ()

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.optimizer.schedule={self.schedule!r}; supported: {SCHEDULES}")
        if self.learning_rate < 0:
            raise ConfigError(f"train.optimizer.learning_rate={self.learning_rate} must be >= 0")
        if self.warmup_steps < 0 or self.total_steps < max(self.warmup_steps, 1):
            raise ConfigError(f"train.optimizer: need 0 <= warmup_steps ({self.warmup_steps}) <= "
                              f"total_steps ({self.total_steps}) and total_steps >= 1")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.optimizer.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(f"train.optimizer.grad_clip_norm={self.grad_clip_norm}; "
                              f"a positive number or None (no clipping)")
        object.__setattr__(self, "weight_decay_rules", param_groups.normalize_rules(
            self.weight_decay_rules, "train.optimizer.weight_decay_rules"))


def optimizer_config(values: Mapping[str, Any] | None) -> OptimizerConfig:
    return from_dict(OptimizerConfig, values, where="train.optimizer")


def warmup_length(config: OptimizerConfig) -> int:
    if config.warmup_ratio is not None:
        return int(round(config.warmup_ratio * config.total_steps))
    return config.warmup_steps


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """lr(step): linear warmup 0 -> peak over warmup_steps, then the named decay."""
    peak, warmup = config.learning_rate, warmup_length(config)
    decay_steps = config.total_steps - warmup
    end = peak * config.end_lr_ratio
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(decay_steps, 1), alpha=config.end_lr_ratio)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, end, max(decay_steps, 1))
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(trainable: Any, config: OptimizerConfig) -> Any:
    rules = tuple(config.weight_decay_rules) + DEFAULT_WEIGHT_DECAY_RULES
    mask = param_groups.match_groups(trainable, rules)
    return jax.tree.map(bool, mask)


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
    """updates * multiplier, leaf by leaf (`multipliers`: a tree of floats shaped like the params)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, multipliers), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ExampleCountState(NamedTuple):
    examples: jax.Array  # f32[]: examples trained on before the next update (exact below 2^24)


def scale_by_example_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """updates * -schedule(examples seen so far); `update(..., num_examples=n)` adds this step's
    examples to the count (like optax's scale_by_learning_rate, with examples for steps)."""
    def init(params):
        del params
        return ExampleCountState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None, *, num_examples, **extra_args):
        del params, extra_args
        lr = schedule(state.examples)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return updates, ExampleCountState(state.examples + num_examples)
    return optax.GradientTransformationExtraArgs(init, update)


def examples_seen(opt_state: Any) -> jax.Array:
    """The example count of an optimizer built with unit="examples"."""
    return optax.tree_utils.tree_get(opt_state, "examples")


def make_optimizer(config: OptimizerConfig, trainable: Any, multipliers: Any,
                   unit: str = "steps") -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer over the trainable tree, lr schedule). `multipliers`: per-leaf lr multipliers
    of the trainable tree (floats, no None). unit="examples": the schedule counts examples, and
    `update` takes `num_examples=` (the global batch's example count)."""
    if unit not in UNITS:
        raise ValueError(f"schedule unit {unit!r}; supported: {UNITS}")
    schedule = make_schedule(config)
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    decay_mask = weight_decay_mask(trainable, config)
    if unit == "steps":
        parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                 weight_decay=config.weight_decay, mask=decay_mask))
    else:
        parts += [optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
                  optax.add_decayed_weights(config.weight_decay, decay_mask),
                  scale_by_example_schedule(schedule)]
    if any(m != 1.0 for m in jax.tree.leaves(multipliers)):
        parts.append(scale_by_multipliers(multipliers))
    return optax.chain(*parts), schedule
