"""vlm_jax: train vision-language models (SigLIP + projector + decoder LLM) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="vlm_jax",
    version="0.1.0",
    description="JAX/Flax research codebase for training vision-language models (LLaVA / PaliGemma style).",
    python_requires=">=3.10",
    packages=find_packages(include=["vlm_jax", "vlm_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "ml-collections>=1.1",
        "safetensors>=0.8",
        "sentencepiece>=0.2",
        "tokenizers>=0.23",
        "pillow>=11",
        "numpy>=2",
        "einops>=0.8",
        "tqdm>=4.66",
        "etils[epath]",
    ],
    extras_require={
        # PyTorch side: parity tests and export to HF transformers. Pin torch (see launch/constraints.txt).
        "torch": ["torch", "transformers>=5.0", "psutil"],
        "dev": ["pytest>=8", "chex"],
    },
    entry_points={"console_scripts": ["vlm-jax=vlm_jax.cli:main"]},
)
