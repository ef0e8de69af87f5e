"""One shapes tokenizer fit (data/shapes_tokenizer.py): the trainer, inspect-data and the shapes
recipe get the same tokenizer from the same config, fitted on the run's own world. (Issue
"structure", deliverable 4: the three used to fit on three different corpora.)"""
import os

import jax

from configs.shapes import run as recipe_run
from vlm_jax.cli import inspect_data
from vlm_jax.data.shapes_tokenizer import fit_shapes_tokenizer
from vlm_jax.train.tokenizer import build_tokenizer
from vlm_jax.train.run_config import load_run_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
RECIPE = os.path.join(ROOT, "configs", "shapes", "config.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _vocab(tokenizer):
    return tokenizer._backend.tokenizer.get_vocab()


def test_the_recipe_fits_what_the_trainer_fits_for_its_config(tmp_path):
    recipe = recipe_run.fit_tokenizer(str(tmp_path / "recipe"))
    run = load_run_config(f"{RECIPE}:phase=align", [], jax.device_count())
    trainer = build_tokenizer(run, str(tmp_path / "align"))
    assert _vocab(recipe) == _vocab(trainer)
    assert os.path.exists(tmp_path / "recipe" / "tokenizer" / "tokenizer.json")


def test_inspect_data_shows_the_trainers_tokenizer(tmp_path):
    argv = ["--config", f"{TINY}:phase=instruct", "--out", str(tmp_path / "x.html")]
    shown = inspect_data.collect(inspect_data.parse_args(argv)).tokenizer
    run = load_run_config(f"{TINY}:phase=instruct", [], jax.device_count())
    assert _vocab(shown) == _vocab(build_tokenizer(run, str(tmp_path / "run")))


def test_the_fit_follows_the_world_of_the_data():
    """A world without yellow and small objects is fitted without their words."""
    world = dict(shapes=("circle", "square", "triangle"), colors=("red", "green", "blue"),
                 sizes=("large",))
    small_world = fit_shapes_tokenizer(300, 0, 1024, "minimal", world)
    whole_world = fit_shapes_tokenizer(300, 0, 1024, "minimal")
    assert len(small_world.encode(" yellow")) > 1 and len(whole_world.encode(" yellow")) == 1
    assert len(small_world.encode(" red")) == 1
