"""Tiling (data/tiling.py): the grid rule against a written table and against transformers'
Idefics3 image processor (grid, pixels), the layout's token ids against its processor, the
pipeline's tiled examples, and the checks that refuse what cannot fit."""
import numpy as np
import pytest

from vlm_jax.data import tiling
from vlm_jax.data.images import normalize_pixels
from vlm_jax.data.tiling import TilingConfig
from vlm_jax.data.tokenizer import train_word_tokenizer
from vlm_jax.data.transforms import make_transform
from vlm_jax.errors import ConfigError

TILE = 32
TOKENS_PER_TILE = 3
ASPECTS = [(40, 50), (50, 40), (30, 120), (120, 30), (64, 64), (10, 10), (33, 97), (97, 33),
           (200, 90)]


@pytest.mark.parametrize("height,width,max_tiles,grid", [
    (64, 64, 16, (4, 4)),     # square: always n x n (enlarged when small)
    (10, 10, 16, (4, 4)),
    (64, 128, 16, (2, 4)),    # 1:2 -> longest edge 128, other 64
    (100, 300, 16, (2, 4)),   # 1:3 -> 128 x 42 -> 42 rounded up to 64
    (300, 50, 16, (4, 1)),    # 6:1 tall -> 128 x 22 -> 22 rounded up to 32
    (90, 200, 9, (2, 3)),     # n = 3: 96 x 43 -> 44 (even) -> 64 x 96
    (64, 64, 1, (0, 0)),      # n = 1: the longest edge is one tile, never split
    (50, 40, 0, (0, 0)),      # off
])
def test_grid_for_follows_the_longest_edge_rule(height, width, max_tiles, grid):
    assert tiling.grid_for(height, width, TILE, TilingConfig(max_tiles=max_tiles)) == grid


@pytest.mark.parametrize("max_tiles", [4, 16])
@pytest.mark.parametrize("height,width", ASPECTS)
def test_tiles_equal_transformers_idefics3_image_processor(height, width, max_tiles):
    """Why: a tiled model must export with a processor that cuts the same tiles: transformers'
    Idefics3 (PIL) image processor with do_image_splitting gives the same grid and pixels."""
    from PIL import Image
    from transformers import Idefics3ImageProcessorPil

    config = TilingConfig(max_tiles=max_tiles)
    rgb = np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), np.uint8)
    tiles, grid = tiling.tile_image(rgb, TILE, config)
    assert grid == tiling.grid_for(height, width, TILE, config)
    assert len(tiles) == (grid[0] * grid[1] + 1 if grid != (0, 0) else 1)
    processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": config.side * TILE}, do_image_splitting=True,
        max_image_size={"longest_edge": TILE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        return_row_col_info=True)
    theirs = processor(images=Image.fromarray(rgb), return_tensors="np")
    assert (theirs["rows"][0][0], theirs["cols"][0][0]) == grid
    np.testing.assert_allclose(normalize_pixels(tiles).transpose(0, 3, 1, 2),
                               theirs["pixel_values"][0], atol=1e-6)


def _tokenizer(max_tiles: int = 16):
    config = TilingConfig(max_tiles=max_tiles)
    return train_word_tokenizer(["a red square", "what colour is it", "the table total 12"],
                                special_tokens=config.layout_tokens() + ["<end_of_utterance>"],
                                vocab_size=300)


