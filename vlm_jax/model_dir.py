"""A model directory: config + params + tokenizer, the unit that import, training, generation and
export hand to each other.

    DIR/config.json     {"format": "vlm_jax.model/1", "model": <VLMConfig as a dict>,
                         "data": {"template": ..., "pad_to_square": ...},   (what it was trained on)
                         "trained_with": {"dtype": "bfloat16", ...}}        (for information)
    DIR/params/         orbax checkpoint of the param tree (restores onto any mesh)
    DIR/tokenizer/      the tokenizer files (tokenizer.json or a SentencePiece .model)
    DIR/generation_config.json   optional: the imported LLM's HF generation config (stop tokens)

The model section holds the architecture and the dtype the params are stored in, never how the
model computes: compute dtype, attention backend and remat are run settings
(`vlm.RUN_SETTINGS`), chosen by the command that uses the model (a train config, `--dtype` on
generate / eval). A directory written before this rule is read the same way: its run settings
are dropped on load and only reported as `trained_with`.

`data` holds what inference must repeat to see inputs as training did: the chat template of the
prompts and the image preprocessing (`pad_to_square`).

A directory is written whole or not at all: `save_model` fills a hidden sibling
(`.NAME.saving`) and renames it into place, so a reader never sees a half-written model.

Training checkpoints (`vlm_jax/train/checkpoint.py`) hold the same config and params plus optimizer and
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
from jax.experimental import multihost_utils

from vlm_jax.config import from_dict, to_dict
from vlm_jax.data.tiling import TilingConfig
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import CheckpointError, InputError
from vlm_jax.models.vlm import VLMConfig, architecture_only, param_shapes, run_settings

FORMAT = "vlm_jax.model/1"
# the keys of config.json's "data"; tiling: {"max_tiles": n * n, "rule": ...} (data/tiling.py)
DATA_SETTINGS = ("template", "pad_to_square", "prefix_lm", "tiling")
GENERATION_CONFIG = "generation_config.json"


def resolve_model_dir(path: str, given_as: str) -> str:
    """A model directory, or a finished run's workdir (its `model/`). A workdir holds a
    config.json of its own (the run config), so `model/` is looked for first. `given_as` is the
    flag or config field the path came from (`--checkpoint`, `train.init_from.path`), named by
    the error."""
    where = f"{given_as} {path}" if given_as.startswith("-") else f"{given_as}={path}"
    if os.path.exists(os.path.join(path, "model", "config.json")):
        return os.path.join(path, "model")
    if os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params")):
        return path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{where} is a workdir without model/ (its run did not finish): "
                              f"resume that run to the end first, or point at a model directory")
    raise CheckpointError(f"{where} is neither a model directory (config.json) nor a finished "
                          f"run's workdir (model/config.json)")


def save_model(directory: str, config: VLMConfig, params: Any, tokenizer=None,
               data: dict | None = None, generation_config: dict | None = None) -> None:
    """Write a model directory, replacing whatever is at `directory` once the new one is whole.
    `config`'s run settings are recorded as `trained_with`, not as part of the model; `data`: the
    template and preprocessing it was trained with (keys DATA_SETTINGS).

    Every process of a multi-process run calls this (each writes its own params shards); process
    0 alone writes the rest. The files go to `staging_path(directory)`, the same on every process,
    which process 0 renames into place after all processes finished: an interrupted save leaves
    the old directory or the new one, never a mix."""
    unknown = sorted(set(data or {}) - set(DATA_SETTINGS))
    if unknown:
        raise CheckpointError(f"model directory data settings {unknown}; supported: {DATA_SETTINGS}")
    path = epath.Path(directory).absolute() if "://" not in str(directory) else epath.Path(directory)
    staging = staging_path(path)
    is_writer = jax.process_index() == 0
    if is_writer and staging.exists():  # left by an interrupted save
        staging.rmtree()
    _sync_processes("vlm_jax: model staging directory cleared")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", params)
        checkpointer.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save(str(staging / "tokenizer"))
        if is_writer:
            if generation_config is not None:
                (staging / GENERATION_CONFIG).write_text(json.dumps(generation_config, indent=2))
            meta = {"format": FORMAT, "model": to_dict(architecture_only(config)),
                    "data": dict(data or {}), "trained_with": run_settings(config)}
            (staging / "config.json").write_text(json.dumps(meta, indent=2))
        _sync_processes("vlm_jax: model directory written")
        if is_writer:
            move_into_place(staging, path)
    except BaseException:
        if is_writer and staging.exists():
            staging.rmtree()
        raise
    _sync_processes("vlm_jax: model directory in place")  # every process returns with it there


def staging_path(directory: str | epath.Path) -> epath.Path:
    """Where `save_model(directory)` writes before the rename: a hidden sibling, so that nothing
    looking for a model directory (or a workdir's `model/`) finds a half-written one."""
    path = epath.Path(directory)
    return path.parent / f".{path.name}.saving"


def check_output_dir(out: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse an `--out` that would destroy something: one that overlaps an input of the
    command (even with `overwrite`), a file, or a non-empty directory without `overwrite`."""
    out_real = os.path.realpath(out)
    for source in inputs:
        source_real = os.path.realpath(source)
        if out_real == source_real or out_real.startswith(source_real + os.sep) \
                or source_real.startswith(out_real + os.sep):
            raise InputError(f"--out {out} overlaps the input {source}; write elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InputError(f"--out {out} is not empty; choose a new directory or pass --overwrite "
                         f"(its contents are replaced only once the new directory is complete)")


def move_into_place(staging: str | epath.Path, path: str | epath.Path) -> None:
    """`staging` becomes `path`; an old `path` is moved aside first and deleted only after."""
    staging, path = epath.Path(staging), epath.Path(path)
    old = path.parent / f".{path.name}.old"
    if old.exists():
        if path.exists():
            old.rmtree()
        else:  # a save interrupted between the two renames below: the old model is in `old`
            old.rename(path)
    if path.exists():
        path.rename(old)
    try:
        staging.rename(path)
    except BaseException:
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    if old.exists():
        old.rmtree()


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_meta(directory: str) -> dict:
    config_file = epath.Path(directory) / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory} is not a vlm_jax model directory (no config.json; "
                              f"an interrupted save or a different kind of checkpoint)")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_config(directory: str) -> VLMConfig:
    """The model's architecture (run settings at their defaults: f32 compute, no remat)."""
    return architecture_only(from_dict(VLMConfig, _read_meta(directory)["model"], "model"))


def load_data_settings(directory: str) -> dict:
    """{"template": name or None, "pad_to_square": bool, "prefix_lm": bool, "tiling":
    TilingConfig}: what the model was trained on (an import or an older directory records
    nothing: template None, no padding, causal prompts, no tiles; a PaliGemma import records
    prefix_lm)."""
    data = _read_meta(directory).get("data") or {}
    return {"template": data.get("template"), "pad_to_square": bool(data.get("pad_to_square")),
            "prefix_lm": bool(data.get("prefix_lm")),
            "tiling": from_dict(TilingConfig, data.get("tiling"), "data.tiling")}


def load_trained_with(directory: str) -> dict:
    """The run settings the model was trained with, e.g. {"dtype": "bfloat16"} (information)."""
    meta = _read_meta(directory)
    if "trained_with" in meta:
        return dict(meta["trained_with"])
    return run_settings(from_dict(VLMConfig, meta["model"], "model"))


def compute_note(directory: str, dtype: str) -> str | None:
    """A line saying how the model computes here when training computed otherwise, else None."""
    trained = load_trained_with(directory).get("dtype")
    if trained is None or trained == dtype:
        return None
    return (f"note: {directory} was trained with {trained} compute; computing in {dtype} here "
            f"(--dtype {trained} to match)")


def load_generation_config(directory: str) -> dict | None:
    path = epath.Path(directory) / GENERATION_CONFIG
    return json.loads(path.read_text()) if path.exists() else None


def load_model(directory: str, shardings: Any = None, load_tokenizer: bool = True):
    """(config, params, tokenizer or None). `shardings`: a tree of jax.sharding.Sharding matching
    the params to restore them directly onto a mesh; default: one device."""

    config = load_config(directory)
    path = epath.Path(directory).absolute() if "://" not in str(directory) else epath.Path(directory)
    abstract = param_shapes(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    params = ocp.StandardCheckpointer().restore(path / "params", target)
    tokenizer = None
    tokenizer_dir = path / "tokenizer"
    if load_tokenizer and tokenizer_dir.exists():
        tokenizer = Tokenizer.from_path(os.fspath(tokenizer_dir))
    return config, params, tokenizer


def numpy_params(params: Any) -> Any:
    """Host copy of a param tree (for converters and tests)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
