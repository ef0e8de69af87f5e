"""A vlm_jax VLM in PyTorch: SigLIP vision tower -> projector -> decoder LLM, image features
spliced into the text at the image-token positions. Written by `vlm-jax export-hf --format custom`
beside config.json and loaded with

    AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True)

It imports torch and transformers only. The vision tower is transformers' SiglipVisionModel and the
LLM its Llama / Qwen2 / Gemma *ForCausalLM (KV cache, attention kernels and `generate` are theirs);
this file holds what transformers has no class for: the projector, with vlm_jax's numerics
(vlm_jax/models/projector.py), and the splicing (vlm_jax/models/vlm.py `VLM.embed`).

Weights (model.safetensors):
    vision_tower.*      SiglipVisionModel
    projector.*         input_norm, pos_embed, mlp.linear_{1..} | media_proj, queries, blocks.{i}, ln_out
    language_model.*    the *ForCausalLM (model.*, lm_head.weight unless tied)
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
        self.post_init()

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
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (to find the image tokens), not inputs_embeds")
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)


__all__ = ["VlmJaxForConditionalGeneration", "VlmJaxPreTrainedModel"]
