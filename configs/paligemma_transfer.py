"""Fine-tune ("transfer", in big_vision's words) an imported PaliGemma / PaliGemma 2 checkpoint on
question -> answer data, the way PaliGemma reads it, then hand it back to transformers.

    vlm-jax import-hf --hf-dir paligemma2-3b-pt-224 --out ckpt/pg2
    vlm-jax train --config configs/paligemma_transfer.py:model=ckpt/pg2,\\
data=train.json,images=images --workdir runs/pg2_ft
    vlm-jax export-hf --checkpoint runs/pg2_ft --out exported/pg2_ft    # PaliGemma format

What PaliGemma was pretrained to read, and what this config keeps:
  * the "paligemma" template: "<image>"*N + "<bos>" + prefix + "\\n" then suffix + "<eos>"
    (transformers' PaliGemmaProcessor writes the same; the export carries one), one question
    per example: a multi-turn row or a system turn is skipped and counted (data/skipped/...);
  * prefix-LM attention (`data.prefix_lm=True`): image + prefix attend both ways, the suffix
    causally; the loss falls on the suffix and its EOS only;
  * images resized to the tower's size without padding (PaliGemma's processor does not pad).
The data is LLaVA JSON (`data=FILE.json,images=DIR`): the human turn is the prefix (e.g.
"answer en What colour is the car?", big_vision's task prefixes), the gpt turn the suffix.

Defaults (arguments): the whole model trains (`vision=train`; `vision=freeze` keeps the SigLIP
tower fixed, as some of big_vision's transfer configs do), lr 1e-5 peak with 5% warmup then
cosine, no weight decay, `epochs=1`, `batch=256` examples padded to `seq_len=512` tokens
(no packing: one example per row, as PaliGemma's transfers batch), bf16 compute on f32 master
weights, full remat. big_vision sets these per task; change them with the arguments or
`--config.train.optimizer.learning_rate=...`.
"""
import math

import jax
import ml_collections

from vlm_jax import model_dir
from vlm_jax.config import parse_arg, to_dict

NAME = "configs/paligemma_transfer.py"


def get_config(arg=None):
    args = parse_arg(arg, model="", data="", images="", epochs=1, batch=256, seq_len=512,
                     lr=1e-5, vision="train", processes=1, devices=0)
    if not (args.model and args.data and args.images):
        raise ValueError(f"{NAME}: give model=DIR (a PaliGemma import), data=FILE.json and "
                         f"images=DIR; got model={args.model!r}, data={args.data!r}, "
                         f"images={args.images!r}")
    if args.vision not in ("train", "freeze"):
        raise ValueError(f"{NAME}: vision={args.vision!r}; supported: train, freeze")
    for name in ("epochs", "batch", "seq_len", "processes"):
        if args[name] < 1:
            raise ValueError(f"{NAME}: {name}={args[name]} must be >= 1")
    source = model_dir.resolve_model_dir(args.model, f"{NAME}: model")
    trained = model_dir.load_data_settings(source)
    if not trained["prefix_lm"] or trained["template"] != "paligemma":
        raise ValueError(f"{NAME}: model={source} does not read PaliGemma's prompts (it records "
                         f"template={trained['template']!r}, prefix_lm={trained['prefix_lm']}); "
                         f"this config fine-tunes a PaliGemma import (`vlm-jax import-hf --hf-dir`) "
                         f"or a run started from one")

    config = ml_collections.ConfigDict()
    model = to_dict(model_dir.load_config(source))
    model.update(dtype="bfloat16", param_dtype="float32", remat_policy="full")
    config.model = model
    config.tokenizer = dict(kind="path", path=source)
    # Whole rows on every device and process.
    multiple = math.lcm(args.devices or jax.device_count(), args.processes)
    rows = -(-args.batch // multiple) * multiple
    config.data = dict(
        sources=[dict(kind="llava_json", options=dict(path=args.data, image_root=args.images))],
        task="instruct", template="paligemma", prefix_lm=True, pad_to_square=False,
        seq_len=args.seq_len, batch_size=rows // args.processes, packing=False,
        max_images_per_row=1, read_threads=8, prefetch_buffer_size=512, worker_count=0,
        max_skip_fraction=0.01, too_long="truncate")
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.train = dict(
        epochs=args.epochs, steps=None, seed=0, micro_batches=1,
        phase=dict(name="instruct", vision_lr_mult=1.0 if args.vision == "train" else None),
        optimizer=dict(learning_rate=args.lr, schedule="cosine", warmup_ratio=0.05,
                       weight_decay=0.0, grad_clip_norm=1.0),
        init_from=dict(path=source, groups=[".*"]))
    config.checkpoint = dict(every_steps=500, keep=3, async_save=True)
    config.log = dict(every_steps=10, progress_bar=True, tensorboard=True, measure_cpu_peak=False)
    config.eval = dict(every_steps=0, num_batches=8)
    return config
