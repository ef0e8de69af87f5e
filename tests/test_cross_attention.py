"""Cross-attention fusion (models/cross_attention.py): one block against transformers' Mllama
layer, the zero gates leaving an imported LLM untouched, KV-cache generation against recompute,
packed rows against each row alone, the config's checks, phases and FLOPs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.mllama import modeling_mllama

from vlm_jax.convert import hf_llm
from vlm_jax.errors import ConfigError
from vlm_jax.inference import generate as gen
from vlm_jax.models import layers
from vlm_jax.models.cross_attention import CrossAttentionBlock, image_visibility
from vlm_jax.models.decoder import Decoder
from vlm_jax.models.vlm import VLM, init_params
from vlm_jax.train import flops, phases

D, HEADS, KV_HEADS, MLP = 32, 4, 2, 64
HEAD_DIM = D // HEADS  # Mllama's head_dim is hidden / heads


def _fused(tiny_vlm_config, layers=(0, 2), family="llama", **llm):
    return tiny_vlm_config(family, llm=dict(num_layers=3, **llm), fusion="cross_attention",
                           cross_attention_layers=layers)


def _open_gates(params, value=0.8):
    params = jax.tree.map(lambda a: a, params)
    for name in ("attention_gate", "mlp_gate"):
        params["cross_attention"][name] = jnp.full_like(params["cross_attention"][name], value)
    return params


def _forward(config, params, ids, images, segment_ids=None, positions=None):
    ids = jnp.asarray(ids)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return np.asarray(VLM(config).apply({"params": params}, ids, images, jnp.asarray(positions),
                                        jnp.ones(ids.shape, jnp.int32), segment_ids))


def test_block_matches_mllama_cross_attention_layer():
    """Same weights (every tensor perturbed, gates open), same inputs, f32: 1e-5. Every text row
    sees at least one image token here; a row that sees none is where the conventions differ
    (Mllama attends uniformly to every image token; we add nothing), checked at the end."""
    torch.manual_seed(0)
    config = transformers.MllamaTextConfig(
        vocab_size=64, hidden_size=D, intermediate_size=MLP, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
        cross_attention_layers=[0])
    config._attn_implementation = "eager"
    theirs = modeling_mllama.MllamaCrossAttentionDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}

    def linear(name, in_shape, out_shape):
        return sd[name].T.reshape(in_shape + out_shape)

    ours = {
        "pre_attention_norm": {"scale": sd["input_layernorm.weight"]},
        "attention": {
            "q": {"kernel": linear("cross_attn.q_proj.weight", (D,), (HEADS, HEAD_DIM))},
            "k": {"kernel": linear("cross_attn.k_proj.weight", (D,), (KV_HEADS, HEAD_DIM))},
            "v": {"kernel": linear("cross_attn.v_proj.weight", (D,), (KV_HEADS, HEAD_DIM))},
            "o": {"kernel": linear("cross_attn.o_proj.weight", (HEADS, HEAD_DIM), (D,))},
            "q_norm": {"scale": sd["cross_attn.q_norm.weight"]},
            "k_norm": {"scale": sd["cross_attn.k_norm.weight"]}},
        "attention_gate": sd["cross_attn_attn_gate"],
        "pre_mlp_norm": {"scale": sd["post_attention_layernorm.weight"]},
        "mlp": {"gate": {"kernel": sd["mlp.gate_proj.weight"].T},
                "up": {"kernel": sd["mlp.up_proj.weight"].T},
                "down": {"kernel": sd["mlp.down_proj.weight"].T}},
        "mlp_gate": sd["cross_attn_mlp_gate"],
    }
    llm = hf_llm.decoder_config_from_hf(dict(
        model_type="llama", vocab_size=64, hidden_size=D, intermediate_size=MLP,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-5, hidden_act="silu"))
    rng = np.random.default_rng(0)
    batch, text, image_tokens = 2, 7, 10
    x = rng.normal(size=(batch, text, D)).astype(np.float32)
    images = rng.normal(size=(batch, image_tokens, D)).astype(np.float32)
    sees = rng.random((batch, 1, text, image_tokens)) < 0.5
    sees[..., 0] = True  # every row sees something
    sees[1, 0, 0, :] = False  # ... but one (checked below)
    rows = sees.any(-1).transpose(0, 2, 1)  # [B, T, 1]

    got = CrossAttentionBlock(llm).apply({"params": ours}, jnp.asarray(x), jnp.asarray(images),
                                          jnp.asarray(sees), jnp.asarray(rows))[0]
    additive = torch.where(torch.from_numpy(sees), 0.0, torch.finfo(torch.float32).min)
    row_mask = torch.from_numpy(rows[:, None].astype(np.float32))  # [B, 1, T, 1]
    with torch.no_grad():
        want = theirs(torch.from_numpy(x), cross_attention_states=torch.from_numpy(images),
                      cross_attention_mask=additive, attention_mask=None,
                      full_text_row_masked_out_mask=row_mask)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    seen = rows[..., 0]
    np.testing.assert_allclose(np.asarray(got)[seen], want[seen], atol=1e-5, rtol=1e-5)
    # The row that sees no image: unchanged here, Mllama adds its uniform attention.
    np.testing.assert_array_equal(np.asarray(got)[1, 0], x[1, 0])
    assert np.abs(want[1, 0] - x[1, 0]).max() > 1e-3


def test_zero_gates_leave_an_imported_llm_bit_identical(hf_tiny, tiny_vlm_config):
    """A transformers Llama imported as the LLM, cross-attention blocks added at init (gates 0):
    the VLM's logits with images equal the LLM's alone bit for bit, and the HF model's to 1e-5."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_tiny.text("llama", tie=False, vocab=64,
                                                    num_hidden_layers=3)).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    llm = hf_llm.decoder_config_from_hf(hf.config.to_dict())
    config = dataclasses.replace(_fused(tiny_vlm_config), llm=llm)
    params = init_params(config, jax.random.key(0))
    params["llm"] = hf_llm.decoder_params_from_hf(
        {k: v.detach().numpy() for k, v in hf.state_dict().items()}, llm)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 60, (2, 9))
    ids[:, 2] = config.image_token_id
    images = jnp.asarray(rng.normal(size=(2, 1, 16, 16, 3)), jnp.float32)
    fused = _forward(config, params, ids, images)
    alone_params = {"params": params["llm"]}
    embeds = Decoder(llm).apply(alone_params, jnp.asarray(ids), method=Decoder.embed)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    alone = np.asarray(Decoder(llm).apply(alone_params, embeds, positions,
                                          layers.make_attention_mask(jnp.ones((2, 9), jnp.int32))))
    np.testing.assert_array_equal(fused, alone)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(fused, want, atol=1e-5, rtol=1e-5)
    # and the gates matter once open
    assert np.abs(_forward(config, _open_gates(params), ids, images) - fused)[:, 2:].max() > 1e-3


