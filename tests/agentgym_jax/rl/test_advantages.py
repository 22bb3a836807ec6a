"""Advantage estimators against loop-based numpy references (multi-turn masks, padding)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from agentgym_jax.rl import advantages as A
from agentgym_jax.rl.config import AlgorithmConfig, KLCtrlConfig
from tests.helpers.rl_toy import make_batch, multiturn_masks

ATOL = 1e-5


# ------------------------------------------------------------------ numpy references (loops)


def np_credit(rewards, mask):
    """Move every reward on a mask-0 token onto the closest preceding model token."""
    out = np.zeros_like(rewards, dtype=np.float64)
    b, t = rewards.shape
    for i in range(b):
        last = -1
        for j in range(t):
            if mask[i, j]:
                last = j
                out[i, j] += rewards[i, j]
            elif last >= 0:
                out[i, last] += rewards[i, j]
    return out


def np_gae(rewards, values, mask, gamma, lam):
    r = np_credit(rewards, mask)
    adv = np.zeros_like(r)
    for i in range(r.shape[0]):
        idx = [j for j in range(r.shape[1]) if mask[i, j]]
        running = 0.0
        for k in reversed(range(len(idx))):
            j = idx[k]
            v_next = values[i, idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r[i, j] + gamma * v_next - values[i, j]
            running = delta + gamma * lam * running
            adv[i, j] = running
    ret = (adv + values) * mask
    return adv, ret


def np_whiten(x, mask):
    vals = [x[i, j] for i in range(x.shape[0]) for j in range(x.shape[1]) if mask[i, j]]
    mean, var = np.mean(vals), np.var(vals, ddof=1)
    return (x - mean) / np.sqrt(var + 1e-8) * mask


def np_group_stats(scores, gids, valid=None):
    """Group mean, unbiased std and size over the valid members of each row's group."""
    valid = np.ones(len(scores)) if valid is None else valid
    means, stds, sizes = [], [], []
    for i in range(len(scores)):
        members = [scores[j] for j in range(len(scores)) if gids[j] == gids[i] and valid[j]]
        sizes.append(len(members))
        means.append(np.mean(members) if members else 0.0)
        stds.append(np.std(members, ddof=1) if len(members) > 1 else 0.0)
    return np.array(means), np.array(stds), np.array(sizes)


def np_grpo(scores, gids, mask, norm_by_std=True, eps=1e-6, valid=None):
    valid = np.ones(len(scores)) if valid is None else valid
    out = np.zeros(mask.shape)
    means, stds, sizes = np_group_stats(scores, gids, valid)
    for i in range(len(scores)):
        if sizes[i] < 2 or not valid[i]:
            continue
        a = scores[i] - means[i]
        if norm_by_std:
            a /= stds[i] + eps
        out[i] = a * mask[i]
    return out


def np_rloo(scores, gids, mask, valid=None):
    valid = np.ones(len(scores)) if valid is None else valid
    out = np.zeros(mask.shape)
    for i in range(len(scores)):
        others = [
            scores[j] for j in range(len(scores)) if gids[j] == gids[i] and j != i and valid[j]
        ]
        if others and valid[i]:
            out[i] = (scores[i] - np.mean(others)) * mask[i]
    return out


def np_rpp_baseline(scores, gids, mask, valid=None):
    valid = np.ones(len(scores)) if valid is None else valid
    means, _, sizes = np_group_stats(scores, gids, valid)
    m = mask * np.asarray(valid, np.float64)[:, None]
    centred = np.zeros(mask.shape)
    for i in range(len(scores)):
        if valid[i]:
            centred[i] = (scores[i] - means[i] if sizes[i] > 1 else scores[i]) * m[i]
    return np_whiten(centred, m)


# ------------------------------------------------------------------ fixtures


