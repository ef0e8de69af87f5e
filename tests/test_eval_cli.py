"""`vlm-jax eval` end to end on tiny checkpoints: VQA (multi-turn prompts, per-type table, right /
wrong marks, blank-image baseline), captioning (BLEU-4 / CIDEr-D) and retrieval (recall@k), each
checked against an independent recomputation; results.json and report.html; clear errors."""
import contextlib
import io
import json
import os
import re

import jax
import numpy as np
import pytest

from configs.shapes import config as recipe
from vlm_jax.eval import captions as caption_metrics
from vlm_jax.eval import vqa as evaluate
from vlm_jax.train import run_config as config_lib
from vlm_jax.cli import main as cli_main
from vlm_jax.data.images import preprocess_image
from vlm_jax.data.sources.shapes import ShapesSource
from vlm_jax.data.transforms import TokenizeConversation
from vlm_jax.inference.generate import greedy_generate
from vlm_jax.model_dir import load_model, save_model
from vlm_jax.models.vlm import VLM, init_params
from vlm_jax.train.tokenizer import build_tokenizer

SHAPES_QA = "configs/shapes/config.py:phase=instruct"


@pytest.fixture(scope="module")
def checkpoints(tiny_trained_run, tmp_path_factory):
    """Model directories of configs/tiny.py's instruct / align / contrastive models (random
    init; align: conftest's 2-step run from random init). The instruct model answers every
    question with one token, "yes" or "no": its final norm keeps hidden dimension 0 only and the
    LM head maps it to +yes / -no."""
    root = tmp_path_factory.mktemp("eval")
    paths = {"align": tiny_trained_run.model}
    for phase in ("instruct", "contrastive"):
        run = config_lib.build_run_config(
            config_lib.load_config_file(f"configs/tiny.py:phase={phase}"), jax.device_count())
        tokenizer = build_tokenizer(run, str(root / "tokenizer_work"))
        params = jax.jit(init_params, static_argnums=0)(run.model, jax.random.key(0))
        if phase == "instruct":
            yes, no = _single_token(tokenizer, "yes"), _single_token(tokenizer, "no")
            llm = params["llm"] = jax.tree.map(np.asarray, params["llm"])
            llm["final_norm"]["scale"] = np.eye(1, llm["final_norm"]["scale"].shape[0])[0]
            kernel = np.zeros(llm["lm_head"]["kernel"].shape, np.float32)
            kernel[0, yes], kernel[0, no] = 1.0, -1.0
            llm["lm_head"]["kernel"] = kernel
        paths[phase] = str(root / phase)
        save_model(paths[phase], run.model, params, tokenizer)
    return paths


def _single_token(tokenizer, word):
    """The id of a one-token spelling of `word` (with or without a leading space)."""
    for text in (word, " " + word):
        ids = tokenizer.encode(text)
        if len(ids) == 1:
            return ids[0]
    raise AssertionError(f"{word!r} is no single token")


def _eval(args):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
        code = cli_main(["eval"] + args)
    return code, out.getvalue(), err.getvalue()


def _outputs(directory):
    with open(os.path.join(directory, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(directory, "report.html"), encoding="utf-8") as f:
        return results, f.read()


def test_vqa_multi_turn_scores_marks_and_reports(checkpoints, tmp_path):
    out = str(tmp_path / "vqa")
    code, printed, err = _eval(["--config", SHAPES_QA, "--checkpoint", checkpoints["instruct"],
                                "--split", "test", "--num-examples", "3", "--max-new-tokens", "1",
                                "--batch-size", "8", "--blank-baseline", "--out", out])
    assert code == 0, err
    results, report = _outputs(out)
    records = results["predictions"]
    assert len(records) == 3 * 6  # the recipe asks 6 questions per image
    assert {r["prediction"] for r in records} <= {"yes", "no"}
    correct = [evaluate.is_correct(r["prediction"], r["answer"], r["type"]) for r in records]
    assert [r["correct"] for r in records] == correct
    assert 0 < sum(correct) < len(records)  # yes/no questions are answered right some of the time
    assert results["metrics"]["accuracy"] == pytest.approx(np.mean(correct))
    by_type = {}
    for record, right in zip(records, correct):
        by_type.setdefault(record["type"], []).append(right)
    assert results["metrics"]["mean_type_accuracy"] == pytest.approx(
        np.mean([np.mean(v) for v in by_type.values()]))
    for question_type in by_type:
        assert re.search(rf"^{question_type}\s+[\d.]+%\s+[\d.]+%$", results["table"], re.M)
    assert "blank image" in printed and "blank_image_mean_type_accuracy" in results["metrics"]

    # Independent prompts: the training transform's ids before each answer, then the generator.
    model_config, params, tokenizer = load_model(checkpoints["instruct"])
    raw = ShapesSource("test", image_size=48, task="qa", turns_per_example=6,
                       question_types=recipe.QUESTION_TYPES, **recipe.WORLDS["recipe"])[1]
    example = TokenizeConversation(tokenizer, "minimal", model_config.tokens_per_image, 256).map(
        {**raw, "images": np.zeros((1, 4, 4, 3), np.float32)})
    mask = example["loss_mask"] > 0
    answer_starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]])) + 1
    image = preprocess_image(raw["images"][0], model_config.vision.image_size)[None, None]
    for turn in (0, 5):
        prompt = example["input_ids"][:answer_starts[turn]][None]
        tokens, counts = greedy_generate(model_config, params, prompt,
                                         np.array([prompt.shape[1]]), image, 1)
        assert records[6 + turn]["prediction"] == tokenizer.decode(tokens[0, :counts[0]]).strip()
        assert records[6 + turn]["answer"] == raw["conversation"][2 * turn + 1]["content"]

    # The report: one row per question with its image inline, marked like results.json.
    assert report.count("<tr class='right'>") == sum(correct)
    assert report.count("<tr class='wrong'>") == len(records) - sum(correct)
    assert report.count("<img src='data:image/png;base64,") == len(records)
    assert "is there" in report or "what color" in report