def test_a_token_sees_the_images_of_its_own_example_from_their_marker_on():
    ids = jnp.array([[1, 9, 2, 9, 3, 9, 4]])  # markers (id 9) at 1, 3, 5
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2]])
    mask, rows = image_visibility(ids, 9, num_images=4, tokens_per_image=2, segment_ids=segments)
    sees = np.asarray(mask[0, 0, :, ::2])  # one column per image
    want = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0],
                     [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]], bool)  # image 3 has no marker
    np.testing.assert_array_equal(sees, want)
    np.testing.assert_array_equal(np.asarray(rows[0, :, 0]), want.any(1))


def test_packed_rows_equal_each_example_alone(tiny_vlm_config):
    config = _fused(tiny_vlm_config)
    params = _open_gates(init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    marker = config.image_token_id
    first = [3, marker, 5, 6, 7]
    second = [8, 9, marker, 10, marker, 11]
    images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    packed = np.array([first + second])
    segments = jnp.array([[1] * len(first) + [2] * len(second)])
    positions = np.array([list(range(len(first))) + list(range(len(second)))])
    got = _forward(config, params, packed, jnp.asarray(images[None]), segments, positions)
    alone_a = _forward(config, params, np.array([first]), jnp.asarray(images[None, :1]))
    alone_b = _forward(config, params, np.array([second]), jnp.asarray(images[None, 1:]))
    np.testing.assert_allclose(got[0, :len(first)], alone_a[0], atol=2e-5)
    np.testing.assert_allclose(got[0, len(first):], alone_b[0], atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_generation_equals_full_recompute(tiny_vlm_config, family):
    extra = dict(sliding_window=4) if family == "gemma2" else {}
    config = _fused(tiny_vlm_config, family=family, **extra)
    params = _open_gates(init_params(config, jax.random.key(1)), 1.5)
    marker = config.image_token_id
    prompts = [[1, marker, 2, 3, marker, 4, 5], [marker, 6, 7], [8, 9, 10, 11]]  # last: no image
    width = max(map(len, prompts))
    ids = np.zeros((3, width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts])
    images = np.random.default_rng(2).normal(size=(3, 2, 16, 16, 3)).astype(np.float32)
    tokens, _ = gen.greedy_generate(config, params, ids, lengths, images, 6)
    # Recompute: the whole sequence each step, right-padded to one width (causal: the padding
    # after position t does not change its logits), so one program serves every step.
    forward = jax.jit(lambda ids, images: VLM(config).apply(
        {"params": params}, ids, images, jnp.broadcast_to(jnp.arange(width + 6), ids.shape),
        jnp.ones(ids.shape, jnp.int32)))
    for row, prompt in enumerate(prompts):
        sequence = list(prompt)
        for _ in range(6):
            padded = np.array([sequence + [0] * (width + 6 - len(sequence))])
            logits = forward(jnp.asarray(padded), jnp.asarray(images[row:row + 1]))
            sequence.append(int(np.argmax(logits[0, len(sequence) - 1])))
        assert tokens[row].tolist() == sequence[len(prompt):], row


def test_config_checks_name_the_field(tiny_vlm_config):
    with pytest.raises(ConfigError, match="model.fusion"):
        tiny_vlm_config(fusion="late")
    with pytest.raises(ConfigError, match="cross_attention_layers"):
        tiny_vlm_config(fusion="cross_attention")
    with pytest.raises(ConfigError, match=r"cross_attention_layers=\(0, 3\)"):
        _fused(tiny_vlm_config, layers=(0, 3))
    with pytest.raises(ConfigError, match="increasing"):
        _fused(tiny_vlm_config, layers=(2, 0))
    with pytest.raises(ConfigError, match="fusion='early'"):
        tiny_vlm_config(cross_attention_layers=(0,))
    config = _fused(tiny_vlm_config)
    assert config.tokens_per_image == 1 and config.features_per_image == 4


def test_align_trains_projector_and_blocks_only_and_flops_count_them(tiny_vlm_config):
    config = _fused(tiny_vlm_config)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    groups = flops.trainable_groups(phases.lr_multipliers(shapes, phases.PhaseConfig("align")))
    assert groups == {"projector", "cross_attention"}
    step = flops.train_step_flops(config, "align", batch_size=2, seq_len=10)
    block = flops.cross_attention_block_flops(config, 2, 10, 2)
    assert step.cross_attention == 3 * 2 * block  # two blocks, trainable: fwd + both grads
    early = flops.train_step_flops(tiny_vlm_config(llm=dict(num_layers=3)), "align", 2, 10)
    assert step.decoder == early.decoder and step.vision == early.vision


def test_formats_without_cross_attention_refuse_it_by_name(tiny_vlm_config):
    from vlm_jax.convert import exporter
    from vlm_jax.errors import ConversionError
    config = _fused(tiny_vlm_config)
    assert exporter.resolve_format(config, "auto") == "custom"
    for fmt in ("llava", "idefics3", "paligemma"):
        with pytest.raises(ConversionError, match=f"--format {fmt}: model.fusion='cross_attention'"):
            exporter.resolve_format(config, fmt)