@pytest.mark.parametrize("height,width", ASPECTS[:5])
def test_layout_ids_equal_transformers_idefics3_processor(height, width, tmp_path):
    """Why: the text of a tiled image is what Idefics3's processor writes, token for token
    (row / column markers, the newlines after each row, the global view last)."""
    from PIL import Image
    from transformers import (Idefics3ImageProcessorPil, Idefics3Processor,
                              PreTrainedTokenizerFast)

    tokenizer = _tokenizer()
    tokenizer.save(str(tmp_path))
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": 4 * TILE}, do_image_splitting=True,
        max_image_size={"longest_edge": TILE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=hf_tokenizer,
                                  image_seq_len=TOKENS_PER_TILE)
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    text = "what colour is it <image> a red square"
    theirs = processor(images=Image.fromarray(rgb), text=text, return_tensors="np")

    transform = make_transform(_data_config(tokenizer), tokenizer)
    decoded = transform.transforms[0].map({"images": [rgb]})
    rows, cols = decoded["image_grids"][0]
    layout = tiling.layout_text(int(rows), int(cols), tokenizer.image_token, TOKENS_PER_TILE)
    ours = tokenizer.encode(text.replace(tokenizer.image_token, layout))
    assert ours == theirs["input_ids"][0].tolist()
    assert len(decoded["images"]) == theirs["pixel_values"].shape[1]
    image_id = tokenizer.image_token_id
    assert ours.count(image_id) == TOKENS_PER_TILE * len(decoded["images"])


def _data_config(tokenizer, max_tiles: int = 16, seq_len: int = 512, task: str = "instruct"):
    from vlm_jax.data.pipeline import DataConfig
    return DataConfig(sources=(), task=task, template="minimal", seq_len=seq_len,
                      image_size=TILE, num_image_tokens=TOKENS_PER_TILE,
                      max_images_per_row=max_tiles + 1, tiling=TilingConfig(max_tiles=max_tiles))


def test_a_tiled_conversation_holds_every_tile_and_learns_no_layout_token():
    tokenizer = _tokenizer()
    transform = make_transform(_data_config(tokenizer), tokenizer)
    rgb = np.random.default_rng(1).integers(0, 256, (40, 100, 3), np.uint8)
    example = transform.map({"id": "x", "images": [rgb], "conversation": [
        {"role": "user", "content": "<image>\nwhat colour is it"},
        {"role": "assistant", "content": "red"}]})
    rows, cols = tiling.grid_for(40, 100, TILE, TilingConfig(max_tiles=16))
    assert example["images"].shape == (rows * cols + 1, TILE, TILE, 3)
    ids = example["input_ids"]
    assert int((ids == tokenizer.image_token_id).sum()) == TOKENS_PER_TILE * (rows * cols + 1)
    layout_ids = {tokenizer.token_to_id(t) for t in TilingConfig(max_tiles=16).layout_tokens()}
    layout_ids.add(tokenizer.image_token_id)
    learned = example["target_ids"][example["loss_mask"] > 0]
    assert learned.size and not set(learned.tolist()) & layout_ids


def test_what_tiling_cannot_fit_is_refused_naming_the_fields():
    tokenizer = _tokenizer()
    with pytest.raises(ConfigError, match="data.tiling.max_tiles=5"):
        TilingConfig(max_tiles=5)
    with pytest.raises(ConfigError, match="max_images_per_row"):
        from vlm_jax.data.pipeline import DataConfig
        DataConfig(sources=(), tiling=TilingConfig(max_tiles=4), max_images_per_row=4)
    bare = train_word_tokenizer(["a b"], vocab_size=270)
    with pytest.raises(ConfigError, match="layout tokens missing"):
        make_transform(_data_config(bare), bare)
    wrapped = _tokenizer()
    wrapped.add_special_tokens(["<im_start>", "<im_end>"])
    wrapped.image_wrap = ("<im_start>", "<im_end>")
    with pytest.raises(ConfigError, match="another model's layout"):
        make_transform(_data_config(wrapped), wrapped)
    with pytest.raises(ConfigError, match="data.task='contrastive'"):
        make_transform(_data_config(tokenizer, task="contrastive"), tokenizer)
    assert tiling.max_layout_tokens(TilingConfig(max_tiles=4), 2) == 24


