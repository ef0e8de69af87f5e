"""The embedded default: one tiny VLM trained on the shapes world in four phases; this file is
the config of each phase (`phase=contrastive|lm|align|instruct`), `run.py` runs them in order.

    vlm-jax train --config configs/shapes/config.py:phase=align,init_from=RUN/lm \\
        --config.tokenizer.path=RUN/tokenizer --workdir RUN/align

Why these choices (measured on a 2-core CPU, see README "The shapes recipe"):
  * 48x48 images, 8x8 patches: a 6x6 patch grid where every cell of the world's 3x3 position grid
    is exactly 2x2 patches; the pixel-shuffle projector folds each 2x2 block into one LLM token,
    so the LLM reads 9 image tokens, one per grid cell.
  * `posemb="sincos2d"`: fixed 2-D positions the encoder never has to learn (learned tables
    left position questions at chance in a first attempt).
  * The projector adds a learned embedding per image token (`pos_embed`, after a LayerNorm):
    an object's grid cell is linearly readable from every encoder token but from only 66-78% of
    the plain projector's outputs; with it, one-object position questions go from 23% to 100%.
  * `vision.feature_layer=0`: the LLM reads the patch embeddings (+ sincos positions), not the
    encoder's last layer. After 3 global-attention layers every token also carries the other
    objects' colours (a linear probe reads another object's colour from a token 57-66% of the
    time), and every question that keys on or asks for a colour stayed near chance on
    multi-object scenes: colour 68.5% / position 67.5% after 1200 instruct steps, 98% / 86%
    with patch features. The contrastive phase still trains the whole tower; what the VLM
    keeps of it is the patch embedding (instruct tunes it at 0.3x lr).
  * The contrastive captions name colour, shape and position of every object: the patch
    embedding learns to see what and where before the LLM ever reads it.
  * `instruct`: 1200 steps, Adam b2=0.95. The LLM first answers with an attribute of *some*
    object in the scene; picking out the named one comes after a plateau of ~600 steps, and
    only while the learning rate is still high (600 steps: 79.2% overall, see README).
  * Every phase uses the same model config (towers a phase does not train stay frozen and are
    carried along), so `init_from` takes the whole previous model.
  * The `minimal` chat template (question, newline, answer, EOS): no tokens spent on a system
    prompt or role names; several Q/A turns per image make one image encode serve many answers.

Speed (profiled per op with jax.profiler on the 2-core AMD EPYC; the training itself is what it
was, these change how a step computes; benchmarks/README.md "The embedded default"):
  * `micro_batches=4` in lm / align / instruct: the same gradient accumulated over 4 slices of
    the batch, each small enough for the CPU's caches (a 32 x 128 x 384 f32 MLP activation is
    6 MB; a quarter fits the 1-2 MB L2): instruct step 292 -> 227 ms, lm 383 -> 308 ms.
  * `loss_chunk_size=16` (align, instruct, lm): the fused LM-head loss works in chunks of this
    many loss positions per row; at 128 an instruct row (<= 16 loss tokens of 96) paid for 128
    positions of [32, V] logits, a quarter of the step. instruct 227 -> 164 ms.
  * align `seq_len=48`: its rows hold at most 43 tokens (100 x 64 examples checked), 64 was
    padding. align 335 -> 153 ms with the two above.
  * `scan_unroll=3`: every 2-3 layer stack as straight-line code (no loop slicing / stacking),
    ~10% on the LLM phases, bit-identical results.
"""
import ml_collections

from vlm_jax.config import parse_arg

PHASES = ("contrastive", "lm", "align", "instruct")
# After the recipe: image-text matching from its instruct model (configs/shapes/itm.py).
EXTRA_PHASES = ("itm",)
# phase -> (shapes source task, pipeline task)
TASKS = {"contrastive": ("caption", "contrastive"), "lm": ("text", "lm"),
         "align": ("caption", "align"), "instruct": ("qa", "instruct"),
         "itm": ("caption", "contrastive")}
