"""vlm-jax sweep: product / zip expansion, distinct filesystem-safe run names, validation of every
run before any launch, the printed commands, and a real local sweep of 4 tiny runs on the shapes
world whose report table has one row per run."""
import json
import os
import shlex

import pytest

from vlm_jax import sweep as sweep_lib
from vlm_jax.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
FAST = ["--config.log.progress_bar=false", "--config.log.tensorboard=false",
        "--config.checkpoint.async_save=false", "--config.eval.num_batches=1"]


def test_product_zip_and_combine():
    runs = sweep_lib.product(a=[1, 2], b=["x", "y", "z"])
    assert len(runs) == 6 and runs[0] == {"a": 1, "b": "x"} and runs[1] == {"a": 1, "b": "y"}
    assert sweep_lib.zip_(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    combined = sweep_lib.combine(sweep_lib.zip_(a=[1, 2], b=[3, 4]), sweep_lib.product(c=[5, 6]))
    assert combined == [{"a": 1, "b": 3, "c": 5}, {"a": 1, "b": 3, "c": 6},
                        {"a": 2, "b": 4, "c": 5}, {"a": 2, "b": 4, "c": 6}]
    with pytest.raises(ValueError, match="same number of values"):
        sweep_lib.zip_(a=[1, 2], b=[3])
    with pytest.raises(ValueError, match="non-empty list"):
        sweep_lib.product(a="abc")


def test_run_names_are_distinct_and_filesystem_safe():
    sweep = [{"train.seed": 0, "data.seed": 0, "data.template": "a/b c"},
             {"train.seed": 0, "data.seed": 1, "data.template": "a/b c"},
             {"train.seed": 1, "data.seed": 0, "data.template": "a:b?c"},
             {"train.seed": 1, "data.seed": 0, "data.template": "a:b*c"}]
    names = sweep_lib.run_names(sweep)
    assert len(set(names)) == 4
    for name in names:
        assert all(ch.isalnum() or ch in ".=+-_" for ch in name), name
    # 'seed' alone would be ambiguous: both dotted keys stay; 'template' is unique: shortened.
    assert names[0] == "train.seed-0_data.seed-0_template-a_b_c"
    assert "train.seed-0" in names[0] and "data.seed-0" in names[0] and "template-a_b_c" in names[0]
    long = sweep_lib.run_names([{"data.template": "x" * 300}, {"data.template": "x" * 299 + "y"}])
    assert all(len(n) <= sweep_lib.MAX_NAME_LENGTH for n in long) and long[0] != long[1]


def test_tiny_sweep_prints_four_distinct_train_commands(tmp_path, capsys):
    root = tmp_path / "sweep"
    assert cli_main(["sweep", "--config", f"{TINY}:steps=3", "--workdir", str(root),
                           "--launcher", "print", "--config.eval_data=None"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 4
    workdirs = [c[c.index("--workdir") + 1] for c in commands]
    assert len(set(workdirs)) == 4 and all(w.startswith(str(root) + os.sep) for w in workdirs)
    for command in commands:
        assert command[:2] == ["vlm-jax", "train"] and "--config.eval_data=None" in command
    lrs = {c for command in commands for c in command
           if c.startswith("--config.train.optimizer.learning_rate=")}
    assert lrs == {"--config.train.optimizer.learning_rate=0.001",
                   "--config.train.optimizer.learning_rate=0.003"}
    record = json.loads((root / "sweep.json").read_text())
    assert [r["workdir"] for r in record["runs"]] == workdirs
    assert all(r["status"] == "printed" for r in record["runs"])


def test_an_invalid_run_stops_the_sweep_before_any_launch(tmp_path, capsys):
    config = tmp_path / "bad_sweep.py"
    config.write_text(
        "from vlm_jax.config import load_config_file\n"
        f"def get_config(arg=None):\n    return load_config_file({TINY!r})\n"
        "def sweep():\n    return [{'data.batch_size': 8}, {'data.batch_size': 3}]\n")
    root = tmp_path / "sweep"
    assert cli_main(["sweep", "--config", str(config), "--workdir", str(root), "--launcher", "local",
                           "--num-devices", "8"]) == 2
    err = capsys.readouterr().err
    assert "batch_size-3" in err and "nothing was launched" in err and "data.batch_size=3" in err
    assert not root.exists()


def test_swept_key_also_given_on_the_command_line_is_refused(tmp_path):
    with pytest.raises(ValueError, match="also swept"):
        sweep_lib.expand(TINY, str(tmp_path), ["train.optimizer.learning_rate=0.1"])


def test_launcher_commands_for_tpu_and_slurm():
    run = {"name": "learning_rate-0.001_warmup_steps-1", "workdir": "gs://b/sweep/r1",
           "overrides": ["train.seed=1"]}
    tpu = sweep_lib.launch_command("tpu", "configs/tiny.py", run, ["--zone", "us-east5-a"])
    assert tpu[:2] == ["bash", "launch/tpu_pod.sh"]
    assert tpu[tpu.index("--workdir") + 1] == "gs://b/sweep/r1" and tpu[tpu.index("--zone") + 1] == "us-east5-a"
    assert tpu[tpu.index("--") + 1:] == ["--config.train.seed=1"]
    name = tpu[tpu.index("--name") + 1]
    assert len(name) <= 40 and all(ch.islower() or ch.isdigit() or ch == "-" for ch in name)
    slurm = sweep_lib.launch_command("slurm", "configs/tiny.py", run, ["--nodes", "2"])
    assert slurm[:2] == ["bash", "launch/slurm_submit.sh"]
    assert slurm[slurm.index("--nodes") + 1] == "2" and slurm.index("--nodes") < slurm.index("--")
    assert slurm[slurm.index("--") + 1:] == ["--config", "configs/tiny.py", "--workdir",
                                             "gs://b/sweep/r1", "--config.train.seed=1"]


@pytest.mark.slow
def test_local_sweep_of_four_tiny_runs_and_its_report(tmp_path, capsys):
    # Seeds change no compiled program, so runs 2-4 reuse run 1's compilations from the
    # sweep's shared cache: 4 real trainings in well under a minute on 2 cores.
    config = tmp_path / "seed_sweep.py"
    config.write_text(
        "from vlm_jax.config import load_config_file\n"
        "from vlm_jax.sweep import product\n"
        "def get_config(arg=None):\n"
        f"    return load_config_file({TINY!r} + (':' + arg if arg else ''))\n"
        "def sweep():\n"
        "    return product(**{'train.seed': [0, 1], 'data.seed': [0, 1]})\n")
    root = tmp_path / "sweep"
    assert cli_main(["sweep", "--config", f"{config}:steps=3", "--workdir", str(root),
                           "--launcher", "local", *FAST]) == 0
    record = json.loads((root / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["done"] * 4
    for run in record["runs"]:  # each run trained with its own overrides
        saved = json.loads((root / run["name"] / "config.json").read_text())
        assert saved["train"]["seed"] == run["swept"]["train.seed"]
        assert saved["data"]["seed"] == run["swept"]["data.seed"]
    capsys.readouterr()

    assert cli_main(["sweep", "--report", "--workdir", str(root)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + 4 and table == (root / "report.md").read_text().strip().splitlines()
    assert "train.seed" in table[0] and "eval/loss" in table[0]
    rows = json.loads((root / "report.json").read_text())
    assert [r["name"] for r in rows] == [r["name"] for r in record["runs"]]
    for row in rows:
        assert row["status"] == "done" and row["step"] == 3 and 0 < row["loss"] < 20
        assert row["eval/loss"] > 0
    # Different init seeds and data orders: the runs really differ.
    assert len({round(r["loss"], 6) for r in rows}) == 4


def test_report_marks_runs_without_metrics(tmp_path, capsys):
    root = tmp_path / "sweep"
    assert cli_main(["sweep", "--config", f"{TINY}:steps=3", "--workdir", str(root),
                           "--launcher", "print"]) == 0
    capsys.readouterr()
    assert cli_main(["sweep", "--report", "--workdir", str(root)]) == 0
    rows = json.loads((root / "report.json").read_text())
    assert len(rows) == 4 and all(r["status"] == "no metrics" and r["loss"] is None for r in rows)


@pytest.mark.parametrize("launcher,extra", [("tpu", ["--zone", "us-east5-a",
                                                      "--accelerator-type", "v5p-64"]),
                                             ("slurm", ["--nodes", "2"])])
def test_launcher_scripts_accept_the_sweep_commands(launcher, extra):
    """The real launch/ scripts, in their --dry-run mode, take the commands the sweep builds
    and start `vlm-jax train` with the run's workdir and overrides."""
    import subprocess
    workdir = "gs://b/sweep/r1" if launcher == "tpu" else "/shared/sweep/r1"
    run = {"name": "seed-1", "workdir": workdir, "overrides": ["train.seed=1"]}
    command = sweep_lib.launch_command(launcher, "configs/tiny.py", run, extra + ["--dry-run"])
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    train_lines = [line for line in result.stdout.splitlines() if "vlm-jax train" in line]
    assert train_lines and all("--config.train.seed=1" in line for line in train_lines)
    assert all("configs/tiny.py" in line for line in train_lines)
