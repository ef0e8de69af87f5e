"""The optimizer: AdamW with a weight-decay mask, per-group lr multipliers, grad clipping, lr schedules.

Built over the TRAINABLE tree only (frozen params never reach it, so they hold no state):

    clip_by_global_norm -> adamw(schedule, decay mask) -> scale by per-leaf lr multiplier

Scaling AdamW's final update by m is the same as running that leaf at lr * m (the decoupled
weight-decay term scales with it, as in PyTorch's per-group lr). Weight decay applies where the
decay rules say True; by default only to '.../kernel' leaves, so norms, biases, embedding tables,
position tables, the MAP probe, SigLIP's temperature/bias and LoRA adapters are not decayed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import optax

from vlm_jax.config_utils import from_dict
from vlm_jax.train import param_groups

SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_WEIGHT_DECAY_RULES = ((".*/kernel", True), (".*", False))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4       # peak lr, reached after warmup
    schedule: str = "cosine"          # after warmup: cosine / linear decay to end_lr_ratio, or constant
    warmup_steps: int = 0             # linear warmup from 0
    total_steps: int = 1000           # warmup + decay
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
            raise ValueError(f"train.optimizer.schedule={self.schedule!r}; supported: {SCHEDULES}")
        if self.learning_rate < 0:
            raise ValueError(f"train.optimizer.learning_rate={self.learning_rate} must be >= 0")
        if self.warmup_steps < 0 or self.total_steps < max(self.warmup_steps, 1):
            raise ValueError(f"train.optimizer: need 0 <= warmup_steps ({self.warmup_steps}) <= "
                             f"total_steps ({self.total_steps}) and total_steps >= 1")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"train.optimizer.grad_clip_norm={self.grad_clip_norm}; "
                             f"a positive number or None (no clipping)")
        object.__setattr__(self, "weight_decay_rules", param_groups.normalize_rules(
            self.weight_decay_rules, "train.optimizer.weight_decay_rules"))


def optimizer_config(values: Mapping[str, Any] | None) -> OptimizerConfig:
    return from_dict(OptimizerConfig, values, where="train.optimizer")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """lr(step): linear warmup 0 -> peak over warmup_steps, then the named decay."""
    peak, warmup = config.learning_rate, config.warmup_steps
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


def make_optimizer(config: OptimizerConfig, trainable: Any, multipliers: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer over the trainable tree, lr schedule). `multipliers`: per-leaf lr multipliers
    of the trainable tree (floats, no None)."""
    schedule = make_schedule(config)
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay,
                             mask=weight_decay_mask(trainable, config)))
    if any(m != 1.0 for m in jax.tree.leaves(multipliers)):
        parts.append(scale_by_multipliers(multipliers))
    return optax.chain(*parts), schedule
