"""Nothing lost, nothing silent: `train --workdir` refuses a model directory, a file and a
foreign non-empty directory before writing anything, and resumes a previous run's workdir;
`import-hf --out` refuses a non-empty directory unless --overwrite; a model directory is written
whole or not at all (an interrupted `save_model` leaves the previous one as it was)."""
import hashlib
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from vlm_jax import cli, model_dir
from vlm_jax.train import run_config as config_lib
from vlm_jax.models.vlm import init_params
from vlm_jax.train.loop import check_workdir

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
TRAIN_FLAGS = ["--config.log.progress_bar=False", "--config.log.tensorboard=False",
               "--config.eval_data=None", "--config.checkpoint.every_steps=1",
               "--config.checkpoint.async_save=False"]


def _train(workdir, steps):
    return cli.main(["train", "--config", f"{TINY}:phase=lm,steps={steps}", "--workdir",
                     str(workdir), *TRAIN_FLAGS])


def _snapshot(root):
    """{relative path: (mtime_ns, sha256 of the bytes) for files, None for directories}."""
    tree = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            tree[os.path.relpath(os.path.join(directory, name), root)] = None
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns,
                                                     hashlib.sha256(f.read()).hexdigest())
    return tree


def _outside_params(tree):
    """A snapshot without params/ (orbax names its files anew on every save)."""
    return {path: entry for path, entry in tree.items() if not path.startswith("params")}


def _metric_steps(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["step"] for r in rows if "loss" in r]


# ----------------------------------------------------------------------------- train --workdir

def test_train_into_a_model_directory_is_refused_and_changes_nothing(tiny_trained_run, capsys):
    """Why / Data lost (issue "nothing lost"): `train --workdir MODEL_DIR` overwrote its
    config.json and tokenizer/."""
    model = pathlib.Path(tiny_trained_run.model)  # a finished 2-step run's (conftest)
    assert os.path.isdir(model / "tokenizer") and os.path.isdir(model / "params")
    before = _snapshot(model)
    assert _train(model, steps=2) == 2
    err = capsys.readouterr().err
    assert f"workdir {model} is a model directory" in err
    assert f"train.init_from.path={model}" in err and "model= argument" in err
    assert "pick a new --workdir" in err
    assert _snapshot(model) == before


def test_previous_runs_workdir_is_resumed(tiny_trained_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_trained_run.workdir, workdir)  # steps 1 and 2, a checkpoint each
    assert _metric_steps(workdir) == [1, 2]
    model_before = _snapshot(workdir / "model")
    assert cli.main(tiny_trained_run.argv(workdir)) == 0  # the same run config
    assert f"resumed from {workdir}/checkpoints/2" in capsys.readouterr().err
    # Nothing trained again (a fresh start would log steps 1 and 2 a second time) ...
    assert _metric_steps(workdir) == [1, 2]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    # ... and the final model directory was written anew, whole, in place of the old one.
    model_after = _snapshot(workdir / "model")
    assert _outside_params(model_after).keys() == _outside_params(model_before).keys()
    assert model_after["config.json"] != model_before["config.json"]  # written again
    _, trained, _ = model_dir.load_model(tiny_trained_run.model, load_tokenizer=False)
    _assert_params_equal(workdir / "model", model_dir.numpy_params(trained))
    assert not any(name.startswith(".model") for name in os.listdir(workdir))


def test_foreign_or_file_workdir_is_refused_and_changes_nothing(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "data").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    # An HF checkpoint's config.json is not a run config either.
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = _snapshot(foreign)
    assert _train(foreign, steps=2) == 2
    err = capsys.readouterr().err
    assert f"workdir {foreign} is not empty and holds no previous run" in err
    assert "it holds config.json, data/, notes.txt" in err
    assert _snapshot(foreign) == before

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert _train(a_file, steps=2) == 2
    assert f"workdir {a_file} is a file" in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_fresh_workdirs_pass_the_check(tmp_path):
    check_workdir(str(tmp_path / "missing"))
    check_workdir(str(tmp_path))  # empty
    # `vlm-jax sweep --launcher local` opens train.log before the run starts; a run stopped
    # before its first checkpoint has written its tokenizer only.
    (tmp_path / "train.log").write_text("")
    (tmp_path / "tokenizer").mkdir()
    check_workdir(str(tmp_path))
    (tmp_path / "other.txt").write_text("")
    with pytest.raises(ValueError, match="holds other.txt, tokenizer/, train.log"):
        check_workdir(str(tmp_path))


# ----------------------------------------------------------------------------- import-hf --out