def _data(seed, b=6, t=20):
    rng = np.random.default_rng(seed)
    attn, mask = multiturn_masks(rng, b, t)
    rewards = (rng.normal(size=(b, t)) * (rng.random((b, t)) < 0.3)).astype(np.float32) * attn
    values = rng.normal(size=(b, t)).astype(np.float32)
    return rewards, values, mask.astype(np.float32)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.99, 0.5)])
def test_gae_matches_loop_reference(gamma, lam):
    rewards, values, mask = _data(1)
    adv, ret = A.gae(rewards, values, mask, gamma, lam, whiten=False)
    ref_adv, ref_ret = np_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=ATOL)
    np.testing.assert_allclose(ret, ref_ret, atol=ATOL)
    adv_w, _ = jax.jit(A.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv_w, np_whiten(ref_adv, mask), atol=1e-4)


def test_env_turn_is_not_a_time_step():
    # One episode: model token, 3 env tokens, model token. With gamma < 1 the first token's
    # advantage discounts the second's value once, not four times.
    mask = np.array([[1, 0, 0, 0, 1]], np.float32)
    values = np.array([[0.5, 9.0, 9.0, 9.0, 2.0]], np.float32)
    rewards = np.zeros((1, 5), np.float32)
    gamma = 0.5
    adv, _ = A.gae(rewards, values, mask, gamma, 1.0, whiten=False)
    delta1 = 0.0 - 2.0  # last model token: r 0, bootstrap 0
    delta0 = 0.0 + gamma * 2.0 - 0.5
    np.testing.assert_allclose(adv[0], [delta0 + gamma * delta1, 0, 0, 0, delta1], atol=ATOL)


def test_outcome_reward_on_env_token_is_credited():
    rewards, values, mask = _data(2)
    rewards = np.zeros_like(rewards)
    last_model = np.array([np.nonzero(m)[0].max() for m in mask])
    rewards[:, -1] = 1.0  # outcome on the final (env or padding) token, after the last model token
    assert not mask[:, -1].all()
    adv, ret = A.gae(rewards, values, mask, 1.0, 1.0, whiten=False)
    ref, _ = np_gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(adv, ref, atol=ATOL)
    rows = np.arange(len(mask))
    # The last model token gets the reward: delta = 1 - V.
    np.testing.assert_allclose(adv[rows, last_model], 1.0 - values[rows, last_model], atol=ATOL)
    rpp_ret = A.discounted_returns(rewards, mask, 1.0)
    np.testing.assert_allclose(rpp_ret, mask, atol=ATOL)  # every model token sees the outcome


def test_reward_in_prompt_is_ignored():
    mask = np.array([[0, 0, 1, 1, 0]], np.float32)
    rewards = np.array([[5.0, 0, 0, 1.0, 0]], np.float32)
    ret = A.discounted_returns(rewards, mask, 1.0)
    np.testing.assert_allclose(ret, [[0, 0, 1, 1, 0]], atol=ATOL)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_loop_reference(gamma):
    rewards, _, mask = _data(3)
    adv, ret = A.reinforce_pp(rewards, mask, gamma)
    ref_ret, _ = np_gae(rewards, np.zeros_like(rewards), mask, gamma, 1.0)
    np.testing.assert_allclose(ret, ref_ret, atol=ATOL)
    np.testing.assert_allclose(adv, np_whiten(ref_ret, mask), atol=1e-4)


def _outcome_data(seed):
    rng = np.random.default_rng(seed)
    b, t = 9, 12
    _, mask = multiturn_masks(rng, b, t)
    scores = rng.normal(size=b).astype(np.float32)
    gids = np.array([7, 7, 7, 3, 3, 42, 7, 3, 11], np.int32)  # sizes 4, 3, 1, 1; ids unordered
    return scores, gids, mask.astype(np.float32)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_loop_reference(norm_by_std):
    scores, gids, mask = _outcome_data(4)
    adv, ret = A.grpo(scores, gids, mask, norm_by_std=norm_by_std)
    np.testing.assert_allclose(adv, np_grpo(scores, gids, mask, norm_by_std), atol=1e-4)
    np.testing.assert_allclose(ret, adv)
    assert np.all(np.asarray(adv)[gids == 42] == 0)  # group of size 1


