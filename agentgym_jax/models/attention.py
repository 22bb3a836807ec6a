"""Causal self-attention over whole sequences (training forward/backward, log-prob passes), by backend.

``model.attention`` picks the implementation:

- ``xla``: plain einsum softmax attention, run in query blocks that only read the keys up to the
  block's end (``q_block``); every backend can run it, and the other paths are tested against it.
- ``splash``: the TPU Pallas splash-attention kernel (causal mask and segment ids; forward and
  backward). Pallas calls cannot be auto-partitioned, so it runs under ``shard_map``: batch over
  the data axes, heads over ``tensor``.
- ``cudnn``: cuDNN fused attention through ``jax.nn.dot_product_attention`` (GPU).
- ``auto``: splash on TPU, cudnn on GPU, xla elsewhere.

Decoding against the slot KV cache always uses the XLA path: the engine already bounds the keys
it reads to a bucketed live length, so a ragged decode kernel would only save the bucket slack.

Inputs are q [B, T, H, D], k / v [B, T, KV, D] (grouped-query: H is a multiple of KV) and
``segment_ids`` [B, T] int32: 0 marks padding, >0 a sequence. A real query attends to earlier keys
of its own segment. Rows of padding queries are unspecified (callers never read them).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AttentionImpl = Literal["auto", "xla", "splash", "cudnn"]
IMPLS = ("auto", "xla", "splash", "cudnn")

# Splash tiles the sequence in blocks of this many tokens; shorter sequences are padded up to it.
SPLASH_BLOCK = 128


def resolve(impl: str, platform: str | None = None) -> str:
    """The concrete implementation for ``impl`` on ``platform`` (default: the default backend)."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def grouped_softmax(q, k, v, mask):
    """Softmax attention: q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S] bool -> [B,T,H,D]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d)
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def cached_attention(q, k, v, mask):
    """Attention over a KV cache: q [B,T,H,D], k [B,KV,D,S], v [B,KV,S,D], mask [B,T,S] bool.

    The cache-side operands are used in their stored layout; only q and the output (T rows) are
    transposed, so that both dots have their batch dims (B, KV) leading.
    """
    b, t, h, d = q.shape
    n_kv, s = k.shape[1], k.shape[3]
    g = h // n_kv
    qg = q.reshape(b, t, n_kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, n_kv, g * t, d)
    logits = jnp.einsum("bkqd,bkds->bkqs", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, n_kv, g, t, s) / math.sqrt(d)
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype).reshape(b, n_kv, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out.reshape(b, n_kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def xla_causal(q, k, v, segment_ids, q_block: int = 0):
    """Blocked causal attention: query block i reads keys [0, end of block i) only."""
    t = q.shape[1]
    seg = segment_ids
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    if not q_block or t <= q_block:
        return grouped_softmax(q, k, v, mask)
    blocks = [
        grouped_softmax(
            q[:, i : i + q_block],
            k[:, : i + q_block],
            v[:, : i + q_block],
            mask[:, i : i + q_block, : i + q_block],
        )
        for i in range(0, t, q_block)
    ]
    return jnp.concatenate(blocks, axis=1)


def cudnn_causal(q, k, v, segment_ids):
    """cuDNN fused attention (GPU). Grouped-query heads are native to the call."""
    seg = segment_ids
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] > 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation="cudnn"
    ).astype(q.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, groups: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(groups)])
    block = min(512, t)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # One kernel per kv head: its query group attends to a single k/v (MQA form of GQA).
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
    """Splash on one device's shard: q [B,T,H,D], k/v [B,T,KV,D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, d = q.shape
    kv = k.shape[2]
    pad = -t % SPLASH_BLOCK
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    tp = t + pad
    kernel = _splash_kernel(tp, h // kv, interpret)
    # Splash does not scale the logits; pads get segment 0 and see only each other.
    qg = (q / math.sqrt(d)).reshape(b, tp, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]

    def one(qh, kh, vh, seg):
        return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(qg, kt, vt, segment_ids.astype(jnp.int32))  # [B, KV, G, T, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)
    return out[:, :t].astype(q.dtype)


def splash_causal(q, k, v, segment_ids, mesh: Mesh | None = None, *, interpret: bool = False):
    """TPU splash attention; under ``shard_map`` over ``mesh`` when one is given."""
    fn = functools.partial(_splash_local, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    from agentgym_jax import sharding as shd

    # The mesh axes that divide k's batch and kv-head dims (q's heads are a multiple of them).
    axes = ("batch", "length", "kv_heads", "head_dim")
    qs = shd.sharding_for(axes, k.shape, mesh).spec
    ss = P(qs[0], None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qs, qs, qs, ss), out_specs=qs, check_vma=False)(
        q, k, v, segment_ids
    )


def causal_attention(
    q, k, v, segment_ids, *, impl: str, q_block: int = 0, mesh: Mesh | None = None
):
    """Dispatch to the implementation named by ``impl`` (already resolved, not ``auto``)."""
    if impl == "xla":
        return xla_causal(q, k, v, segment_ids, q_block)
    if impl == "cudnn":
        return cudnn_causal(q, k, v, segment_ids)
    if impl == "splash":
        return splash_causal(q, k, v, segment_ids, mesh)
    raise ValueError(f"unknown attention implementation {impl!r}")