def test_a_packed_row_of_images_with_different_tile_counts_gives_each_its_own_logits(
        tiny_vlm_config):
    """Why: tiles make the image-token count vary per example; packed together, each example
    must still read only its own tiles (segment isolation), exactly as alone."""
    import grain
    import jax

    from vlm_jax.data.packing import PackedRowsIterDataset, RowSpec, assemble_row
    from vlm_jax.models.vlm import VLM, init_params

    tokenizer = _tokenizer(max_tiles=4)
    config = tiny_vlm_config(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    size, per_tile = config.vision.image_size, config.tokens_per_image
    data = _data_config(tokenizer, max_tiles=4)
    data = type(data)(**{**data.__dict__, "image_size": size, "num_image_tokens": per_tile})
    transform = make_transform(data, tokenizer)
    rng = np.random.default_rng(0)
    examples = [transform.map({"id": str(i), "images": [rng.integers(0, 256, (h, w, 3), np.uint8)],
                               "conversation": [{"role": "user", "content": "<image>\nwhat colour"},
                                                {"role": "assistant", "content": "red"}]})
                for i, (h, w) in enumerate([(16, 16), (10, 30), (40, 12)])]
    assert sorted(len(e["images"]) for e in examples) == [3, 3, 5]
    spec = RowSpec(seq_len=sum(len(e["input_ids"]) for e in examples), max_images=11,
                   image_size=size)
    rows = [assemble_row(row, spec) for row in PackedRowsIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(), spec)]
    assert len(rows) == 1
    params = init_params(config, jax.random.key(0))
    model = VLM(config)

    def logits(row):
        return np.asarray(model.apply({"params": params}, row["input_ids"][None],
                                      normalize_pixels(row["images"])[None],
                                      row["positions"][None], row["mask_ar"][None],
                                      segment_ids=row["segment_ids"][None]))[0]

    packed = logits(rows[0])
    start = 0
    for example in examples:
        n = len(example["input_ids"])
        alone_spec = RowSpec(seq_len=n, max_images=5, image_size=size)
        alone = logits(assemble_row([example], alone_spec))
        np.testing.assert_allclose(packed[start:start + n], alone, atol=2e-5)
        start += n


