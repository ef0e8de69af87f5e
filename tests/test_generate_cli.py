"""`vlm-jax generate` / `score` refuse bad input before anything compiles: one line on stderr
naming the problem, exit code 2. Checks that need no model run against a checkpoint path that
does not exist, so passing them shows they come before the model loads."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax import model_dir
from vlm_jax.cli import main as cli_main
from vlm_jax.inference.prompts import conversation_prompt_ids
from vlm_jax.models.vlm import init_params

MAX_POSITIONS = 256
QUESTION = "what color is the circle"


@pytest.fixture(scope="module")
def root(tiny_vlm_config, shapes_tokenizer, tmp_path_factory):
    """Two copies of one tiny llama-family VLM: `trained` records the template "minimal" (as
    training writes it), `imported` records none (as import-hf); and a red image."""
    tokenizer = shapes_tokenizer
    config = tiny_vlm_config(vocab_size=tokenizer.vocab_size,
                             image_token_id=tokenizer.image_token_id,
                             llm=dict(num_layers=1, max_position_embeddings=MAX_POSITIONS))
    # Random weights of init's shapes: compiling init would cost more than this whole file.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(x.dtype),
                          jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
    path = tmp_path_factory.mktemp("generate_cli")
    model_dir.save_model(str(path / "trained"), config, params, tokenizer,
                         data={"template": "minimal"})
    model_dir.save_model(str(path / "imported"), config, params, tokenizer)
    Image.new("RGB", (24, 20), (200, 30, 30)).save(path / "red.png")
    return path


def _refused(capsys, argv):
    """The stderr line of a run that must exit 2 with exactly one line."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def _unloaded(root):
    """A checkpoint that does not exist: any error other than its own came before loading."""
    return ["--checkpoint", str(root / "no_such_model")]


def _write_requests(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ----------------------------------------------------------------------------- typed <image>

def test_a_typed_image_places_the_image_and_never_doubles_its_slots(root, capsys):
    """Why / Silent wrong answers (issue "nothing lost"): a literal `<image>` typed in a prompt
    gave twice the image-token slots for one image, the extra ones filled with the last feature."""
    import vlm_jax
    from vlm_jax.inference.requests import request_inputs as _request_inputs
    model = vlm_jax.load(str(root / "trained"))
    per_image = model.config.tokens_per_image
    image = str(root / "red.png")
    plain, _ = _request_inputs(model, "minimal", image, QUESTION)
    typed, _ = _request_inputs(model, "minimal", image, f"<image>\n{QUESTION}")
    inside, _ = _request_inputs(model, "minimal", image, "what color <image> is the circle")
    for ids in (plain, typed, inside):
        assert (ids == model.config.image_token_id).sum() == per_image
    # "<image>\n" + question is the training format, typed or added by the template.
    np.testing.assert_array_equal(typed, plain)
    # Typed elsewhere, the image sits there: the user turn rendered as written.
    want = conversation_prompt_ids(model.tokenizer, [
        {"role": "user", "content": "what color <image> is the circle"}], "minimal", per_image)
    np.testing.assert_array_equal(inside, want)

    requests = _write_requests(root / "typed.jsonl", [
        json.dumps({"image": image, "prompt": QUESTION}),
        json.dumps({"image": image, "prompt": f"<image>\n{QUESTION}"})])
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(root / "trained"), "--requests", requests,
                     "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 2 and rows[0]["tokens"] == rows[1]["tokens"]
    # The model's own template, not overridden: nothing to note.
    assert "template" not in captured.err


def test_more_than_one_typed_image_is_refused_naming_the_request(root, capsys):
    image = str(root / "red.png")
    line = _refused(capsys, ["generate", *_unloaded(root), "--image", image,
                             "--prompt", "<image> what is <image>"])
    assert "--prompt '<image> what is <image>'" in line and "2 <image>" in line
    line = _refused(capsys, ["score", *_unloaded(root), "--image", image,
                             "--prompt", "<image><image>", "--completion", "red"])
    assert "--prompt '<image><image>'" in line and "2 <image>" in line
    requests = _write_requests(root / "two_images.jsonl", [
        json.dumps({"image": image, "prompt": QUESTION}),
        json.dumps({"image": image, "prompt": "<image> and <image>"})])
    line = _refused(capsys, ["generate", *_unloaded(root), "--requests", requests])
    assert f"{requests} line 2" in line and "2 <image>" in line


# ----------------------------------------------------------------------------- length

def test_prompt_plus_new_tokens_must_fit_the_model_positions(root, capsys):
    import vlm_jax
    from vlm_jax.inference.requests import request_inputs as _request_inputs
    model = vlm_jax.load(str(root / "trained"))
    prompt = "what color is the red circle " * 30
    ids, _ = _request_inputs(model, "minimal", str(root / "red.png"), prompt)
    length = len(ids)
    assert length < MAX_POSITIONS - 2
    common = ["--checkpoint", str(root / "trained"), "--image", str(root / "red.png"),
              "--prompt", prompt]
    over = MAX_POSITIONS - length + 1
    line = _refused(capsys, ["generate", *common, "--max-new-tokens", str(over)])
    assert f"is {length} tokens" in line and f"--max-new-tokens {over}" in line
    assert f"max_position_embeddings {MAX_POSITIONS}" in line
    # Exactly filling the positions is allowed.
    capsys.readouterr()
    assert cli_main(["generate", *common, "--max-new-tokens", str(MAX_POSITIONS - length)]) == 0
    # score: the completion's tokens take the positions after the prompt.
    completion = "red " * 80
    num_completion = len(model.tokenizer.encode(completion))
    assert length + num_completion > MAX_POSITIONS
    line = _refused(capsys, ["score", *common, "--completion", completion])
    assert f"is {length} tokens" in line and f"tokens {num_completion}" in line
    assert f"max_position_embeddings {MAX_POSITIONS}" in line


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flag,value", [
    ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--top-k", "-1"), ("--top-p", "0"),
    ("--top-p", "1.5"), ("--temperature", "-0.5"), ("--temperature", "nan"), ("--stop", "")])