def test_caption_bleu_cider_from_the_generated_captions(checkpoints, tmp_path):
    out = str(tmp_path / "caption")
    code, _, err = _eval(["--config", "configs/tiny.py:phase=align", "--checkpoint",
                          checkpoints["align"], "--num-examples", "5", "--max-new-tokens", "4",
                          "--out", out])
    assert code == 0, err
    results, report = _outputs(out)
    records = results["predictions"]
    assert len(records) == 5 and results["task"] == "caption"
    hypotheses, references = [r["prediction"] for r in records], [r["references"] for r in records]
    assert results["metrics"]["bleu4"] == pytest.approx(caption_metrics.bleu4(hypotheses, references))
    assert results["metrics"]["cider_d"] == pytest.approx(caption_metrics.cider_d(hypotheses,
                                                                                  references))
    # the prompt is LLaVA's "plain" prefix: BOS, the image tokens, a newline
    model_config, params, tokenizer = load_model(checkpoints["align"])
    source = ShapesSource("validation", image_size=32, task="caption", turns_per_example=1)
    raw = source[0]
    assert records[0]["references"] == [raw["caption"]]
    ids = tokenizer.encode(f"{tokenizer.bos_token}{tokenizer.image_token}\n")
    ids = np.repeat(ids, np.where(np.array(ids) == tokenizer.image_token_id,
                                  model_config.tokens_per_image, 1))[None]
    image = preprocess_image(raw["images"][0], 32)[None, None]
    tokens, counts = greedy_generate(model_config, params, ids, np.array([ids.shape[1]]), image, 4,
                                     [tokenizer.eos_id])
    assert records[0]["prediction"] == tokenizer.decode(tokens[0, :counts[0]]).strip()
    assert report.count("CIDEr-D") >= 5


def test_retrieval_recall_matches_a_direct_ranking(checkpoints, tmp_path):
    out = str(tmp_path / "retrieval")
    code, _, err = _eval(["--config", "configs/tiny.py:phase=contrastive", "--checkpoint",
                          checkpoints["contrastive"], "--num-examples", "12", "--batch-size", "5",
                          "--out", out])
    assert code == 0, err
    results, _ = _outputs(out)
    model_config, params, tokenizer = load_model(checkpoints["contrastive"])
    source = ShapesSource("validation", image_size=32, task="caption", turns_per_example=1)
    raws = [source[i] for i in range(12)]
    captions = [r["caption"] for r in raws]
    text_ids = np.full((12, 24), tokenizer.pad_id, np.int32)
    for row, caption in enumerate(captions):
        ids = tokenizer.encode(caption)[:23] + [tokenizer.eos_id]
        text_ids[row, :len(ids)] = ids
    images = np.stack([preprocess_image(r["images"][0], 32) for r in raws])
    zimg, ztxt, _ = jax.jit(lambda p, i, t: VLM(model_config).apply(
        {"params": p}, i, t, method=VLM.contrastive_embeddings))(params, images, text_ids)
    similarity = np.asarray(zimg) @ np.asarray(ztxt).T

    def recall(sim, k):  # a query hits if a candidate with its caption is among its k best
        hits = 0
        for query in range(12):
            best = np.argsort(-sim[query], kind="stable")[:k]
            hits += any(captions[c] == captions[query] for c in best)
        return hits / 12

    for k in (1, 5):
        assert results["metrics"][f"image_to_text_r@{k}"] == pytest.approx(recall(similarity, k),
                                                                          abs=1e-6)
        assert results["metrics"][f"text_to_image_r@{k}"] == pytest.approx(recall(similarity.T, k),
                                                                          abs=1e-6)


def test_errors_name_the_problem(checkpoints, tmp_path):
    code, _, err = _eval(["--config", SHAPES_QA, "--checkpoint", checkpoints["contrastive"],
                          "--out", str(tmp_path / "x")])
    assert code == 2 and "needs an LLM" in err
    code, _, err = _eval(["--config", "configs/tiny.py:phase=lm", "--checkpoint",
                          checkpoints["instruct"], "--out", str(tmp_path / "x")])
    assert code == 2 and "has no evaluation" in err
    code, _, err = _eval(["--config", "configs/tiny.py:phase=contrastive", "--checkpoint",
                          checkpoints["instruct"], "--out", str(tmp_path / "x")])
    assert code == 2 and "text tower" in err


def test_an_out_holding_other_files_is_refused_before_the_model_loads(checkpoints, tmp_path):
    from vlm_jax.eval import tasks as eval_command
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not eval's")
    code, _, err = _eval(["--config", SHAPES_QA, "--checkpoint", checkpoints["instruct"],
                          "--out", str(out)])
    assert code == 2 and "holds files eval did not write (notes.txt)" in err
    assert os.listdir(out) == ["notes.txt"]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    eval_command.check_out(str(earlier))  # an earlier eval's results are replaced
    eval_command.check_out(str(tmp_path / "new"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        eval_command.check_out(str(tmp_path / "file"))