QUESTION_TYPES = ("color", "shape", "count", "exists", "position", "relation")
# The world the recipe trains and tests on (arg `world=`, ShapesSource's shapes/colors/sizes).
# "recipe": the floor (>= 3 shapes, >= 4 colours, 9 positions, 1-4 objects) with one
# object size; "full": the whole shapes world (4 shapes, 5 colours, 2 sizes; a small object is
# 9 px wide at 48 px). README "The shapes recipe" has both measured.
WORLDS = {"recipe": dict(shapes=("circle", "square", "triangle"),
                         colors=("red", "green", "blue", "yellow"), sizes=("large",)),
          "full": {}}
IMAGE_SIZE = 48
VOCAB_SIZE = 1024       # the recipe's tokenizer (tokenizer section below) has exactly this many ids
IMAGE_TOKEN_ID = 4      # <image> in every tokenizer from `train_word_tokenizer`
TEXT_LEN = 48           # contrastive caption tokens (a 4-object caption is ~40)

# phase -> steps, per-process batch, peak lr, sequence length, Q/A turns per image, micro-batches,
# loss positions per chunk (see "Speed" in the docstring)
SCHEDULE = {
    "contrastive": dict(steps=200, batch=64, lr=1e-3, seq_len=TEXT_LEN, turns=1, micro=1, chunk=128),
    "lm": dict(steps=400, batch=32, lr=2e-3, seq_len=128, turns=6, micro=4, chunk=16),
    "align": dict(steps=100, batch=64, lr=1e-3, seq_len=48, turns=1, micro=4, chunk=16),
    "instruct": dict(steps=1200, batch=32, lr=1e-3, seq_len=96, turns=6, micro=4, chunk=16),
    "itm": dict(steps=600, batch=64, lr=3e-4, seq_len=TEXT_LEN, turns=1, micro=1, chunk=128),
}


# arg `fusion=`: how the LLM reads the image. "early" (the recipe): the 9 image tokens in the
# text. "cross_attention": one marker token per image in the text and a gated cross-attention
# block before every decoder layer (models/cross_attention.py); README "Cross-attention fusion"
# has both measured at the same step budget.
FUSIONS = {"early": {}, "cross_attention": dict(fusion="cross_attention",
                                                cross_attention_layers=(0, 1, 2))}


def model_config(fusion: str = "early") -> dict:
    width = 128
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, width=width, depth=3, num_heads=4,
                  mlp_dim=4 * width, posemb="sincos2d", use_head=True, feature_layer=0)
    text_tower = dict(vocab_size=VOCAB_SIZE, width=width, depth=2, num_heads=4,
                      mlp_dim=4 * width, max_len=TEXT_LEN, projection_dim=width)
    projector = dict(type="pixel_shuffle", pixel_shuffle_factor=2, mlp_depth=2,
                     hidden_dim=4 * width, input_norm=True, pos_embed=True)
    llm = dict(family="llama", vocab_size=VOCAB_SIZE, hidden_size=width, num_layers=3,
               num_heads=4, num_kv_heads=4, head_dim=width // 4, mlp_dim=3 * width,
               max_position_embeddings=512)
    return dict(vision=vision, text_tower=text_tower, projector=projector, llm=llm,
                image_token_id=IMAGE_TOKEN_ID, **FUSIONS[fusion])


# How the recipe computes (run settings, not part of the saved model): every 2-3 layer stack
# as straight-line code.
RUN_SETTINGS = dict(scan_unroll=3)


def micro_batches_for(batch: int, wanted: int) -> int:
    """The most micro-batches up to `wanted` that split `batch` evenly over this machine's
    devices (the mesh is data-parallel over all of them): on one CPU, 4; with 8 test devices and
    a batch of 8, 1."""
    import jax
    devices = jax.device_count()
    return max((m for m in range(1, wanted + 1) if batch % (m * devices) == 0), default=1)


