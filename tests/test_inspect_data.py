"""`vlm-jax inspect-data`: on the shapes world and on a tiny LLaVA JSON, the terminal view and the
HTML contact sheet show the answers marked as learned, compact image spans and inline images;
with --config it shows the batches `vlm-jax train` builds from that config (checked against the
trainer's own tokenizer and pipeline), and a bad config is one line on stderr, exit code 2."""
import html
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax.train import run_config as config_lib
from vlm_jax.cli import inspect_data as inspect_cli
from vlm_jax.cli import main as cli_main
from vlm_jax.data import inspect as inspect_data
from vlm_jax.data.pipeline import build_pipeline
from vlm_jax.data.sources.shapes import ShapesSource
from vlm_jax.train.tokenizer import build_tokenizer

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def test_shapes_html_and_terminal(tmp_path, capsys):
    out = tmp_path / "sheet.html"
    assert cli_main(["inspect-data", "--source", "shapes", "--template", "qwen2", "--image-size", "32",
                              "--num-image-tokens", "4", "--seq-len", "512", "-n", "2",
                              "--color", "never", "--out", str(out)]) == 0
    sheet = out.read_text()
    printed = capsys.readouterr().out
    for index in range(2):
        for answer in ShapesSource(image_size=32)[index]["meta"]["answers"]:
            assert f"<mark class=learned>{html.escape(answer)}&lt;|im_end|&gt;</mark>" in sheet
            assert f"[[{answer}<|im_end|>]]" in printed
    examples_part, batch_part = sheet.split("the trainer's first batch")
    assert examples_part.count("<img src='data:image/png;base64,") == 2
    assert batch_part.count("<img src='data:image/png;base64,") >= 2  # rows 0 and 1
    assert "&lt;image x4&gt;" in sheet and "<image x4>" in printed
    assert "row 0: #1:" in printed and "batch layout" in sheet


def test_llava_json_direct_flags(tmp_path, capsys):
    pixels = np.zeros((12, 10, 3), np.uint8)
    pixels[:, :, 0] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (tmp_path / "red.png").write_bytes(buffer.getvalue())
    rows = [{"id": "r0", "image": "red.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the image?"},
                {"from": "gpt", "value": "red"}]},
            {"id": "r1", "image": "missing.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat color?"},
                {"from": "gpt", "value": "blue"}]}]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    from vlm_jax.data.tokenizer import train_word_tokenizer
    train_word_tokenizer(["what color is the image? red blue"]).save(str(tmp_path / "tok"))
    out = tmp_path / "llava.html"
    assert cli_main(["inspect-data", "--source", "llava_json", "--path", str(tmp_path / "data.json"),
                              "--tokenizer", str(tmp_path / "tok"), "--template", "vicuna",
                              "--seq-len", "256", "--image-size", "16", "--num-image-tokens", "3",
                              "-n", "2", "--color", "never", "--out", str(out)]) == 0
    sheet = out.read_text()
    assert "<mark class=learned> red&lt;eos&gt;</mark>" in sheet
    assert "skipped: image_missing" in sheet
    assert "&lt;image x3&gt;" in sheet
    printed = capsys.readouterr().out
    assert "row 0: #1:" in printed and "'image_missing': 1" in printed


def _trainer_run(spec: str, *overrides: str):
    config = config_lib.apply_overrides(config_lib.load_config_file(spec), list(overrides))
    return config_lib.build_run_config(config, jax.device_count(), jax.process_count())


