"""The LLaVA-1.5 recipe on a SigLIP tower: `align` on LLaVA-Pretrain-558K, then `instruct` on
LLaVA-v1.5-mix665K, starting from a composed import (SigLIP + an instruction-tuned LLM).

    vlm-jax import-hf --vision siglip-so400m-patch14-384 --text Qwen2-7B-Instruct \\
        --projector mlp2x_gelu --feature-layer -2 --out ckpt/base
    vlm-jax train --config configs/llava15_siglip.py:phase=align,model=ckpt/base,\\
data=LLaVA-Pretrain/blip_laion_cc_sbu_558k.json,images=LLaVA-Pretrain/images --workdir runs/align
    vlm-jax train --config configs/llava15_siglip.py:phase=instruct,model=runs/align,\\
data=llava_v1_5_mix665k.json,images=llava_images --workdir runs/instruct

The data comes in one of three forms (arguments):
    data=FILE.json[l],images=DIR       LLaVA JSON (the default form)
    webdataset=SHARDS,steps=N          img2dataset-style shards ("dir/{00000..00099}.tar"); a
                                       stream has no known size, so the run is N steps
    tfds=NAME,tfds_features=SRC:ROLE;SRC:ROLE[,tfds_dir=DIR]   a prepared TFDS dataset, e.g.
                                       tfds_features=image:image;caption:caption

Hyper-parameters are LLaVA-1.5's: align trains the projector only (lr 1e-3), instruct trains
projector + LLM (lr 2e-5), ONE EPOCH each (`train.epochs=1`: every example once), warmup 3% of
the run (`warmup_ratio`) then cosine, no weight decay, 2048 tokens, images padded to a square
with the mean colour first (LLaVA-1.5's `image_aspect_ratio="pad"`), over-long conversations cut
at whole turns (`data.too_long="truncate"`, never an image token).

Batches with packing: LLaVA-1.5's global batch is 256 (align) / 128 (instruct) examples, padded.
Here several examples share a packed 2048-token row, so a step holds a varying number of
examples. The lr schedule counts examples, not steps (it spans exactly one epoch's examples),
and `batch` (in examples) sets the rows per step from the expected examples per row
(`examples_per_row`, by default seq_len // (image tokens + EXPECTED_TEXT_TOKENS[phase])): at
729 image tokens two align examples fill a row, so 256 examples = 128 rows; instruct rows hold
one (128 rows), and its many short and text-only rows pack more. `num_examples` in
metrics.jsonl is each step's real count.

The model section is read from `model` (an import-hf output or the align run's workdir), so the
config can never disagree with the weights. `vlm-jax eval --checkpoint` needs no `model=`.
Expected hardware: 8x H100 80GB or a TPU v5p-64 slice with FSDP over all chips (mesh fsdp=-1);
pass `processes=N` on N hosts (rows per process = rows / N). Rows are rounded up to a multiple of
the devices (`devices=`, default: all JAX sees), so the batch always divides over the mesh.
"""
import math

import jax
import ml_collections

from vlm_jax import model_dir
from vlm_jax.config import parse_arg, to_dict
from vlm_jax.models import families

# phase -> (data task, global batch in examples, peak lr)
PHASES = {"align": ("align", 256, 1e-3), "instruct": ("instruct", 128, 2e-5)}
# Typical text tokens of one example (template included), to turn a batch in examples into rows:
# BLIP captions are short; a 665K conversation averages a few hundred tokens.
EXPECTED_TEXT_TOKENS = {"align": 64, "instruct": 512}


