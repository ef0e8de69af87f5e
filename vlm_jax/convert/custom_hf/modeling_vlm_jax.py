"""A vlm_jax VLM in PyTorch: SigLIP vision tower -> projector -> decoder LLM, image features
spliced into the text at the image-token positions. Written by `vlm-jax export-hf --format custom`
beside config.json and loaded with

    AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True)

It imports torch and transformers only. The vision tower is transformers' SiglipVisionModel and the
LLM its Llama / Qwen2 / Gemma *ForCausalLM (KV cache, attention kernels and `generate` are theirs);
this file holds what transformers has no class for: the projector, with vlm_jax's numerics
(vlm_jax/models/projector.py), and the splicing (vlm_jax/models/vlm.py `VLM.embed`), or, for a
model with `fusion="cross_attention"`, the gated cross-attention blocks
(vlm_jax/models/cross_attention.py), which run before the LLM layers `cross_attention_layers`
names (forward pre-hooks on those layers: the LLM's own weights and code stay as they are).

Weights (model.safetensors):
    vision_tower.*      SiglipVisionModel
    projector.*         input_norm, pos_embed, mlp.linear_{1..} | media_proj, queries, blocks.{i}, ln_out
    language_model.*    the *ForCausalLM (model.*, lm_head.weight unless tied)
    cross_attention.*   the cross-attention blocks (fusion="cross_attention" only)
"""
import math

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers.activations import ACT2FN

from .configuration_vlm_jax import VlmJaxConfig

# vlm_jax's LayerNorm default; every projector norm uses it.
LAYER_NORM_EPS = 1e-6


def pixel_shuffle(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, N, D] on a sqrt(N) x sqrt(N) grid -> [B, N / s^2, D * s^2]: each output token concatenates
    an s x s block of neighbouring patches, row-major inside the block."""
    batch, num_tokens, dim = tokens.shape
    side, s = math.isqrt(num_tokens), factor
    x = tokens.reshape(batch, side // s, s, side // s, s, dim)  # [B, Hb, sy, Wb, sx, D]
    x = x.permute(0, 1, 3, 2, 4, 5)                              # [B, Hb, Wb, sy, sx, D]
    return x.reshape(batch, (side // s) ** 2, s * s * dim)


class MLP(nn.Module):
    """Linear layers named linear_1, linear_2, ... with the activation between them."""

    def __init__(self, in_dim: int, features: tuple, act: str, bias: bool):
        super().__init__()
        self.num_layers = len(features)
        for i, out_dim in enumerate(features):
            self.add_module(f"linear_{i + 1}", nn.Linear(in_dim, out_dim, bias=bias))
            in_dim = out_dim
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            if i:
                x = self.act(x)
            x = getattr(self, f"linear_{i + 1}")(x)
        return x


class ResamplerBlock(nn.Module):
    """Latents cross-attend to [image tokens; latents] (Flamingo's Perceiver resampler), then an
    MLP; q/k/v/o have no bias, the MLP uses exact GELU."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.ln_latents = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.ln_media = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.q = nn.Linear(width, num_heads * self.head_dim, bias=False)
        self.k = nn.Linear(width, num_heads * self.head_dim, bias=False)
        self.v = nn.Linear(width, num_heads * self.head_dim, bias=False)
        self.o = nn.Linear(num_heads * self.head_dim, width, bias=False)
        self.ln_mlp = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = MLP(width, (width * mlp_ratio, width), "gelu", bias=True)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        batch, num_queries, _ = latents.shape
        q_in = self.ln_latents(latents)
        kv_in = torch.cat([self.ln_media(media), q_in], dim=1)

        def heads(x):  # [B, T, H * hd] -> [B, H, T, hd]
            return x.reshape(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(q_in)), heads(self.k(kv_in)), heads(self.v(kv_in))
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, num_queries, -1)
        latents = latents + self.o(attended)
        return latents + self.mlp(self.ln_mlp(latents))


