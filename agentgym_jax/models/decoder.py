"""Flax NNX decoder for the Qwen2 / Qwen2.5 / Qwen3 / Llama 3.x family, and its value-head critic.

Every parameter carries logical axis names in its ``axes`` metadata (``layers``, ``vocab``,
``embed``, ``heads``, ``kv_heads``, ``mlp``, ``norm``); ``agentgym_jax.sharding`` maps them to mesh
axes. The decoder layers are one stacked module (``Transformer.layers``, leading ``layers`` dim).
Linear kernels are stored [in, out] (HF stores [out, in]; import/export transposes).

The forward pass takes an optional external KV cache (``KVCache``): new keys/values are written at
each row's ``cache_index`` and queries attend to every cache entry at or before their own position.
That is the hook the engine uses for prefill, multi-turn ``append`` and decode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from agentgym_jax.models import attention as attn
from agentgym_jax.models.attention import cached_attention, causal_attention
from agentgym_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer: ``k`` is [layers, slots, kv_heads, head_dim, max_len] and
    ``v`` is [layers, slots, kv_heads, max_len, head_dim].

    Stacked like the layers' parameters, so the layers can run under one ``lax.scan`` with the
    cache in its carry (updated in place): compile time does not grow with depth. Keys are stored
    transposed so both attention dots read the cache as it lies: with [slots, max_len, ...] XLA
    copied a transposed window of both every layer and step, the largest cost of a CPU decode step.
    """

    k: jax.Array
    v: jax.Array

    K_AXES = ("layers", "slots", "kv_heads", "head_dim", "length")
    V_AXES = ("layers", "slots", "kv_heads", "length", "head_dim")

    @staticmethod
    def shapes(cfg: ModelConfig, batch: int, max_len: int) -> tuple[tuple, tuple]:
        n, kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        return (n, batch, kv, d, max_len), (n, batch, kv, max_len, d)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        k_shape, v_shape = cls.shapes(cfg, batch, max_len)
        return cls(k=jnp.zeros(k_shape, dtype), v=jnp.zeros(v_shape, dtype))

    @property
    def max_len(self) -> int:
        return self.v.shape[3]

    @property
    def num_slots(self) -> int:
        return self.v.shape[1]

    def take_slots(self, slot_ids: jax.Array, length: int | None = None) -> KVCache:
        """The rows of ``slot_ids``, their first ``length`` (static) entries (ids out of range
        read as zeros)."""
        n = self.max_len if length is None else min(int(length), self.max_len)
        rows = lambda c: jnp.take(c, slot_ids, axis=1, mode="fill", fill_value=0)  # noqa: E731
        return KVCache(k=rows(self.k)[..., :n], v=rows(self.v)[:, :, :, :n])

    def set_slots(self, slot_ids: jax.Array, rows: KVCache) -> KVCache:
        """Write ``rows`` (the first ``rows.max_len`` entries) back at ``slot_ids``
        (out-of-range ids are dropped)."""
        n = rows.max_len
        k = self.k.at[:, slot_ids, ..., :n].set(rows.k.astype(self.k.dtype), mode="drop")
        v = self.v.at[:, slot_ids, :, :n].set(rows.v.astype(self.v.dtype), mode="drop")
        return KVCache(k=k, v=v)

    def copy_slots(self, src: jax.Array, dst: jax.Array, length: int) -> KVCache:
        """Copy the first ``length`` (static) entries of slot ``src[r]`` into slot ``dst[r]``
        (dst ids out of range are dropped)."""
        return self.set_slots(dst, self.take_slots(src, length))


def cache_write(ck, cv, layer, cache_index, k, v):
    """Write k / v [B, T, KV, D] of ``layer`` at ``cache_index[b] + t`` of stacked ``ck`` / ``cv``.

    mode="drop": a write past max_len is discarded instead of being clamped onto (and corrupting)
    earlier entries, as dynamic_update_slice would do.
    """
    b, t, n_kv, _ = k.shape
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(n_kv)[None, None, :]
    idx = (cache_index[:, None] + jnp.arange(t)[None, :])[:, :, None]
    ck = ck.at[layer, rows, heads, :, idx].set(k.astype(ck.dtype), mode="drop")
    cv = cv.at[layer, rows, heads, idx].set(v.astype(cv.dtype), mode="drop")
    return ck, cv