def test_grpo_constant_group_gives_zero():
    mask = np.ones((4, 3), np.float32)
    adv, _ = A.grpo(np.array([1.0, 1.0, 0.0, 1.0], np.float32), np.array([0, 0, 1, 1]), mask)
    np.testing.assert_allclose(adv[:2], 0.0, atol=ATOL)
    assert np.all(np.asarray(adv[2]) < 0) and np.all(np.asarray(adv[3]) > 0)


def test_rloo_matches_loop_reference():
    scores, gids, mask = _outcome_data(5)
    adv, _ = A.rloo(scores, gids, mask)
    np.testing.assert_allclose(adv, np_rloo(scores, gids, mask), atol=1e-5)


def test_reinforce_pp_baseline_matches_loop_reference():
    scores, gids, mask = _outcome_data(6)
    adv, _ = A.reinforce_pp_baseline(scores, gids, mask)
    np.testing.assert_allclose(adv, np_rpp_baseline(scores, gids, mask), atol=1e-4)


# ------------------------------------------------------------------ env failures (valid mask)

# gids 7 7 7 3 3 42 7 3 11: group 7 keeps 2 of 4 valid, group 3 keeps 1 of 3 (size < 2), the
# singleton 42 is invalid, 11 is a valid singleton.
VALID = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], np.int32)


@pytest.mark.parametrize("est", ["grpo", "drgrpo", "rloo", "reinforce_plus_plus_baseline"])
def test_outcome_estimators_with_valid_match_loop_reference(est):
    scores, gids, mask = _outcome_data(10)
    batch = {"scores": scores, "group_ids": gids, "loss_mask": mask, "valid": VALID}
    adv = np.asarray(A.compute_advantages(est, batch)["advantages"])
    if est in ("grpo", "drgrpo"):
        ref = np_grpo(scores, gids, mask, est == "grpo", valid=VALID)
    elif est == "rloo":
        ref = np_rloo(scores, gids, mask, valid=VALID)
    else:
        ref = np_rpp_baseline(scores, gids, mask, valid=VALID)
    np.testing.assert_allclose(adv, ref, atol=1e-4)
    assert np.all(adv[VALID == 0] == 0)
    if est != "reinforce_plus_plus_baseline":  # group 3 has one valid member: no signal
        assert np.all(adv[gids == 3] == 0)
    # Scores of invalid rows do not matter.
    moved = dict(batch, scores=np.where(VALID > 0, scores, 100.0).astype(np.float32))
    np.testing.assert_allclose(A.compute_advantages(est, moved)["advantages"], adv, atol=1e-5)
    # No `valid`: all valid.
    ones = dict(batch, valid=np.ones_like(VALID))
    no_key = {k: v for k, v in batch.items() if k != "valid"}
    np.testing.assert_allclose(
        A.compute_advantages(est, ones)["advantages"],
        A.compute_advantages(est, no_key)["advantages"],
        atol=1e-6,
    )


@pytest.mark.parametrize("est", ["gae", "reinforce_plus_plus"])
def test_temporal_estimators_skip_invalid_rows(est):
    rewards, values, mask = _data(11, b=6)
    valid = np.array([1, 0, 1, 1, 0, 1], np.int32)
    batch = {"rewards": rewards, "values": values, "loss_mask": mask, "valid": valid}
    out = A.compute_advantages(est, batch, {"gamma": 0.9, "lam": 0.95})
    m = mask * valid[:, None]  # whitening over the valid rows' tokens only
    if est == "gae":
        ref, ref_ret = np_gae(rewards, values, m, 0.9, 0.95)
    else:
        ref_ret, _ = np_gae(rewards, np.zeros_like(rewards), m, 0.9, 1.0)
        ref = ref_ret
    np.testing.assert_allclose(out["returns"], ref_ret, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], np_whiten(ref, m), atol=1e-4)


