"""LLaVA-1.5 `instruct` on SigLIP-So400m/14-384 + Gemma-3-4B's language model (the text side
of google/gemma-3-4b-it, as a gemma3_text directory for `import-hf --text`).

configs/llava_so400m.py with llm=gemma3_4b; its arguments (target=v5p-64|8xh100, init=, data=,
images=, ...) pass through. Fit check (numbers in docs/scaling.md):

    vlm-jax plan --config configs/llava_so400m_gemma3_4b.py:target=v5p-64 --mesh data=1,fsdp=32 \\
        --devices tpu_v5p
"""
import os

from vlm_jax.config import load_module

_BASE = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava_so400m.py"))


def get_config(arg=None):
    return _BASE.get_config("llm=gemma3_4b" + ("," + arg if arg else ""))
