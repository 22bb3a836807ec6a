"""Losses against numpy loops; PPO gradient identities and clip boundaries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentgym_jax.rl import losses as L
from tests.helpers.rl_toy import multiturn_masks


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_logprobs_and_entropy_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
    logits[0, 0] += 1e4  # large offsets must not overflow
    logits[1, 2, 3] = 80.0
    targets = rng.integers(0, 11, (3, 5))
    lp = np.asarray(L.token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    ref = np_log_softmax(logits)
    for i, j in np.ndindex(3, 5):
        assert lp[i, j] == pytest.approx(ref[i, j, targets[i, j]], abs=1e-4)
    ent = np.asarray(L.entropy_from_logits(jnp.asarray(logits)))
    ref_ent = -(np.exp(ref) * ref).sum(-1)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-4)
    assert np.isfinite(ent).all()


def test_sequence_logprobs_shift():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    ids = rng.integers(0, 9, (2, 6)).astype(np.int32)
    lp, ent = L.sequence_logprobs(jnp.asarray(logits), jnp.asarray(ids), with_entropy=True)
    ref = np_log_softmax(logits)
    for b in range(2):
        assert lp[b, 0] == 0 and ent[b, 0] == 0
        for t in range(1, 6):  # token t is predicted by the logits at t - 1
            assert lp[b, t] == pytest.approx(ref[b, t - 1, ids[b, t]], abs=1e-5)
            assert ent[b, t] == pytest.approx(
                -(np.exp(ref[b, t - 1]) * ref[b, t - 1]).sum(), abs=1e-5
            )


def np_agg(loss, mask, mode):
    """veRL 0.9 agg_loss: the seq-mean modes average over rows with at least one loss token."""
    if mode == "token-mean":
        n = mask.sum()
        return sum(loss[i, j] for i, j in np.ndindex(mask.shape) if mask[i, j]) / max(n, 1)
    seqs = []
    for i in range(mask.shape[0]):
        n = mask[i].sum()
        if not n:
            continue
        s = sum(loss[i, j] for j in range(mask.shape[1]) if mask[i, j])
        seqs.append(s if mode == "seq-mean-token-sum" else s / n)
    return np.mean(seqs) if seqs else 0.0


@pytest.mark.parametrize("mode", L.LOSS_AGG_MODES)
def test_agg_loss_and_split_weights(mode):
    rng = np.random.default_rng(2)
    _, mask = multiturn_masks(rng, 6, 14)
    mask[3] = 0  # an all-masked row
    loss = rng.normal(size=mask.shape).astype(np.float32)
    got = float(L.agg_loss(jnp.asarray(loss), jnp.asarray(mask), mode))
    assert got == pytest.approx(np_agg(loss, mask, mode), rel=1e-5, abs=1e-6)
    # Micro-batch weights with mini-batch normalisers sum back to the full aggregate.
    n_tok, n_seq = jnp.sum(mask), L.seq_count(jnp.asarray(mask))
    assert float(n_seq) == 5
    parts = [
        jnp.sum(loss[s] * L.agg_weights(jnp.asarray(mask[s]), mode, n_tok, n_seq))
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert float(sum(parts)) == pytest.approx(got, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        L.agg_loss(loss, mask, "sum")


@pytest.mark.parametrize("mode", L.LOSS_AGG_MODES)
def test_agg_with_empty_rows_equals_agg_without_them(mode):
    """Failed or fully truncated episodes (no loss tokens) do not shrink the others' loss."""
    rng = np.random.default_rng(12)
    _, mask = multiturn_masks(rng, 8, 16)
    empty = np.array([0, 1, 0, 0, 1, 1, 0, 0], bool)
    mask[empty] = 0
    loss = rng.normal(size=mask.shape).astype(np.float32) * 3
    got = float(L.agg_loss(jnp.asarray(loss), jnp.asarray(mask), mode))
    assert got == pytest.approx(np_agg(loss, mask, mode), rel=1e-5, abs=1e-6)
    kept = float(L.agg_loss(jnp.asarray(loss[~empty]), jnp.asarray(mask[~empty]), mode))
    assert got == pytest.approx(kept, rel=1e-5, abs=1e-6)
    # Micro-batches of two rows (one entirely empty) with the full batch's normalisers.
    n_tok, n_seq = jnp.sum(mask), L.seq_count(jnp.asarray(mask))
    parts = [
        float(jnp.sum(loss[k : k + 2] * L.agg_weights(mask[k : k + 2], mode, n_tok, n_seq)))
        for k in range(0, 8, 2)
    ]
    assert sum(parts) == pytest.approx(got, rel=1e-5, abs=1e-6)
    # All rows empty: 0, not NaN.
    none = float(L.agg_loss(jnp.asarray(loss), jnp.zeros_like(jnp.asarray(mask)), mode))
    assert none == 0.0