def test_bad_generation_flags_are_refused_naming_the_flag(root, capsys, flag, value):
    line = _refused(capsys, ["generate", *_unloaded(root), "--image", str(root / "red.png"),
                             "--prompt", QUESTION, flag, value])
    assert line.startswith(f"vlm-jax generate: error: {flag} "), line


# ----------------------------------------------------------------------------- requests files

@pytest.mark.parametrize("bad,problem", [
    ("this is not json", "not JSON"),
    ("[1, 2]", "a request is a JSON object"),
    ('{"image": "IMAGE"}', "needs 'image' and 'prompt'"),
    ('{"prompt": "what"}', "needs 'image' and 'prompt'"),
    ('{"image": "IMAGE", "prompt": 3}', "'prompt' must be a string, got a number"),
    ('{"image": "IMAGE", "prompt": ["what"]}', "'prompt' must be a string, got an array"),
    ('{"image": 5, "prompt": "what"}', "'image' must be a string, got a number")])
def test_a_bad_requests_line_is_refused_naming_file_and_line(root, capsys, bad, problem):
    image = str(root / "red.png")
    # Line 2 is blank: line numbers are the file's own.
    requests = _write_requests(root / "bad.jsonl", [
        json.dumps({"image": image, "prompt": QUESTION}), "", bad.replace("IMAGE", image)])
    line = _refused(capsys, ["generate", *_unloaded(root), "--requests", requests])
    assert f"{requests} line 3: " in line and problem in line, line


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_a_requests_file_without_requests_is_refused(root, capsys, content):
    requests = root / "empty.jsonl"
    requests.write_text(content)
    line = _refused(capsys, ["generate", *_unloaded(root), "--requests", str(requests)])
    assert f"--requests {requests} holds no requests" in line


# ----------------------------------------------------------------------------- images

@pytest.fixture(scope="module")
def bad_images(root):
    """{kind: path} of images that cannot be used."""
    garbage = root / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    truncated = root / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    return {"missing": str(root / "missing.png"), "garbage": str(garbage),
            "truncated": str(truncated), "directory": str(root)}


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "directory"])
def test_a_missing_or_corrupt_image_is_refused_naming_its_path(root, capsys, bad_images, kind):
    path = bad_images[kind]
    line = _refused(capsys, ["generate", *_unloaded(root), "--image", path, "--prompt", QUESTION])
    assert f"--image {path}: " in line
    line = _refused(capsys, ["score", *_unloaded(root), "--image", path, "--prompt", QUESTION,
                             "--completion", "red"])
    assert f"--image {path}: " in line
    # Every request's image is checked before the model loads, not only the first batch's.
    requests = _write_requests(root / "bad_image.jsonl", [
        json.dumps({"image": str(root / "red.png"), "prompt": QUESTION}),
        json.dumps({"image": path, "prompt": QUESTION})])
    line = _refused(capsys, ["generate", *_unloaded(root), "--requests", requests,
                             "--batch-size", "1"])
    assert f"{requests} line 2: image {path}: " in line


# ----------------------------------------------------------------------------- templates

def test_a_template_other_than_the_trained_one_or_a_family_default_is_said(root, capsys):
    def score_notes(*argv):
        capsys.readouterr()
        assert cli_main(["score", "--image", str(root / "red.png"), "--prompt", QUESTION,
                         "--completion", "red", *argv]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if "template" in line]

    [note] = score_notes("--checkpoint", str(root / "trained"), "--template", "plain")
    assert "--template plain" in note and "minimal" in note
    assert score_notes("--checkpoint", str(root / "trained"), "--template", "minimal") == []
    [note] = score_notes("--checkpoint", str(root / "imported"))
    # Why / a model decoded with another template than the family trains with: an import
    # defaults to its family's template (models/families/llama.py: llama3), the one
    # configs/llava15_siglip.py trains llama models with, not LLaVA-1.5's vicuna.
    assert "no chat template" in note and "using llama3" in note and "llama" in note
    assert score_notes("--checkpoint", str(root / "imported"), "--template", "minimal") == []
