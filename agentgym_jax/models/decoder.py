"""Flax NNX decoder for the Qwen2 / Qwen2.5 / Qwen3 / Llama 3.x family, and its value-head critic.

Every parameter carries logical axis names in its ``axes`` metadata (``vocab``, ``embed``,
``heads``, ``kv_heads``, ``mlp``, ``norm``); ``agentgym_jax.sharding`` maps them to mesh axes.
Linear kernels are stored [in, out] (HF stores [out, in]; import/export transposes).

The forward pass takes an optional external KV cache (``KVCache``): new keys/values are written at
each row's ``cache_index`` and queries attend to every cache entry at or before their own position.
That is the hook the engine uses for prefill, multi-turn ``append`` and decode.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from agentgym_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values, layer-major: ``k[layer]`` is [batch (slots), max_len, kv_heads, head_dim].

    One buffer per layer (a tuple, not a stacked [layers, ...] array): a decode step scatters
    into each layer's buffer in place, while a stacked cache makes XLA copy it (~3x slower).
    """

    k: tuple
    v: tuple

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    def map(self, fn) -> KVCache:
        """Apply ``fn`` to every layer's k and v buffer."""
        return KVCache(k=tuple(fn(x) for x in self.k), v=tuple(fn(x) for x in self.v))


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


def _param(rngs: nnx.Rngs, shape, axes, param_dtype, init="normal", std=0.02):
    if init == "ones":
        value = jnp.ones(shape, param_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, param_dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape)).astype(param_dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.scale = _param(rngs, (dim,), ("norm",), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out] with logical axes."""

    def __init__(self, d_in, d_out, axes, *, bias: bool, rngs: nnx.Rngs, param_dtype, dtype):
        self.kernel = _param(rngs, (d_in, d_out), axes, param_dtype)
        self.bias = _param(rngs, (d_out,), axes[1:], param_dtype, init="zeros") if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype, dtype):
        e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q_proj = Linear(e, h * d, ("embed", "heads"), bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(e, k * d, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(e, k * d, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(h * d, e, ("heads", "embed"), bias=False, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.n_heads, self.n_kv, self.head_dim = h, k, d

    def __call__(self, x, positions, inv_freq, mask, kv=None, cache_index=None, q_block=0):
        """x [B,T,E]; mask [B,T,S] bool (query t may see key s); kv: this layer's (k, v) cache.

        With a cache, queries see its first S = mask.shape[-1] entries (the caller bounds S by the
        longest live sequence, so short sequences in a long cache do not pay for its full length).
        Without one, ``q_block`` > 0 runs causal attention in query blocks that only read the keys
        up to the block's end: half the work, and blocks small enough to stay in cache.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            # mode="drop": a write past max_len is discarded instead of being clamped onto (and
            # corrupting) earlier entries, as dynamic_update_slice would do.
            ck, cv = kv
            idx = cache_index[:, None] + jnp.arange(t)[None, :]
            rows = jnp.arange(b)[:, None]
            ck = ck.at[rows, idx].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[rows, idx].set(v.astype(cv.dtype), mode="drop")
            s_len = mask.shape[-1]
            k_all, v_all, new_kv = (
                ck[:, :s_len].astype(x.dtype),
                cv[:, :s_len].astype(x.dtype),
                (ck, cv),
            )
            out = self._attend(q, k_all, v_all, mask)
        elif q_block and t > q_block:
            new_kv = None
            out = jnp.concatenate(
                [
                    self._attend(
                        q[:, i : i + q_block],
                        k[:, : i + q_block],
                        v[:, : i + q_block],
                        mask[:, i : i + q_block, : i + q_block],
                    )
                    for i in range(0, t, q_block)
                ],
                axis=1,
            )
        else:
            new_kv = None
            out = self._attend(q, k, v, mask)
        return self.o_proj(out), new_kv

    def _attend(self, q, k, v, mask):
        """Grouped-query softmax attention: q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S] -> [B,T,H*D]."""
        b, t = q.shape[:2]
        qg = q.reshape(b, t, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(self.head_dim)
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.n_heads * self.head_dim)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype, dtype):
        e, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Linear(e, m, ("embed", "mlp"), **kw)
        self.up_proj = Linear(e, m, ("embed", "mlp"), **kw)
        self.down_proj = Linear(m, e, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dtype=dtype, **kw)

    def __call__(self, x, positions, inv_freq, mask, kv=None, cache_index=None, q_block=0):
        h, new_kv = self.self_attn(
            self.input_layernorm(x), positions, inv_freq, mask, kv, cache_index, q_block
        )
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