def _pg_setup(seed=3):
    rng = np.random.default_rng(seed)
    b, t, v = 4, 7, 13
    logits = jnp.asarray(rng.normal(size=(b, t, v)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    _, mask = multiturn_masks(rng, b, t)
    adv = jnp.asarray(rng.normal(size=(b, t)).astype(np.float32))
    return logits, targets, jnp.asarray(mask, jnp.float32), adv


@pytest.mark.parametrize("mode", L.LOSS_AGG_MODES)
def test_ppo_gradient_at_ratio_one_is_vanilla_pg(mode):
    logits, targets, mask, adv = _pg_setup()
    old = jax.lax.stop_gradient(L.token_logprobs(logits, targets))

    def ppo(lg):
        return L.policy_loss(L.token_logprobs(lg, targets), old, adv, mask, mode, 0.2, 0.28, 3.0)[0]

    def vanilla(lg):
        return L.agg_loss(-adv * L.token_logprobs(lg, targets), mask, mode)

    g1, g2 = jax.grad(ppo)(logits), jax.grad(vanilla)(logits)
    assert float(jnp.abs(g2).max()) > 1e-3
    np.testing.assert_allclose(g1, g2, atol=1e-6)


def _surrogate(ratio, a, low, high, c):
    logp = jnp.log(jnp.asarray([ratio], jnp.float32))
    adv = jnp.asarray([a], jnp.float32)

    def f(lp):
        pg, clipped, lower, _ = L.policy_loss_terms(lp, jnp.zeros(1), adv, low, high, c)
        return pg[0], (clipped[0], lower[0])

    (val, (clipped, lower)), g = jax.value_and_grad(f, has_aux=True)(logp)
    return float(val), float(g[0]), float(clipped), float(lower)


@pytest.mark.parametrize("low,high", [(0.2, 0.2), (0.2, 0.28)])
def test_clip_bounds(low, high):
    d = 1e-3
    # Positive advantage: gradient flows up to 1 + high, vanishes above.
    _, g, c, _ = _surrogate(1 + high - d, 1.0, low, high, 3.0)
    assert g != 0 and c == 0
    v, g, c, _ = _surrogate(1 + high + d, 1.0, low, high, 3.0)
    assert g == 0 and c == 1 and v == pytest.approx(-(1 + high), rel=1e-6)
    # Positive advantage below 1 - low is not clipped (pessimistic bound).
    _, g, c, _ = _surrogate(1 - low - d, 1.0, low, high, 3.0)
    assert g != 0 and c == 0
    # Negative advantage: clipped below 1 - low, free above (until the dual clip).
    _, g, c, _ = _surrogate(1 - low + d, -1.0, low, high, 3.0)
    assert g != 0 and c == 0
    v, g, c, _ = _surrogate(1 - low - d, -1.0, low, high, 3.0)
    assert g == 0 and c == 1 and v == pytest.approx(1 - low, rel=1e-6)


def test_dual_clip():
    v, g, c, lower = _surrogate(3.5, -2.0, 0.2, 0.2, 3.0)
    assert g == 0 and lower == 1 and v == pytest.approx(2.0 * 3.0)
    v, g, c, lower = _surrogate(2.5, -2.0, 0.2, 0.2, 3.0)
    assert g != 0 and lower == 0 and v == pytest.approx(2.0 * 2.5, rel=1e-6)
    v, g, c, lower = _surrogate(3.5, -2.0, 0.2, 0.2, None)  # dual clip off
    assert g != 0 and lower == 0 and v == pytest.approx(2.0 * 3.5, rel=1e-6)


def test_policy_loss_metrics_match_loops():
    rng = np.random.default_rng(4)
    b, t = 5, 9
    _, mask = multiturn_masks(rng, b, t)
    old = rng.normal(size=(b, t)).astype(np.float32)
    logp = old + rng.normal(size=(b, t)).astype(np.float32) * 0.4
    adv = rng.normal(size=(b, t)).astype(np.float32)
    loss, m = L.policy_loss(logp, old, adv, mask, "token-mean", 0.2, 0.3, 3.0)
    per, clipped, lower, kls = [], [], [], []
    for i, j in np.ndindex(b, t):
        if not mask[i, j]:
            continue
        r = float(np.exp(np.float64(logp[i, j]) - old[i, j]))
        l1, l2 = -adv[i, j] * r, -adv[i, j] * min(max(r, 0.8), 1.3)
        per_tok = max(l1, l2)
        if adv[i, j] < 0:
            lower.append(float(per_tok > -adv[i, j] * 3.0))
            per_tok = min(per_tok, -adv[i, j] * 3.0)
        else:
            lower.append(0.0)
        per.append(per_tok)
        clipped.append(float(l2 > l1))
        kls.append(old[i, j] - logp[i, j])
    assert float(loss) == pytest.approx(np.mean(per), rel=1e-4)
    assert float(m["pg_clipfrac"]) == pytest.approx(np.mean(clipped), abs=1e-6)
    assert float(m["pg_clipfrac_lower"]) == pytest.approx(np.mean(lower), abs=1e-6)
    assert float(m["ppo_kl"]) == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "low_var_kl"])
