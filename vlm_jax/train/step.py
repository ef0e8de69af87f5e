"""The train step: TrainState born sharded on the mesh, and one jitted update (accumulation, clipping,
metrics, non-finite guard) for the next-token phases (align / instruct / lm) and contrastive.

    plan = plan_training(model_config, TrainStepConfig(phase=..., optimizer=...), mesh)
    state = create_train_state(plan, jax.random.key(0))          # or params=imported_params
    train_step = make_train_step(plan)
    state, metrics = train_step(state, sharding.global_batch(local_batch, mesh))

Only the trainable tree is differentiated and optimised: frozen towers run forward only and own
no optimizer state. Params are f32 masters; the compute dtype comes from the model config.
A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged and
reports `is_finite = 0` (the loop stops on it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import sharding
from vlm_jax.data.images import normalize_pixels
from vlm_jax.errors import CheckpointError, ConfigError
from vlm_jax.models.decoder import lm_head_weight
from vlm_jax.models.vlm import VLM, VLMConfig, dummy_inputs, itm_inputs
from vlm_jax.train import losses, param_groups, phases
from vlm_jax.train.lora import init_lora, merge_lora
from vlm_jax.train.optimizer import OptimizerConfig, examples_seen, make_optimizer

NEXT_TOKEN_KEYS = ("input_ids", "target_ids", "loss_mask", "positions", "mask_ar")
CONTRASTIVE_KEYS = ("images", "text_ids")
ITM_KEYS = CONTRASTIVE_KEYS + ("text_lengths",)
NEGATIVE_KEYS = ("negative_text_ids", "negative_text_lengths")  # data-provided hard negatives


def pair_keys(phase: phases.PhaseConfig, negatives: bool = False) -> tuple[str, ...]:
    """The batch keys of a phase that reads image-caption pairs (`negatives`: the data holds
    hard-negative captions, data.negative_captions > 0; the ITM step scores them)."""
    if phase.step_kind != "itm":
        return CONTRASTIVE_KEYS
    return ITM_KEYS + (NEGATIVE_KEYS if negatives else ())


@dataclasses.dataclass(frozen=True)
class TrainStepConfig:
    phase: phases.PhaseConfig = phases.PhaseConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many
    loss_chunk_size: int = 128  # positions per row per chunk of the fused LM-head loss
    schedule_unit: str = "steps"  # "examples": the lr schedule counts examples (train.epochs)

    @classmethod
    def from_train(cls, train: Any, **changes) -> "TrainStepConfig":
        """The step settings of a run's `train` section (run_config.TrainConfig); `changes`
        replace some (the loop's epoch-long schedule: optimizer, schedule_unit)."""
        fields = dict(phase=train.phase, optimizer=train.optimizer,
                      micro_batches=train.micro_batches, loss_chunk_size=train.loss_chunk_size)
        return cls(**{**fields, **changes})

    def __post_init__(self):
        if self.micro_batches < 1:
            raise ConfigError(f"train.micro_batches={self.micro_batches} must be >= 1")
        if self.loss_chunk_size < 1:
            raise ConfigError(f"train.loss_chunk_size={self.loss_chunk_size} must be >= 1")
        if self.micro_batches > 1 and self.phase.reads_pairs:
            raise ConfigError(f"train.micro_batches > 1 is not supported in the "
                              f"{self.phase.name!r} phase: its loss couples every image with "
                              f"every text of the batch")


@flax.struct.dataclass
class TrainState:
    """step i32[]; trainable / frozen: disjoint nested dicts whose union is the model params plus,
    with LoRA, the adapters under trainable['lora']; opt_state covers `trainable` only."""
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any

    @property
    def lora(self) -> Any:
        return self.trainable.get(phases.LORA_KEY)


@dataclasses.dataclass
class TrainPlan:
    """Everything fixed before the first step: model, optimizer, what trains, and the shardings."""
    model_config: VLMConfig
    config: TrainStepConfig
    mesh: Mesh
    rules: tuple
    model: VLM
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    lr_multipliers: Any          # full tree: float or None (frozen) per leaf
    abstract_boxed: Any          # eval_shape of the boxed init: logical names for every leaf
    state_shardings: TrainState

    def model_params(self, state: TrainState) -> dict:
        """The model's param tree (LoRA merged in), for eval, generation and export."""
        return _assemble(self, state.trainable, state.frozen)


def _full_init(model_config: VLMConfig, phase: phases.PhaseConfig) -> Callable[[jax.Array], dict]:
    """rng -> boxed {model params..., 'lora': adapters (if any)}."""
    def init(rng):
        model_rng, lora_rng = jax.random.split(rng)
        params = VLM(model_config).init(model_rng, **dummy_inputs(model_config),
                                        method=VLM.init_all)["params"]
        params = dict(params)
        if phase.lora is not None:
            params[phases.LORA_KEY] = init_lora(lora_rng, params, phase.lora)
        return params
    return init


def plan_training(model_config: VLMConfig, config: TrainStepConfig, mesh: Mesh,
                  rules=sharding.DEFAULT_RULES) -> TrainPlan:
    """Check the phase fits the model, find what trains, build the optimizer and all shardings
    (abstractly: no param is materialised here)."""
    phases.check_model_fits(config.phase, model_config)
    rules = tuple(rules)
    rng = jax.random.key(0)  # made off the mesh: an AOT mesh (`vlm-jax plan --topology`) has no runtime
    with sharding.rules_context(mesh, rules):
        abstract_boxed = jax.eval_shape(_full_init(model_config, config.phase), rng)
    full_shardings = sharding.param_shardings(abstract_boxed, mesh, rules)
    abstract = nn.unbox(abstract_boxed)
    multipliers = phases.lr_multipliers(abstract, config.phase)
    trainable, frozen = phases.split_trainable(abstract, multipliers)
    if not jax.tree.leaves(trainable):
        raise ConfigError(f"phase {config.phase.name!r} with train.phase.param_groups="
                          f"{list(config.phase.param_groups)} leaves no param trainable")
    trainable_multipliers, _ = phases.split_trainable(multipliers, multipliers)
    optimizer, schedule = make_optimizer(config.optimizer, trainable, trainable_multipliers,
                                         unit=config.schedule_unit)
    trainable_shardings, frozen_shardings = phases.split_trainable(full_shardings, multipliers)
    replicated = NamedSharding(mesh, P())
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, trainable), trainable_shardings,
        transform_non_params=lambda _: replicated)
    state_shardings = TrainState(step=replicated, trainable=trainable_shardings,
                                 frozen=frozen_shardings, opt_state=opt_shardings)
    return TrainPlan(model_config, config, mesh, rules, VLM(model_config), optimizer, schedule,
                     multipliers, abstract_boxed, state_shardings)


