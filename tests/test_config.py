"""Config files, overrides and validation: every error names its field and comes before anything
is compiled (each check counts XLA compiles, persistent-cache hits included)."""
import os

import jax
import pytest

from vlm_jax.config import parse_arg
from vlm_jax.train import run_config as config_lib

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def _build(arg=None, overrides=(), num_devices=8, process_count=1):
    return config_lib.load_run_config(TINY + (f":{arg}" if arg else ""), list(overrides),
                                      num_devices, process_count)


def test_parse_arg_types_values_by_default_and_refuses_unknown_keys():
    args = parse_arg("phase=align,res=64,lr=0.5,lora", phase="x", res=1, lr=1.0,
                                lora=False)
    assert (args.phase, args.res, args.lr, args.lora) == ("align", 64, 0.5, True)
    assert isinstance(args.res, int)
    with pytest.raises(ValueError, match="'ress'.*did you mean res"):
        parse_arg("ress=3", res=1)
    with pytest.raises(ValueError, match="config argument res"):
        parse_arg("res=big", res=1)


def test_overrides_are_typed_by_the_field():
    run = _build(overrides=["train.optimizer.learning_rate=1e-4", "train.steps=7",
                            "log.tensorboard=false", "train.optimizer.b2=0.95",
                            "train.phase.param_groups=[('projector/.*', 2.0)]"])
    assert run.train.optimizer.learning_rate == 1e-4
    assert run.train.steps == 7 and run.train.optimizer.total_steps == 7  # schedule ends with the run
    assert run.log.tensorboard is False
    assert run.train.optimizer.b2 == 0.95  # not in the file: typed by the dataclass field
    assert run.train.phase.param_groups[0] == ("projector/.*", 2.0)
    assert run.data.num_image_tokens == run.model.tokens_per_image == 16
    assert run.eval_data is not None and _build(overrides=["eval_data=None"]).eval_data is None


