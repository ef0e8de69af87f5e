"""`vlm-jax inspect-data`: on the shapes world and on a tiny LLaVA JSON, the terminal view and the
HTML contact sheet show the answers marked as learned, compact image spans and inline images."""
import html
import io
import json

import numpy as np
from PIL import Image

from vlm_jax.data import inspect as inspect_data
from vlm_jax.data.sources.shapes import ShapesSource


def test_shapes_html_and_terminal(tmp_path, capsys):
    out = tmp_path / "sheet.html"
    assert inspect_data.main(["--source", "shapes", "--template", "qwen2", "--image-size", "32",
                              "--num-image-tokens", "4", "--seq-len", "256", "-n", "2",
                              "--color", "never", "--out", str(out)]) == 0
    sheet = out.read_text()
    printed = capsys.readouterr().out
    for index in range(2):
        for answer in ShapesSource(image_size=32)[index]["meta"]["answers"]:
            assert f"<mark class=learned>{html.escape(answer)}&lt;|im_end|&gt;</mark>" in sheet
            assert f"[[{answer}<|im_end|>]]" in printed
    assert sheet.count("<img src='data:image/png;base64,") == 2
    assert "&lt;image x4&gt;" in sheet and "<image x4>" in printed
    assert "row 0: #1:" in printed and "batch layout" in sheet


def test_llava_json_with_config_file(tmp_path, capsys):
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
    (tmp_path / "config.py").write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    config = ml_collections.ConfigDict()\n"
        f"    config.data = dict(sources=[dict(kind='llava_json', options=dict("
        f"path={str(tmp_path / 'data.json')!r}))], template='vicuna', seq_len=256,"
        " image_size=16, num_image_tokens=3, batch_size=1)\n"
        "    return config\n")
    out = tmp_path / "llava.html"
    inspect_data.main(["--config", str(tmp_path / "config.py"), "--tokenizer",
                       str(tmp_path / "tok"), "-n", "2", "--color", "never", "--out", str(out)])
    sheet = out.read_text()
    assert "<mark class=learned> red&lt;eos&gt;</mark>" in sheet
    assert "skipped: image_missing" in sheet
    assert "&lt;image x3&gt;" in sheet
    assert "row 0: #1:" in capsys.readouterr().out