def create_train_state(plan: TrainPlan, rng: jax.Array, params: dict | None = None) -> TrainState:
    """A fresh TrainState, every array born sharded (`jit(init, out_shardings=...)`).
    `params`: start from these model params (e.g. an imported checkpoint) instead of a random init;
    LoRA adapters and the optimizer state are still created fresh."""
    def state_from(full):
        trainable, frozen = phases.split_trainable(full, plan.lr_multipliers)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                          opt_state=plan.optimizer.init(trainable))

    if params is None:
        init = lambda r: state_from(nn.unbox(_full_init(plan.model_config, plan.config.phase)(r)))
        with sharding.rules_context(plan.mesh, plan.rules):
            return jax.jit(init, out_shardings=plan.state_shardings)(rng)
    # Outside the rules context: unboxing abstract leaves there would add sharding constraints.
    model_boxed = {k: v for k, v in plan.abstract_boxed.items() if k != phases.LORA_KEY}
    _check_matches(params, nn.unbox(model_boxed))
    params = jax.device_put(params, sharding.param_shardings(model_boxed, plan.mesh, plan.rules))

    def from_params(p, r):
        # A real copy: jit would otherwise hand the caller's buffers back inside the state,
        # and the train step donates the state.
        p = jax.tree.map(jnp.copy, p)
        full = dict(p)
        if plan.config.phase.lora is not None:
            names = param_groups.flatten(model_boxed)
            reboxed = param_groups.map_with_path(lambda path, v: names[path].replace_boxed(v), p)
            full[phases.LORA_KEY] = nn.unbox(init_lora(r, reboxed, plan.config.phase.lora))
        return state_from(full)

    with sharding.rules_context(plan.mesh, plan.rules):
        return jax.jit(from_params, out_shardings=plan.state_shardings)(params, rng)


