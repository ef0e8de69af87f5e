"""The same VLM forward on one device and on an 8-device fsdp x tensor mesh (fake CPU devices)."""
import jax
import numpy as np
import pytest

from vlm_jax import sharding
from vlm_jax.models.vlm import VLM, dummy_inputs


def _batch(config, batch_size=8, text=8):
    rng = np.random.default_rng(0)
    n = config.tokens_per_image
    ids = rng.integers(0, 63, size=(batch_size, n + text)).astype(np.int32)
    ids[:, 2:2 + n] = config.image_token_id
    return dict(input_ids=ids,
                images=rng.standard_normal((batch_size, 1, 32, 32, 3)).astype(np.float32),
                positions=np.broadcast_to(np.arange(n + text, dtype=np.int32), ids.shape).copy(),
                mask_ar=np.ones_like(ids))


FUSIONS = {"early": {}, "cross_attention": dict(fusion="cross_attention",
                                                cross_attention_layers=(0, 1))}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_on_fsdp_tensor_mesh_matches_one_device(tiny_vlm_config, fusion):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    # 16 image tokens (early fusion; 1 marker with cross-attention), features from the
    # second-to-last of 2 vision layers; <image> = 63
    config = tiny_vlm_config(vision=dict(image_size=32, depth=2, feature_layer=-2),
                             **FUSIONS[fusion])
    model = VLM(config)
    init = lambda rng: model.init(rng, **dummy_inputs(config), method=VLM.init_all)["params"]
    rng = jax.random.key(0)
    batch = _batch(config)

    single_params = jax.jit(lambda r: jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                                                   init(r), is_leaf=lambda x: hasattr(x, "unbox")))(rng)
    want = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, **b))(single_params, batch))

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    with sharding.rules_context(mesh):
        boxed = jax.eval_shape(init, rng)
        shardings = sharding.param_shardings(boxed, mesh)
        import flax.linen as nn
        params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
        global_batch = sharding.global_batch(batch, mesh)
        got = jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, global_batch)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

    # params are really split: q kernel [layers, embed, heads, head_dim] over fsdp x tensor
    q = params["llm"]["layers"]["attention"]["q"]["kernel"] if "attention" in params["llm"]["layers"] \
        else _find(params["llm"]["layers"], "q")["kernel"]
    assert q.sharding.spec[1:3] == ("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4, q.shape[2] // 2, q.shape[3])
    emb = params["llm"]["embed"]["embedding"]
    assert emb.addressable_shards[0].data.size == emb.size // 8
    if fusion == "cross_attention":  # the blocks' q kernels [blocks, embed, heads, head_dim] too
        q = params["cross_attention"]["attention"]["q"]["kernel"]
        assert q.sharding.spec[1:3] == ("fsdp", "tensor")


def _find(tree, key):
    for k, v in tree.items():
        if k == key:
            return v
        if isinstance(v, dict):
            found = _find(v, key)
            if found is not None:
                return found
    return None


def test_mesh_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not divide"):
        sharding.MeshConfig(data=-1, fsdp=3).shape(8)
    with pytest.raises(ValueError, match="8 devices"):
        sharding.MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    assert sharding.MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    # a single MQA kv head cannot be split 2 ways: replicated instead of failing
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 1, 8), mesh)
    assert tuple(spec) == ("fsdp", None, None)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.global_batch({"input_ids": np.zeros((6, 4), np.int32)}, mesh)
