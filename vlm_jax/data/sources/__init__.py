"""Data sources: each yields raw examples (see the data contract in vlm_jax/data/__init__.py)."""
