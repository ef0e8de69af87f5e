"""Model FLOPs per optimizer step (analytic, from the config), accelerator peaks, and MFU.

Convention (the one of the PyTorch peer `bench/peer_hf_llava.py`, so both sides count alike):
a matmul with N weights costs 2N FLOPs per token forward; its backward costs 2N for the
gradient w.r.t. its input (needed when anything upstream trains) plus 2N for the gradient
w.r.t. its weights (when it trains). So per token and weight:

    trainable part                                   6N   (fwd + input grad + weight grad)
    frozen part that the gradient passes through     4N   (align: the frozen LLM; LoRA's base LLM)
    frozen part with nothing trainable upstream      2N   (the frozen vision tower: forward only)

N counts matmul weights only (dense kernels, the patch embedding, the LM head); biases, norms,
activations and embedding *lookups* are free. The LM head is a real V x D matmul (tied or not)
and is counted at every position. Attention scores and values cost 4 * T^2 * width forward per
layer and row (full T^2: no causal discount, PaLM/Megatron), x3 when the backward passes
through. HF runs every vision layer even when `feature_layer` reads an earlier one, and the peer
counts them all; so do we by default (`vision_layers`). Our model is allowed to do less (skip
layers after `feature_layer`, compute logits only where a loss is taken): the model-FLOP count
stays the same, which makes achieved FLOP/s comparable across implementations; pass
`vision_layers` / `lm_head_positions` to count what an implementation executes instead.
Rematerialisation is never counted (model FLOPs, not hardware FLOPs).

Unknown FLOPs are None, never an exception: a part without a formula (a projector type missing
from `PROJECTOR_FLOP_FORMULAS`) makes `projector_forward_flops` and `train_step_flops` return
None, `missing_flop_formula` names it, and `mfu` is then None (the training loop logs
`mfu: null`).

MFU = flops_per_step / step_seconds / (peak_flops_per_device * num_devices).

Peaks (`peak_flops_per_device`) are dense matmul peaks per JAX device at the precision JAX
uses by default: bf16 compute -> the bf16 tensor-core / MXU peak; f32 compute -> TF32 on NVIDIA
Ampere and later and one bf16 pass on TPU (JAX's default f32 matmul precision there). On CPU
there is no honest datasheet number: pass the measured GFLOP/s of a large f32 matmul
(`measure_matmul_flops`) or a configured figure; the CPU devices of one process share its cores,
so the per-device peak is the process's figure divided by the local CPU device count.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Collection, Mapping

import jax
import jax.numpy as jnp

from vlm_jax.models.vlm import VLMConfig, param_shapes
from vlm_jax.train import phases
from vlm_jax.train.phases import PhaseConfig

# data flow of the next-token phases (cross-attention blocks feed the decoder layers after them)
NEXT_TOKEN_ORDER = ("vision_tower", "projector", "cross_attention", "llm")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step, by part (each already includes its forward/backward factor)."""
    vision: int = 0
    projector: int = 0
    decoder: int = 0            # decoder layer matmuls
    lm_head: int = 0
    decoder_attention: int = 0
    cross_attention: int = 0    # cross-attention fusion: its blocks' matmuls and attention
    text_tower: int = 0         # contrastive phase
    contrastive_loss: int = 0   # contrastive phase: the B x B similarity matmul

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


# ----------------------------------------------------------------------------- matmul weights

def vision_layer_weights(width: int, mlp_dim: int) -> int:
    """Matmul weights of one SigLIP encoder layer: q, k, v, o and fc1, fc2."""
    return 4 * width * width + 2 * width * mlp_dim


def decoder_layer_weights(llm) -> int:
    """Matmul weights of one decoder layer: q, k, v, o and the gated MLP's gate, up, down."""
    d, hd = llm.hidden_size, llm.head_dim
    attention = d * llm.num_heads * hd * 2 + d * llm.num_kv_heads * hd * 2
    return attention + 3 * d * llm.mlp_dim


def _linear_flops(proj, patches: int, dv: int, dt: int) -> int:
    return 2 * patches * dv * dt


def _mlp2x_gelu_flops(proj, patches: int, dv: int, dt: int) -> int:
    return 2 * patches * (dv * dt + dt * dt)


