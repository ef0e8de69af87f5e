"""`train.init_from`: start a run from another model's params (a model directory, or a finished
run's workdir), taking the params whose path fully matches one of `train.init_from.groups`; the
rest is freshly initialised. `check_init_from` validates shapes before anything compiles (it
reads the source's config.json, nothing else); `apply_init_from` restores the taken params
straight onto the new state's shardings."""
from __future__ import annotations

import re

import jax

from vlm_jax import model_dir, sharding
from vlm_jax.errors import ConfigError
from vlm_jax.models.vlm import VLMConfig, init_params, param_shapes
from vlm_jax.train import param_groups


def _init_from_dir(run) -> str:
    return model_dir.resolve_model_dir(run.train.init_from.path, "train.init_from.path")


def _abstract_params(config: VLMConfig) -> dict:
    return param_shapes(config)


def _taken_paths(run, source_config: VLMConfig) -> list[str]:
    """Target param paths to copy from the source; raises naming a param whose shape differs."""
    groups = param_groups.normalize_rules([(g, True) for g in run.train.init_from.groups],
                                          "train.init_from.groups")
    compiled = [re.compile(pattern) for pattern, _ in groups]
    target = param_groups.flatten(_abstract_params(run.model))
    source = param_groups.flatten(_abstract_params(source_config))
    taken = [p for p in target if any(c.fullmatch(p) for c in compiled)]
    if not taken:
        raise ConfigError(f"train.init_from.groups={list(run.train.init_from.groups)} match no "
                          f"param of the model (e.g. {sorted(target)[:3]})")
    for path in taken:
        if path not in source:
            raise ConfigError(f"train.init_from: param {path} is not in {run.train.init_from.path} "
                              f"(narrow train.init_from.groups)")
        if (source[path].shape, source[path].dtype) != (target[path].shape, target[path].dtype):
            raise ConfigError(f"train.init_from: param {path} has shape {source[path].shape} "
                              f"{source[path].dtype} in {run.train.init_from.path} but "
                              f"{target[path].shape} {target[path].dtype} in this model config")
    return taken


def check_init_from(run) -> None:
    """Validate train.init_from against the model config (shapes only, nothing loaded)."""
    source_dir = _init_from_dir(run)
    _taken_paths(run, model_dir.load_config(source_dir))


def apply_init_from(run, plan, state):
    """`state` (freshly created) with the train.init_from groups replaced by the source's params,
    restored straight onto the state's shardings. The optimizer state needs no change: Adam's
    moments start at zero whatever the params are, and LoRA adapters depend on shapes only."""
    source_dir = _init_from_dir(run)
    source_config = model_dir.load_config(source_dir)
    taken = _taken_paths(run, source_config)
    with sharding.rules_context(plan.mesh, plan.rules):
        source_boxed = jax.eval_shape(lambda: init_params(source_config, jax.random.key(0),
                                                          boxed=True))
    _, source_params, _ = model_dir.load_model(
        source_dir, shardings=sharding.param_shardings(source_boxed, plan.mesh, plan.rules),
        load_tokenizer=False)
    source = param_groups.flatten(source_params)
    trainable, frozen = param_groups.flatten(state.trainable), param_groups.flatten(state.frozen)
    for path in taken:
        tree = trainable if path in trainable else frozen
        tree[path] = jax.device_put(source[path], tree[path].sharding)
    return state.replace(trainable=param_groups.unflatten(trainable),
                         frozen=param_groups.unflatten(frozen))