def _check_matches(params: dict, abstract: dict) -> None:
    got = {p: tuple(v.shape) for p, v in param_groups.flatten(params).items()}
    want = {p: tuple(v.shape) for p, v in param_groups.flatten(abstract).items()}
    if got != want:
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        shapes = [f"{p}: {got[p]} vs {want[p]}" for p in sorted(want.keys() & got.keys())
                  if got[p] != want[p]]
        raise CheckpointError(f"params do not match the model config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, shape mismatches {shapes[:5]}")


def _assemble(plan: TrainPlan, trainable: dict, frozen: dict) -> dict:
    full = param_groups.merge_trees(trainable, frozen)
    lora = full.pop(phases.LORA_KEY, None)
    if lora is not None:
        full = merge_lora(full, lora, plan.config.phase.lora.alpha)
    return full


def _require(batch: dict, keys: tuple, phase: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"phase {phase!r} needs batch keys {list(keys)}; missing {missing} "
                         f"(got {sorted(batch)})")


def _next_token_sums(plan: TrainPlan, params: dict, batch: dict):
    """(masked CE sum, correct count, token count); logits only where the loss is taken."""
    images = _pixels(batch.get("images")) if plan.model_config.vision is not None else None
    hidden = plan.model.apply({"params": params}, batch["input_ids"], images, batch["positions"],
                              batch["mask_ar"], batch.get("segment_ids"), method=VLM.hidden_states)
    head, vocab_axis = lm_head_weight(params["llm"], plan.model_config.llm)
    return losses.next_token_sums_from_hidden(hidden, head, vocab_axis, batch["target_ids"],
                                              batch["loss_mask"],
                                              chunk_size=plan.config.loss_chunk_size,
                                              soft_cap=plan.model_config.llm.final_logit_softcap)


def _contrastive_images(batch: dict) -> jax.Array:
    """[B, H, W, 3]; the pipeline's [B, M, H, W, 3] layout holds one image per caption."""
    images = _pixels(batch["images"])
    return images[:, 0] if images.ndim == 5 else images


def _pixels(images: jax.Array | None) -> jax.Array | None:
    """The model's f32 input in [-1, 1]: the pipeline's uint8 pixels normalised here, inside
    the jitted step (exactly `data/images.preprocess_image`'s values), so that a quarter of the
    bytes of f32 travels to the device; float batches (benchmarks, tests) are taken as they are."""
    if images is None or images.dtype != jnp.uint8:
        return images
    return normalize_pixels(images)


