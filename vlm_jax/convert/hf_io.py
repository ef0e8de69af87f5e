"""Reading and writing HF checkpoint directories (config.json + safetensors, sharded or not)."""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from vlm_jax.errors import ConversionError


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{hf_dir}: no config.json (not a HF model directory)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def read_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of `hf_dir` (model.safetensors or a sharded index) as numpy arrays.

    bf16 tensors stay bf16 (ml_dtypes); callers cast to the param dtype.
    """
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no .safetensors files (PyTorch .bin checkpoints are "
                              f"not read; convert them with transformers' save_pretrained)")
    state = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        try:
            state.update(load_file(path))
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001  safetensors reports damage as its own error type
            raise ConversionError(f"{path} does not read as safetensors (truncated or damaged?): "
                                  f"{e}") from None
    return state


def write_hf_dir(out_dir: str, config: dict, state_dict: dict[str, np.ndarray]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def check_keys(state_dict: dict, expected: set[str], what: str) -> None:
    """Raise naming the keys `state_dict` has beyond `expected` (and those it lacks)."""
    unexpected = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))