def cache_read(ck, cv, layer, length: int):
    """The first ``length`` (static) entries of ``layer``: k [B, KV, D, S], v [B, KV, S, D]."""
    _, b, n_kv, d, _ = ck.shape
    k = jax.lax.dynamic_slice(ck, (layer, 0, 0, 0, 0), (1, b, n_kv, d, length))[0]
    v = jax.lax.dynamic_slice(cv, (layer, 0, 0, 0, 0), (1, b, n_kv, length, d))[0]
    return k, v


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids for a (left- or right-) padded batch: count of real tokens before each one."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3 frequency-dependent scaling (keeps high frequencies, stretches low ones).
    factor = float(s["factor"])
    lo, hi = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    inv_l = jnp.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    is_medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return jnp.where(is_medium, smoothed, inv_l)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, T, H, D]; rotate-half convention (as HF)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rot * sin).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape, axes, param_dtype, init="normal", std=0.02, stack=0):
    """A parameter with logical ``axes``; ``stack`` > 0 prepends a ``layers`` dim of that size."""
    if stack:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "ones":
        value = jnp.ones(shape, param_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, param_dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape)).astype(param_dtype)
    return nnx.Param(value, axes=axes)


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """What every layer's attention needs besides its input (shared by all layers)."""

    impl: str = "xla"
    q_block: int = 0
    mesh: Any = None
    segment_ids: jax.Array | None = None  # [B, T] without a cache
    mask: jax.Array | None = None  # [B, T, S] with a cache
    cache_index: jax.Array | None = None


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32, stack=0):
        self.scale = _param(rngs, (dim,), ("norm",), param_dtype, init="ones", stack=stack)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out] with logical axes."""

    def __init__(
        self, d_in, d_out, axes, *, bias: bool, rngs: nnx.Rngs, param_dtype, dtype, stack=0
    ):
        self.kernel = _param(rngs, (d_in, d_out), axes, param_dtype, stack=stack)
        self.bias = (
            _param(rngs, (d_out,), axes[1:], param_dtype, init="zeros", stack=stack)
            if bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype, dtype, stack=0):
        e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, stack=stack)
        self.q_proj = Linear(e, h * d, ("embed", "heads"), bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(e, k * d, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(e, k * d, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(h * d, e, ("heads", "embed"), bias=False, **kw)
        if cfg.qk_norm:
            nkw = dict(rngs=rngs, param_dtype=param_dtype, stack=stack)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **nkw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **nkw)
        else:
            self.q_norm = self.k_norm = None
        self.n_heads, self.n_kv, self.head_dim = h, k, d

    def __call__(self, x, positions, inv_freq, ctx: _Ctx, kv=None, layer=None):
        """x [B,T,E] -> ([B,T,E], updated (k, v) cache or None).

        With ``kv`` (every layer's stacked cache) and this layer's index ``layer``, new keys and
        values are written at ``ctx.cache_index`` and queries see the first S =
        ``ctx.mask.shape[-1]`` entries (the caller bounds S by the longest live sequence).
        Without, causal attention over the batch by ``ctx.impl``.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_kv = None
        if kv is not None:
            ck, cv = cache_write(*kv, layer, ctx.cache_index, k, v)
            k_all, v_all = cache_read(ck, cv, layer, ctx.mask.shape[-1])
            out = cached_attention(q, k_all.astype(x.dtype), v_all.astype(x.dtype), ctx.mask)
            new_kv = (ck, cv)
        else:
            out = causal_attention(
                q, k, v, ctx.segment_ids, impl=ctx.impl, q_block=ctx.q_block, mesh=ctx.mesh
            )
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim)), new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype, dtype, stack=0):
        e, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, param_dtype=param_dtype, dtype=dtype, stack=stack)
        self.gate_proj = Linear(e, m, ("embed", "mlp"), **kw)
        self.up_proj = Linear(e, m, ("embed", "mlp"), **kw)
        self.down_proj = Linear(m, e, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One decoder layer; with ``stack`` = L, every parameter holds all L layers (leading dim)."""

    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype, dtype, stack=0):
        kw = dict(rngs=rngs, param_dtype=param_dtype, stack=stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dtype=dtype, **kw)

    def __call__(self, x, positions, inv_freq, ctx: _Ctx, kv=None, layer=None):
        h, new_kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, ctx, kv, layer)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


REMAT_POLICIES = ("none", "full", "dots")


def _remat_policy(remat: bool | str) -> str:
    """Normalise ``remat`` (older configs use a bool: True = full)."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    return remat


class Transformer(nnx.Module):
    """Decoder backbone + LM head. ``model(ids, attention_mask=...)`` -> logits [B, T, V].

    The layers' parameters are stacked (a leading ``layers`` logical axis) and every forward
    pass runs them under ``lax.scan``: one layer is traced and compiled, however deep the model.
    Through a KV cache (the engine), the stacked cache rides in the scan's carry, so each layer
    writes its new entries in place.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool | str = "none",
        attn_q_block: int = 128,
        attention: str = "auto",
        mesh: Any = None,
        logits_chunk: int = 0,
    ):
        self.config = cfg
        self.dtype = dtype
        # Recomputation in the backward pass: none, full (each layer), dots (keep matmul outputs).
        self.remat = _remat_policy(remat)
        # Query block of the XLA causal attention over whole sequences; 0 = one block.
        self.attn_q_block = attn_q_block
        self.attention = attn.resolve(attention)
        # The mesh the splash kernel is shard_mapped over (None: unsharded).
        self.mesh = mesh
        # Positions per LM-head chunk in the training log-prob passes (0 = one chunk).
        self.logits_chunk = logits_chunk
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.embed_tokens = _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype
        )
        self.layers = DecoderLayer(cfg, dtype=dtype, stack=cfg.num_hidden_layers, **kw)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype
            )

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        attend_len: int | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, E] and the updated cache (None without a cache).

        Without a cache: causal attention within the batch; ``attention_mask`` [B, T] marks real
        tokens (left or right padding) and positions come from it. ``segment_ids`` [B, T] (0 =
        padding) instead packs several sequences per row: a token sees only its own segment, and
        ``positions`` must then be given per segment.
        With a cache: token t of row b is written at ``cache_index[b] + t`` and sees cache entries
        ``<= cache_index[b] + t``; ``positions`` defaults to those indices. ``attend_len`` (static)
        bounds the cache entries read: the caller guarantees every ``cache_index[b] + t`` is below it
        (rows whose writes are dropped, at index ``max_len``, are exempt: their output is unused).
        """
        b, t = input_ids.shape
        inv_freq = rope_inv_freq(self.config)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        graphdef, stack = nnx.split(self.layers)
        if cache is None:
            if segment_ids is None:
                if attention_mask is None:
                    attention_mask = jnp.ones((b, t), jnp.int32)
                segment_ids = (attention_mask > 0).astype(jnp.int32)
                if positions is None:
                    positions = positions_from_mask(attention_mask)
            elif positions is None:
                raise ValueError("packed rows (segment_ids) need per-segment positions")
            ctx = _Ctx(self.attention, self.attn_q_block, self.mesh, segment_ids=segment_ids)

            def body(h, layer_state):
                h, _ = nnx.merge(graphdef, layer_state)(h, positions, inv_freq, ctx)
                return h, None

            if self.remat == "full":
                body = jax.checkpoint(body, prevent_cse=False)
            elif self.remat == "dots":
                policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            x, _ = jax.lax.scan(body, x, stack)
            return self.norm(x), None

        if cache_index is None:
            raise ValueError("cache_index [B] is required when a KV cache is passed")
        q_pos = cache_index[:, None] + jnp.arange(t)[None, :]
        if positions is None:
            positions = q_pos
        s_len = cache.max_len if attend_len is None else min(int(attend_len), cache.max_len)
        mask = jnp.arange(s_len)[None, None, :] <= q_pos[:, :, None]
        ctx = _Ctx(mask=mask, cache_index=cache_index)

        def cached(carry, xs):
            h, ck, cv = carry
            layer_state, i = xs
            h, (ck, cv) = nnx.merge(graphdef, layer_state)(h, positions, inv_freq, ctx, (ck, cv), i)
            return (h, ck, cv), None

        layer_ids = jnp.arange(self.config.num_hidden_layers)
        (x, k, v), _ = jax.lax.scan(cached, (x, cache.k, cache.v), (stack, layer_ids))
        return self.norm(x), KVCache(k=k, v=v)

    def logits(self, hidden: jax.Array) -> jax.Array:
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden, w.astype(self.dtype), preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        positions=None,
        cache=None,
        cache_index=None,
        attend_len=None,
        segment_ids=None,
    ):
        """Logits [B, T, V] (float32); with a cache, returns (logits, new_cache)."""
        h, new_cache = self.hidden_states(
            input_ids,
            attention_mask,
            positions=positions,
            cache=cache,
            cache_index=cache_index,
            attend_len=attend_len,
            segment_ids=segment_ids,
        )
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


class Critic(nnx.Module):
    """Value model: the decoder backbone with a scalar head. ``critic(ids, mask)`` -> [B, T]."""

    def __init__(self, backbone: Transformer, *, rngs: nnx.Rngs):
        self.backbone = backbone
        # The LM head is not needed by the critic; drop it so it neither trains nor takes memory.
        self.backbone.lm_head = None
        e = backbone.config.hidden_size
        self.value_head = _param(rngs, (e, 1), ("embed", None), jnp.float32, init="zeros")
        self.value_bias = _param(rngs, (1,), (None,), jnp.float32, init="zeros")

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
        h, _ = self.backbone.hidden_states(
            input_ids, attention_mask, positions=positions, segment_ids=segment_ids
        )
        v = jnp.dot(h.astype(jnp.float32), self.value_head[...]) + self.value_bias[...]
        return v[..., 0]
