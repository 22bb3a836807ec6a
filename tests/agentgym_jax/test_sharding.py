"""Sharded forward on 8 fake CPU devices equals the 1-device run; weights really are split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from agentgym_jax import sharding as shd
from agentgym_jax.models import from_pretrained
from tests.helpers.hf import left_padded_batch, make_hf_model


def test_logical_to_spec_uses_each_mesh_axis_once():
    assert shd.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
    # 'embed' would also want fsdp, already used by batch.
    assert shd.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("norm",)) == P(None)


def test_make_mesh_sizes_and_errors():
    assert len(jax.devices()) == 8
    m = shd.make_mesh(shd.MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="devices"):
        shd.make_mesh(shd.MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(ValueError, match="at most one"):
        shd.make_mesh(shd.MeshConfig(data=-1, fsdp=-1, tensor=1))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_sharded_forward_matches_single_device(kind, tmp_path):
    d = str(tmp_path / kind)
    make_hf_model(kind, d)
    single = from_pretrained(d)
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = from_pretrained(d, mesh=mesh)

    # Layers are stacked on a leading, unsharded `layers` dim.
    q = sharded.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
    emb = sharded.embed_tokens[...]
    assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)

    ids, mask = left_padded_batch(single.config.vocab_size, [5, 12, 9, 16])
    ref = np.asarray(single(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else mesh:
        bs = shd.batch_sharding(mesh)
        ids_s, mask_s = jax.device_put(jnp.asarray(ids), bs), jax.device_put(jnp.asarray(mask), bs)
        from flax import nnx

        @nnx.jit
        def fwd(m, i, a):
            return m(i, attention_mask=a)

        out = fwd(sharded, ids_s, mask_s)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_shard_module_places_params(tmp_path):
    d = str(tmp_path / "m")
    make_hf_model("qwen2", d)
    model = from_pretrained(d)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tensor=2))
    shd.shard_module(model, mesh)
    up = model.layers.mlp.up_proj.kernel[...]
    assert up.sharding.spec == P(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 4, up.shape[2] // 2)