def _hf_llm(directory, vocab_size=64):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def test_import_hf_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    hf_dir = _hf_llm(tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    before = _snapshot(tmp_path)
    assert cli.main(["import-hf", "--hf-dir", hf_dir, "--out", str(out)]) == 2
    assert f"--out {out} is not empty" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before  # nothing in out, nothing beside it

    assert cli.main(["import-hf", "--hf-dir", hf_dir, "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "params"]
    assert model_dir.load_config(str(out)).llm.vocab_size == 64
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no staging or old copy left

    # --overwrite never replaces the import's own input.
    hf_before = _snapshot(hf_dir)
    assert cli.main(["import-hf", "--hf-dir", hf_dir, "--out", hf_dir, "--overwrite"]) == 2
    assert f"--out {hf_dir} overlaps the input {hf_dir}" in capsys.readouterr().err
    assert _snapshot(hf_dir) == hf_before


# ----------------------------------------------------------------------------- atomic saves

def _tiny_model(seed):
    run = config_lib.build_run_config(config_lib.load_config_file(f"{TINY}:phase=lm"), 8)
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init_params(run.model, jax.random.key(0)))
    return run.model, jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                                   abstract)


class _TokenizerThatFails:
    """Stands for a save interrupted midway: params are written, the tokenizer half."""

    def save(self, directory):
        os.makedirs(directory)
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            f.write("{")
        raise OSError("No space left on device")


def _assert_params_equal(directory, want):
    _, params, _ = model_dir.load_model(str(directory), load_tokenizer=False)
    for got, expected in zip(jax.tree.leaves(model_dir.numpy_params(params)),
                             jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)


def test_interrupted_save_leaves_the_previous_model(tmp_path):
    config, old_params = _tiny_model(seed=1)
    _, new_params = _tiny_model(seed=2)
    target = tmp_path / "model"
    model_dir.save_model(str(target), config, old_params)
    before = _snapshot(target)
    with pytest.raises(OSError, match="No space left"):
        model_dir.save_model(str(target), config, new_params, _TokenizerThatFails())
    assert _snapshot(target) == before
    _assert_params_equal(target, old_params)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # the staging copy is cleaned up

    # A first save interrupted the same way leaves no model at all, not half of one.
    with pytest.raises(OSError):
        model_dir.save_model(str(tmp_path / "fresh"), config, new_params, _TokenizerThatFails())
    assert not os.path.exists(tmp_path / "fresh")


def test_save_replaces_the_model_and_a_killed_saves_leftovers(tmp_path):
    config, old_params = _tiny_model(seed=1)
    _, new_params = _tiny_model(seed=2)
    target = tmp_path / "model"
    model_dir.save_model(str(target), config, old_params,
                         generation_config={"eos_token_id": 2})
    # A process killed mid-save leaves its staging directory behind (no cleanup ran).
    leftover = model_dir.staging_path(str(target))
    assert leftover.name == ".model.saving"
    (leftover / "tokenizer").mkdir(parents=True)
    (leftover / "tokenizer" / "stale.json").write_text("{}")
    model_dir.save_model(str(target), config, new_params)
    _assert_params_equal(target, new_params)
    # Nothing of the old directory or of the leftover survives.
    assert sorted(os.listdir(target)) == ["config.json", "params"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


# ----------------------------------------------------------------------------- other outputs

def test_inspect_data_replaces_only_its_own_page(tmp_path, capsys):
    """Why / Data lost: `inspect-data --out` used to overwrite any file (default
    inspect_data.html in the working directory)."""
    page = tmp_path / "notes.html"
    page.write_text("<p>my notes</p>")
    argv = ["inspect-data", "--source", "shapes", "--image-size", "32", "--num-image-tokens", "4",
            "-n", "1", "--rows", "1", "--color", "never", "--out", str(page)]
    assert cli.main(argv) == 2
    assert f"--out {page} exists and inspect-data did not write it" in capsys.readouterr().err
    assert page.read_text() == "<p>my notes</p>"
    assert cli.main(argv + ["--overwrite"]) == 0
    written = page.read_text()
    assert "inspect-data" in written
    assert cli.main(argv) == 0  # its own page is replaced without asking
    assert cli.main(argv[:-1] + [str(tmp_path)]) == 2  # a directory is not a page


def test_plan_json_replaces_only_an_earlier_report(tmp_path, capsys):
    """Why / Data lost: `plan --json PATH` used to overwrite any file."""
    other = tmp_path / "results.json"
    other.write_text('{"accuracy": 0.9}')
    assert cli.main(["plan", "--config", TINY, "--mesh", "1x1", "--devices", "h100",
                     "--json", str(other)]) == 2
    assert f"--json {other} exists and is not an earlier plan report" in capsys.readouterr().err
    assert json.loads(other.read_text()) == {"accuracy": 0.9}


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path, capsys):
    """Why / Interrupts and damaged files: a truncated safetensors file given to import-hf ended
    in a traceback that did not name the file."""
    hf_dir = _hf_llm(tmp_path / "hf")
    weights = [name for name in os.listdir(hf_dir) if name.endswith(".safetensors")][0]
    path = os.path.join(hf_dir, weights)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()  # transformers' save progress bar
    assert cli.main(["import-hf", "--hf-dir", hf_dir, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and weights in error[0], error
    assert not (tmp_path / "out").exists()