def _pixel_shuffle_flops(proj, patches: int, dv: int, dt: int) -> int:
    s2 = proj.pixel_shuffle_factor ** 2
    weights = dv * s2 * dt + (proj.mlp_depth - 1) * dt * dt
    return 2 * (patches // s2) * weights


def _resampler_flops(proj, patches: int, dv: int, dt: int) -> int:
    queries, keys = proj.num_queries, patches + proj.num_queries
    per_block = (2 * queries * 2 * dt * dt                  # q and o on the latents
                 + 2 * keys * 2 * dt * dt                   # k and v on [media; latents]
                 + 4 * queries * keys * dt                  # scores and values
                 + 2 * queries * 2 * proj.resampler_mlp_ratio * dt * dt)
    return 2 * patches * dv * dt + proj.resampler_depth * per_block


# projector type -> forward FLOPs of one image: (ProjectorConfig, patches, vision width, LLM width).
# A type missing here (a new projector nobody has counted yet) makes its FLOPs unknown: None.
PROJECTOR_FLOP_FORMULAS: dict[str, Callable[[Any, int, int, int], int]] = {
    "linear": _linear_flops,
    "mlp2x_gelu": _mlp2x_gelu_flops,
    "pixel_shuffle": _pixel_shuffle_flops,
    "resampler": _resampler_flops,
}


def projector_forward_flops(model: VLMConfig) -> int | None:
    """Forward FLOPs of the projector for one image (its matmuls, plus attention for a resampler);
    None when `model.projector.type` has no formula in `PROJECTOR_FLOP_FORMULAS`."""
    proj, dv, dt = model.projector, model.vision.width, model.llm.hidden_size
    formula = PROJECTOR_FLOP_FORMULAS.get(proj.type)
    if formula is None:
        return None
    patches = model.vision.num_patches - (1 if model.vision_feature_select == "default" else 0)
    return formula(proj, patches, dv, dt)


def missing_flop_formula(model: VLMConfig, phase) -> str | None:
    """What `train_step_flops` cannot count for `model` in `phase` (a PhaseConfig or its name),
    as a config setting (e.g. "model.projector.type='foo'"); None when it counts everything."""
    if isinstance(phase, str):
        phase = PhaseConfig(name=phase)
    if phase.step_kind == "itm":
        return f"train.phase.name={phase.name!r} (the matching step has no FLOP formula yet)"
    if phase.step_kind == "contrastive":  # no projector in the contrastive step
        return None
    if model.vision is not None and model.projector is not None \
            and model.projector.type not in PROJECTOR_FLOP_FORMULAS:
        return f"model.projector.type={model.projector.type!r}"
    return None


def vision_forward_flops(vision, num_layers: int | None = None, with_head: bool = False) -> int:
    """Forward FLOPs of the SigLIP ViT for one image: patch embedding, `num_layers` encoder
    layers (default: all) with attention, and optionally the MAP pooling head."""
    layers_run = vision.depth if num_layers is None else num_layers
    n, d = vision.num_patches, vision.width
    flops = 2 * n * vision.patch_size ** 2 * 3 * d
    flops += layers_run * (2 * n * vision_layer_weights(d, vision.mlp_dim) + 4 * n * n * d)
    if with_head:
        # One probe query attends to the n tokens: k, v on n tokens; q, o and the MLP on one.
        flops += 2 * (2 * n * d * d + 2 * d * d + 2 * d * vision.mlp_dim) + 4 * n * d
    return flops


def text_tower_forward_flops(text) -> int:
    """Forward FLOPs of the SigLIP text tower for one caption of `max_len` tokens."""
    n, d = text.max_len, text.width
    return (text.depth * (2 * n * vision_layer_weights(d, text.mlp_dim) + 4 * n * n * d)
            + 2 * d * text.projection_dim)


# ----------------------------------------------------------------------------- what trains

def trainable_groups(lr_multipliers: Mapping[str, Any]) -> frozenset[str]:
    """Top-level param groups with at least one trainable leaf, from an lr-multiplier tree
    (`TrainPlan.lr_multipliers` / `phases.lr_multipliers`: None = frozen)."""
    return frozenset(name for name, sub in lr_multipliers.items()
                     if any(v is not None for v in jax.tree.leaves(sub, is_leaf=lambda x: x is None)))


def phase_trainable_groups(model: VLMConfig, phase) -> frozenset[str]:
    """`trainable_groups` of `phase` (a PhaseConfig) on `model`'s params (shapes only)."""
    abstract = param_shapes(model)
    if phase.lora is not None:
        abstract = {**abstract, phases.LORA_KEY: {"llm": {}}}
    groups = trainable_groups(phases.lr_multipliers(abstract, phase))
    return groups | ({phases.LORA_KEY} if phase.lora is not None else frozenset())


# ----------------------------------------------------------------------------- step FLOPs

def train_step_flops(model: VLMConfig, phase, batch_size: int, seq_len: int | None = None,
                     num_images: int | None = None, trainable: Collection[str] | None = None,
                     vision_layers: int | None = None, lm_head_positions: int | None = None
                     ) -> StepFlops | None:
    """Model FLOPs of one optimizer step (all micro-batches) on `batch_size` rows, or None when
    some part has no FLOP formula (`missing_flop_formula` names it): unknown, never a guess.

    phase: a `phases.PhaseConfig` (or its name). Next-token phases: `seq_len` tokens per row and
    `num_images` images in the whole batch (default one per row; images are counted, not
    image slots). Contrastive: `batch_size` image-caption pairs, captions of text_tower.max_len.
    trainable: top-level groups that train ('vision_tower', 'projector', 'llm', 'text_tower',
    'contrastive', 'lora'); default from the phase's rules (`phase_trainable_groups`).
    vision_layers: encoder layers counted per image (default all: the HF/peer convention).
    lm_head_positions: positions per row whose logits are counted (default all `seq_len`).
    """
    if isinstance(phase, str):
        phase = PhaseConfig(name=phase)
    if trainable is None:
        trainable = phase_trainable_groups(model, phase)
    trainable = frozenset(trainable)
    if phase.step_kind == "contrastive":
        return _contrastive_flops(model, batch_size, trainable)
    if phase.step_kind == "itm":
        return None
    if seq_len is None:
        raise ValueError(f"train_step_flops: phase {phase.name!r} needs seq_len")
    if missing_flop_formula(model, phase) is not None:
        return None
    return _next_token_flops(model, batch_size, seq_len, num_images, trainable, vision_layers,
                             lm_head_positions)


def _next_token_flops(model, batch_size, seq_len, num_images, trainable, vision_layers,
                      lm_head_positions) -> StepFlops:
    llm = model.llm
    # A part passes the gradient through when anything before it in the data flow trains.
    parts = {name: name in trainable for name in NEXT_TOKEN_ORDER}
    lora = "lora" in trainable
    upstream = {name: any(parts[p] for p in NEXT_TOKEN_ORDER[:i])
                for i, name in enumerate(NEXT_TOKEN_ORDER)}
    upstream["llm"] = upstream["llm"] or lora

    def factor(name):  # multiplier on the forward FLOPs
        return 1 + int(parts[name] or upstream[name]) + int(parts[name])

    flops = {}
    if model.vision is not None and model.projector is not None:
        images = batch_size if num_images is None else num_images
        flops["vision"] = (factor("vision_tower") * images
                           * vision_forward_flops(model.vision, vision_layers))
        flops["projector"] = factor("projector") * images * projector_forward_flops(model)
    tokens = batch_size * seq_len
    head_tokens = batch_size * (seq_len if lm_head_positions is None else lm_head_positions)
    flops["decoder"] = factor("llm") * 2 * tokens * llm.num_layers * decoder_layer_weights(llm)
    flops["lm_head"] = factor("llm") * 2 * head_tokens * llm.vocab_size * llm.hidden_size
    attention_factor = 3 if (parts["llm"] or upstream["llm"]) else 1
    # Keys per query: the whole row (the dense convention), or a sliding layer's window.
    keys = sum(min(seq_len, llm.sliding_window) if kind == "sliding_attention" else seq_len
               for kind in llm.layer_types)
    flops["decoder_attention"] = (attention_factor * 4 * batch_size * keys * seq_len
                                  * llm.num_heads * llm.head_dim)
    if model.fusion == "cross_attention":
        images = batch_size if num_images is None else num_images
        flops["cross_attention"] = factor("cross_attention") * len(model.cross_attention_layers) \
            * cross_attention_block_flops(model, batch_size, seq_len, images)
    return StepFlops(**flops)


def cross_attention_block_flops(model: VLMConfig, batch_size: int, seq_len: int, images: int) -> int:
    """Forward FLOPs of one cross-attention block on `batch_size` rows of `seq_len` text tokens
    holding `images` images in all: q, o and the MLP per text token, k and v per image token,
    and each text token's attention over its row's image tokens (dense, like the decoder's)."""
    llm, n = model.llm, model.features_per_image
    d, hd = llm.hidden_size, llm.head_dim
    per_text_token = 2 * (2 * d * llm.num_heads * hd + 3 * d * llm.mlp_dim)
    per_image_token = 2 * 2 * d * llm.num_kv_heads * hd
    attention = 4 * seq_len * images * n * llm.num_heads * hd  # sum over rows of T x N_row
    return batch_size * seq_len * per_text_token + images * n * per_image_token + attention


def _contrastive_flops(model, batch_size, trainable) -> StepFlops:
    vision_factor = 3 if "vision_tower" in trainable else 1
    text_factor = 3 if "text_tower" in trainable else 1
    any_trains = bool(trainable & {"vision_tower", "text_tower", "contrastive"})
    projection = model.text_tower.projection_dim
    return StepFlops(
        vision=vision_factor * batch_size * vision_forward_flops(model.vision, with_head=True),
        text_tower=text_factor * batch_size * text_tower_forward_flops(model.text_tower),
        contrastive_loss=(3 if any_trains else 1) * 2 * batch_size * batch_size * projection)


# ----------------------------------------------------------------------------- peaks and MFU

# Dense matmul peak FLOP/s per JAX device: (bf16, f32 at JAX's default precision). Matched as
# substrings of `device.device_kind`, most specific first. TPU v2/v3 expose one device per core.
_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),          # SXM / HBM3; f32 = TF32
    ("H200", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10G", 70e12, 35e12),
    ("V100", 125e12, 15.7e12),         # fp16 tensor cores; no bf16, f32 on CUDA cores
    ("TPU v6 lite", 918e12, 918e12),   # f32 = one bf16 MXU pass (JAX's TPU default)
    ("TPU v6e", 918e12, 918e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v3", 61.5e12, 61.5e12),
    ("TPU v2", 22.5e12, 22.5e12),
)
COMPUTE_DTYPES = ("float32", "bfloat16")


def known_peak_flops(device_kind: str, dtype: str = "float32") -> float | None:
    """Datasheet dense peak for a device kind and compute dtype, or None when unknown."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"peak FLOPs: dtype={dtype!r}; supported: {COMPUTE_DTYPES}")
    for name, bf16, f32 in _PEAKS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else f32
    return None


def measure_matmul_flops(size: int = 2048, dtype: str = "float32", repeats: int = 5,
                         device: jax.Device | None = None) -> float:
    """Best FLOP/s of a jitted [size, size] @ [size, size] matmul on `device` (the CPU yardstick)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.full((size, size), 0.5, dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def peak_flops_per_device(device: jax.Device | None = None, dtype: str = "float32",
                          configured: float | None = None, measure_cpu: bool = True) -> float | None:
    """Peak FLOP/s of one device for MFU.

    `configured` wins when given. Otherwise: the datasheet table for GPUs/TPUs; on CPU a measured
    large matmul (`measure_cpu`) divided by the local CPU device count (they share the cores).
    None when the accelerator is unknown and nothing is configured (MFU is then not reported).
    """
    if configured is not None:
        if configured <= 0:
            raise ValueError(f"configured peak FLOP/s must be positive, got {configured}")
        return float(configured)
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        if not measure_cpu:
            return None
        num_cpu_devices = len(jax.local_devices(backend="cpu"))
        return measure_matmul_flops(dtype=dtype, device=device) / num_cpu_devices
    return known_peak_flops(device.device_kind, dtype)


def mfu(flops_per_step: float | None, step_seconds: float, peak_per_device: float | None,
        num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the FLOPs or the peak are unknown)."""
    if flops_per_step is None or peak_per_device is None:
        return None
    if step_seconds <= 0 or num_devices < 1:
        raise ValueError(f"mfu: step_seconds={step_seconds} and num_devices={num_devices} must be "
                         f"positive")
    return flops_per_step / step_seconds / (peak_per_device * num_devices)
