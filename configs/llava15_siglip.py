"""The LLaVA-1.5 recipe on a SigLIP tower: `align` on LLaVA-Pretrain-558K, then `instruct` on
LLaVA-v1.5-mix665K, starting from a composed import (SigLIP + an instruction-tuned LLM).

    vlm-jax import-hf --vision siglip-so400m-patch14-384 --text Qwen2-7B-Instruct \\
        --projector mlp2x_gelu --feature-layer -2 --out ckpt/base
    vlm-jax train --config configs/llava15_siglip.py:phase=align,model=ckpt/base,\\
data=LLaVA-Pretrain/blip_laion_cc_sbu_558k.json,images=LLaVA-Pretrain/images --workdir runs/align
    vlm-jax train --config configs/llava15_siglip.py:phase=instruct,model=runs/align,\\
data=llava_v1_5_mix665k.json,images=llava_images --workdir runs/instruct

Hyper-parameters are LLaVA-1.5's: align trains the projector only (global batch 256, lr 1e-3),
instruct trains projector + LLM (global batch 128, lr 2e-5), one epoch each, 3% warmup then
cosine, no weight decay, 2048 tokens. The model section is read from `model` (an import-hf
output or the align run's workdir), so the config can never disagree with the weights.
Expected hardware: 8x H100 80GB or a TPU v5p-64 slice with FSDP over all chips (mesh fsdp=-1);
`batch` is the per-process batch (global = batch x processes).
"""
import ml_collections

from vlm_jax import model_dir
from vlm_jax.checkpoint import resolve_model_dir
from vlm_jax.config import parse_arg
from vlm_jax.config_utils import to_dict

# phase -> (data task, global batch, peak lr, examples in one epoch)
PHASES = {"align": ("align", 256, 1e-3, 558_128), "instruct": ("instruct", 128, 2e-5, 665_298)}
TEMPLATES = {"qwen2": "qwen2", "llama": "llama3", "gemma": "gemma"}


def get_config(arg=None):
    args = parse_arg(arg, phase="align", model="", data="", images="", processes=1, steps=0,
                     template="", seq_len=2048, micro_batches=1)
    if args.phase not in PHASES:
        raise ValueError(f"configs/llava15_siglip.py: phase={args.phase!r}; supported: {tuple(PHASES)}")
    for name in ("model", "data", "images"):
        if not args[name]:
            raise ValueError(f"configs/llava15_siglip.py: argument {name}=... is required")
    task, global_batch, lr, epoch_examples = PHASES[args.phase]
    if global_batch % args.processes:
        raise ValueError(f"processes={args.processes} does not divide the global batch {global_batch}")
    source_model = resolve_model_dir(args.model)
    model = to_dict(model_dir.load_config(source_model))
    # bf16 compute on f32 master weights; full remat keeps a 7-8B LLM's activations small.
    model.update(dtype="bfloat16", param_dtype="float32", remat_policy="full")
    steps = args.steps or epoch_examples // global_batch

    config = ml_collections.ConfigDict()
    config.model = model
    source = dict(kind="llava_json", options=dict(path=args.data, image_root=args.images))
    config.data = dict(sources=[source], task=task,
                       template="plain" if task == "align" else (args.template or TEMPLATES[model["llm"]["family"]]),
                       seq_len=args.seq_len, batch_size=global_batch // args.processes,
                       packing=True, max_images_per_row=8, num_epochs=None, read_threads=8,
                       prefetch_buffer_size=512, worker_count=0, max_skip_fraction=0.01)
    config.tokenizer = dict(kind="path", path=source_model)
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.train = dict(
        steps=steps, seed=0, micro_batches=args.micro_batches, phase=dict(name=args.phase),
        optimizer=dict(learning_rate=lr, warmup_steps=max(1, int(0.03 * steps)),
                       schedule="cosine", weight_decay=0.0, grad_clip_norm=1.0),
        init_from=dict(path=source_model, groups=[".*"]))
    config.checkpoint = dict(every_steps=500, keep=3, async_save=True)
    config.log = dict(every_steps=10, progress_bar=True, tensorboard=True, measure_cpu_peak=False)
    config.eval = dict(every_steps=0, num_batches=8)
    return config