def batch_loss(plan: TrainPlan, params: dict, batch: dict, denominator: jax.Array | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The loss of `params` (the model's full tree, LoRA merged) on `batch`, as the train step
    differentiates it and eval reports it: (loss f32[], sums).

    Next-token phases: loss = masked CE sum / `denominator` (default: this batch's loss-token
    count, at least 1; with micro-batches the train step passes the whole batch's), sums =
    {loss_sum, correct, count} (CE sum, correct argmax tokens, loss tokens). Contrastive: the
    sigmoid loss over the batch's B x B pairs, sums = {loss_sum: loss * B, count: B}. ITM
    (`itm_loss`, negatives drawn with `rng`, default key 0): sums add itm_correct / itm_pairs."""
    if plan.config.phase.step_kind == "itm":
        return itm_loss(plan, params, batch, jax.random.key(0) if rng is None else rng)
    if plan.config.phase.step_kind == "contrastive":
        images = _contrastive_images(batch)
        zimg, ztxt, (scale, bias) = plan.model.apply(
            {"params": params}, images, batch["text_ids"], method=VLM.contrastive_embeddings)
        loss = losses.sigmoid_loss_chunked(zimg, ztxt, scale, bias, plan.mesh)
        count = jnp.asarray(images.shape[0], jnp.float32)
        return loss, {"loss_sum": loss * count, "count": count}
    loss_sum, correct, count = _next_token_sums(plan, params, batch)
    if denominator is None:
        denominator = jnp.maximum(count, 1.0)
    return loss_sum / denominator, {"loss_sum": loss_sum, "correct": correct, "count": count}


def itm_loss(plan: TrainPlan, params: dict, batch: dict, rng: jax.Array):
    """Image-text matching on a batch of B pairs: the B positives, for each image a hard-negative
    caption and for each caption a hard-negative image (`losses.hard_negatives`, from the
    contrastive towers' similarities, no gradient), 3B pairs through `VLM.itm_logits`; with
    data-provided negatives (negative_text_ids [B, K, L]) also each image with its K captions,
    (3 + K) B pairs. contrastive+itm adds the sigmoid loss, each weighted as the phase says."""
    phase, model = plan.config.phase, plan.model
    images = _contrastive_images(batch)
    zimg, ztxt, (scale, bias) = model.apply({"params": params}, images, batch["text_ids"],
                                            method=VLM.contrastive_embeddings)
    neg_text, neg_image, text_ok, image_ok = losses.hard_negatives(
        jax.lax.stop_gradient(zimg), jax.lax.stop_gradient(ztxt), batch["text_ids"],
        jax.lax.stop_gradient(scale), rng, plan.mesh)
    ids, last = itm_inputs(plan.model_config, batch["text_ids"], batch["text_lengths"])
    count = images.shape[0]
    own = jnp.arange(count)
    pair_ids = jnp.concatenate([ids, ids[neg_text], ids])
    pair_last = jnp.concatenate([last, last[neg_text], last])
    pair_image = jnp.concatenate([own, own, neg_image])
    labels = jnp.concatenate([jnp.ones(count), jnp.zeros(2 * count)])
    weights = jnp.concatenate([jnp.ones(count), text_ok, image_ok]).astype(jnp.float32)
    if "negative_text_ids" in batch:  # [B, K, L]: image i with each of its K captions
        k = batch["negative_text_ids"].shape[1]
        neg_ids, neg_last = itm_inputs(
            plan.model_config, batch["negative_text_ids"].reshape(count * k, -1),
            batch["negative_text_lengths"].reshape(count * k))
        pair_ids = jnp.concatenate([pair_ids, neg_ids])
        pair_last = jnp.concatenate([pair_last, neg_last])
        pair_image = jnp.concatenate([pair_image, jnp.repeat(own, k)])
        labels = jnp.concatenate([labels, jnp.zeros(count * k)])
        weights = jnp.concatenate([weights, jnp.ones(count * k)])
    logits = model.apply({"params": params}, pair_ids, images, pair_last, pair_image,
                         method=VLM.itm_logits)
    loss, correct = losses.itm_loss(logits, labels, weights)
    loss = phase.itm_weight * loss
    if phase.name == "contrastive+itm":
        loss = loss + phase.contrastive_weight * losses.sigmoid_loss_chunked(
            zimg, ztxt, scale, bias, plan.mesh)
    count = jnp.asarray(count, jnp.float32)
    return loss, {"loss_sum": loss * count, "count": count, "itm_correct": correct,
                  "itm_pairs": jnp.sum(weights)}


def _split_micro_batches(batch: dict, num: int, mesh: Mesh) -> dict:
    """[B, ...] -> [num, B/num, ...]; micro-batch k takes rows k, k+num, ... so every micro-batch
    stays spread over all data-parallel devices."""
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"global batch {x.shape[0]} is not divisible by "
                             f"train.micro_batches={num}")
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
        spec = P(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.tree.map(split, batch)


def _next_token_grads(plan: TrainPlan, state: TrainState, batch: dict):
    """(grads of the trainable tree, metrics) with the loss = masked CE sum / global token count."""
    num_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    denom = jnp.maximum(num_tokens, 1.0)

    def loss_fn(trainable, micro):
        loss, sums = batch_loss(plan, _assemble(plan, trainable, state.frozen), micro, denom)
        return loss, sums["correct"]

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num_micro = plan.config.micro_batches
    if num_micro == 1:
        (loss, correct), grads = grad_fn(state.trainable, batch)
    else:
        def accumulate(carry, micro):
            grads_acc, loss_acc, correct_acc = carry
            (loss, correct), grads = grad_fn(state.trainable, micro)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss, correct_acc + correct), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss, correct), _ = jax.lax.scan(
            accumulate, init, _split_micro_batches(batch, num_micro, plan.mesh))
    metrics = {"loss": loss, "token_accuracy": correct / denom, "num_loss_tokens": num_tokens,
               "num_examples": _num_examples(batch)}
    return grads, metrics


def _num_examples(batch: dict) -> jax.Array:
    """f32[]: examples in a next-token batch (packed rows count their segments; padding rows 0)."""
    if "segment_ids" in batch:
        return jnp.sum(jnp.max(batch["segment_ids"], axis=1)).astype(jnp.float32)
    return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)


def _contrastive_grads(plan: TrainPlan, state: TrainState, batch: dict):
    """Contrastive and ITM steps (no micro-batches); ITM draws its negatives with a key of the
    step number, so a resumed run draws the same."""
    rng = jax.random.fold_in(jax.random.key(0), state.step)

    def loss_fn(trainable):
        return batch_loss(plan, _assemble(plan, trainable, state.frozen), batch, rng=rng)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    metrics = {"loss": loss, "num_examples": sums["count"]}
    if "itm_correct" in sums:
        metrics["itm_accuracy"] = sums["itm_correct"] / jnp.maximum(sums["itm_pairs"], 1.0)
    return grads, metrics


def make_train_step(plan: TrainPlan) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with the state donated.

    batch: global arrays (see `sharding.global_batch`). Next-token phases read input_ids,
    target_ids, loss_mask, positions, mask_ar (+ images, segment_ids); contrastive reads images
    and text_ids. metrics: loss, grad_norm, lr, is_finite (1.0 / 0.0), num_examples, and
    token_accuracy + num_loss_tokens (next-token); examples_seen when the schedule counts
    examples."""
    phase = plan.config.phase
    contrastive = phase.reads_pairs
    required_keys = pair_keys(phase) if contrastive else NEXT_TOKEN_KEYS
    if phase.name in ("align", "instruct"):
        required_keys += ("images",)

    def train_step(state: TrainState, batch: dict):
        _require(batch, required_keys, phase.name)
        grads_fn = _contrastive_grads if contrastive else _next_token_grads
        grads, metrics = grads_fn(plan, state, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = plan.optimizer.update(grads, state.opt_state, state.trainable,
                                                   num_examples=metrics["num_examples"])
        trainable = optax.apply_updates(state.trainable, updates)
        is_finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep_if_bad = lambda new, old: jnp.where(is_finite, new, old)  # noqa: E731
        trainable = jax.tree.map(keep_if_bad, trainable, state.trainable)
        opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
        by_examples = plan.config.schedule_unit == "examples"
        lr = plan.schedule(examples_seen(state.opt_state) if by_examples else state.step)
        metrics = {**metrics, "grad_norm": grad_norm, "lr": lr,
                   "is_finite": is_finite.astype(jnp.float32)}
        if by_examples:  # exact and global, restored on resume
            metrics["examples_seen"] = examples_seen(opt_state)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    jitted = jax.jit(train_step, donate_argnums=(0,),
                     out_shardings=(plan.state_shardings, NamedSharding(plan.mesh, P())))

    def run(state: TrainState, batch: dict):
        with sharding.rules_context(plan.mesh, plan.rules):
            return jitted(state, batch)

    def lower(state: TrainState, batch: dict):
        """Ahead-of-time lowering from ShapeDtypeStructs (`vlm-jax plan`)."""
        with sharding.rules_context(plan.mesh, plan.rules):
            return jitted.lower(state, batch)
    run.lower = lower
    return run