class Transformer(nnx.Module):
    """Decoder backbone + LM head. ``model(ids, attention_mask=...)`` -> logits [B, T, V]."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        attn_q_block: int = 128,
    ):
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        # Query block of causal attention over whole sequences (training, scoring); 0 = one block.
        self.attn_q_block = attn_q_block
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.embed_tokens = _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype=dtype, **kw) for _ in range(cfg.num_hidden_layers)]
        )
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
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, E] and the updated cache (None without a cache).

        Without a cache: causal attention within the batch; ``attention_mask`` [B, T] marks real
        tokens (left or right padding) and positions come from it.
        With a cache: token t of row b is written at ``cache_index[b] + t`` and sees cache entries
        ``<= cache_index[b] + t``; ``positions`` defaults to those indices. ``attend_len`` (static)
        bounds the cache entries read: the caller guarantees every ``cache_index[b] + t`` is below it
        (rows whose writes are dropped, at index ``max_len``, are exempt: their output is unused).
        """
        b, t = input_ids.shape
        inv_freq = rope_inv_freq(self.config)
        if cache is None:
            if attention_mask is None:
                attention_mask = jnp.ones((b, t), jnp.int32)
            if positions is None:
                positions = positions_from_mask(attention_mask)
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None] & (attention_mask[:, None, :] > 0)
        else:
            if cache_index is None:
                raise ValueError("cache_index [B] is required when a KV cache is passed")
            q_pos = cache_index[:, None] + jnp.arange(t)[None, :]
            if positions is None:
                positions = q_pos
            s_len = cache.max_len if attend_len is None else min(int(attend_len), cache.max_len)
            mask = jnp.arange(s_len)[None, None, :] <= q_pos[:, :, None]
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        new_k, new_v = [], []
        qb = self.attn_q_block
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            args = (x, positions, inv_freq, mask, kv, cache_index)
            # Remat trades compute for activation memory in the backward pass, so only the
            # training forward (no cache) uses it. jax.checkpoint of a pure function of the
            # layer's state: nnx.remat writes state back and fails with TraceContextError when
            # the model was merged under an inner trace (engine decode loop, chunked log-probs).
            if self.remat and cache is None:
                graphdef, state = nnx.split(layer)
                x, kv = jax.checkpoint(lambda st, *a, g=graphdef: nnx.merge(g, st)(*a, q_block=qb))(
                    state, *args
                )
            else:
                x, kv = layer(*args, q_block=qb)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = self.norm(x)
        new_cache = KVCache(k=tuple(new_k), v=tuple(new_v)) if cache is not None else None
        return x, new_cache

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
    ):
        """Logits [B, T, V] (float32); with a cache, returns (logits, new_cache)."""
        h, new_cache = self.hidden_states(
            input_ids,
            attention_mask,
            positions=positions,
            cache=cache,
            cache_index=cache_index,
            attend_len=attend_len,
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

    def __call__(self, input_ids, attention_mask=None, *, positions=None):
        h, _ = self.backbone.hidden_states(input_ids, attention_mask, positions=positions)
        v = jnp.dot(h.astype(jnp.float32), self.value_head[...]) + self.value_bias[...]
        return v[..., 0]
