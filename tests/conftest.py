"""Test-wide setup, markers and the fixtures several test files share.

Setup, before jax is imported: 8 fake CPU devices for the sharding tests, offline HF, absl flags
parsed for grain, and two things for compile time, which is most of the suite's time (hundreds of
tiny programs, each run a few times); the processes tests start inherit both through the
environment:
  * one persistent XLA compilation cache per test run (a fresh temporary directory, unless
    JAX_COMPILATION_CACHE_DIR is set): the same programs compile in many tests, and a cache hit
    runs the very executable the compile would have produced;
  * XLA:CPU code generation without LLVM's optimization passes: the same XLA programs as less
    optimized machine code, which tiny models do not notice, compiled in two thirds of the time
    (XLA_FLAGS that set the level already are left alone).

Markers (`pytest -m "not slow"` is the quick run): `slow` over ~20 s on 2 CPU cores, `parity`
compares against transformers' PyTorch models, `multiprocess` starts several processes.
The 30 slowest tests are listed at the end of every run (`--durations=N` to change).

Shared fixtures: `hf_tiny` (tiny transformers configs per family), `tiny_vlm_config` (our tiny
VLM), `shapes_tokenizer` (the tokenizer a configs/tiny.py run fits), `tiny_trained_run` (a
configs/tiny.py align run trained once per test run).
"""
import dataclasses
import logging
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlm_jax_tests_xla_")
# Every program is cached, however small: most of the tests' programs compile in well under 1 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

MARKERS = {
    "slow": "takes over ~20 s on 2 CPU cores (deselect with -m 'not slow')",
    "parity": "compares our model against transformers' PyTorch model",
    "multiprocess": "starts several processes (multi-process training, resume after a signal)",
}
DURATIONS = 30  # slowest tests listed when --durations is not given


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    if config.option.durations is None:
        config.option.durations = DURATIONS


def pytest_unconfigure(config):
    if _OWN_COMPILATION_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# ----------------------------------------------------------------------------- transformers

class HFTiny:
    """Tiny transformers configs: an LLM per family (vocab 96 by default, as the LLaVA tests'
    image token id 95 expects) and a SigLIP vision tower (32 px, 8 px patches: 16 tokens)."""

    VOCAB = 96

    def text(self, family: str, tie: bool, vocab: int = VOCAB, **overrides):
        """A tiny HF text config of our `family` (models/families/); the newer families have
        their particular features switched on at a size a test can see: Qwen3's head_dim apart
        from hidden/heads, Gemma 2 / 3's sliding window (8 tokens) and soft-caps, SmolLM3's NoPE
        layer (every 2nd)."""
        import transformers
        common = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=256)
        gemma = dict(head_dim=16, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
        extra = {
            "llama": {}, "qwen2": {}, "gemma": gemma,
            "qwen3": dict(head_dim=16),
            "gemma2": dict(gemma, query_pre_attn_scalar=24, sliding_window=8,
                           attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
            "gemma3": dict(gemma, query_pre_attn_scalar=24, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"],
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 1e4}}),
            "smollm3": dict(no_rope_layer_interval=2),
        }[family]
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                        "gemma": transformers.GemmaConfig, "qwen3": transformers.Qwen3Config,
                        "gemma2": transformers.Gemma2Config,
                        "gemma3": transformers.Gemma3TextConfig,
                        "smollm3": transformers.SmolLM3Config}[family]
        return config_class(**{**common, **extra, **overrides})

    def vision(self, image_size: int = 32, patch: int = 8, layers: int = 3, **overrides):
        import transformers
        return transformers.SiglipVisionConfig(**{
            **dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                   num_attention_heads=4, image_size=image_size, patch_size=patch,
                   vision_use_head=False), **overrides})


@pytest.fixture(scope="session")
def hf_tiny():
    """`hf_tiny.text(family, tie, vocab=...)`, `hf_tiny.vision(image_size=..., patch=...)`."""
    return HFTiny()


# ----------------------------------------------------------------------------- our tiny VLM

TINY_VISION = dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64,
                   feature_layer=-1, use_head=False)
TINY_LLM = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.fixture(scope="session")
def tiny_vlm_config():
    """Factory of the tiny VLM the model tests share: 16 px images in 8 px patches (4 image
    tokens), a 1-layer vision tower, an mlp2x_gelu projector, a 2-layer decoder of `family`.
    `vision` / `llm` override single fields; `image_token_id` defaults to the last id."""
    from vlm_jax.models.decoder import decoder_config
    from vlm_jax.models.projector import ProjectorConfig
    from vlm_jax.models.siglip import VisionConfig
    from vlm_jax.models.vlm import VLMConfig

    def build(family="llama", vocab_size=64, image_token_id=None, vision=None, llm=None,
              projector=None, **fields):
        return VLMConfig(
            vision=VisionConfig(**{**TINY_VISION, **(vision or {})}),
            projector=projector or ProjectorConfig(type="mlp2x_gelu"),
            llm=decoder_config(family, vocab_size=vocab_size, **{**TINY_LLM, **(llm or {})}),
            image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
            **fields)
    return build


# ----------------------------------------------------------------------------- shapes runs

@pytest.fixture(scope="session")
def shapes_tokenizer(tmp_path_factory):
    """The tokenizer a configs/tiny.py run fits on the shapes world (tokenizer.kind="shapes");
    its words are single tokens, <image> is id 4."""
    from vlm_jax.train.run_config import load_run_config
    from vlm_jax.train.tokenizer import build_tokenizer
    run = load_run_config(f"{TINY}:phase=instruct", [], jax.device_count())
    return build_tokenizer(run, str(tmp_path_factory.mktemp("shapes_tokenizer")))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished `vlm-jax train` workdir (checkpoints/1, checkpoints/2, metrics.jsonl,
    config.json, tokenizer/, model/), the command line that trained it and the warnings it
    logged."""
    workdir: str
    config_arg: str
    flags: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def model(self) -> str:
        return os.path.join(self.workdir, "model")

    def argv(self, workdir) -> list[str]:
        """`vlm-jax train` arguments for this very run in `workdir` (the same run config: a
        copy of the workdir resumes)."""
        return ["train", "--config", self.config_arg, "--workdir", str(workdir), *self.flags]


class _Warnings(logging.Handler):
    """Keeps the message of every record at WARNING or above."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory):
    """configs/tiny.py phase=align (no init_from: random towers) trained 2 steps through the CLI,
    once per test run, with a checkpoint and a metrics row at every step. Tests must not write
    into it (copy it first)."""
    from vlm_jax import cli
    run = TrainedRun(
        str(tmp_path_factory.mktemp("tiny_trained") / "run"), f"{TINY}:phase=align,steps=2",
        ("--config.log.progress_bar=False", "--config.log.tensorboard=False",
         "--config.eval_data=None", "--config.checkpoint.every_steps=1",
         "--config.checkpoint.async_save=False"))
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    try:
        assert cli.main(run.argv(run.workdir)) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    return dataclasses.replace(run, warnings=tuple(handler.messages))
