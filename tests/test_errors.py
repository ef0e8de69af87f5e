"""One error path: every kind of user mistake (vlm_jax/errors.py) reaches the CLI's guard and is
printed as one line that names the real config path, flag or file, with its exit code; a
traceback only with --debug. (Issue "structure", deliverable 3.)"""
import json
import os
import subprocess
import sys

import pytest

from vlm_jax import errors
from vlm_jax.cli import main as cli_main

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _fails(capsys, argv, code=2):
    """stderr's one line after `vlm-jax argv` exits with `code`."""
    assert cli_main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("override,path", [
    ("train.phase.lora.rank=0", "train.phase.lora.rank=0"),             # was "train.lora.rank"
    ("train.phase.lora.targets=['(']", "train.phase.lora.targets[0]"),  # was a raw re.error
    ("train.optimizer.schedule=cosin", "train.optimizer.schedule"),
    ("model.projector.type=mlp3", "model.projector.type"),
])
def test_a_config_error_names_the_field(tmp_path, capsys, override, path):
    line = _fails(capsys, ["train", "--config", f"{TINY}:phase=instruct", f"--config.{override}",
                           "--workdir", str(tmp_path / "run"), "--print-config"])
    assert line.startswith("vlm-jax train: error: ") and path in line
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg):\n    return {\n")
    line = _fails(capsys, ["train", "--config", str(bad), "--workdir", str(tmp_path / "run")])
    assert f"config file {bad} line" in line and "syntax error" in line


def test_a_config_file_may_import_its_neighbours_from_anywhere(tmp_path):
    """`from configs import base` works whatever the working directory: the directory holding
    configs/ goes on sys.path (it used to fail unless run from the repository root)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("")
    (tmp_path / "configs" / "base.py").write_text(
        f"from vlm_jax.config import load_config_file\n"
        f"def get_config(arg=None):\n    return load_config_file({TINY!r})\n")
    (tmp_path / "configs" / "derived.py").write_text(
        "from configs import base\ndef get_config(arg=None):\n    return base.get_config()\n")
    result = subprocess.run(
        [sys.executable, "-m", "vlm_jax.cli", "train", "--config",
         str(tmp_path / "configs" / "derived.py"), "--workdir", str(tmp_path / "run"),
         "--print-config"], cwd="/", capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["train"]["steps"] >= 1


def test_a_data_error_names_the_file(tmp_path, capsys):
    data = tmp_path / "rows.json"
    data.write_text("[{not json")
    line = _fails(capsys, ["inspect-data", "--source", "llava_json", "--path", str(data),
                           "--tokenizer", str(tmp_path), "--out", str(tmp_path / "x.html")])
    assert str(data) in line or str(tmp_path) in line


def test_a_checkpoint_error_names_the_flag(tmp_path, capsys):
    line = _fails(capsys, ["eval", "--config", TINY, "--checkpoint", str(tmp_path / "nothing")])
    assert f"--checkpoint {tmp_path / 'nothing'} is neither a model directory" in line


def test_a_conversion_error_names_the_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _fails(capsys, ["import-hf", "--hf-dir", str(tmp_path / "empty"),
                           "--out", str(tmp_path / "out")])
    assert line.startswith("vlm-jax import-hf: error: ") and str(tmp_path / "empty") in line
    assert not (tmp_path / "out").exists()


def test_an_input_error_names_the_flag_and_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["generate", "--checkpoint", str(tmp_path), "--image", "x.png", "--prompt", "hi",
            "--batch-size", "0"]
    assert "--batch-size 0: supported: >= 1" in _fails(capsys, argv)
    with pytest.raises(errors.InputError, match="--batch-size"):
        cli_main(["--debug"] + argv)


def test_every_kind_is_a_value_error_with_an_exit_code():
    """Library callers that catch ValueError keep working; the CLI reads exit_code."""
    kinds = [errors.ConfigError, errors.DataError, errors.CheckpointError,
             errors.ConversionError, errors.InputError]
    assert all(issubclass(kind, ValueError) and kind.exit_code == 2 for kind in kinds)
    assert errors.TrainingStopped.exit_code == errors.ExportMismatch.exit_code == 3


def test_an_unknown_command_suggests_the_closest(capsys):
    assert cli_main(["evaluate"]) == 2
    assert "did you mean eval?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "generate", "score", "import-hf",
                                     "export-hf", "inspect-data", "plan", "sweep"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"vlm-jax {command}" in capsys.readouterr().out
