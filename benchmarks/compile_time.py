"""Compile time of the jitted VLM forward at 4 vs 16 layers (vision and LLM): nn.scan keeps it flat.

    python benchmarks/compile_time.py
"""
import time

import jax

from vlm_jax.models.decoder import decoder_config
from vlm_jax.models.projector import ProjectorConfig
from vlm_jax.models.siglip import VisionConfig
from vlm_jax.models.vlm import VLM, VLMConfig, dummy_inputs, init_params
for depth in (4, 16):
    cfg = VLMConfig(vision=VisionConfig(image_size=64, patch_size=8, width=64, depth=depth, num_heads=4, mlp_dim=128, feature_layer=-2, use_head=False),
                    projector=ProjectorConfig(), llm=decoder_config("llama", vocab_size=256, hidden_size=64, num_layers=depth, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128),
                    image_token_id=255)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    inputs = dummy_inputs(cfg, batch_size=2)
    f = jax.jit(lambda p, x: VLM(cfg).apply({"params": p}, **x))
    t = time.perf_counter(); f.lower(params, inputs).compile(); print(f"vision+llm depth {depth}: compile {time.perf_counter()-t:.2f} s")