class VlmJaxProjector(nn.Module):
    """Vision tokens [B, N, Dv] -> LLM input embeddings [B, image_seq_length, D].

    linear / mlp2x_gelu / pixel_shuffle: [LayerNorm] -> [pixel shuffle] -> [+ pos_embed] -> MLP.
    resampler: [LayerNorm] -> media_proj, then learned queries through the resampler blocks.
    """

    def __init__(self, config: VlmJaxConfig, num_vision_tokens: int):
        super().__init__()
        self.config = config
        vision_width = config.vision_config.hidden_size
        out_dim = config.text_config.hidden_size
        kind = config.projector_type
        self.input_norm = (nn.LayerNorm(vision_width, eps=LAYER_NORM_EPS)
                           if config.projector_input_norm else None)
        self.pos_embed = None
        if kind == "resampler":
            self.media_proj = nn.Linear(vision_width, out_dim, bias=True)
            self.queries = nn.Parameter(torch.zeros(config.resampler_num_queries, out_dim))
            self.blocks = nn.ModuleList(
                ResamplerBlock(out_dim, config.resampler_heads, config.resampler_mlp_ratio)
                for _ in range(config.resampler_depth))
            self.ln_out = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
            return
        in_dim, num_tokens = vision_width, num_vision_tokens
        if kind == "linear":
            features = (out_dim,)
        elif kind == "mlp2x_gelu":
            features = (out_dim, out_dim)
        else:  # pixel_shuffle
            s = config.pixel_shuffle_factor
            in_dim, num_tokens = in_dim * s * s, num_tokens // (s * s)
            features = (config.projector_hidden_dim,) * (config.projector_mlp_depth - 1) + (out_dim,)
        if config.projector_pos_embed:
            # one learned embedding per output token (its place on the image grid)
            self.pos_embed = nn.Parameter(torch.zeros(num_tokens, in_dim))
        self.mlp = MLP(in_dim, features, config.projector_hidden_act, config.projector_bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            tokens = self.input_norm(tokens)
        if self.config.projector_type == "resampler":
            media = self.media_proj(tokens)
            latents = self.queries.to(media.dtype).expand(tokens.shape[0], -1, -1)
            for block in self.blocks:
                latents = block(latents, media)
            return self.ln_out(latents)
        if self.config.projector_type == "pixel_shuffle":
            tokens = pixel_shuffle(tokens, self.config.pixel_shuffle_factor)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed.to(tokens.dtype)
        return self.mlp(tokens)


class RMSNorm(nn.Module):
    """vlm_jax's RMSNorm: f32 statistics; `plus_one` stores w and applies (1 + w) (Gemma)."""

    def __init__(self, dim: int, eps: float, plus_one: bool):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float()
        return (y * (1.0 + weight if self.plus_one else weight)).to(x.dtype)


class CrossAttention(nn.Module):
    """Text queries over image keys / values: GQA, RMSNorm over each head of q and k, no RoPE."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float,
                 plus_one: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps, plus_one)
        self.k_norm = RMSNorm(head_dim, eps, plus_one)

    def image_kv(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens [B, N, D] -> (k, v) [B, K, N, hd], computed once per prompt."""
        batch, num = images.shape[:2]
        k = self.k_norm(self.k_proj(images).view(batch, num, self.kv_heads, self.head_dim))
        v = self.v_proj(images).view(batch, num, self.kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple, mask: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[:2]
        q = self.q_norm(self.q_proj(x).view(batch, length, self.heads, self.head_dim))
        q = q.transpose(1, 2)                                          # [B, H, T, hd]
        groups = self.heads // self.kv_heads
        k, v = (t.repeat_interleave(groups, dim=1) for t in kv)         # [B, H, N, hd]
        scores = (q @ k.transpose(-1, -2)).float() * self.head_dim ** -0.5
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class CrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * attn(norm(x)), then x + tanh(mlp_gate) * mlp(norm(x)); a text token
    that sees no image gets neither (`rows`). Mllama's tensor names."""

    def __init__(self, config: VlmJaxConfig):
        super().__init__()
        text = config.text_config
        dim, heads = text.hidden_size, text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or dim // heads
        eps, plus_one = text.rms_norm_eps, config.cross_attention_norm_plus_one
        self.input_layernorm = RMSNorm(dim, eps, plus_one)
        self.cross_attn = CrossAttention(dim, heads, text.num_key_value_heads, head_dim, eps,
                                         plus_one)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(dim, eps, plus_one)
        self.mlp = GatedMLP(dim, text.intermediate_size, config.cross_attention_mlp_act)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: tuple, mask: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        h = torch.where(rows, self.cross_attn(self.input_layernorm(x), kv, mask), zero)
        x = x + self.cross_attn_attn_gate.tanh().to(x.dtype) * h
        h = torch.where(rows, self.mlp(self.post_attention_layernorm(x)), zero)
        return x + self.cross_attn_mlp_gate.tanh().to(x.dtype) * h


class VlmJaxPreTrainedModel(PreTrainedModel):
    config_class = VlmJaxConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VlmJaxProjector):  # vlm_jax's initialisers
            if module.pos_embed is not None:
                nn.init.normal_(module.pos_embed, std=1.0)
            if getattr(module, "queries", None) is not None:
                nn.init.normal_(module.queries, std=0.02)


class VlmJaxForConditionalGeneration(VlmJaxPreTrainedModel, GenerationMixin):
    """forward(input_ids, pixel_values, attention_mask, past_key_values, ...) -> the LLM's
    CausalLMOutputWithPast. `generate` passes pixel_values to the prefill only; later steps
    read the image through the KV cache."""

    def __init__(self, config: VlmJaxConfig):
        super().__init__(config)
        vision = config.vision_config
        num_vision_tokens = (vision.image_size // vision.patch_size) ** 2
        if config.vision_feature_select_strategy == "default":
            num_vision_tokens -= 1
        self.vision_tower = SiglipVisionModel(vision)
        self.projector = VlmJaxProjector(config, num_vision_tokens)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._cross = None  # the prompt's image keys / values and markers (cross-attention)
        if config.fusion == "cross_attention":
            self.cross_attention = nn.ModuleList(
                CrossAttentionBlock(config) for _ in config.cross_attention_layers)
            decoder_layers = self.language_model.model.layers
            for slot, layer in enumerate(config.cross_attention_layers):
                decoder_layers[layer].register_forward_pre_hook(self._fuse_before(slot),
                                                                with_kwargs=True)
        self.post_init()

    def _fuse_before(self, slot: int):
        """A pre-hook running cross-attention block `slot` on the layer's input hidden states."""
        def hook(module, args, kwargs):
            cross = self._cross
            if cross is None:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            x = self.cross_attention[slot](x, cross["kv"][slot], cross["mask"], cross["rows"])
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        return hook

    def _set_cross_inputs(self, input_ids: torch.LongTensor, pixel_values, past_key_values,
                          dtype: torch.dtype) -> None:
        """What the cross-attention blocks read for this call. A prompt with images: their keys /
        values (once) and where each image's marker sits; the k-th marker of a row stands for the
        row's k-th image, the images in row-major order. Then every text token sees the images
        whose marker is at or before it; a later decoding step keeps the prompt's images."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if pixel_values is not None:
            features = self.get_image_features(pixel_values.to(dtype))   # [num_images, n, D]
            is_marker = input_ids == self.config.image_token_id
            counts = is_marker.sum(dim=1)
            if int(counts.sum()) != features.shape[0]:
                raise ValueError(f"the text has {int(counts.sum())} image tokens (id "
                                 f"{self.config.image_token_id}) but {features.shape[0]} image(s) "
                                 f"were given (one image token per image)")
            batch, per_image, dim = input_ids.shape[0], features.shape[1], features.shape[2]
            slots = max(int(counts.max()), 1)
            images = features.new_zeros(batch, slots * per_image, dim)
            marker = torch.zeros(batch, slots, dtype=torch.long, device=input_ids.device)
            present = torch.zeros(batch, slots, dtype=torch.bool, device=input_ids.device)
            start = 0
            for row in range(batch):
                where = is_marker[row].nonzero()[:, 0]
                count = len(where)
                images[row, :count * per_image] = features[start:start + count].reshape(-1, dim)
                marker[row, :count], present[row, :count] = where + past, True
                start += count
            self._cross = {"kv": [block.cross_attn.image_kv(images) for block in self.cross_attention],
                           "marker": marker, "present": present, "per_image": per_image}
        elif past == 0:
            self._cross = None  # a new prompt without images
        if self._cross is None:
            return
        cross = self._cross
        query = past + torch.arange(input_ids.shape[1], device=input_ids.device)
        sees = cross["present"][:, None, :] & (cross["marker"][:, None, :] <= query[None, :, None])
        cross["mask"] = sees.repeat_interleave(cross["per_image"], dim=2)[:, None]  # [B, 1, T, N]
        cross["rows"] = sees.any(dim=-1, keepdim=True)                               # [B, T, 1]

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_images, 3, S, S] -> image tokens [num_images, image_seq_length, D]."""
        outputs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        features = outputs.hidden_states[self.config.vision_feature_layer]
        if getattr(self.config, "vision_feature_post_norm", False):
            features = self.vision_tower.post_layernorm(features)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.projector(features)

    def embed(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (Gemma's are scaled by its embedding layer) with the image features
        written into the image-token positions: the k-th image token of the batch, in row-major
        order, receives the k-th image feature. Image features are not scaled."""
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        features = self.get_image_features(pixel_values.to(embeds.dtype))
        is_image = input_ids == self.config.image_token_id
        num_tokens, num_features = int(is_image.sum()), features.shape[0] * features.shape[1]
        if num_tokens != num_features:
            raise ValueError(f"the text has {num_tokens} image tokens (id {self.config.image_token_id}) "
                             f"but {features.shape[0]} image(s) give {num_features} features "
                             f"({self.config.image_seq_length} per image)")
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if self.config.fusion == "cross_attention":
            if input_ids is None:
                raise ValueError("a cross-attention-fusion model needs input_ids (its image "
                                 "markers say which text sees which image)")
            inputs_embeds = self.get_input_embeddings()(input_ids)
            self._set_cross_inputs(input_ids, pixel_values, past_key_values, inputs_embeds.dtype)
        elif inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (to find the image tokens), not inputs_embeds")
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)


__all__ = ["VlmJaxForConditionalGeneration", "VlmJaxPreTrainedModel"]