def get_config(arg=None):
    args = parse_arg(arg, phase="align", model="", data="", images="", webdataset="", tfds="",
                     tfds_features="", tfds_dir="", processes=1, devices=0, steps=0, batch=0,
                     examples_per_row=0, template="", seq_len=2048, micro_batches=1)
    if args.phase not in PHASES:
        raise ValueError(f"configs/llava15_siglip.py: phase={args.phase!r}; supported: {tuple(PHASES)}")
    for name in ("batch", "examples_per_row", "steps", "devices"):
        if args[name] < 0:
            raise ValueError(f"configs/llava15_siglip.py: {name}={args[name]} must be >= 0 "
                             f"(0 = the default)")
    if args.processes < 1:
        raise ValueError(f"configs/llava15_siglip.py: processes={args.processes} must be >= 1")
    task, default_batch, lr = PHASES[args.phase]
    batch = args.batch or default_batch

    config = ml_collections.ConfigDict()
    model = None
    if args.model:
        source_model = model_dir.resolve_model_dir(args.model, "configs/llava15_siglip.py: model")
        architecture = model_dir.load_config(source_model)
        model = to_dict(architecture)
        # bf16 compute on f32 master weights; full remat keeps a 7-8B LLM's activations small.
        # Run settings: the trained model directory records the architecture only.
        model.update(dtype="bfloat16", param_dtype="float32", remat_policy="full")
        config.model = model
        config.tokenizer = dict(kind="path", path=source_model)
    # Without model= (e.g. `vlm-jax eval --checkpoint`), the caller supplies the model section.

    per_row = args.examples_per_row or (
        max(1, args.seq_len // (architecture.tokens_per_image + EXPECTED_TEXT_TOKENS[task]))
        if args.model else 1)
    rows = -(-batch // per_row)
    # Whole rows on every device (FSDP over all of them) and every process.
    devices = args.devices or jax.device_count()
    multiple = math.lcm(devices, args.processes)
    rows = -(-rows // multiple) * multiple
    family = model["llm"]["family"] if model else None
    template = "plain" if task == "align" else (args.template or (families.get(family).template if family else "vicuna"))
    config.data = dict(sources=[_source(args)], task=task, template=template,
                       seq_len=args.seq_len, batch_size=rows // args.processes, packing=True,
                       max_images_per_row=8, read_threads=8, prefetch_buffer_size=512,
                       worker_count=0, max_skip_fraction=0.01, too_long="truncate",
                       pad_to_square=True)
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    # A stream (WebDataset) has no known size: its run is `steps` long. Otherwise one epoch.
    length = dict(steps=args.steps) if args.steps else dict(epochs=1, steps=None)
    schedule = dict(warmup_steps=max(1, int(0.03 * args.steps))) if args.steps else dict(
        warmup_ratio=0.03)
    config.train = dict(
        **length, seed=0, micro_batches=args.micro_batches, phase=dict(name=args.phase),
        optimizer=dict(learning_rate=lr, schedule="cosine", weight_decay=0.0, grad_clip_norm=1.0,
                       **schedule),
        init_from=dict(path=source_model if args.model else None, groups=[".*"]))
    config.checkpoint = dict(every_steps=500, keep=3, async_save=True)
    config.log = dict(every_steps=10, progress_bar=True, tensorboard=True, measure_cpu_peak=False)
    config.eval = dict(every_steps=0, num_batches=8)
    return config


def _source(args) -> dict:
    """The one data source the arguments name (LLaVA JSON, WebDataset or TFDS)."""
    given = [name for name in ("data", "webdataset", "tfds") if args[name]]
    if len(given) != 1:
        raise ValueError(f"configs/llava15_siglip.py: give exactly one of data=FILE.json "
                         f"(with images=DIR), webdataset=SHARDS or tfds=NAME; got {given or 'none'}")
    if args.data:
        if not args.images:
            raise ValueError("configs/llava15_siglip.py: data=... needs images=DIR (the root its "
                             "image paths are relative to)")
        return dict(kind="llava_json", options=dict(path=args.data, image_root=args.images))
    if args.webdataset:
        if not args.steps:
            raise ValueError("configs/llava15_siglip.py: webdataset=... is a stream of unknown "
                             "size; give steps=N (its examples / batch for one epoch)")
        return dict(kind="webdataset", options=dict(shards=args.webdataset))
    if not args.tfds_features:
        raise ValueError("configs/llava15_siglip.py: tfds=... needs tfds_features=SRC:ROLE;... "
                         "(e.g. image:image;caption:caption; roles in vlm_jax/data/sources/tfds.py)")
    features = dict(pair.split(":", 1) for pair in args.tfds_features.split(";"))
    options = dict(name=args.tfds, split="train", features=features)
    if args.tfds_dir:
        options["data_dir"] = args.tfds_dir
    return dict(kind="tfds", options=options)
