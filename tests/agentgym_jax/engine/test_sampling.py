"""Sampling statistics: empirical frequencies vs the top-k / top-p filtered distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentgym_jax.engine.sampling import SamplingParams, categorical, first_argmax, sample


def reference_probs(logits, temperature, top_p, top_k):
    """Loop-based numpy reference: temperature, top-k, then top-p on the renormalised top-k."""
    z = np.asarray(logits, np.float64) / temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    keep, mass = [], 0.0
    for i, pi in zip(order, p):
        if mass >= top_p:
            break
        keep.append(i)
        mass += pi
    out = np.zeros(len(z))
    q = np.exp(z[keep] - z[keep].max())
    out[keep] = q / q.sum()
    return out


def draw(logits, n, temperature, top_p, top_k, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    keys = jax.random.split(jax.random.key(seed), n)
    tok, lp, slp = jax.jit(sample)(logits, keys, SamplingParams.full(n, temperature, top_p, top_k))
    return np.asarray(tok), np.asarray(lp), np.asarray(slp)


LOGITS = np.random.default_rng(0).normal(0, 1.5, 24)


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 5), (1.0, 0.6, 0), (1.3, 0.8, 8)]
)
def test_frequencies_match_filtered_distribution(temperature, top_p, top_k):
    n = 20000
    tok, lp, slp = draw(LOGITS, n, temperature, top_p, top_k)
    ref = reference_probs(LOGITS, temperature, top_p, top_k)
    assert np.all(ref[tok] > 0), "sampled a filtered-out token"
    support = ref > 0
    counts = np.bincount(tok, minlength=len(LOGITS))[support]
    expected = n * ref[support]
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # ~5 sigma above the chi-square mean: fails on a wrong distribution, not on noise.
    assert chi2 < dof + 5 * np.sqrt(2 * max(dof, 1)) + 5, (chi2, dof)
    # sampler log-probs are the filtered distribution's; logprobs the full tempered softmax.
    np.testing.assert_allclose(slp, np.log(ref[tok]), atol=1e-5)
    full = np.asarray(jax.nn.log_softmax(jnp.asarray(LOGITS, jnp.float32) / temperature))
    np.testing.assert_allclose(lp, full[tok], atol=1e-5)


def test_greedy_and_determinism():
    tok, lp, slp = draw(LOGITS, 8, 0.0, 1.0, 0)
    assert np.all(tok == np.argmax(LOGITS)) and np.all(slp == 0)
    np.testing.assert_allclose(
        lp, np.asarray(jax.nn.log_softmax(jnp.asarray(LOGITS)))[tok], atol=1e-6
    )
    a = draw(LOGITS, 64, 1.0, 0.9, 0, seed=3)[0]
    b = draw(LOGITS, 64, 1.0, 0.9, 0, seed=3)[0]
    c = draw(LOGITS, 64, 1.0, 0.9, 0, seed=4)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_per_slot_settings_mix_in_one_batch():
    n = 4000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (2 * n, len(LOGITS)))
    keys = jax.random.split(jax.random.key(1), 2 * n)
    params = SamplingParams(
        temperature=jnp.concatenate([jnp.zeros(n), jnp.ones(n)]),
        top_p=jnp.ones(2 * n),
        top_k=jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.full((n,), 2, jnp.int32)]),
    )
    tok = np.asarray(jax.jit(sample)(logits, keys, params)[0])
    assert np.all(tok[:n] == np.argmax(LOGITS))
    top2 = set(np.argsort(-LOGITS)[:2].tolist())
    assert set(tok[n:].tolist()) == top2


def test_first_argmax_matches_numpy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(64, 300)).astype(np.float32)  # many tied maxima
    x[3] = -np.inf
    x[4, :] = -np.inf
    x[4, 7] = 2.0
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, -1))


def test_categorical_draws_what_jax_random_categorical_draws():
    keys = jax.random.split(jax.random.key(3), 32)
    logits = jax.random.normal(jax.random.key(4), (32, 1000)) * 3
    logits = logits.at[:, 500:].set(-jnp.inf)  # filtered tail, as top-k leaves it
    want = jax.vmap(jax.random.categorical)(keys, logits)
    np.testing.assert_array_equal(np.asarray(jax.jit(categorical)(keys, logits)), np.asarray(want))