def test_kl_loss_types(kind):
    rng = np.random.default_rng(5)
    logp = rng.normal(size=(3, 6)).astype(np.float32) - 3
    ref = logp + rng.normal(size=(3, 6)).astype(np.float32)
    ref[0, 0] = logp[0, 0] + 30.0  # k3 would be huge: clamped to 10
    mask = np.ones((3, 6), np.float32)
    got = float(L.kl_loss(logp, ref, mask, kind))
    vals = []
    for i, j in np.ndindex(3, 6):
        d = float(logp[i, j]) - float(ref[i, j])
        vals.append(
            {
                "kl": d,
                "abs": abs(d),
                "mse": 0.5 * d * d,
                "low_var_kl": min(max(np.exp(-min(max(d, -20), 20)) + d - 1, -10), 10),
            }[kind]
        )
    assert got == pytest.approx(np.mean(vals), rel=1e-4)
    if kind == "low_var_kl":
        assert float(L.kl_loss(logp, logp, mask, kind)) == pytest.approx(0.0, abs=1e-7)


def test_value_loss_and_explained_variance():
    rng = np.random.default_rng(6)
    b, t = 4, 8
    _, mask = multiturn_masks(rng, b, t)
    v_old = rng.normal(size=(b, t)).astype(np.float32)
    vpred = v_old + rng.normal(size=(b, t)).astype(np.float32)
    ret = rng.normal(size=(b, t)).astype(np.float32)
    loss, frac = L.value_loss(vpred, v_old, ret, mask, cliprange_value=0.5)
    per, cl = [], []
    for i, j in np.ndindex(b, t):
        if mask[i, j]:
            vc = min(max(vpred[i, j], v_old[i, j] - 0.5), v_old[i, j] + 0.5)
            l1, l2 = (vpred[i, j] - ret[i, j]) ** 2, (vc - ret[i, j]) ** 2
            per.append(0.5 * max(l1, l2))
            cl.append(float(l2 > l1))
    assert float(loss) == pytest.approx(np.mean(per), rel=1e-5)
    assert float(frac) == pytest.approx(np.mean(cl), abs=1e-6)
    r = np.array([ret[i, j] for i, j in np.ndindex(b, t) if mask[i, j]])
    v = np.array([vpred[i, j] for i, j in np.ndindex(b, t) if mask[i, j]])
    ev = float(L.explained_variance(ret, vpred, mask))
    assert ev == pytest.approx(1 - np.var(r - v) / np.var(r), rel=1e-4)
    assert float(L.explained_variance(ret, ret, mask)) == pytest.approx(1.0)


def test_chunked_logprobs_match_full_values_and_grads():
    """The LM head in chunks (model.logits_chunk) gives the full pass's log-probs, entropies and
    gradients, including a length that is not a multiple of the chunk."""
    import jax

    rng = np.random.default_rng(0)
    b, t, e, v = 2, 37, 8, 50
    hidden = jnp.asarray(rng.standard_normal((b, t, e)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((e, v)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, v, (b, t)))

    def loss(w, chunk):
        lp, ent = L.chunked_sequence_logprobs(lambda h: h @ w / 0.7, hidden, ids, chunk)
        return jnp.sum(lp * jnp.arange(t)) + jnp.sum(ent), (lp, ent)

    (full, (lp_f, ent_f)), g_f = jax.value_and_grad(loss, has_aux=True)(w, 0)
    ref_lp, ref_ent = L.sequence_logprobs(hidden @ w / 0.7, ids, with_entropy=True)
    np.testing.assert_allclose(np.asarray(lp_f), np.asarray(ref_lp), atol=1e-6)
    for chunk in (8, 16, 37):
        (val, (lp, ent)), g = jax.value_and_grad(loss, has_aux=True)(w, chunk)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_f), atol=1e-5)
        np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_f), atol=1e-5)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_f), rtol=1e-4, atol=1e-4)
