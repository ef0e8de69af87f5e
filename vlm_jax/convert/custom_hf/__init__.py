"""Source files that `vlm-jax export-hf --format custom` copies into an export directory.

They are transformers remote code (`trust_remote_code=True`): they import torch and transformers
only, and nothing in vlm_jax imports them. `convert/hf_custom.py` writes the config.json and
weights they read, `convert/hf_processor.py` the processor files.
"""
