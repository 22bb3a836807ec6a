"""Pure slot-batch functions: write tokens into slots (prefill / append) and decode.

The slot invariant: slot s holds ``length[s]`` tokens in its KV cache (positions
``0 .. length-1``) plus one *pending* token, the last token of its sequence, which is known but
not yet encoded. A decode step feeds the pending token at position ``length``, samples the next
token and makes it the new pending one. Prefill and append therefore write "pending + new tokens
except the last" and leave the last new token pending. This keeps prefill, append and decode one
code path (no stored logits) and lets an env reply land right after the model's stop token.

Everything here is a pure function of (model, pytrees); ``engine.py`` owns the jits.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from agentgym_jax.engine.sampling import SamplingParams, sample, split_keys
from agentgym_jax.models.decoder import KVCache

# finish reasons (device codes); the host maps them to strings.
RUNNING, STOP, LENGTH, MAX_LEN = 0, 1, 2, 3
FINISH_NAMES = {STOP: "stop", LENGTH: "length", MAX_LEN: "max_len"}


@flax.struct.dataclass
class SlotState:
    """Device state of the slot batch (the part that jitted steps replace and donate)."""

    cache: KVCache
    """Keys [layers, slots, kv_heads, head_dim, max_len] and values [layers, slots, kv_heads,
    max_len, head_dim] (see ``KVCache``)."""
    length: jax.Array
    """[S] int32: tokens encoded in the cache (the pending token is at position ``length``)."""
    pending: jax.Array
    """[S] int32: the last token of the sequence, fed at the next decode step."""
    rng: jax.Array
    """[S, 2] uint32: raw threefry key per slot, advanced only when that slot samples."""


@flax.struct.dataclass
class DecodeControl:
    """Per-call inputs of the decode loop (small; built on the host once per call)."""

    active: jax.Array  # [S] bool: slots decoding now
    budget: jax.Array  # [S] int32: new tokens this slot may still emit this turn
    stop_ids: jax.Array  # [S, M] int32, padded with -1
    sampling: SamplingParams
    watch: jax.Array  # [S] bool: slots whose finishing ends the loop
    return_on_first: jax.Array  # [] bool: end when any watched slot finishes (else when all have)


@flax.struct.dataclass
class DecodeOut:
    tokens: jax.Array  # [S, chunk] int32; row s valid for the first n_new[s] columns
    logprobs: jax.Array  # [S, chunk] float32 (temperature-scaled full-softmax log-prob)
    sampler_logprobs: jax.Array  # [S, chunk] float32 (after top-k / top-p)
    n_new: jax.Array  # [S] int32
    finish: jax.Array  # [S] int32 finish code (RUNNING if still decoding)


def init_state(cache: KVCache) -> SlotState:
    s = cache.num_slots
    return SlotState(
        cache=cache,
        length=jnp.zeros((s,), jnp.int32),
        pending=jnp.zeros((s,), jnp.int32),
        rng=jnp.zeros((s, 2), jnp.uint32),
    )


def extend(
    model,
    state: SlotState,
    slot_ids,
    tokens,
    start,
    count,
    pending,
    seeds,
    new_rng,
    *,
    attend_len=None,
):
    """Write ``tokens[r, :count[r]]`` into slot ``slot_ids[r]`` from cache position ``start[r]``.

    slot_ids [R] (ids >= S are padding rows: read as zeros, writes dropped), tokens [R, T],
    start / count / pending [R] int32; ``pending`` becomes the slot's pending token. Rows with
    ``new_rng`` get a fresh key ``fold_in(key(0), seeds[r])`` (a new episode).
    Only the selected rows of the cache are gathered, run and scattered back. ``attend_len``
    (static) bounds the cache entries attention reads; it must cover every ``start + count``.
    """
    cache = state.cache
    # Only the attended window of each row travels: writes and reads stay below attend_len.
    sub = cache.take_slots(slot_ids, attend_len)
    # The LM head is skipped: only the cache matters (the last token stays pending).
    _, sub = model.hidden_states(tokens, cache=sub, cache_index=start, attend_len=attend_len)
    cache = cache.set_slots(slot_ids, sub)
    fresh = jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(jax.random.key(0), s)))(seeds)
    old_rng = jnp.take(state.rng, slot_ids, axis=0, mode="fill", fill_value=0)
    rng = jnp.where(new_rng[:, None], fresh.astype(jnp.uint32), old_rng)
    return SlotState(
        cache=cache,
        length=state.length.at[slot_ids].set(start + count, mode="drop"),
        pending=state.pending.at[slot_ids].set(pending, mode="drop"),
        rng=state.rng.at[slot_ids].set(rng, mode="drop"),
    )


def fork(state: SlotState, src, dst, seeds, *, copy_len: int) -> SlotState:
    """Copy slot ``src[r]``'s sequence into slot ``dst[r]`` for each row r (dst ids >= S are
    padding, dropped): the first ``copy_len`` (static) cache entries, the length and the pending
    token; each destination gets a fresh RNG key ``fold_in(key(0), seeds[r])``, as a prefilled
    episode does."""

    fresh = jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(jax.random.key(0), s)))(seeds)
    return SlotState(
        cache=state.cache.copy_slots(src, dst, copy_len),
        length=state.length.at[dst].set(state.length[src], mode="drop"),
        pending=state.pending.at[dst].set(state.pending[src], mode="drop"),
        rng=state.rng.at[dst].set(fresh.astype(jnp.uint32), mode="drop"),
    )


def forward_pending(model, state: SlotState, active, attend_len=None):
    """Feed every slot's pending token; inactive slots write nowhere. -> (logits [S, V], cache).

    ``attend_len`` (static) bounds the cache entries read; it must exceed every active length.
    """
    max_len = state.cache.max_len
    # An index of max_len makes the scatter drop the write (mode="drop" in the decoder).
    idx = jnp.where(active, state.length, max_len)
    logits, cache = model(
        state.pending[:, None], cache=state.cache, cache_index=idx, attend_len=attend_len
    )
    return logits[:, 0], cache


def decode_step(model, state: SlotState, active, sampling: SamplingParams, attend_len=None):
    """One token for every active slot. -> (state, tokens, logprobs, sampler_logprobs)."""
    logits, cache = forward_pending(model, state, active, attend_len)
    next_rng, keys = split_keys(state.rng)
    tok, lp, slp = sample(logits, keys, sampling)
    state = SlotState(
        cache=cache,
        length=jnp.where(active, state.length + 1, state.length),
        pending=jnp.where(active, tok, state.pending),
        rng=jnp.where(active[:, None], next_rng, state.rng),
    )
    return state, tok, lp, slp


def decode_loop(model, state: SlotState, ctrl: DecodeControl, chunk: int, attend_len=None):
    """Decode up to ``chunk`` steps in one ``lax.while_loop``; per-slot stop / budget / max_len.

    ``attend_len`` (static) bounds the cache entries attention reads: the caller picks it above
    every active slot's ``length + min(chunk, budget) - 1``, the last position this call can feed.

    Stops when no slot is active, after ``chunk`` steps, or once the watched slots have finished
    (any one of them with ``return_on_first``, so the host can refill it while the others keep
    their place; all of them otherwise).
    """
    s = state.length.shape[0]
    max_len = state.cache.max_len
    out = DecodeOut(
        tokens=jnp.zeros((s, chunk), jnp.int32),
        logprobs=jnp.zeros((s, chunk), jnp.float32),
        sampler_logprobs=jnp.zeros((s, chunk), jnp.float32),
        n_new=jnp.zeros((s,), jnp.int32),
        finish=jnp.zeros((s,), jnp.int32),
    )

    def cond(carry):
        _, active, step, out = carry
        done = out.finish != RUNNING
        stop = jnp.where(
            ctrl.return_on_first, jnp.any(ctrl.watch & done), jnp.all(~ctrl.watch | done)
        )
        return (step < chunk) & jnp.any(active) & ~stop

    def body(carry):
        st, active, step, out = carry
        st, tok, lp, slp = decode_step(model, st, active, ctrl.sampling, attend_len)
        n_new = out.n_new + active.astype(jnp.int32)
        is_stop = jnp.any(tok[:, None] == ctrl.stop_ids, axis=-1)
        # Sequence length incl. the new pending token is length + 1; it may not pass max_len.
        finish = jnp.where(
            is_stop,
            STOP,
            jnp.where(
                n_new >= ctrl.budget, LENGTH, jnp.where(st.length + 1 >= max_len, MAX_LEN, RUNNING)
            ),
        )
        finish = jnp.where(active, finish, out.finish)
        out = DecodeOut(
            tokens=out.tokens.at[:, step].set(tok),
            logprobs=out.logprobs.at[:, step].set(lp),
            sampler_logprobs=out.sampler_logprobs.at[:, step].set(slp),
            n_new=n_new,
            finish=finish,
        )
        return st, active & (finish == RUNNING), step + 1, out

    st, _, _, out = jax.lax.while_loop(cond, body, (state, ctrl.active, jnp.int32(0), out))
    return st, out
