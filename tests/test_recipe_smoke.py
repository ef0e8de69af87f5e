"""The shapes recipe's code path at a tiny step count: tokenizer, four chained phases through the
training loop, evaluation with both baselines, results.json, and a re-run that skips finished
phases. Accuracy is not checked here (README: measured numbers)."""
import json
import os

import jax
import numpy as np
import pytest

from configs.shapes import config as recipe
from configs.shapes import itm, run
from vlm_jax.model_dir import load_data_settings, load_model
from vlm_jax.train import param_groups


def _flat(params):
    return {k: np.asarray(v) for k, v in param_groups.flatten(jax.device_get(params)).items()}


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "shapes")
    assert run.main(["--workdir", workdir, "--steps", "2", "--batch", "8",
                     "--eval-per-type", "2"]) == 0
    printed = capsys.readouterr().out
    assert "sample conversations" in printed and "overall (5 core)" in printed

    results = json.load(open(os.path.join(workdir, "results.json")))
    assert set(results["columns"]) == {"model", "blank image", "majority"}
    for table in results["columns"].values():
        assert set(table) == set(recipe.QUESTION_TYPES)
        assert all(total == 2 for _, total in table.values())
    assert set(results["seconds"]) >= set(recipe.PHASES) | {"evaluate", "total"}

    # Each phase starts from the previous one: what a phase freezes is carried bit for bit.
    models = {phase: _flat(load_model(os.path.join(workdir, phase, "model"))[1])
              for phase in recipe.PHASES}
    for path, value in models["lm"].items():
        same_as_contrastive = np.array_equal(value, models["contrastive"][path])
        assert same_as_contrastive == (not path.startswith("llm/")), path
    for path, value in models["align"].items():
        if path.startswith(("llm/", "text_tower/")):
            np.testing.assert_array_equal(value, models["lm"][path], err_msg=path)

    # A second run finds every phase finished and only evaluates again.
    assert run.main(["--workdir", workdir, "--steps", "2", "--batch", "8",
                     "--eval-per-type", "1"]) == 0
    assert printed.count("done before") == 0
    assert capsys.readouterr().out.count("done before") == len(recipe.PHASES)

    # Image-text matching from the instruct model (with one data-provided hard negative per
    # caption): trains, scores one-change captions and retrieval with and without re-ranking;
    # the towers it does not train are carried over.
    assert itm.main(["--workdir", workdir, "--steps", "2", "--batch", "8", "--scenes", "8",
                     "--negatives", "1", "--objective", "itm"]) == 0
    assert "ITM re-ranked" in capsys.readouterr().out
    results = json.load(open(os.path.join(workdir, "itm", "results.json")))
    assert set(results["itm_accuracy"]) == {"color", "shape", "position", "overall"}
    matched = _flat(load_model(os.path.join(workdir, "itm", "model"))[1])
    # it keeps the chat template the instruct model answers in (generate, export's check)
    assert load_data_settings(os.path.join(workdir, "itm", "model"))["template"] == "minimal"
    assert any(path.startswith("itm_head/") for path in matched)
    for path, value in models["instruct"].items():
        if path.startswith(("vision_tower/", "text_tower/", "contrastive/")):
            np.testing.assert_array_equal(value, matched[path], err_msg=path)

    # A rerun with other settings into the same directories is refused, naming the setting,
    # rather than evaluating the model already there as if it were the one asked for.
    with pytest.raises(SystemExit, match=r"itm holds a model trained with other settings "
                                         r"\(data\.negative_captions: there 1, asked 2"):
        itm.main(["--workdir", workdir, "--steps", "2", "--batch", "8", "--negatives", "2",
                  "--objective", "itm"])
    with pytest.raises(SystemExit, match=r"contrastive holds a model trained with other "
                                         r"settings .*model\.fusion: there 'early', asked"):
        run.main(["--workdir", workdir, "--steps", "2", "--batch", "8",
                  "--fusion", "cross_attention"])


@pytest.mark.slow
def test_cross_attention_recipe_runs_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "shapes_cross")
    assert run.main(["--workdir", workdir, "--steps", "2", "--batch", "8", "--eval-per-type", "2",
                     "--fusion", "cross_attention"]) == 0
    assert "overall (5 core)" in capsys.readouterr().out
    config, params, _ = load_model(os.path.join(workdir, "instruct", "model"))
    assert config.fusion == "cross_attention" and config.tokens_per_image == 1
    assert params["cross_attention"]["attention_gate"].shape == (3, 1)


@pytest.mark.parametrize("phase,rows_per_device", [("instruct", 0), ("lm", 1), ("align", 3)])
def test_recipe_speed_settings_validate_on_these_devices(phase, rows_per_device):
    """The recipe accumulates micro-batches for speed (the same gradient); with a batch or a
    device count they do not divide it takes fewer, never an invalid config."""
    from vlm_jax.train.run_config import build_run_config
    batch = rows_per_device * jax.device_count()  # 0: the recipe's own batch
    config = recipe.get_config(f"phase={phase},batch={batch}")
    run_config = build_run_config(config, jax.device_count())
    micro = run_config.train.micro_batches
    assert run_config.data.batch_size % (micro * jax.device_count()) == 0 or micro == 1
    assert run_config.model.scan_unroll == recipe.RUN_SETTINGS["scan_unroll"]
    if batch == 0 and jax.device_count() == 1:
        assert micro == recipe.SCHEDULE[phase]["micro"]
