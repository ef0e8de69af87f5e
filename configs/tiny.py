"""A minimal config on the shapes world for tests and smoke runs: every phase, a model of a few
thousand params, seconds per run on one CPU.

    vlm-jax train --config configs/tiny.py:phase=align,steps=20 --workdir /tmp/tiny
"""
import dataclasses

import ml_collections

from vlm_jax.config import parse_arg
from vlm_jax.models.decoder import decoder_config

# phase -> (shapes source task, pipeline task)
TASKS = {"instruct": ("qa", "instruct"), "align": ("caption", "align"), "lm": ("text", "lm"),
         "contrastive": ("caption", "contrastive"), "itm": ("caption", "contrastive"),
         "contrastive+itm": ("caption", "contrastive")}
VOCAB = 2048  # >= the shapes tokenizer's ids (about 1.6k)


def get_config(arg=None):
    args = parse_arg(arg, phase="instruct", res=32, steps=20, batch=8, seq_len=64)
    if args.phase not in TASKS:
        raise ValueError(f"configs/tiny.py: phase={args.phase!r}; supported: {tuple(TASKS)}")
    source_task, task = TASKS[args.phase]
    config = ml_collections.ConfigDict()

    vision = dict(image_size=args.res, patch_size=args.res // 4, width=32, depth=1, num_heads=2,
                  mlp_dim=64, use_head=args.phase in ("contrastive", "itm", "contrastive+itm"))
    llm = dataclasses.asdict(decoder_config("llama", vocab_size=VOCAB, hidden_size=32,
                                            num_layers=1, num_heads=2, num_kv_heads=1,
                                            head_dim=16, mlp_dim=64))
    text_tower = dict(vocab_size=VOCAB, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=24,
                      projection_dim=32)
    if args.phase == "contrastive":
        config.model = dict(vision=vision, text_tower=text_tower)
    elif args.phase in ("itm", "contrastive+itm"):  # image-text matching: every tower + the head
        config.model = dict(vision=vision, text_tower=text_tower, projector=dict(type="mlp2x_gelu"),
                            llm=llm, image_token_id=4, itm_head=True)
    elif args.phase == "lm":
        config.model = dict(llm=llm)
    else:
        config.model = dict(vision=vision, projector=dict(type="mlp2x_gelu"), llm=llm,
                            image_token_id=4)  # <image> of the shapes tokenizer

    source = dict(kind="shapes", options=dict(split="train", image_size=args.res,
                                              task=source_task, turns_per_example=1))
    config.data = dict(sources=[source], task=task, template="minimal", seq_len=args.seq_len,
                       text_len=24, batch_size=args.batch, max_images_per_row=2, read_threads=0,
                       prefetch_buffer_size=4)
    eval_source = dict(kind="shapes", options=dict(split="validation", image_size=args.res,
                                                   task=source_task, turns_per_example=1,
                                                   num_examples=64))
    config.eval_data = dict(sources=[eval_source], shuffle=False, num_epochs=1)
    config.tokenizer = dict(kind="shapes", corpus_examples=500)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.train = dict(steps=args.steps, seed=0, micro_batches=1,
                        phase=dict(name=args.phase),
                        optimizer=dict(learning_rate=3e-3, warmup_steps=2, schedule="cosine"))
    config.checkpoint = dict(every_steps=10, keep=2, async_save=True)
    config.log = dict(every_steps=5, progress_bar=True, tensorboard=True, measure_cpu_peak=False)
    config.eval = dict(every_steps=0, num_batches=2)
    return config


def sweep():
    """Peak learning rate x warmup: 4 runs (`vlm-jax sweep --config configs/tiny.py ...`)."""
    from vlm_jax.sweep import product
    return product(**{"train.optimizer.learning_rate": [1e-3, 3e-3],
                      "train.optimizer.warmup_steps": [1, 2]})
