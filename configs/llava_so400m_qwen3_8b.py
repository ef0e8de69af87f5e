"""LLaVA-1.5 `instruct` on SigLIP-So400m/14-384 + Qwen3-8B (Qwen/Qwen3-8B).

configs/llava_so400m.py with llm=qwen3_8b; its arguments (target=v5p-64|8xh100, init=, data=,
images=, ...) pass through. Fit check (numbers in docs/scaling.md):

    vlm-jax plan --config configs/llava_so400m_qwen3_8b.py:target=v5p-64 --mesh data=1,fsdp=32 \\
        --devices tpu_v5p
"""
import os

from vlm_jax.config import load_module

_BASE = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava_so400m.py"))


def get_config(arg=None):
    return _BASE.get_config("llm=qwen3_8b" + ("," + arg if arg else ""))
