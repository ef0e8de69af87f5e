"""LLaVA-1.5 `instruct` on SigLIP-So400m/14-384 + a 2-8B LLM, sized for a TPU v5p-64 slice
(32 chips, 8 hosts) or one 8x H100 80GB node. The model section is written out here from the
published architectures (nothing is downloaded); the weights come from an import:

    vlm-jax import-hf --vision siglip-so400m-patch14-384 --text Meta-Llama-3-8B-Instruct \\
        --projector mlp2x_gelu --feature-layer -2 --out ckpt/so400m_llama3_8b
    # (align the projector first: configs/llava15_siglip.py phase=align), then
    vlm-jax train --config configs/llava_so400m_llama3_8b.py:target=v5p-64,init=runs/align,\\
data=llava_v1_5_mix665k.json,images=llava_images --workdir gs://BUCKET/runs/instruct

`llm=gemma2b|llama3_8b|qwen2_7b|qwen3_8b|gemma2_2b|gemma3_4b|smollm3_3b` picks the LLM (the
configs/llava_so400m_<llm>.py files fix it); `target=v5p-64|8xh100` picks the mesh, the
per-process batch and the micro-batches.
Each (llm, target) pair is proven to fit by `vlm-jax plan` (numbers and commands:
docs/scaling.md). `init=` loads the import (or the align run) and checks every shape against
this model section; the tokenizer is read from the same directory.

Memory choices: bf16 compute on f32 master weights, every transformer block rematerialised
(`remat_policy=full`: only each block's input is kept for the backward pass), FSDP over all
chips (params, gradients and Adam moments are split 32 or 8 ways), the vision tower frozen (no
gradients, no optimizer state). LLaVA-1.5's instruct hyper-parameters: global batch 128 x 2048
tokens (packed), lr 2e-5, 3% warmup then cosine, no weight decay, one epoch of 665K examples.
"""
import ml_collections

from vlm_jax.config import parse_arg

# SigLIP-So400m/14-384 (google/siglip-so400m-patch14-384): 27x27 = 729 patch tokens.
SO400M = dict(image_size=384, patch_size=14, width=1152, depth=27, num_heads=16, mlp_dim=4304,
              layer_norm_eps=1e-6, feature_layer=-2, use_head=True, posemb="learn")

# The instruction-tuned LLMs as `import-hf` reads their config.json. vocab_size includes the
# <image> token import-hf adds (at id len(tokenizer), when the tokenizer has no "<image>"):
# the tables of Gemma 1 / 2 (256000 rows, tokenizer 256000), Llama-3 and SmolLM3 (128256 rows,
# tokenizer 128256) grow by one row for it; Qwen2's, Qwen3's and Gemma 3's padded tables already
# have room (Qwen2: id 151646 of 152064; Qwen3: 151669 of 151936, after its 26 special tokens
# up to </think> = 151668; Gemma 3: 262145 of 262208, after <image_soft_token> = 262144).
# Training checks the id against the tokenizer (model.image_token_id), so a tokenizer that
# differs is an error, not a silent mis-splice. The structural fields a family fixes
# (models/families/) are written out for reading; a value contradicting the family is an error.
LLMS = {
    "gemma2b": (dict(family="gemma", vocab_size=256001, hidden_size=2048, num_layers=18,
                     num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16384, norm_eps=1e-6,
                     rope_theta=10000.0, qkv_bias=False, mlp_act="gelu_tanh", norm_plus_one=True,
                     embed_scale=True, tie_embeddings=True, max_position_embeddings=8192),
                256000, "gemma"),
    "llama3_8b": (dict(family="llama", vocab_size=128257, hidden_size=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336, norm_eps=1e-5,
                       rope_theta=500000.0, qkv_bias=False, mlp_act="silu", norm_plus_one=False,
                       embed_scale=False, tie_embeddings=False, max_position_embeddings=8192),
                  128256, "llama3"),
    "qwen2_7b": (dict(family="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28,
                      num_heads=28, num_kv_heads=4, head_dim=128, mlp_dim=18944, norm_eps=1e-6,
                      rope_theta=1000000.0, qkv_bias=True, mlp_act="silu", norm_plus_one=False,
                      embed_scale=False, tie_embeddings=False, max_position_embeddings=32768),
                 151646, "qwen2"),
    # Qwen/Qwen3-8B: Qwen2 without q/k/v biases, RMSNorm over each head of q and k.
    "qwen3_8b": (dict(family="qwen3", vocab_size=151936, hidden_size=4096, num_layers=36,
                      num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=12288, norm_eps=1e-6,
                      rope_theta=1000000.0, qkv_bias=False, qk_norm=True, mlp_act="silu",
                      norm_plus_one=False, embed_scale=False, tie_embeddings=False,
                      max_position_embeddings=40960),
                 151669, "chatml"),
    # google/gemma-2-2b-it (PaliGemma 2's text side): sandwich norms, soft-caps 50 / 30, a
    # 4096-token window on layers 0, 2, 4, ... . HF LLaVA does not apply the final soft-cap:
    # `export-hf` (auto) writes the custom format, which keeps it; `--format llava` refuses.
    "gemma2_2b": (dict(family="gemma2", vocab_size=256001, hidden_size=2304, num_layers=26,
                       num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216, norm_eps=1e-6,
                       rope_theta=10000.0, qkv_bias=False, mlp_act="gelu_tanh",
                       norm_plus_one=True, embed_scale=True, post_norms=True,
                       attn_logit_softcap=50.0, final_logit_softcap=30.0,
                       query_pre_attn_scalar=256.0, sliding_window=4096, tie_embeddings=True,
                       max_position_embeddings=8192),
                  256000, "gemma"),
    # The language model of google/gemma-3-4b-it (model_type gemma3_text): q/k norms, a
    # 1024-token window (RoPE base 10k) on 5 of every 6 layers, the 6th global (RoPE base 1M,
    # linear scaling x8), no soft-caps. import-hf --text takes a text-only Gemma3ForCausalLM
    # directory, not the multimodal Gemma3ForConditionalGeneration one.
    "gemma3_4b": (dict(family="gemma3", vocab_size=262208, hidden_size=2560, num_layers=34,
                       num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=10240, norm_eps=1e-6,
                       rope_theta=1000000.0, rope_scaling_type="linear", rope_scaling_factor=8.0,
                       rope_local_theta=10000.0, qkv_bias=False, mlp_act="gelu_tanh",
                       norm_plus_one=True, embed_scale=True, qk_norm=True, post_norms=True,
                       attn_logit_softcap=0.0, final_logit_softcap=0.0,
                       query_pre_attn_scalar=256.0, sliding_window=1024, tie_embeddings=True,
                       max_position_embeddings=131072),
                  262145, "gemma"),
    # HuggingFaceTB/SmolLM3-3B: Llama architecture, no RoPE on layers 3, 7, 11, ... (the
    # family's every-4th default), tied embeddings.
    "smollm3_3b": (dict(family="smollm3", vocab_size=128257, hidden_size=2048, num_layers=36,
                        num_heads=16, num_kv_heads=4, head_dim=128, mlp_dim=11008,
                        norm_eps=1e-6, rope_theta=5000000.0, qkv_bias=False, mlp_act="silu",
                        norm_plus_one=False, embed_scale=False, tie_embeddings=True,
                        max_position_embeddings=65536),
                   128256, "chatml"),
}

