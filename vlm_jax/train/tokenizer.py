"""The run's tokenizer: `tokenizer.kind="path"` loads one (a file, its directory or a model
directory); `kind="shapes"` fits one on the run's shapes world (data/shapes_tokenizer.py), saves
it in `workdir/tokenizer` and reloads it on resume, so ids never change under a checkpoint.
Either way it is checked against the model (vocabulary size, <image> id) before anything
compiles. The trainer and `vlm-jax inspect-data` both call `build_tokenizer`."""
from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from vlm_jax.data.shapes_tokenizer import fit_shapes_tokenizer, world_of
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.errors import ConfigError
from vlm_jax.train.run_config import RunConfig


def build_tokenizer(run: RunConfig, workdir: str):
    """The run's tokenizer; a fitted one (kind='shapes', fitted on the run's shapes world by
    `fit_shapes_tokenizer`, as inspect-data and the shapes recipe do) is saved in
    `workdir/tokenizer` and reloaded on resume so ids never change under a checkpoint."""
    cfg = run.tokenizer
    if cfg.kind == "path":
        path = cfg.path
        if os.path.isdir(os.path.join(path, "tokenizer")):  # a model directory
            path = os.path.join(path, "tokenizer")
        tokenizer = Tokenizer.from_path(path)
    else:
        saved = os.path.join(workdir, "tokenizer")
        resumed = os.path.isdir(saved)
        if jax.process_count() > 1:  # all processes look before process 0 writes it below
            multihost_utils.sync_global_devices("vlm_jax: tokenizer directory checked")
        if resumed:
            tokenizer = Tokenizer.from_path(saved)
        else:
            # A tiled run's layout tokens (data/tiling.py) are reserved ids of the fitted BPE.
            tokenizer = fit_shapes_tokenizer(cfg.corpus_examples, cfg.corpus_seed, cfg.vocab_size,
                                             cfg.template, world_of(run.data.sources),
                                             run.data.tiling.layout_tokens())
            if jax.process_index() == 0:
                tokenizer.save(saved)
    _check_tokenizer_fits(run, tokenizer)
    return tokenizer


def _check_tokenizer_fits(run: RunConfig, tokenizer) -> None:
    model = run.model
    vocab_owner = ("model.llm.vocab_size", model.llm.vocab_size) if model.llm is not None else (
        ("model.text_tower.vocab_size", model.text_tower.vocab_size)
        if model.text_tower is not None else (None, None))
    if vocab_owner[0] and tokenizer.vocab_size > vocab_owner[1]:
        raise ConfigError(f"{vocab_owner[0]}={vocab_owner[1]} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids (tokenizer section)")
    if model.vision is not None and model.llm is not None \
            and tokenizer.image_token_id != model.image_token_id:
        raise ConfigError(f"model.image_token_id={model.image_token_id} but the tokenizer's "
                          f"{tokenizer.image_token} is id {tokenizer.image_token_id}")
