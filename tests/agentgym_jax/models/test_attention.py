"""Attention backends against the XLA path: splash (Pallas, interpret mode on CPU), packed
segments, and the backend knob."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentgym_jax.models import attention as attn
from agentgym_jax.models import from_pretrained
from tests.helpers.hf import make_hf_model


def _qkv(b=2, t=160, h=4, kv=2, d=128, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, t, kv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, t, kv, d), jnp.float32)
    # Row 0 left-padded by 37, row 1 two packed sequences then right padding.
    seg = np.ones((b, t), np.int32)
    seg[0, :37] = 0
    seg[1, 90:150] = 2
    seg[1, 150:] = 0
    return q, k, v, jnp.asarray(seg)


def _real(x, seg):
    return np.asarray(x)[np.asarray(seg) > 0]


def test_xla_blocked_equals_one_block():
    q, k, v, seg = _qkv()
    one = attn.xla_causal(q, k, v, seg, q_block=0)
    blocked = attn.xla_causal(q, k, v, seg, q_block=64)
    np.testing.assert_allclose(_real(blocked, seg), _real(one, seg), atol=1e-5)


def test_xla_segments_do_not_see_each_other():
    """A packed second sequence attends exactly as if it were alone in its row."""
    q, k, v, seg = _qkv()
    packed = attn.xla_causal(q, k, v, seg)
    sl = slice(90, 150)
    alone = attn.xla_causal(q[1:2, sl], k[1:2, sl], v[1:2, sl], jnp.ones((1, 60), jnp.int32))
    np.testing.assert_allclose(np.asarray(packed)[1, sl], np.asarray(alone)[0], atol=1e-5)


def test_splash_interpret_matches_xla_forward_and_grads():
    """The TPU kernel (run by the Pallas interpreter on CPU): causal + segment ids, GQA, a length
    that is not a multiple of the kernel block; forward and backward."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v, seg = _qkv()
    w = (seg > 0).astype(jnp.float32)[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w * jnp.cos(jnp.arange(q.shape[-1]) / 7.0))

    xla = lambda q, k, v: attn.xla_causal(q, k, v, seg)  # noqa: E731
    splash = lambda q, k, v: attn.splash_causal(q, k, v, seg, interpret=True)  # noqa: E731
    np.testing.assert_allclose(
        _real(splash(q, k, v), seg), _real(xla(q, k, v), seg), atol=2e-5, rtol=1e-5
    )
    g_ref = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_model_packed_rows_equal_separate_rows(tmp_path):
    """Two sequences packed in one row (segment ids + per-segment positions) give the logits
    each gives alone: the basis of a packed update."""
    d = str(tmp_path)
    make_hf_model("qwen2", d)
    model = from_pretrained(d)
    rng = np.random.default_rng(0)
    a = rng.integers(1, model.config.vocab_size, 9)
    b = rng.integers(1, model.config.vocab_size, 6)
    ids = np.concatenate([a, b, [0, 0, 0]])[None]
    seg = np.array([[1] * 9 + [2] * 6 + [0] * 3])
    pos = np.array([list(range(9)) + list(range(6)) + [0] * 3])
    packed = np.asarray(
        model(jnp.asarray(ids), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    )
    la = np.asarray(model(jnp.asarray(a[None])))[0]
    lb = np.asarray(model(jnp.asarray(b[None])))[0]
    np.testing.assert_allclose(packed[0, :9], la, atol=1e-5)
    np.testing.assert_allclose(packed[0, 9:15], lb, atol=1e-5)


def test_backend_knob():
    assert attn.resolve("auto", "tpu") == "splash"
    assert attn.resolve("auto", "gpu") == "cudnn"
    assert attn.resolve("auto", "cpu") == "xla"
    assert attn.resolve("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match="model.attention"):
        attn.resolve("flash")


def test_splash_under_shard_map_matches_xla():
    """Splash on an 8-device mesh (batch over fsdp, kv heads over tensor) equals the unsharded
    XLA path."""
    from agentgym_jax import sharding as shd

    q, k, v, seg = _qkv(b=4)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tensor=2))
    out = attn.splash_causal(q, k, v, seg, mesh, interpret=True)
    ref = attn.xla_causal(q, k, v, seg)
    np.testing.assert_allclose(_real(out, seg), _real(ref, seg), atol=2e-5, rtol=1e-5)