@pytest.mark.parity
@pytest.mark.parametrize("composition,architecture,processor_class", [
    ("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor"),
    ("mlp2x_gelu", "VlmJaxForConditionalGeneration", "VlmJaxTiledProcessor"),
])
def test_a_tiled_model_exports_with_a_processor_that_tiles_as_we_do(
        tiny_vlm_config, tmp_path, capsys, composition, architecture, processor_class):
    """Why: a model trained on tiles must load in transformers and answer the same from the same
    picture. Composed like Idefics3 it exports natively with Idefics3's splitting processor; any
    other composition (an mlp2x_gelu projector) as the custom format with VlmJaxTiledProcessor.
    Either processor's ids and tiles equal ours on images of several aspect ratios, and the
    export's self-check compares the tiled probe's logits and greedy answer."""
    import jax
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_jax import model_dir
    from vlm_jax.cli import main as cli_main
    from vlm_jax.models.projector import ProjectorConfig
    from vlm_jax.models.vlm import init_params

    tokenizer = _tokenizer(max_tiles=4)
    ids = dict(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    if composition == "idefics3":
        config = tiny_vlm_config(**ids, vision=dict(image_size=32, feature_post_norm=True),
                                 projector=ProjectorConfig(type="pixel_shuffle", mlp_depth=1,
                                                           bias=False, pixel_shuffle_factor=2))
    else:
        config = tiny_vlm_config(**ids)
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))
    trained = tmp_path / "trained"
    model_dir.save_model(str(trained), config, params, tokenizer,
                         data={"template": "minimal", "tiling": {"max_tiles": 4}})
    out = tmp_path / "exported"
    assert cli_main(["export-hf", "--checkpoint", str(trained), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    print(line)
    assert architecture in line and "the same greedy answer" in line, line

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == processor_class
    size = config.vision.image_size
    for height, width in ASPECTS[:6]:
        rgb = np.random.default_rng(width).integers(0, 256, (height, width, 3), np.uint8)
        batch = processor(images=Image.fromarray(rgb), text="what colour <image> red",
                          return_tensors="np")
        tiles, grid = tiling.model_images(rgb, size, config=TilingConfig(max_tiles=4))
        want = tokenizer.encode(tiling.expand_placeholders(
            "what colour <image> red", tokenizer.image_token, [grid], config.tokens_per_image))
        assert batch["input_ids"][0].tolist() == want, (height, width)
        np.testing.assert_allclose(batch["pixel_values"].reshape(-1, 3, size, size),
                                   tiles.transpose(0, 3, 1, 2), atol=1e-6)


def test_inspect_data_shows_every_tile_and_the_layout_tokens():
    """Why: a researcher checks what the model reads before training: a tiled example shows its
    tiles as images and its row / column markers in the text, and an image whose tiles cannot
    fit a row is counted as skipped, not cut."""
    from vlm_jax.data.inspect import inspect_examples, token_spans
    from vlm_jax.data.pipeline import DataConfig, SourceConfig
    from vlm_jax.data.shapes_tokenizer import fit_shapes_tokenizer

    tokenizer = fit_shapes_tokenizer(200, 0, 1024, special_tokens=TilingConfig(4).layout_tokens())
    source = SourceConfig(kind="shapes", options=dict(split="train", image_size=64, num_examples=4))
    cfg = DataConfig(sources=(source,), task="instruct", template="minimal", seq_len=192,
                     image_size=32, num_image_tokens=4, max_images_per_row=5,
                     tiling=TilingConfig(max_tiles=4))
    records = inspect_examples(cfg, tokenizer, 2)
    example = records[0]["example"]
    assert example["images"].shape == (5, 32, 32, 3)  # a square scene: 2 x 2 tiles + global
    text = "".join(span.text for span in token_spans(tokenizer, example))
    assert "<row_2_col_2><image x4>" in text and "<global-img><image x4>" in text
    # Two images of 5 tiles each cannot fit a row of 5 image slots: skipped and counted, not cut.
    from vlm_jax.data.skips import RowFitCheck
    two = make_transform(cfg, tokenizer).map({"id": "two", "images": [
        np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)], "conversation": [
        {"role": "user", "content": "<image><image>\nwhat colour"},
        {"role": "assistant", "content": "red"}]})
    assert len(two["images"]) == 10
    assert RowFitCheck(cfg.row_spec)(two).reason == "too_many_images"


def test_eval_reads_a_tiled_models_examples_as_training_did():
    """Why: `vlm-jax eval` must feed a tiled model tiles and layouts, as training did: its
    examples carry every tile and each image's grid, and the prompt holds the layout."""
    from vlm_jax.data.pipeline import DataConfig, SourceConfig
    from vlm_jax.eval.tasks import read_examples
    from vlm_jax.inference.prompts import conversation_prompt_ids

    tokenizer = _tokenizer(max_tiles=4)
    source = SourceConfig(kind="documents", options=dict(split="test", num_examples=3))
    data = DataConfig(sources=(source,), task="instruct", template="minimal")
    examples, skipped = read_examples(data, 3, None, TILE, tiling_config=TilingConfig(4))
    assert not skipped and len(examples) == 3
    for example in examples:
        assert example.grids == [(2, 2)] and example.pixels.shape == (5, TILE, TILE, 3)
        prompt = conversation_prompt_ids(tokenizer, example.raw["conversation"][:1], "minimal",
                                         TOKENS_PER_TILE, example.grids)
        assert int((prompt == tokenizer.image_token_id).sum()) == 5 * TOKENS_PER_TILE
        assert tokenizer.token_to_id("<row_2_col_2>") in prompt.tolist()
    untiled, _ = read_examples(data, 1, None, TILE)
    assert untiled[0].grids is None and untiled[0].pixels.shape == (1, TILE, TILE, 3)
