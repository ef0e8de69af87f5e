"""benchmarks/accelerator.py --smoke: the accelerator benchmark's own code (every model builder,
train variant and the decode measurement) runs on CPU at tiny shapes, so the first session that
is lent a GPU can fire it without debugging it on scarce device time. (Issue "Speed where users
run it", deliverable 1: "a --smoke mode that runs the same code on CPU in CI".)"""
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.mark.slow
def test_smoke_runs_every_code_path_and_writes_the_table(tmp_path, capsys):
    sys.path.insert(0, BENCHMARKS)
    try:
        import accelerator
    finally:
        sys.path.remove(BENCHMARKS)
    out = tmp_path / "accel"
    assert accelerator.main(["--smoke", "--out", str(out)]) == 0
    result = json.load(open(out / "results.json"))
    assert result["not_run"] == [] and result["smoke"]
    kinds = {row["kind"] for row in result["rows"]}
    assert kinds == {"train", "decode"}
    for row in result["rows"]:
        if row["kind"] == "train":
            assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] is not None
        else:  # a tiny model's decode step may vanish in timing noise: then None, never < 0
            assert row["ttft_s"] > 0 and (row["decode_tokens_per_s"] is None
                                          or row["decode_tokens_per_s"] > 0)
    table = (out / "results.md").read_text()
    assert "| nanovlm bf16 remat dots_no_batch |" in table and "decode" in table
    # An output directory that already holds results is refused, not overwritten.
    with pytest.raises(SystemExit, match="already holds files"):
        accelerator.main(["--smoke", "--out", str(out)])
