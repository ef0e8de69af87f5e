"""A model directory: config + params + tokenizer, the unit that import, training, generation and
export hand to each other.

    DIR/config.json     {"format": "vlm_jax.model/1", "model": <VLMConfig as a dict>}
    DIR/params/         orbax checkpoint of the param tree (restores onto any mesh)
    DIR/tokenizer/      the tokenizer files (tokenizer.json or a SentencePiece .model)

Training checkpoints (`vlm_jax/checkpoint.py`) hold the same config and params plus optimizer and
data-iterator state; `load_model` accepts a model directory.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vlm_jax.config_utils import from_dict, to_dict
from vlm_jax.models.vlm import VLMConfig

FORMAT = "vlm_jax.model/1"


def save_model(directory: str, config: VLMConfig, params: Any, tokenizer=None) -> None:
    """Write a model directory (overwrites `directory/params` if present)."""
    path = epath.Path(directory).absolute() if "://" not in str(directory) else epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", params, force=True)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer"))
    if jax.process_index() == 0:
        # Written last: a directory without config.json is an incomplete save.
        (path / "config.json").write_text(
            json.dumps({"format": FORMAT, "model": to_dict(config)}, indent=2))


def load_config(directory: str) -> VLMConfig:
    path = epath.Path(directory)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} is not a vlm_jax model directory (no config.json; "
                                f"an interrupted save or a different kind of checkpoint)")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return from_dict(VLMConfig, meta["model"], "model")


def load_model(directory: str, shardings: Any = None, load_tokenizer: bool = True):
    """(config, params, tokenizer or None). `shardings`: a tree of jax.sharding.Sharding matching
    the params to restore them directly onto a mesh; default: one device."""
    from vlm_jax.models.vlm import init_params

    config = load_config(directory)
    path = epath.Path(directory).absolute() if "://" not in str(directory) else epath.Path(directory)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    params = ocp.StandardCheckpointer().restore(path / "params", target)
    tokenizer = None
    tokenizer_dir = path / "tokenizer"
    if load_tokenizer and tokenizer_dir.exists():
        from vlm_jax.data.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_path(os.fspath(tokenizer_dir))
    return config, params, tokenizer


def numpy_params(params: Any) -> Any:
    """Host copy of a param tree (for converters and tests)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
