"""PPO-family losses as pure functions of [B, T] arrays (veRL ``core_algos`` names and semantics).

Shift convention (the one place it is handled: ``sequence_logprobs`` / ``shift_right``): every
per-token array in a batch is aligned to ``input_ids``. ``logprobs[b, t]`` is log p(input_ids[b, t]
| input_ids[b, :t]), predicted by the logits at position t - 1; position 0 has no prediction and
holds 0. Likewise ``values[b, t]`` is the critic's value of the state in which token t is chosen,
read from the hidden state at t - 1. ``loss_mask[b, t] = 1`` marks model-generated targets, so a
prompt's first token can never be a target.

Aggregation: ``agg_loss(loss_mat, mask, mode)`` implements veRL's modes (seq-mean modes count only
rows with a loss token). Inside the update, losses are instead reduced with per-token weights from
``agg_weights`` with the whole mini-batch's token and sequence counts, so summing micro-batch
losses gives exactly the mini-batch loss (veRL averages the per-micro-batch aggregates, which is
not the same for token-mean with uneven lengths).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from agentgym_jax.rl.advantages import kl_penalty, masked_mean

Array = jax.Array

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


# --------------------------------------------------------------------------------------------
# log-probs, entropy, values from model outputs


def token_logprobs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[targets] in float32 without materialising the [.., V] log-softmax."""
    # Shift by the max first: (picked - max) is exact, so large logits keep full precision.
    shifted = _shifted(logits)
    picked = jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def _shifted(logits: Array) -> Array:
    logits = logits.astype(jnp.float32)
    return logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of softmax(logits) over the last axis: lse - sum p * logits (stable, float32)."""
    shifted = _shifted(logits)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    p = jnp.exp(shifted - lse)
    return lse[..., 0] - jnp.sum(p * shifted, axis=-1)


def shift_right(x: Array) -> Array:
    """[B, T] quantity read at position t-1 -> aligned to token t (0 at t = 0)."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def sequence_logprobs(logits: Array, input_ids: Array, with_entropy: bool = False):
    """Log-probs [B, T] of ``input_ids`` aligned to them (0 at t = 0), optionally the entropy [B, T]
    of the distribution that produced each token. Logits are not sliced (no [B, T-1, V] copy)."""
    nxt = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    lp = shift_right(token_logprobs(logits, nxt))
    if not with_entropy:
        return lp
    return lp, shift_right(entropy_from_logits(logits))


def chunked_sequence_logprobs(head, hidden: Array, input_ids: Array, chunk: int):
    """``sequence_logprobs(head(hidden), input_ids, with_entropy=True)`` without the [B, T, V]
    logits: the LM head and log-softmax run over ``chunk`` positions at a time, and the backward
    pass recomputes each chunk's logits (at a 150k vocabulary, the logits and their gradient are
    most of an update's memory). ``head``: hidden [B, c, E] -> float32 logits [B, c, V]."""
    b, t, e = hidden.shape
    if not chunk or t <= chunk:
        return sequence_logprobs(head(hidden), input_ids, with_entropy=True)
    nxt = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    pad = -t % chunk
    n = (t + pad) // chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, e).swapaxes(0, 1)
    nx = jnp.pad(nxt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        logits = head(args[0])
        return token_logprobs(logits, args[1]), entropy_from_logits(logits)

    lp, ent = jax.lax.map(one, (h, nx))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]  # noqa: E731
    return shift_right(unchunk(lp)), shift_right(unchunk(ent))


# --------------------------------------------------------------------------------------------
# aggregation


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r}: allowed {LOSS_AGG_MODES}")


def seq_count(mask: Array) -> Array:
    """Rows with at least one loss token: the sequence count of the seq-mean modes."""
    return jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32))


