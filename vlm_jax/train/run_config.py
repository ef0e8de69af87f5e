"""The run's config: `RunConfig`, composed of the configs each part owns, loaded from a config
file plus command-line overrides and validated before anything compiles (every error names its
field). The machinery (config files, overrides, typed dataclasses) is `vlm_jax/config/`.

A config file is a small python file with `get_config(arg: str | None) -> ConfigDict` (arg is
the text after ':' in `--config configs/x.py:phase=align,res=64`; read it with `parse_arg`) and,
optionally, `sweep()` (for the sweep launcher). Its sections:

    model        VLMConfig as a dict (vision / text_tower / projector / llm / image_token_id ...)
    data         DataConfig as a dict. `num_image_tokens` is SET from the model
                 (model.tokens_per_image), never typed; `image_size` defaults to the model's.
    eval_data    optional: overrides of `data` for the validation split (usually `sources`);
                 evaluation reads `eval.num_batches` batches from its start every time.
    tokenizer    TokenizerConfig: a path (tokenizer file / directory / model directory) or
                 kind="shapes" (a word-level BPE fitted on the shapes world, saved in the workdir)
    mesh         MeshConfig: data / fsdp / tensor sizes (one may be -1)
    train        phase (PhaseConfig), optimizer (OptimizerConfig; total_steps defaults to
                 steps), steps, micro_batches, loss_chunk_size, seed, init_from (InitFromConfig)
    checkpoint   CheckpointConfig: every_steps, keep, async_save
    log          LogConfig: every_steps, progress_bar, tensorboard, batch_hash, MFU peak
    eval         EvalConfig: every_steps, num_batches

Overrides: `--config.train.optimizer.learning_rate=1e-4` (typed by the field; unknown keys are
refused with the closest known key suggested).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Sequence

import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.config import from_dict, load_config_file, suggestion, to_dict
from vlm_jax.data.pipeline import STREAM_KINDS, DataConfig
from vlm_jax.data import tiling
from vlm_jax.data.templates import TEMPLATES
from vlm_jax.errors import ConfigError
from vlm_jax.models.vlm import VLMConfig
from vlm_jax.sharding import MeshConfig
from vlm_jax.train.optimizer import OptimizerConfig
from vlm_jax.train import init_from, phases
from vlm_jax.train.phases import PhaseConfig

TOKENIZER_KINDS = ("path", "shapes")
# data.task each phase accepts: the phase decides the loss, the task decides the batch layout.
PHASE_TASKS = {"contrastive": ("contrastive",), "lm": ("lm",), "align": ("align", "instruct"),
               "instruct": ("instruct", "align"), "itm": ("contrastive",),
               "contrastive+itm": ("contrastive",)}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """kind="path": a tokenizer file, its directory or a model directory. kind="shapes": a BPE
    fitted on the run's shapes world (data/shapes_tokenizer.py), saved in the workdir and
    reloaded on resume."""
    kind: str = "path"
    path: str | None = None            # kind="path": tokenizer file, its directory or a model dir
    corpus_examples: int = 2000        # kind="shapes": training scenes the BPE is fitted on
    corpus_seed: int = 0
    vocab_size: int = 4096             # kind="shapes": BPE vocabulary cap
    template: str = "minimal"          # kind="shapes": chat template the corpus's Q/A are in

    def __post_init__(self):
        if self.kind not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer.kind={self.kind!r}; supported: {TOKENIZER_KINDS}")
        if self.kind == "path" and not self.path:
            raise ConfigError("tokenizer.path is required with tokenizer.kind='path'")
        if self.kind == "shapes" and self.template not in TEMPLATES:
            raise ConfigError(f"tokenizer.template={self.template!r}; supported: "
                              f"{sorted(TEMPLATES)}")


@dataclasses.dataclass(frozen=True)
class InitFromConfig:
    """Start from a model directory (`vlm-jax import-hf` output, or a finished run's
    `workdir/model`) or a run's workdir (its model/, else its latest checkpoint), taking the
    params whose path fully matches one of `groups`; the rest is freshly initialised."""
    path: str | None = None
    groups: tuple = (".*",)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run lasts `steps` optimizer steps, or `epochs` passes over the data (then steps is None,
    the run ends when the data does, and the lr schedule counts examples, not steps: with
    packing a step holds a varying number of examples; see train/optimizer.py)."""
    steps: int | None = 1000
    epochs: int | None = None
    phase: PhaseConfig = PhaseConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    micro_batches: int = 1
    # Positions per row in each chunk of the fused LM-head loss (losses.next_token_sums_from_hidden):
    # a row's loss positions are gathered first, so the work is rounded up to a multiple of this
    # per row; make it small when few positions carry a loss (short answers).
    loss_chunk_size: int = 128
    seed: int = 0
    init_from: InitFromConfig = InitFromConfig()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000            # also saved at the end and on SIGTERM
    keep: int = 3                      # newest checkpoints kept
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10              # JSONL / TensorBoard rows (the progress bar moves every step)
    progress_bar: bool = True
    tensorboard: bool = True
    batch_hash: bool = False           # log a hash of every step's batch (resume tests)
    peak_flops_per_device: float | None = None  # for MFU; default: datasheet / measured on CPU
    measure_cpu_peak: bool = True      # CPU: time a large matmul at start as the MFU peak


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0               # 0 = only at the end (when eval_data is set)
    num_batches: int = 8


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: VLMConfig
    data: DataConfig
    train: TrainConfig
    eval_data: DataConfig | None = None
    tokenizer: TokenizerConfig = TokenizerConfig(kind="shapes")
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict:
        return to_dict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


