"""The documents world (data/sources/documents.py) and its recipe's config (configs/documents)."""
import re

import numpy as np
import pytest

from vlm_jax.data.sources import documents
from vlm_jax.data.sources.documents import DocumentsSource
from vlm_jax.errors import ConfigError


def test_pages_are_deterministic_and_splits_differ():
    a, b = DocumentsSource(seed=3)[5], DocumentsSource(seed=3)[5]
    assert a["conversation"] == b["conversation"]
    np.testing.assert_array_equal(a["images"][0], b["images"][0])
    test = DocumentsSource(split="test", seed=3)[5]
    assert not np.array_equal(a["images"][0], test["images"][0])
    assert a["images"][0].shape == (96, 96, 3) and a["images"][0].dtype == np.uint8


def test_test_pages_use_layouts_no_training_page_has():
    train = {DocumentsSource()[i]["meta"]["layout"] % 5 for i in range(200)}
    held = {DocumentsSource(split=s)[i]["meta"]["layout"] % 5
            for s in ("validation", "test") for i in range(50)}
    assert train == {0, 1, 2, 3} and held == {4}


def test_every_answer_is_what_the_page_says():
    source = DocumentsSource(turns_per_example=4)
    kinds = set()
    for index in range(100):
        page, turns = source.sample(index)
        fields = {f.label: f for f in page.fields}
        for kind, question, answer in turns:
            kinds.add(kind)
            if kind == "title":
                assert answer == page.title
            elif kind == "field":
                label = re.fullmatch(r"what is the value of (\w+)\?", question).group(1)
                assert answer == str(fields[label].value)
            elif kind == "cell":
                r, c = (int(v) for v in re.fullmatch(
                    r"what word is in row (\d), column (\d)\?", question).groups())
                assert answer == page.table[r - 1][c - 1]
            else:
                label = re.fullmatch(r"give the box of the (\w+) field", question).group(1)
                box = [int(v) for v in re.findall(r"\d+", answer)]
                assert box == [int(round(v * 1000)) for v in fields[label].box]
        assert len({q for _, q, _ in turns}) == len(turns)  # no question twice about one page
    assert kinds == set(documents.QUESTION_TYPES)
    _, turns = DocumentsSource(turns_per_example=3, question_types=("title",)).sample(0)
    assert len(turns) == 1  # one distinct question about a page: one turn


def test_a_field_box_holds_its_text_and_nothing_leaves_the_page():
    source = DocumentsSource(image_size=96, font_size=9)
    for index in range(60):
        page, _ = source.sample(index)
        pixels = source.render(page)
        assert (pixels[-1] == 255).all() and (pixels[:, -1] == 255).all()  # the margins stay blank
        for field in page.fields:
            x0, y0, x1, y1 = (int(round(v * 96)) for v in field.box)
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert (pixels[y0:y1, x0:x1] < 128).any()  # ink inside the box


@pytest.mark.parametrize("options,message", [
    (dict(split="dev"), "split='dev'"),
    (dict(question_types=("colour",)), "question type 'colour'"),
    (dict(image_size=48, font_size=9), "image_size=48 cannot hold"),
])
def test_bad_options_are_refused_naming_them(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DocumentsSource(**options)


def test_the_recipe_tiles_the_page_or_reads_it_whole_at_the_same_encoder_resolution(tmp_path):
    import jax

    from configs.documents import config as recipe
    from configs.documents import run as recipe_run
    from vlm_jax.train.run_config import load_run_config

    tokenizer = recipe_run.fit_tokenizer(str(tmp_path))
    runs = {tiles: load_run_config(f"{recipe_run.CONFIG_FILE}:tiles={tiles},tokenizer={tokenizer}",
                                   [], jax.device_count()) for tiles in (True, False)}
    assert runs[True].data.tiling.max_tiles == recipe.MAX_TILES
    assert runs[False].data.tiling.max_tiles == 0
    assert runs[True].model.vision.image_size == runs[False].model.vision.image_size == 32
    assert runs[True].train.steps == runs[False].train.steps


@pytest.mark.slow
def test_the_documents_recipe_runs_end_to_end(tmp_path, capsys):
    """The recipe's code path at a tiny step count: tokenizer, both variants through the
    training loop, evaluation of each on held-out pages and the majority baseline, results.json
    (accuracy is not checked here: README)."""
    import json
    import os

    from configs.documents import config as recipe
    from configs.documents import run as recipe_run
    from vlm_jax import model_dir

    workdir = str(tmp_path / "documents")
    assert recipe_run.main(["--workdir", workdir, "--steps", "2", "--batch", "8",
                            "--eval-per-type", "2"]) == 0
    assert "grounding (IoU>=0.5)" in capsys.readouterr().out
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert set(results["columns"]) == {"tiles", "no tiles", "majority"}
    for table in results["columns"].values():
        assert set(table) == set(recipe.QUESTION_TYPES)
        assert all(total == 2 for _, total in table.values())
    tiling = model_dir.load_data_settings(os.path.join(workdir, "tiles", "model"))["tiling"]
    assert tiling.max_tiles == recipe.MAX_TILES
    assert not model_dir.load_data_settings(
        os.path.join(workdir, "no_tiles", "model"))["tiling"].enabled