def agg_weights(
    mask: Array,
    mode: str,
    n_tokens: Array | None = None,
    n_seqs: Array | float | None = None,
    row_tokens: Array | None = None,
) -> Array:
    """Per-token weights w with sum(loss_mat * w) == agg_loss(loss_mat, mask, mode).

    The seq-mean modes average over rows with at least one loss token (``seq_count``), as veRL
    0.9: a failed or fully truncated episode must not shrink the others' loss. ``n_tokens`` /
    ``n_seqs`` override the normalisers (the mini-batch totals when ``mask`` is one micro-batch
    of it). ``row_tokens`` (same shape as ``mask``) gives each token its sequence's loss-token
    count, for packed rows where a row holds several sequences (default: the row's sum).
    """
    _check_mode(mode)
    m = mask.astype(jnp.float32)
    if mode == "token-mean":
        n = jnp.sum(m) if n_tokens is None else n_tokens
        return m / jnp.maximum(n, 1.0)
    s = jnp.maximum(seq_count(m) if n_seqs is None else n_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return m / s
    row = jnp.sum(m, axis=-1, keepdims=True) if row_tokens is None else row_tokens
    return m / (jnp.maximum(row, 1.0) * s)  # an empty row has weight 0 (not NaN)


def agg_loss(loss_mat: Array, mask: Array, mode: str = "token-mean") -> Array:
    """veRL ``agg_loss``: token-mean | seq-mean-token-sum | seq-mean-token-mean."""
    return jnp.sum(loss_mat * agg_weights(mask, mode))


# --------------------------------------------------------------------------------------------
# policy, KL, entropy, value


def policy_loss_terms(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
):
    """Per-token PPO clipped surrogate (veRL ``compute_policy_loss``), before aggregation.

    Returns (pg_losses, clipped, clipped_lower, neg_kl), all [B, T]: ``clipped`` marks tokens where
    the ratio clip is active, ``clipped_lower`` where the dual clip (``clip_ratio_c``, negative
    advantages only; None disables) is active, ``neg_kl = logp - old_logp`` (clamped to +-20).
    """
    neg_kl = jnp.clip(logp - old_logp, -20.0, 20.0)
    ratio = jnp.exp(neg_kl)
    l1 = -advantages * ratio
    l2 = -advantages * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip1 = jnp.maximum(l1, l2)
    clipped = (l2 > l1).astype(jnp.float32)
    if clip_ratio_c is None:
        return clip1, clipped, jnp.zeros_like(clipped), neg_kl
    l3 = -advantages * clip_ratio_c
    neg = advantages < 0
    pg = jnp.where(neg, jnp.minimum(l3, clip1), clip1)
    clipped_lower = ((clip1 > l3) & neg).astype(jnp.float32)
    return pg, clipped, clipped_lower, neg_kl


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    loss_agg_mode="token-mean",
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_ratio_c=3.0,
) -> tuple[Array, dict[str, Array]]:
    """Aggregated PPO loss and metrics {pg_clipfrac, pg_clipfrac_lower, ppo_kl} (token means)."""
    pg, clipped, lower, neg_kl = policy_loss_terms(
        logp, old_logp, advantages, clip_ratio_low, clip_ratio_high, clip_ratio_c
    )
    loss = agg_loss(pg, mask, loss_agg_mode)
    return loss, {
        "pg_clipfrac": masked_mean(clipped, mask),
        "pg_clipfrac_lower": masked_mean(lower, mask),
        "ppo_kl": masked_mean(-neg_kl, mask),
    }


def kl_loss(logp, ref_logp, mask, kl_type="low_var_kl", loss_agg_mode="token-mean") -> Array:
    """KL to the frozen reference as a loss term (veRL ``use_kl_loss``), aggregated."""
    return agg_loss(kl_penalty(logp, ref_logp, kl_type), mask, loss_agg_mode)


def entropy_loss(entropy, mask, loss_agg_mode="token-mean") -> Array:
    return agg_loss(entropy, mask, loss_agg_mode)


def value_loss_terms(vpreds: Array, old_values: Array, returns: Array, cliprange_value: float):
    """Per-token clipped value loss 0.5 * max((v - R)^2, (clip(v) - R)^2) and the clip indicator."""
    vclip = jnp.clip(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    l1 = jnp.square(vpreds - returns)
    l2 = jnp.square(vclip - returns)
    return 0.5 * jnp.maximum(l1, l2), (l2 > l1).astype(jnp.float32)


def value_loss(vpreds, old_values, returns, mask, cliprange_value=0.5, loss_agg_mode="token-mean"):
    """veRL ``compute_value_loss``: (aggregated loss, clip fraction)."""
    per_tok, clipped = value_loss_terms(vpreds, old_values, returns, cliprange_value)
    return agg_loss(per_tok, mask, loss_agg_mode), masked_mean(clipped, mask)


def explained_variance(returns: Array, values: Array, mask: Array) -> Array:
    """1 - Var[R - V] / Var[R] over masked tokens (NaN-free: 0 when Var[R] == 0)."""
    m = mask.astype(jnp.float32)

    def var(x):
        mu = masked_mean(x, m)
        return masked_mean(jnp.square(x - mu), m)

    vr = var(returns)
    return jnp.where(vr > 0, 1.0 - var(returns - values) / jnp.where(vr > 0, vr, 1.0), 0.0)
