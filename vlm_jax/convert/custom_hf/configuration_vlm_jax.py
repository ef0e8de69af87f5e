"""Config of a vlm_jax VLM exported as transformers remote code: SigLIP vision tower -> projector
-> decoder LLM (Llama / Qwen2 / Gemma). Written by `vlm-jax export-hf --format custom`; imports
torch and transformers only.

The vision and text sections are transformers' own SiglipVisionConfig and Llama / Qwen2 / Gemma
config; the projector is described by flat `projector_*` fields (vlm_jax's ProjectorConfig,
vlm_jax/models/projector.py).
"""
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig, SiglipVisionConfig

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "pixel_shuffle", "resampler")
FEATURE_SELECT = ("full", "default")
FUSIONS = ("early", "cross_attention")


class VlmJaxConfig(PretrainedConfig):
    model_type = "vlm_jax"
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": AutoConfig}

    def __init__(self, vision_config=None, text_config=None, image_token_id=0,
                 image_seq_length=1, vision_feature_layer=-1, vision_feature_post_norm=False,
                 vision_feature_select_strategy="full", projector_type="mlp2x_gelu",
                 projector_hidden_act="gelu", projector_bias=True, projector_input_norm=False,
                 projector_pos_embed=False, projector_mlp_depth=2, projector_hidden_dim=None,
                 pixel_shuffle_factor=2, resampler_num_queries=64, resampler_depth=2,
                 resampler_heads=8, resampler_mlp_ratio=4, fusion="early",
                 cross_attention_layers=(), cross_attention_mlp_act="silu",
                 cross_attention_norm_plus_one=False, **kwargs):
        if isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config.get("model_type", "llama")](**text_config)
        self.vision_config = vision_config if vision_config is not None else SiglipVisionConfig()
        self.text_config = text_config if text_config is not None else CONFIG_MAPPING["llama"]()
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={projector_type!r}; supported: {PROJECTOR_TYPES}")
        if vision_feature_select_strategy not in FEATURE_SELECT:
            raise ValueError(f"vision_feature_select_strategy={vision_feature_select_strategy!r}; "
                             f"supported: {FEATURE_SELECT}")
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        # An index into SiglipVisionModel's hidden_states: 0 = patch + position embeddings,
        # i = output of encoder layer i, -1 = the last layer (before post_layernorm).
        self.vision_feature_layer = vision_feature_layer
        # True: those tokens pass through the tower's post_layernorm (PaliGemma / Idefics3 read
        # the normed last layer).
        self.vision_feature_post_norm = vision_feature_post_norm
        # "default" drops the first vision token (CLIP's CLS), "full" keeps every patch.
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.projector_type = projector_type
        self.projector_hidden_act = projector_hidden_act
        self.projector_bias = projector_bias
        self.projector_input_norm = projector_input_norm
        self.projector_pos_embed = projector_pos_embed
        self.projector_mlp_depth = projector_mlp_depth
        self.projector_hidden_dim = projector_hidden_dim or self.text_config.hidden_size
        self.pixel_shuffle_factor = pixel_shuffle_factor
        self.resampler_num_queries = resampler_num_queries
        self.resampler_depth = resampler_depth
        self.resampler_heads = resampler_heads
        self.resampler_mlp_ratio = resampler_mlp_ratio
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r}; supported: {FUSIONS}")
        # "early": image features written into the text's image tokens; "cross_attention": one
        # image token per image (a marker) and gated cross-attention blocks before the LLM
        # layers `cross_attention_layers`, their MLP activation and norm form the LLM's own.
        self.fusion = fusion
        self.cross_attention_layers = list(cross_attention_layers)
        self.cross_attention_mlp_act = cross_attention_mlp_act
        self.cross_attention_norm_plus_one = cross_attention_norm_plus_one
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)


__all__ = ["VlmJaxConfig"]