# target -> mesh, processes (hosts), micro-batches of the global batch 128
TARGETS = {
    "v5p-64": dict(mesh=dict(data=1, fsdp=32, tensor=1), processes=8, micro_batches=1),
    "8xh100": dict(mesh=dict(data=1, fsdp=8, tensor=1), processes=1, micro_batches=4),
}
GLOBAL_BATCH = 128
EPOCH_EXAMPLES = 665_298


def model_config(llm: str) -> dict:
    if llm not in LLMS:
        raise ValueError(f"configs/llava_so400m.py: llm={llm!r}; supported: {tuple(LLMS)}")
    llm_dict, image_token_id, _ = LLMS[llm]
    return dict(vision=dict(SO400M), projector=dict(type="mlp2x_gelu", act="gelu", bias=True),
                llm=dict(llm_dict), image_token_id=image_token_id,
                dtype="bfloat16", param_dtype="float32", remat_policy="full")


def get_config(arg=None):
    args = parse_arg(arg, llm="llama3_8b", target="v5p-64", init="", tokenizer="",
                     data="llava_v1_5_mix665k.json", images="llava_images", steps=0,
                     seq_len=2048, micro_batches=0)
    if args.target not in TARGETS:
        raise ValueError(f"configs/llava_so400m.py: target={args.target!r}; "
                         f"supported: {tuple(TARGETS)}")
    target = TARGETS[args.target]
    model = model_config(args.llm)
    steps = args.steps or EPOCH_EXAMPLES // GLOBAL_BATCH

    config = ml_collections.ConfigDict()
    config.model = model
    source = dict(kind="llava_json", options=dict(path=args.data, image_root=args.images))
    # 729 image tokens per image: at most two images fit a 2048-token row.
    config.data = dict(sources=[source], task="instruct", template=LLMS[args.llm][2],
                       seq_len=args.seq_len, batch_size=GLOBAL_BATCH // target["processes"],
                       packing=True, max_images_per_row=2, num_epochs=None, read_threads=8,
                       prefetch_buffer_size=512, worker_count=0, max_skip_fraction=0.01)
    config.tokenizer = dict(kind="path",
                            path=args.tokenizer or args.init or f"ckpt/so400m_{args.llm}")
    config.mesh = dict(target["mesh"])
    config.train = dict(
        steps=steps, seed=0, micro_batches=args.micro_batches or target["micro_batches"],
        phase=dict(name="instruct"),
        optimizer=dict(learning_rate=2e-5, warmup_steps=max(1, int(0.03 * steps)),
                       schedule="cosine", weight_decay=0.0, grad_clip_norm=1.0),
        init_from=dict(path=args.init or None, groups=[".*"]))
    config.checkpoint = dict(every_steps=500, keep=3, async_save=True)
    config.log = dict(every_steps=10, progress_bar=True, tensorboard=True, measure_cpu_peak=False)
    config.eval = dict(every_steps=0, num_batches=8)
    return config