def test_config_shows_the_trainers_first_batch(tmp_path, capsys):
    """inspect-data fits its own tokenizer (in a temporary directory); the trainer's is fitted
    here by build_tokenizer into another workdir: the batches must still be the same."""
    run = _trainer_run(f"{TINY}:phase=instruct")
    tokenizer = build_tokenizer(run, str(tmp_path / "trainer"))
    trainer_batch = next(build_pipeline(run.data, tokenizer))
    argv = ["--config", f"{TINY}:phase=instruct", "-n", "3", "--rows", "1", "--color", "never",
            "--out", str(tmp_path / "sheet.html")]

    inspection = inspect_cli.collect(inspect_cli.parse_args(argv))
    assert (inspection.data.num_image_tokens, inspection.data.image_size) == (16, 32)
    for key in ("input_ids", "loss_mask", "segment_ids", "num_images", "images"):
        np.testing.assert_array_equal(inspection.batch[key], trainer_batch[key], err_msg=key)
    # The model's 16 image tokens per image, not the DataConfig default of 196: nothing skipped.
    assert [record.get("skipped") for record in inspection.examples] == [None] * 3
    assert inspection.skip_counts["skipped"] == {}
    image_tokens = (trainer_batch["input_ids"] == tokenizer.image_token_id).sum(axis=1)
    np.testing.assert_array_equal(image_tokens, trainer_batch["num_images"] * 16)

    assert cli_main(["inspect-data"] + argv) == 0
    printed = capsys.readouterr().out
    for line in inspect_data.batch_layout(trainer_batch):
        assert line in printed
    segment = trainer_batch["segment_ids"][0] == 1
    ids, loss_mask = trainer_batch["input_ids"][0][segment], trainer_batch["loss_mask"][0][segment]
    answer = tokenizer.decode(ids[1:][loss_mask[:-1] > 0], skip_special_tokens=False)
    assert f"#1: {tokenizer.decode(ids[:1], skip_special_tokens=False)}" in printed
    assert f"[[{answer}]]" in printed.split("--- row 0")[1]


def test_config_argument_overrides_split_and_saved_tokenizer(tmp_path):
    workdir = tmp_path / "run"
    saved = build_tokenizer(_trainer_run(TINY, "tokenizer.corpus_examples=20"), str(workdir))
    fresh = build_tokenizer(_trainer_run(TINY), str(tmp_path / "fresh"))
    assert saved.vocab_size != fresh.vocab_size
    inspection = inspect_cli.collect(inspect_cli.parse_args(
        ["--config", f"{TINY}:phase=align,seq_len=48", "--config.data.batch_size", "16",
         "--workdir", str(workdir), "-n", "1", "--out", str(tmp_path / "sheet.html")]))
    assert (inspection.data.task, inspection.data.seq_len) == ("align", 48)
    assert inspection.batch["input_ids"].shape == (16, 48)
    assert inspection.tokenizer.vocab_size == saved.vocab_size  # reused, not fitted again
    evaluation = inspect_cli.collect(inspect_cli.parse_args(
        ["--config", f"{TINY}:phase=align", "--split", "eval", "--workdir", str(workdir),
         "-n", "1", "--out", str(tmp_path / "sheet.html")]))
    assert evaluation.examples[0]["id"].startswith("shapes:validation:")


@pytest.mark.parametrize("extra, message", [
    (["--config", f"{TINY}", "--config.data.seq_lenn=5"], "did you mean data.seq_len?"),
    (["--config", f"{TINY}:phse=align"], "config argument 'phse'"),
    (["--config", f"{TINY}:phase=nope"], "phase='nope'"),
    (["--config", "no/such/config.py"], "does not exist"),
    (["--config", f"{TINY}", "--seq-len", "32"], "--config.data.seq_len=N"),
    (["--config", f"{TINY}", "--workdir", "{tmp}"], "has no tokenizer/"),
    (["--source", "llava_json", "--path", "{tmp}/missing.json", "--tokenizer", "{tmp}/tok"],
     "missing.json"),
])
def test_errors_are_one_line(tmp_path, capsys, extra, message):
    from vlm_jax.data.tokenizer import train_word_tokenizer
    train_word_tokenizer(["a b"]).save(str(tmp_path / "tok"))
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    assert cli_main(["inspect-data"] + argv + ["--out", str(tmp_path / "sheet.html")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vlm-jax inspect-data: error: ") and message in error
    assert "\n" not in error and "Traceback" not in error
    assert not (tmp_path / "sheet.html").exists()


def test_a_run_that_would_stop_shows_why(tmp_path, capsys):
    """Every tiny example is longer than 20 tokens: the examples say so, and the trainer's first
    batch would raise TooManySkippedExamples; inspect-data prints that as its error, exit 2."""
    assert cli_main(["inspect-data", "--config", TINY, "--config.data.seq_len=20",
                              "--config.data.min_seen_for_skip_check=10", "-n", "2",
                              "--color", "never", "--out", str(tmp_path / "sheet.html")]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("skipped: too_long: ") == 2
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("vlm-jax inspect-data: error: the trainer stops on its first batch: ")
    assert "'too_long': 10" in error