def _episode(uid, group, score, error=None, truncated=None, n_model=3):
    from agentgym_jax.rollout import Episode

    tokens = list(range(1, 4 + n_model + 2))  # prompt 4, model turn, env reply 2
    lmask = [0] * 4 + [1] * n_model + [0, 0]
    return Episode(
        uid=uid,
        task_id=group,
        group=group,
        tokens=tokens,
        loss_mask=lmask,
        logprobs=[-0.5 * x for x in lmask],
        score=score,
        success=score > 0,
        error=error,
        truncated=truncated,
    )


def test_to_batch_valid_flags_env_failures_only():
    from agentgym_jax.rollout import to_batch

    eps = [
        _episode(0, 0, 1.0),
        _episode(1, 0, 0.0, error="worker crashed"),
        _episode(2, 0, 0.0, error="timeout", truncated="horizon"),  # truncated: still usable
        _episode(3, 0, 0.0, truncated="prompt", n_model=0),
    ]
    b = to_batch(eps, pad_multiple=16)
    np.testing.assert_array_equal(b["valid"], [1, 0, 1, 1])
    assert b["valid"].shape == (4,)
    np.testing.assert_array_equal(b["loss_mask"].sum(1), [3, 0, 3, 0])
    assert b["rewards"][1].sum() == 0


@pytest.mark.parametrize("est", ["grpo", "rloo"])
def test_failures_in_an_all_success_group_leave_advantage_zero(est):
    """Group 0: two successes and two env failures (score 0). The failures are not low scores:
    every valid episode succeeded, so nobody in the group is pushed up or down."""
    from agentgym_jax.rollout import to_batch

    eps = [
        _episode(0, 0, 1.0),
        _episode(1, 0, 0.0, error="worker crashed"),
        _episode(2, 0, 1.0),
        _episode(3, 0, 0.0, error="protocol error"),
        _episode(4, 1, 1.0),  # group 1: a real success / failure contrast
        _episode(5, 1, 0.0),
    ]
    batch = to_batch(eps, pad_multiple=16)
    adv = np.asarray(A.compute_advantages(est, batch)["advantages"])
    np.testing.assert_allclose(adv[:4], 0.0, atol=1e-6)
    assert np.all(adv[4][batch["loss_mask"][4] > 0] > 0)
    assert np.all(adv[5][batch["loss_mask"][5] > 0] < 0)
    # Without the valid mask the failures would count as zero scores and push the successes up.
    no_valid = {k: v for k, v in batch.items() if k != "valid"}
    assert np.all(np.asarray(A.compute_advantages(est, no_valid)["advantages"])[0, 4:7] > 0)