# ----------------------------------------------------------------------------- loading

def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
    """`a.b.c=value` overrides of a run config, typed by RunConfig's fields (in place)."""
    return config_lib.apply_overrides(config, overrides, RunConfig)


def load_run_config(spec: str, overrides: Sequence[str], num_devices: int,
                    process_count: int = 1, model: Mapping[str, Any] | None = None) -> RunConfig:
    """`--config FILE[:ARG]` plus `--config.a.b=V` overrides -> the validated RunConfig: what
    `train`, `plan`, `sweep`, `eval` and `inspect-data` all read. `model`: the model section
    to use when the file leaves it empty (a recipe whose model is a model directory). Beyond
    `build_run_config`, this reads `train.init_from.path`'s config.json to check its shapes."""
    config = apply_overrides(load_config_file(spec), overrides)
    if model is not None and not config.get("model"):
        config.model = dict(model)
    run = build_run_config(config, num_devices, process_count)
    if run.train.init_from.path:
        init_from.check_init_from(run)
    return run


# ----------------------------------------------------------------------------- validation

def build_run_config(config: Mapping[str, Any] | ml_collections.ConfigDict,
                     num_devices: int, process_count: int = 1) -> RunConfig:
    """The typed, cross-checked RunConfig, or a ValueError naming the offending field.
    Runs in well under a second: nothing is compiled or allocated."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]}" + suggestion(unknown[0], SECTIONS))
    for required in ("model", "data", "train"):
        if not raw.get(required):
            raise ConfigError(f"config section {required} is required")
    model = from_dict(VLMConfig, raw["model"], "model")
    train = _train_config(raw["train"])
    data = _data_config(raw["data"], model, "data")
    eval_data = None
    if raw.get("eval_data"):
        eval_data = _data_config({**raw["data"], **raw["eval_data"]}, model, "eval_data")
    hints = typing.get_type_hints(RunConfig)
    sections = {name: from_dict(hints[name], raw[name], name)
                for name in ("tokenizer", "mesh", "checkpoint", "log", "eval")
                if raw.get(name) is not None}
    if train.epochs is not None:
        data = _epochs_data(data, train.epochs)
    run = RunConfig(model=model, data=data, train=train, eval_data=eval_data, **sections)
    _check_phase(run)
    _check_mesh_and_batch(run, num_devices, process_count)
    _check_positive(run)
    return run


# Placeholder length of an epochs run's schedule: the trainer sets it to epochs x the examples
# of one pass over the data when it has read the sources.
EPOCHS_SCHEDULE_PLACEHOLDER = 1


def _train_config(values: Mapping[str, Any]) -> TrainConfig:
    values = dict(values)
    optimizer = dict(values.get("optimizer") or {})
    if values.get("epochs") is not None:
        if values.get("steps") is not None:
            raise ConfigError(f"train.steps={values['steps']} and train.epochs={values['epochs']} "
                              f"are both set; a run is measured in one of them (set steps=None)")
        if values["epochs"] < 1:
            raise ConfigError(f"train.epochs={values['epochs']} must be >= 1")
        for key, instead in (("total_steps", "it spans the epochs' examples"),
                             ("warmup_steps", "use train.optimizer.warmup_ratio")):
            if optimizer.get(key):  # warmup_steps=0 (none) is fine
                raise ConfigError(f"train.optimizer.{key}={optimizer[key]} with train.epochs: the "
                                  f"schedule counts examples there and {instead}")
        values["steps"] = None
        optimizer["total_steps"] = EPOCHS_SCHEDULE_PLACEHOLDER
    else:
        steps = values.get("steps", TrainConfig.steps)
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"train.steps={steps} must be >= 1 (or set train.epochs)")
        # The schedule ends with the run unless the config says otherwise.
        optimizer.setdefault("total_steps", steps)
    values["optimizer"] = optimizer
    train = from_dict(TrainConfig, values, "train")
    if train.micro_batches < 1:
        raise ConfigError(f"train.micro_batches={train.micro_batches} must be >= 1")
    if train.loss_chunk_size < 1:
        raise ConfigError(f"train.loss_chunk_size={train.loss_chunk_size} must be >= 1")
    if isinstance(train.init_from.groups, str) or not train.init_from.groups:
        raise ConfigError(f"train.init_from.groups={train.init_from.groups!r}: a list of regexes "
                          f"over param paths, e.g. ['vision_tower/.*']")
    return train


def _epochs_data(data: DataConfig, epochs: int) -> DataConfig:
    """The data of a run measured in epochs: exactly `epochs` passes over one source of known
    size (a weighted mixture has no single epoch; a stream does not know its size)."""
    if data.num_epochs not in (None, epochs):
        raise ConfigError(f"train.epochs={epochs} but data.num_epochs={data.num_epochs}; leave "
                          f"data.num_epochs out, it follows train.epochs")
    if len(data.sources) != 1:
        raise ConfigError(f"train.epochs needs one data source (data.sources has "
                          f"{len(data.sources)}: a weighted mixture has no single epoch); use "
                          f"train.steps")
    if data.sources[0].kind in STREAM_KINDS:
        raise ConfigError(f"train.epochs needs a source of known size; data.sources[0].kind="
                          f"{data.sources[0].kind!r} is a stream: use train.steps")
    return dataclasses.replace(data, num_epochs=epochs)


def _data_config(values: Mapping[str, Any], model: VLMConfig, where: str) -> DataConfig:
    values = dict(values)
    has_images = model.vision is not None and model.llm is not None
    num_image_tokens = model.tokens_per_image if has_images else 0
    if values.setdefault("num_image_tokens", num_image_tokens) != num_image_tokens:
        raise ConfigError(f"{where}.num_image_tokens={values['num_image_tokens']} but the model "
                          f"gives {num_image_tokens} (model.tokens_per_image); leave it out, it is "
                          f"set from the model")
    if model.vision is not None:
        size = values.setdefault("image_size", model.vision.image_size)
        if size != model.vision.image_size:
            raise ConfigError(f"{where}.image_size={size} but model.vision.image_size="
                              f"{model.vision.image_size}")
    return from_dict(DataConfig, values, where)


def _check_phase(run: RunConfig) -> None:
    phase = run.train.phase
    phases.check_model_fits(phase, run.model)
    if run.eval_data is not None and run.eval_data.tiling != run.data.tiling:
        raise ConfigError(f"eval_data.tiling={to_dict(run.eval_data.tiling)} but data.tiling="
                          f"{to_dict(run.data.tiling)}: the model reads images one way; set "
                          f"both (--config.eval_data.tiling.max_tiles=...)")
    for where, data in (("data", run.data), ("eval_data", run.eval_data)):
        if data is None:
            continue
        if data.tiling.enabled and run.model.fusion == "cross_attention":
            raise ConfigError(f"{where}.tiling.max_tiles={data.tiling.max_tiles} with "
                              f"model.fusion='cross_attention': tiling is built for early fusion "
                              f"only; set {where}.tiling.max_tiles=0 or model.fusion='early'")
        if data.negative_captions and phase.step_kind != "itm":
            raise ConfigError(f"{where}.negative_captions={data.negative_captions}: hard-negative "
                              f"captions are scored by the ITM phases (itm, contrastive+itm), "
                              f"not by {phase.name!r}; set it to 0")
        for i, source in enumerate(data.sources):  # the one source that writes them on request
            given = source.options.get("negative_captions", 0)
            if source.kind == "shapes" and given < data.negative_captions:
                raise ConfigError(f"{where}.negative_captions={data.negative_captions} but "
                                  f"{where}.sources[{i}] (shapes) writes {given} per example: set "
                                  f"its options.negative_captions to at least "
                                  f"{data.negative_captions}")
        if data.task not in PHASE_TASKS[phase.name]:
            raise ConfigError(f"{where}.task={data.task!r} does not fit train.phase.name="
                              f"{phase.name!r} (it takes {PHASE_TASKS[phase.name]})")
        if data.task in ("instruct", "align"):
            need = run.model.tokens_per_image
            if need + 2 > data.seq_len:
                raise ConfigError(f"{where}.seq_len={data.seq_len} cannot hold one image of "
                                  f"model.tokens_per_image={need} tokens plus text; raise "
                                  f"{where}.seq_len or use fewer image tokens (model.vision / "
                                  f"model.projector)")
            if data.max_images_per_row < 1:
                raise ConfigError(f"{where}.max_images_per_row must be >= 1 for task {data.task!r}")
            largest = tiling.max_layout_tokens(data.tiling, need)
            if data.tiling.enabled and largest + 2 > data.seq_len:
                raise ConfigError(
                    f"{where}.tiling.max_tiles={data.tiling.max_tiles}: the largest image (a "
                    f"{data.tiling.side} x {data.tiling.side} grid + the global view, "
                    f"{data.tiling.max_images} x {need} image tokens and its layout) is up to "
                    f"{largest} tokens, more than {where}.seq_len={data.seq_len} holds with text; "
                    f"raise {where}.seq_len or lower {where}.tiling.max_tiles")
        if (data.prefix_lm and run.model.llm is not None
                and run.model.resolved("llm").attention_backend == "tpu_flash"):
            raise ConfigError(f"{where}.prefix_lm=True needs a dense attention mask, which "
                              f"model.llm.attention_backend='tpu_flash' (causal only) cannot take; "
                              f"use 'auto' or 'xla'")
        if data.task == "contrastive" and data.text_len > run.model.text_tower.max_len:
            raise ConfigError(f"{where}.text_len={data.text_len} > model.text_tower.max_len="
                              f"{run.model.text_tower.max_len}")


def _check_mesh_and_batch(run: RunConfig, num_devices: int, process_count: int) -> None:
    try:
        data_size, fsdp_size, _ = run.mesh.shape(num_devices)
    except ValueError as e:
        raise ConfigError(f"{e} (config field mesh)") from None
    dp = data_size * fsdp_size
    micro = run.train.micro_batches
    for where, data in (("data", run.data), ("eval_data", run.eval_data)):
        if data is None:
            continue
        global_batch = data.batch_size * process_count
        if global_batch % dp:
            raise ConfigError(f"{where}.batch_size={data.batch_size} x {process_count} process(es) "
                              f"= global batch {global_batch} is not divisible by the data-parallel "
                              f"size {dp} (mesh.data x mesh.fsdp)")
        if where == "data" and (global_batch % micro or (global_batch // micro) % dp):
            raise ConfigError(f"train.micro_batches={micro}: the global batch {global_batch} must "
                              f"split into {micro} micro-batches each divisible by the data-parallel "
                              f"size {dp}")


def _check_positive(run: RunConfig) -> None:
    checks = {"checkpoint.every_steps": run.checkpoint.every_steps >= 1,
              "checkpoint.keep": run.checkpoint.keep >= 1,
              "log.every_steps": run.log.every_steps >= 1,
              "eval.every_steps": run.eval.every_steps >= 0,
              "eval.num_batches": run.eval.num_batches >= 1}
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"{name} is out of range (see vlm_jax/train/run_config.py)")
