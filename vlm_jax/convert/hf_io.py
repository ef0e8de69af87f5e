"""Reading and writing HF checkpoint directories (config.json + safetensors, sharded or not)."""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from vlm_jax.errors import ConversionError, InputError


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


DEFAULT_SHARD_SIZE = "5GB"  # what transformers' save_pretrained writes per shard by default
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int, field: str = "--max-shard-size") -> int:
    """Bytes in "5GB" / "500MB" / "2GiB" (decimal and binary units, as HF writes them) or an int."""
    if isinstance(text, int):
        size = text
    else:
        value = str(text).strip().upper()
        unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if value.endswith(u)), "")
        try:
            size = int(float(value[:len(value) - len(unit)]) * _SIZE_UNITS.get(unit, 1))
        except ValueError:
            size = -1
    if size <= 0:
        raise InputError(f"{field} {text!r}: a positive size such as 5GB, 500MB or 2GiB")
    return size


def write_hf_dir(out_dir: str, config: dict, state_dict: dict[str, np.ndarray],
                 max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> list[str]:
    """config.json and the tensors: one model.safetensors when they fit `max_shard_size`, else
    model-0000i-of-0000n.safetensors shards (tensors in key order, a shard closed before it would
    pass the size; a larger tensor gets a shard of its own) and model.safetensors.index.json, as
    transformers writes and reads them. Returns the safetensors file names."""
    limit = parse_size(max_shard_size)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for key, value in tensors.items():
        if shards[-1] and used + value.nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][key] = value
        used += value.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return names


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
