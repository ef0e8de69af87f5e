"""The documents recipe's config: a tiny VLM that learns to read small text, with tiles or
without (`python -m configs.documents.run` trains and evaluates both; README "Tiling").

    vlm-jax train --config configs/documents/config.py:tiles=True,tokenizer=DIR --workdir W

Pages of the documents world (vlm_jax/data/sources/documents.py: a title, labelled fields, a
small table, in a 9 px font) are 96 px; the encoder reads 32 px images. With `tiles=True`
(data.tiling.max_tiles=9) each page becomes a 3 x 3 grid of 32 px tiles at full resolution plus a
32 px thumbnail; without, the page is resized to one 32 px image, the same encoder resolution,
where its 9 px text is 3 px high. One phase, instruct, everything trained from scratch (the
vision tower at the full learning rate: reading glyphs is what it must learn).
"""
import ml_collections

from configs.shapes.config import micro_batches_for
from vlm_jax.config import parse_arg

PAGE_SIZE = 96
FONT_SIZE = 9
TILE_SIZE = 32
MAX_TILES = 9            # a 3 x 3 grid: the page at full resolution
VOCAB_SIZE = 1200        # the recipe's tokenizer holds at most this many ids
IMAGE_TOKEN_ID = 4       # <image> in every tokenizer from `train_word_tokenizer`
QUESTION_TYPES = ("title", "field", "cell", "grounding")
TURNS = 3
SCHEDULE = dict(steps=1500, batch=16, lr=1e-3)


def model_config() -> dict:
    width = 128
    vision = dict(image_size=TILE_SIZE, patch_size=8, width=width, depth=2, num_heads=4,
                  mlp_dim=4 * width, posemb="sincos2d", use_head=False, feature_layer=-1)
    # 2 x 2 patches per image token: a tile is 4 tokens, a tiled page 40 (+ 25 layout tokens).
    projector = dict(type="pixel_shuffle", pixel_shuffle_factor=2, mlp_depth=2,
                     hidden_dim=4 * width, input_norm=True, pos_embed=True)
    llm = dict(family="llama", vocab_size=VOCAB_SIZE, hidden_size=width, num_layers=4,
               num_heads=4, num_kv_heads=4, head_dim=width // 4, mlp_dim=3 * width,
               max_position_embeddings=512)
    return dict(vision=vision, projector=projector, llm=llm, image_token_id=IMAGE_TOKEN_ID)


def get_config(arg=None):
    args = parse_arg(arg, tiles=True, steps=0, batch=0, tokenizer="", seed=0)
    steps = args.steps or SCHEDULE["steps"]
    batch = args.batch or SCHEDULE["batch"]
    config = ml_collections.ConfigDict()
    config.model = {**model_config(), "scan_unroll": 4}
    options = dict(split="train", image_size=PAGE_SIZE, font_size=FONT_SIZE,
                   turns_per_example=TURNS, question_types=QUESTION_TYPES)
    tiling = dict(max_tiles=MAX_TILES if args.tiles else 0)
    config.data = dict(sources=[dict(kind="documents", options=options)], task="instruct",
                       template="minimal", seq_len=160 if args.tiles else 96,
                       batch_size=batch, packing=not args.tiles,
                       max_images_per_row=MAX_TILES + 1 if args.tiles else 4,
                       tiling=tiling, read_threads=1, prefetch_buffer_size=2 * batch)
    if not args.tokenizer:
        raise ValueError("configs/documents/config.py: tokenizer=DIR (python -m "
                         "configs.documents.run fits it: the world's words + the layout tokens)")
    config.tokenizer = dict(kind="path", path=args.tokenizer)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.train = dict(
        steps=steps, seed=args.seed, phase=dict(name="instruct", vision_lr_mult=1.0),
        loss_chunk_size=16, micro_batches=micro_batches_for(batch, 2),
        optimizer=dict(learning_rate=SCHEDULE["lr"], warmup_steps=max(1, steps // 10),
                       schedule="cosine", weight_decay=0.0, b2=0.95))
    config.checkpoint = dict(every_steps=steps, keep=1, async_save=True)
    config.log = dict(every_steps=25, progress_bar=True, tensorboard=True, measure_cpu_peak=False)
    config.eval = dict(every_steps=0, num_batches=2)
    return config
