"""vlm-jax plan: the train step compiled ahead of time on 8 fake CPU devices; per-device memory
that XLA's memory analysis and the shapes x shardings agree on; FITS / DOES NOT FIT; clear
errors for meshes and arguments that cannot work."""
import json
import math
import os

import pytest

from vlm_jax.train import plan as plan_lib
from vlm_jax.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
GIB = 1024 ** 3


def test_parse_mesh_forms():
    assert plan_lib.parse_mesh("16x16") == {"data": 16, "fsdp": 16, "tensor": 1}
    assert plan_lib.parse_mesh("2x4x8") == {"data": 2, "fsdp": 4, "tensor": 8}
    assert plan_lib.parse_mesh("fsdp=8,tensor=2") == {"data": 1, "fsdp": 8, "tensor": 2}
    for bad, message in (("4y2", "DATAxFSDP"), ("pipe=2", "unknown mesh axis"),
                         ("0x8", ">= 1"), ("1x2x3x4", "1 to 3 sizes")):
        with pytest.raises(ValueError, match=message):
            plan_lib.parse_mesh(bad)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One compile of configs/tiny.py on data=2 x fsdp=4, checked against a device too small
    for it (4 KiB), so the same run shows the report fields and the DOES NOT FIT answer."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    code = cli_main(["plan", "--config", TINY, "--mesh", "2x4", "--devices", "tpu_v5e",
                     "--memory-gib", str(4 / 1024 ** 2), "--json", str(out)])
    return code, json.loads(out.read_text())


def test_plan_reports_memory_shardings_and_a_verdict(tiny_report, capsys):
    code, report = tiny_report
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["num_devices"] == 8
    assert report["num_processes"] == 2  # 8 v5e chips = 2 hosts: data.batch_size is per host
    assert report["global_batch"] == 16
    gib = report["per_device_gib"]
    for key in ("params", "optimizer_state", "batch", "xla_arguments", "xla_temporaries",
                "peak_estimate"):
        assert gib[key] > 0, key
    # XLA's argument bytes are the state + batch that the shardings give (+ the i32 step).
    analytic = (gib["params"] + gib["optimizer_state"] + gib["batch"]) * GIB
    assert abs(gib["xla_arguments"] * GIB - analytic) <= 64
    # fsdp=4 splits every param at least 4 ways that its dims allow: below the replicated size.
    assert gib["params"] * GIB < report["params"]["total"] * 4 / 2
    # The train state is donated: no output needs memory of its own.
    assert gib["xla_outputs"] - gib["xla_aliased"] < 0.01 * gib["xla_arguments"]
    top = report["largest_tensors"]
    assert top and top == sorted(top, key=lambda r: -r["per_device_gib"])
    biggest = top[0]
    assert "fsdp" in biggest["sharding"] and biggest["dtype"] == "float32"
    ways = math.prod(report["mesh"][axis] for axis in ("data", "fsdp", "tensor")
                     if f"'{axis}'" in biggest["sharding"])
    assert biggest["per_device_gib"] * GIB * ways == math.prod(biggest["shape"]) * 4
    # 4 KiB per device: clearly too small, exit code 1.
    assert code == 1 and not report["fits"] and report["verdict"].startswith("DOES NOT FIT")
    assert "tpu_v5e" in report["verdict"]
    assert any("XLA:CPU" in note for note in report["notes"])


def test_fit_verdict_against_the_device_table(tiny_report):
    _, report = tiny_report
    peak = report["per_device_gib"]["peak_estimate"] * GIB
    fits, text = plan_lib.fit_verdict(peak, plan_lib.DEVICES["tpu_v5e"].memory_gib, 0.9, "tpu_v5e")
    assert fits and text.startswith("FITS")
    fits, text = plan_lib.fit_verdict(peak, peak / GIB, 0.9, "h100")  # 100% > 90% headroom
    assert not fits and "DOES NOT FIT" in text and "90%" in text and "h100" in text
    text = plan_lib.format_report(report)
    assert "peak estimate" in text and "largest tensors" in text and "DOES NOT FIT" in text


def test_a_mesh_the_batch_cannot_split_is_refused_before_compiling(capsys):
    code = cli_main(["plan", "--config", TINY, "--mesh", "8x1", "--devices", "h100",
                     "--config.data.batch_size=4"])
    err = capsys.readouterr().err
    assert code == 2 and "data.batch_size=4" in err and "not divisible" in err


def test_an_unknown_device_and_a_bad_mesh_are_named(capsys):
    with pytest.raises(SystemExit):
        cli_main(["plan", "--config", TINY, "--mesh", "2x4", "--devices", "tpu_v9"])
    assert "tpu_v9" in capsys.readouterr().err
    assert cli_main(["plan", "--config", TINY, "--mesh", "2by4", "--devices", "h100"]) == 2
    assert "DATAxFSDP" in capsys.readouterr().err


def test_another_device_count_reruns_in_a_fresh_process(capfd):
    # 3 devices (this process has 8): the command re-runs itself with 3 fake devices, where
    # the tiny batch of 8 cannot be split 3 ways: a clear error from the fresh process.
    code = cli_main(["plan", "--config", TINY, "--mesh", "3x1", "--devices", "h100",
                     "--num-processes", "1"])
    err = capfd.readouterr().err
    assert code == 2 and "not divisible by the data-parallel size 3" in err


def test_topology_needs_a_tpu_device_and_names_what_is_missing(capsys, monkeypatch):
    assert cli_main(["plan", "--config", TINY, "--mesh", "2x4", "--devices", "h100",
                     "--topology", "v5p:2x2x2"]) == 2
    assert "not a TPU" in capsys.readouterr().err
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a))
    assert cli_main(["plan", "--config", TINY, "--mesh", "2x4", "--devices", "tpu_v5p",
                     "--topology", "v5p:2x2x2"]) == 2
    assert "pip install 'libtpu==0.0.42.*'" in capsys.readouterr().err
