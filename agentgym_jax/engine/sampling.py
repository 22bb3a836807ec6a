"""Per-slot token sampling: greedy, temperature, top-k, top-p, as one pure batched function.

Every slot carries its own temperature / top_p / top_k (arrays [S]) and its own PRNG key, so
one jitted step serves slots with different settings, and a slot's random stream depends only on
its own steps (not on which other slots happen to be decoding).

What the two returned log-probs mean (per sampled token a, with logits z and temperature T):

* ``logprobs`` — ``log softmax(z / T)[a]`` over the *full* vocabulary, with T = 1 for greedy
  slots. This is the policy log-prob the RL trainer recomputes (veRL divides the recomputed
  logits by the rollout temperature too), so at T = 1 it is exactly log pi(a | s).
* ``sampler_logprobs`` — the log-prob under the distribution actually sampled from, i.e. after
  top-k / top-p truncation and renormalisation (0 for greedy). Use it for off-policy corrections;
  it equals ``logprobs`` whenever top_k = 0 and top_p = 1.

Filtering order follows vLLM / HF: temperature, then top-k, then top-p over the renormalised
top-k distribution; the most likely token is always kept.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

_NEG = -jnp.inf


@flax.struct.dataclass
class SamplingParams:
    """Per-slot sampling settings, each [S]. temperature <= 0 means greedy; top_k <= 0 means off."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array

    @classmethod
    def full(cls, n: int, temperature=1.0, top_p=1.0, top_k=0) -> SamplingParams:
        return cls(
            temperature=jnp.full((n,), temperature, jnp.float32),
            top_p=jnp.full((n,), top_p, jnp.float32),
            top_k=jnp.full((n,), top_k, jnp.int32),
        )


def split_keys(raw_keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """raw uint32 keys [S, 2] -> (next raw keys [S, 2], typed subkeys [S]) for this step."""
    keys = jax.random.wrap_key_data(raw_keys)
    pairs = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    return jax.random.key_data(pairs[:, 0]), pairs[:, 1]


def filter_sorted(sorted_logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Mask (to -inf) the tail of descending-sorted logits [S, V] beyond top-k, then top-p."""
    v = sorted_logits.shape[-1]
    rank = jnp.arange(v)[None, :]
    keep_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    masked = jnp.where(keep_k, sorted_logits, _NEG)
    probs = jax.nn.softmax(masked, axis=-1)
    # Keep a token if the mass strictly before it is < top_p: the smallest prefix reaching top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_p = (before < top_p[:, None]) | (rank == 0)
    return jnp.where(keep_k & keep_p, masked, _NEG)


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (first maximum) as two plain reductions: XLA CPU runs argmax's
    (value, index) reduce as a scalar loop, about 5x slower over a vocabulary. A row with a NaN
    gives the last index instead of the first NaN's."""
    v = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.where(x == top, jnp.arange(v, dtype=jnp.int32), v)
    return jnp.minimum(jnp.min(idx, axis=-1), v - 1)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """``vmap(jax.random.categorical)(keys, logits)``, token for token: the same Gumbel noise,
    then ``first_argmax``."""
    noise = jax.vmap(lambda k, z: jax.random.gumbel(k, z.shape, z.dtype))(keys, logits)
    return first_argmax(noise + logits)


def _full_categorical(keys, scaled):
    tok = categorical(keys, scaled)
    lp = jax.nn.log_softmax(scaled, axis=-1)
    return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]


def _filtered_categorical(keys, scaled, top_p, top_k):
    v = scaled.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), scaled.shape)
    # Descending sort by value; ties keep the lower token id first (stable on the negated key).
    neg_sorted, sorted_idx = jax.lax.sort((-scaled, idx), dimension=-1, num_keys=1)
    filt = filter_sorted(-neg_sorted, top_p, top_k)
    j = categorical(keys, filt)
    tok = jnp.take_along_axis(sorted_idx, j[:, None], axis=-1)[:, 0]
    slp = jnp.take_along_axis(jax.nn.log_softmax(filt, axis=-1), j[:, None], axis=-1)[:, 0]
    return tok, slp


def sample(
    logits: jax.Array, keys: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sample one token per row of ``logits`` [S, V] (float32) with typed ``keys`` [S].

    Returns (tokens [S] int32, logprobs [S], sampler_logprobs [S]); see the module docstring.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    greedy = params.temperature <= 0
    temp = jnp.where(greedy, 1.0, params.temperature)
    scaled = logits / temp[:, None]
    filtering = ~greedy & (((params.top_k > 0) & (params.top_k < v)) | (params.top_p < 1.0))
    # Branch at batch level so the common cases skip the random draw (all greedy) or the
    # full-vocabulary sort (no slot filters).
    branch = jnp.where(jnp.all(greedy), 0, jnp.where(jnp.any(filtering), 2, 1))
    greedy_tok = first_argmax(logits)

    def all_greedy(_):
        return greedy_tok, jnp.zeros((logits.shape[0],), jnp.float32)

    def unfiltered(_):
        return _full_categorical(keys, scaled)

    def filtered(_):
        return _filtered_categorical(keys, scaled, params.top_p, params.top_k)

    tok, slp = jax.lax.switch(branch, (all_greedy, unfiltered, filtered), None)
    tok = jnp.where(greedy, greedy_tok, tok.astype(jnp.int32))
    slp = jnp.where(greedy, 0.0, slp)
    full_lp = jax.nn.log_softmax(scaled, axis=-1)
    lp = jnp.take_along_axis(full_lp, tok[:, None], axis=-1)[:, 0]
    return tok, lp, slp