def np_kl(logp, ref, kind):
    out = np.zeros_like(logp, dtype=np.float64)
    for idx in np.ndindex(logp.shape):
        d = float(logp[idx]) - float(ref[idx])
        if kind == "kl":
            out[idx] = d
        elif kind == "abs":
            out[idx] = abs(d)
        elif kind == "mse":
            out[idx] = 0.5 * d * d
        else:
            out[idx] = min(max(np.exp(-d) + d - 1.0, -10.0), 10.0)
    return out


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "low_var_kl"])
def test_kl_in_reward(kind):
    rng = np.random.default_rng(7)
    rewards, _, mask = _data(7)
    logp = rng.normal(size=mask.shape).astype(np.float32) - 2
    ref = logp + rng.normal(size=mask.shape).astype(np.float32) * 1.5
    ref[0, :] -= 15.0  # k3 clamp region
    new_r, seq_kl = A.kl_in_reward(rewards, logp, ref, mask, 0.1, kind)
    kld = np_kl(logp, ref, kind) * mask
    np.testing.assert_allclose(new_r, rewards - 0.1 * kld, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(seq_kl, kld.sum(1) / mask.sum(1), atol=1e-4, rtol=1e-5)


def test_registry_and_compute_advantages():
    batch = make_batch(8, b=8, t=16)
    assert set(A.ADV_ESTIMATORS) >= {
        "gae",
        "grpo",
        "drgrpo",
        "rloo",
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
    }
    m = batch["loss_mask"]
    out = A.compute_advantages("grpo", batch, AlgorithmConfig())
    np.testing.assert_allclose(
        out["advantages"], np_grpo(batch["scores"], batch["group_ids"], m), atol=1e-4
    )
    out = A.compute_advantages("drgrpo", batch, {"norm_adv_by_std_in_grpo": True})
    np.testing.assert_allclose(
        out["advantages"], np_grpo(batch["scores"], batch["group_ids"], m, False), atol=1e-4
    )
    out = A.compute_advantages(
        "gae", batch, AlgorithmConfig(adv_estimator="gae", gamma=0.9, lam=0.8)
    )
    ref, ref_ret = np_gae(batch["rewards"], batch["values"], m, 0.9, 0.8)
    np.testing.assert_allclose(out["returns"], ref_ret, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], np_whiten(ref, m), atol=1e-4)
    # Outcome estimators fall back to sum(rewards) without scores.
    no_scores = {k: v for k, v in batch.items() if k != "scores"}
    a1 = A.compute_advantages("rloo", no_scores)["advantages"]
    np.testing.assert_allclose(
        a1, np_rloo(batch["rewards"].sum(1), batch["group_ids"], m), atol=1e-5
    )
    with pytest.raises(ValueError, match="adv_estimator"):
        A.compute_advantages("ppo2", batch)
    with pytest.raises(KeyError, match="values"):
        A.compute_advantages("gae", {k: v for k, v in batch.items() if k != "values"})


def test_compute_advantages_kl_in_reward_changes_scores():
    batch = make_batch(9, b=8, t=16)
    cfg = AlgorithmConfig(use_kl_in_reward=True, kl_ctrl=KLCtrlConfig(kl_coef=0.5), kl_penalty="kl")
    out = A.compute_advantages("grpo", batch, cfg)
    kl = np_kl(batch["old_logprobs"], batch["ref_logprobs"], "kl") * batch["loss_mask"]
    eff = batch["scores"] - 0.5 * kl.sum(1)
    np.testing.assert_allclose(
        out["advantages"], np_grpo(eff, batch["group_ids"], batch["loss_mask"]), atol=1e-4
    )
    assert out["kl_in_reward"].shape == (8,)


def test_kl_controllers():
    fixed = A.FixedKLController(0.2)
    fixed.update(5.0, 100)
    assert fixed.value == 0.2
    c = A.AdaptiveKLController(0.1, target_kl=1.0, horizon=100)
    c.update(3.0, 10)  # error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    c.update(0.9, 10)  # error -0.1
    assert c.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))


def test_kl_controller_from_config_and_coef_override():
    c = A.make_kl_controller(KLCtrlConfig(type="adaptive", kl_coef=0.3, target_kl=2.0, horizon=50))
    assert isinstance(c, A.AdaptiveKLController) and (c.value, c.target, c.horizon) == (
        0.3,
        2.0,
        50,
    )
    assert A.make_kl_controller(KLCtrlConfig(kl_coef=0.05)).value == 0.05
    batch = make_batch(9, b=8, t=16)
    cfg = AlgorithmConfig(use_kl_in_reward=True, kl_ctrl=KLCtrlConfig(kl_coef=0.5))
    # The controller's value, passed at call time, wins over the config's initial coefficient.
    moved = A.compute_advantages("grpo", batch, cfg, kl_coef=0.25)
    same = A.compute_advantages(
        "grpo", batch, AlgorithmConfig(use_kl_in_reward=True, kl_ctrl=KLCtrlConfig(kl_coef=0.25))
    )
    np.testing.assert_allclose(moved["advantages"], same["advantages"], atol=1e-6)
    with pytest.raises(ValueError, match="kl_ctrl.type"):
        KLCtrlConfig(type="pid")