@pytest.mark.parametrize("override, message", [
    ("train.optimizer.lr=1e-4", r"unknown config key train\.optimizer\.lr; did you mean "
                                r"train\.optimizer\.learning_rate"),
    ("trian.steps=3", r"unknown config key trian; did you mean train"),
    ("train.steps=many", r"train\.steps='many': not a valid int"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        _build(overrides=[override])


@pytest.mark.parametrize("arg, overrides, kwargs, message", [
    # unknown keys in a typed section
    (None, ["model.llm.hidden=3"], {}, r"unknown config key model\.llm\.hidden; did you mean "
                                       r"model\.llm\.hidden_size"),
    # the global batch and the data-parallel size
    (None, ["data.batch_size=4"], {}, r"data\.batch_size=4 .* not divisible by the data-parallel "
                                      r"size 8"),
    (None, ["data.batch_size=16", "train.micro_batches=4"], {}, r"train\.micro_batches=4"),
    (None, ["data.batch_size=6"], {"process_count": 2},
     r"data\.batch_size=6 x 2 process\(es\) = global batch 12 is not divisible by the "
     r"data-parallel size 8"),
    # the mesh and the device count
    (None, ["mesh.data=3"], {}, r"mesh: data\*fsdp\*tensor = 3 .* but there are 8 devices "
                                r"\(config field mesh\)"),
    (None, ["mesh.data=2", "mesh.fsdp=2"], {}, r"but there are 8 devices \(config field mesh\)"),
    # image tokens and the sequence length
    (None, ["data.seq_len=17"], {}, r"data\.seq_len=17 cannot hold one image of "
                                    r"model\.tokens_per_image=16 tokens"),
    ("res=64", ["model.vision.patch_size=4", "data.seq_len=128"], {},
     r"data\.seq_len=128 cannot hold one image of model\.tokens_per_image=256"),
    (None, ["data.num_image_tokens=15"], {}, r"data\.num_image_tokens=15 but the model gives 16"),
    # tiling: the largest grid must fit a row
    (None, ["data.tiling.max_tiles=16", "data.max_images_per_row=17", "data.seq_len=128"], {},
     r"data\.tiling\.max_tiles=16: the largest image .* is up to 312 tokens, more than "
     r"data\.seq_len=128"),
    (None, ["data.tiling.max_tiles=4"], {}, r"data\.tiling\.max_tiles=4: .* more than "
                                             r"data\.max_images_per_row=2"),
    (None, ["data.tiling.max_tiles=6"], {}, r"data\.tiling\.max_tiles=6: 0 \(off\) or a square"),
    (None, ["data.tiling.max_tiles=1", "eval_data.tiling.max_tiles=0"], {},
     r"eval_data\.tiling=\{'max_tiles': 0, 'rule': "
                                            r"'idefics3'\} but data\.tiling="),
    (None, ["data.image_size=64"], {}, r"data\.image_size=64 but model\.vision\.image_size=32"),
    # phase and data / model
    (None, ["train.phase.name=contrastive"], {}, r"phase 'contrastive' needs model\.text_tower"),
    ("phase=contrastive", ["data.task=instruct"], {},
     r"data\.task='instruct' does not fit train\.phase\.name='contrastive'"),
    ("phase=lm", ["train.phase.name=align"], {}, r"phase 'align' needs model\.vision"),
    ("phase=contrastive", ["data.negative_captions=1"], {},
     r"data\.negative_captions=1: hard-negative captions are scored by the ITM phases"),
    (None, ["data.negative_captions=1"], {},
     r"data\.negative_captions=1: .* for data\.task='contrastive' only"),
    ("phase=itm", ["data.negative_captions=2"], {},
     r"data\.negative_captions=2 but data\.sources\[0\] \(shapes\) writes 0 per example"),
    (None, ["train.phase.name=lm"], {}, r"data\.task='instruct' does not fit "
                                        r"train\.phase\.name='lm'"),
    (None, ["train.phase.name=warmup"], {}, r"train\.phase\.name='warmup'"),
    # other sections
    (None, ["train.optimizer.schedule=step"], {}, r"train\.optimizer\.schedule='step'"),
    (None, ["tokenizer.kind=sentencepiece"], {}, r"tokenizer\.kind='sentencepiece'"),
    (None, ["train.init_from.path=/nonexistent"], {}, r"train\.init_from\.path=/nonexistent"),
    (None, ["data.prefix_lm=True", "model.attention_backend=tpu_flash"], {},
     r"data\.prefix_lm=True needs a dense attention mask"),
])
def test_validation_names_the_field_before_compiling(arg, overrides, kwargs, message):
    compiles_before = _compile_count()
    with pytest.raises(ValueError, match=message):
        _build(arg, overrides, **kwargs)
    assert _compile_count() == compiles_before


def test_every_phase_of_the_tiny_config_validates():
    for phase in ("contrastive", "lm", "align", "instruct"):
        run = _build(f"phase={phase}")
        assert run.train.phase.name == phase
        assert config_lib.build_run_config(run.to_dict(), 8) == run  # the saved form round-trips


def test_unknown_keys_in_the_file_are_named():
    config = config_lib.load_config_file(TINY)
    config.model.llm.hidden = 3
    with pytest.raises(ValueError, match=r"unknown config key\(s\) model\.llm\.hidden for "
                                         r"DecoderConfig"):
        config_lib.build_run_config(config, 8)
    config = config_lib.load_config_file(TINY)
    config.evaluation = {}
    with pytest.raises(ValueError, match="unknown config section evaluation; did you mean eval"):
        config_lib.build_run_config(config, 8)


_COMPILES = []


def _compile_count() -> int:
    return len(_COMPILES)


def _on_event(event, *args, **kwargs):
    # A program the persistent compilation cache (conftest) holds is not compiled again: count
    # its cache hit as the compile it stands for.
    if "backend_compile" in event or event == "/jax/compilation_cache/cache_hits":
        _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)
jax.monitoring.register_event_listener(_on_event)


def _epochs_config(overrides):
    config = config_lib.load_config_file(TINY)
    del config.train.optimizer["warmup_steps"]  # counted in steps: refused with train.epochs
    return config_lib.apply_overrides(config, list(overrides))


def test_a_run_measured_in_epochs():
    run = config_lib.build_run_config(_epochs_config(
        ["train.steps=None", "train.epochs=2", "train.optimizer.warmup_ratio=0.03"]), 8, 1)
    assert run.train.steps is None and run.train.epochs == 2 and run.data.num_epochs == 2
    cases = [
        (["train.epochs=2"], "train.steps=20 and train.epochs=2 are both set"),
        (["train.steps=None", "train.epochs=0"], "train.epochs=0 must be >= 1"),
        (["train.steps=None", "train.epochs=1", "train.optimizer.total_steps=9"],
         "train.optimizer.total_steps=9 with train.epochs"),
        (["train.steps=None", "train.epochs=1", "train.optimizer.warmup_steps=9"],
         "use train.optimizer.warmup_ratio"),
        (["train.steps=None", "train.epochs=1", "data.num_epochs=3"],
         "train.epochs=1 but data.num_epochs=3"),
        (["train.steps=None", "train.epochs=1",
          "data.sources=[{'kind': 'webdataset', 'options': {'shards': 'x.tar'}}]"],
         "source of known size"),
        (["train.steps=None", "train.epochs=1",
          "data.sources=[{'kind': 'shapes'}, {'kind': 'shapes'}]"], "needs one data source"),
        (["train.steps=None"], "train.steps=None must be >= 1"),
        (["train.optimizer.warmup_ratio=1.5"], "warmup_ratio=1.5"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            config_lib.build_run_config(_epochs_config(overrides), 8, 1)


def test_warmup_ratio_sets_the_warmup_from_the_run_length():
    from vlm_jax.train.optimizer import make_schedule, warmup_length
    run = _build(overrides=["train.steps=200", "train.optimizer.warmup_ratio=0.05"])
    assert warmup_length(run.train.optimizer) == 10
    schedule = make_schedule(run.train.optimizer)
    assert float(schedule(5)) == pytest.approx(0.5 * run.train.optimizer.learning_rate)