def get_config(arg=None):
    args = parse_arg(arg, phase="instruct", steps=0, batch=0, init_from="", tokenizer="",
                     vision_lr_mult=0.3, style="scene", world="recipe", fusion="early",
                     negatives=0)
    if args.phase not in PHASES + EXTRA_PHASES:
        raise ValueError(f"configs/shapes/config.py: phase={args.phase!r}; supported: "
                         f"{PHASES + EXTRA_PHASES}")
    if args.world not in WORLDS:
        raise ValueError(f"configs/shapes/config.py: world={args.world!r}; supported: "
                         f"{tuple(WORLDS)}")
    if args.fusion not in FUSIONS:
        raise ValueError(f"configs/shapes/config.py: fusion={args.fusion!r}; supported: "
                         f"{tuple(FUSIONS)}")
    if args.negatives and args.phase != "itm":
        raise ValueError(f"configs/shapes/config.py: negatives={args.negatives} (hard-negative "
                         f"captions) is for phase=itm, not {args.phase!r}")
    schedule = SCHEDULE[args.phase]
    steps = args.steps or schedule["steps"]
    batch = args.batch or schedule["batch"]
    source_task, task = TASKS[args.phase]

    config = ml_collections.ConfigDict()
    config.model = {**model_config(args.fusion), **RUN_SETTINGS}
    if args.phase == "itm":
        config.model["itm_head"] = True
    # style=codes: the diagnostic rendering (flat codes per cell, see shapes.render_codes).
    options = dict(split="train", image_size=IMAGE_SIZE, task=source_task, style=args.style,
                   **WORLDS[args.world])
    if source_task != "caption":
        options.update(turns_per_example=schedule["turns"], question_types=QUESTION_TYPES)
    if args.negatives:  # each caption also with this many one-change captions (matching)
        options.update(negative_captions=args.negatives)
    config.data = dict(sources=[dict(kind="shapes", options=options)], task=task,
                       negative_captions=args.negatives,
                       template="minimal", seq_len=schedule["seq_len"], text_len=TEXT_LEN,
                       batch_size=batch, packing=args.phase == "lm", max_images_per_row=1,
                       read_threads=1, prefetch_buffer_size=2 * batch,
                       seed=(PHASES + EXTRA_PHASES).index(args.phase))
    # No eval_data: a validation pass per phase costs a compile each; the recipe's evaluation
    # is run.py's exact-match VQA on held-out test scenes after the last phase.
    # Without tokenizer=: the recipe's own fit (run.py fits it once for all phases this way).
    config.tokenizer = (dict(kind="path", path=args.tokenizer) if args.tokenizer
                        else dict(kind="shapes", vocab_size=VOCAB_SIZE, corpus_examples=3000,
                                  corpus_seed=12345, template="minimal"))
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    phase = dict(name=args.phase)
    if args.phase == "instruct" and args.vision_lr_mult > 0:
        phase["vision_lr_mult"] = args.vision_lr_mult
    config.train = dict(
        steps=steps, seed=0, phase=phase, micro_batches=micro_batches_for(batch, schedule["micro"]),
        loss_chunk_size=schedule["chunk"],
        optimizer=dict(learning_rate=schedule["lr"], warmup_steps=max(1, steps // 10),
                       schedule="cosine", weight_decay=0.0,
                       b2=0.95 if args.phase == "instruct" else 0.999),
        # itm starts from the instruct model, which has no matching head yet
        init_from=dict(path=args.init_from or None,
                       groups=["(?!itm_head/).*"] if args.phase == "itm" else [".*"]))
    # One save at the end: each phase is minutes long and the next phase starts from its model.
    config.checkpoint = dict(every_steps=steps, keep=1, async_save=True)
    config.log = dict(every_steps=25, progress_bar=True, tensorboard=True, measure_cpu_peak=False)
    config.eval = dict(every_steps=0, num_batches=2)
    return config
