"""Jitted actor / critic updates: exactness of micro-batching, sharding, and learning signal."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from agentgym_jax import sharding as sh
from agentgym_jax.rl import losses as L
from agentgym_jax.rl import update as U
from agentgym_jax.rl.config import ActorConfig, AlgorithmConfig, CriticConfig
from tests.helpers.rl_toy import make_batch, tiny_model


def one_device_mesh():
    return sh.make_mesh(sh.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def eight_device_mesh():
    return sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])


def host(tree):
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(host(a), host(b)))


def run_actor(cfg, mesh, batch, seed=0, steps=1, rng=0):
    state = U.init_train_state(tiny_model(seed), U.make_optimizer(cfg), mesh)
    upd = U.make_actor_update(cfg, mesh, state)
    metrics = []
    for i in range(steps):
        state, m = upd(state, batch, jax.random.key(rng + i))
        metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


_RUNS = {}


def cached_run(cfg, n_devices, batch_seed):
    """One update of the tiny model (compiles are the slow part: tests share identical runs)."""
    key = (repr(cfg), n_devices, batch_seed)
    if key not in _RUNS:
        mesh = one_device_mesh() if n_devices == 1 else eight_device_mesh()
        _RUNS[key] = run_actor(cfg, mesh, make_batch(batch_seed, b=8, t=24))
    return _RUNS[key]


# Adam's eps is raised so that float-rounding noise on near-zero gradient entries is not
# normalised up to a full lr-sized step (that would test Adam, not our accumulation).
BASE = ActorConfig(
    lr=1e-2,
    weight_decay=0.1,
    eps=1e-4,
    ppo_mini_batch_size=4,
    ppo_epochs=2,
    entropy_coeff=0.01,
    kl_loss_coef=0.1,
    clip_ratio_high=0.28,
)


# token-mean is exercised by the critic test, seq-mean-token-sum by the hand-written step.
@pytest.mark.parametrize("mode", ["seq-mean-token-mean"])
def test_micro_batched_update_equals_full_batch(mode):
    full = dataclasses.replace(BASE, loss_agg_mode=mode, ppo_micro_batch_size=None)
    micro = dataclasses.replace(full, ppo_micro_batch_size=1)
    s_full, m_full = cached_run(full, 1, 0)
    s_micro, m_micro = cached_run(micro, 1, 0)
    moved = max_diff(s_full.params, tiny_model(0))
    assert moved > 1e-3  # the update did something
    assert max_diff(s_full.params, s_micro.params) <= 1e-5
    for k, v in m_full[0].items():
        assert m_micro[0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_update_matches_hand_written_step():
    """One mini-batch, one epoch: params equal AdamW on the plainly aggregated full-batch loss."""
    batch = make_batch(1, b=4, t=20)
    cfg = dataclasses.replace(
        BASE,
        ppo_epochs=1,
        shuffle=False,
        ppo_micro_batch_size=2,
        loss_agg_mode="seq-mean-token-sum",
        grad_clip=0.05,
    )
    mesh = one_device_mesh()
    new, metrics = run_actor(cfg, mesh, batch)

    model = tiny_model(0)
    graphdef, params = nnx.split(model)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    mask = b["loss_mask"]

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(b["input_ids"], b["attention_mask"])
        logp, ent = L.sequence_logprobs(logits, b["input_ids"], with_entropy=True)
        pg, _ = L.policy_loss(
            logp,
            b["old_logprobs"],
            b["advantages"],
            mask,
            cfg.loss_agg_mode,
            cfg.clip_ratio_low,
            cfg.clip_ratio_high,
            cfg.clip_ratio_c,
        )
        ent_l = L.agg_loss(ent, mask, cfg.loss_agg_mode)
        kl = L.kl_loss(logp, b["ref_logprobs"], mask, cfg.kl_loss_type, cfg.loss_agg_mode)
        return pg - cfg.entropy_coeff * ent_l + cfg.kl_loss_coef * kl, pg

    (_, pg), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    grads, _ = optax.clip_by_global_norm(cfg.grad_clip).update(grads, None)
    tx = optax.adamw(cfg.lr, *cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    upd, _ = tx.update(grads, tx.init(params), params)
    ref = optax.apply_updates(params, upd)
    assert max_diff(new.params, ref) <= 1e-5
    assert metrics[0]["actor/pg_loss"] == pytest.approx(float(pg), rel=1e-5)
    assert metrics[0]["actor/grad_norm"] > cfg.grad_clip  # clipping was exercised


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean"])
def test_update_with_empty_rows_equals_update_without_them(mode):
    """Rows without loss tokens (env failures, fully truncated episodes) leave the seq-mean loss,
    its gradient and the metrics as without them, also micro-batched: the sequence count is the
    mini-batch's rows with a loss token."""
    small = make_batch(6, b=4, t=20)
    order = [0, 1, None, None, 2, None, 3, None]  # micro-batches of 2: one is all empty
    empty = np.array([i is None for i in order])
    big = {
        k: np.stack([v[i] if i is not None else v[j % 4] for j, i in enumerate(order)])
        for k, v in small.items()
    }
    big["loss_mask"][empty] = 0  # tokens kept, loss mask zeroed (as to_batch does on a failure)
    cfg = dataclasses.replace(
        BASE, loss_agg_mode=mode, ppo_mini_batch_size=4, ppo_micro_batch_size=None, shuffle=False
    )
    cfg_big = dataclasses.replace(cfg, ppo_mini_batch_size=8, ppo_micro_batch_size=2)
    mesh = one_device_mesh()
    s_small, m_small = run_actor(cfg, mesh, small)
    s_big, m_big = run_actor(cfg_big, mesh, big)
    assert max_diff(s_small.params, tiny_model(0)) > 1e-3
    assert max_diff(s_small.params, s_big.params) <= 1e-5
    assert set(m_small[0]) == set(m_big[0])
    for k, v in m_small[0].items():
        assert m_big[0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_sharded_update_equals_single_device():
    cfg = dataclasses.replace(BASE, loss_agg_mode="seq-mean-token-mean")  # micro = mini = 4
    s1, m1 = cached_run(cfg, 1, 0)
    s8, m8 = cached_run(cfg, 8, 0)
    emb = s8.params["embed_tokens"][...]
    assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
    assert max_diff(s1.params, s8.params) <= 1e-5
    assert max_diff(s1.opt_state, s8.opt_state) <= 1e-5
    for k, v in m1[0].items():
        assert m8[0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_updates_raise_likelihood_of_positive_advantage_tokens():
    batch = make_batch(3, b=8, t=24)
    mesh = one_device_mesh()
    cfg = ActorConfig(
        lr=3e-3,
        warmup_steps=2,
        ppo_mini_batch_size=4,
        ppo_micro_batch_size=2,
        use_kl_loss=False,
        entropy_coeff=0.0,
    )
    state = U.init_train_state(tiny_model(1), U.make_optimizer(cfg), mesh)
    upd = U.make_actor_update(cfg, mesh, state)
    lp0, _ = U.compute_logprobs(state.graphdef, state.params, batch, micro_batch_size=4)
    sign = np.where(np.arange(8) % 2 == 0, 1.0, -1.0).astype(np.float32)[:, None]
    mask = batch["loss_mask"].astype(np.float32)
    batch = dict(batch, old_logprobs=np.asarray(lp0) * mask, advantages=sign * mask)
    lrs = []
    for i in range(4):
        state, m = upd(state, batch, jax.random.key(i))
        lrs.append(float(m["actor/lr"]))
    lp1, _ = U.compute_logprobs(state.graphdef, state.params, batch)
    delta = (np.asarray(lp1) - np.asarray(lp0)) * mask
    pos, neg = delta[sign[:, 0] > 0].sum(), delta[sign[:, 0] < 0].sum()
    assert pos > 0.1 and neg < -0.1
    np.testing.assert_allclose(lrs, [1.5e-3, 3e-3, 3e-3, 3e-3], rtol=1e-6)  # warmup per step
    assert int(state.step) == 4


def test_compute_logprobs_matches_model_and_shift():
    batch = make_batch(4, b=4, t=12)
    model = tiny_model(2)
    state = U.init_train_state(model, U.make_optimizer(BASE), one_device_mesh())
    lp, ent = U.compute_logprobs(
        state.graphdef, state.params, batch, micro_batch_size=2, temperature=0.7
    )
    logits = np.asarray(tiny_model(2)(batch["input_ids"], batch["attention_mask"])) / 0.7
    ids = batch["input_ids"]
    for b in range(4):
        assert lp[b, 0] == 0
        for t in range(1, 12):
            x = logits[b, t - 1].astype(np.float64)
            ref = x[ids[b, t]] - x.max() - np.log(np.exp(x - x.max()).sum())
            assert float(lp[b, t]) == pytest.approx(ref, abs=1e-4)


def test_critic_update_micro_equals_full_and_learns():
    batch = make_batch(5, b=8, t=20)
    mesh = one_device_mesh()
    full = CriticConfig(lr=1e-2, ppo_mini_batch_size=4, ppo_epochs=2, cliprange_value=0.5, eps=1e-4)
    micro = dataclasses.replace(full, ppo_micro_batch_size=2)
    states, losses = [], []
    for cfg in (full, micro):
        st = U.init_train_state(tiny_model(3, critic=True), U.make_optimizer(cfg), mesh)
        v0 = U.compute_values(st.graphdef, st.params, batch)
        assert np.all(np.asarray(v0)[:, 0] == 0)
        upd = U.make_critic_update(cfg, mesh, st)
        b = dict(batch, values=np.asarray(v0))
        hist = []
        for i in range(4):
            st, m = upd(st, b, jax.random.key(i))
            hist.append(float(m["critic/vf_loss"]))
            assert np.isfinite(m["critic/vf_explained_var"])
        states.append(st)
        losses.append(hist)
    assert max_diff(states[0].params, states[1].params) <= 1e-5
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert losses[0][-1] < losses[0][0]


def test_update_validation_errors():
    mesh = eight_device_mesh()
    cfg = dataclasses.replace(BASE, ppo_micro_batch_size=2)
    state = U.init_train_state(tiny_model(0), U.make_optimizer(cfg), mesh)
    with pytest.raises(ValueError, match="ppo_micro_batch_size"):
        U.make_actor_update(cfg, mesh, state)  # 2 rows cannot split over 4 data-parallel ways
    upd = U.make_actor_update(dataclasses.replace(BASE, ppo_mini_batch_size=8), mesh, state)
    batch = make_batch(0, b=12, t=8)
    with pytest.raises(ValueError, match="ppo_mini_batch_size"):
        upd(state, batch, jax.random.key(0))
    with pytest.raises(KeyError, match="ref_logprobs"):
        upd(state, {k: v for k, v in batch.items() if k != "ref_logprobs"}, jax.random.key(0))


@pytest.mark.parametrize(
    "cls,kwargs,key",
    [
        (ActorConfig, {"loss_agg_mode": "mean"}, "actor.loss_agg_mode"),
        (ActorConfig, {"kl_loss_type": "k4"}, "actor.kl_loss_type"),
        (
            ActorConfig,
            {"ppo_mini_batch_size": 8, "ppo_micro_batch_size": 3},
            "actor.ppo_micro_batch_size",
        ),
        (ActorConfig, {"clip_ratio_c": 0.5}, "actor.clip_ratio_c"),
        (ActorConfig, {"lr_schedule": "cosine"}, "actor.total_steps"),
        (ActorConfig, {"ppo_epochs": 0}, "actor.ppo_epochs"),
        (CriticConfig, {"cliprange_value": -1.0}, "critic.cliprange_value"),
        (AlgorithmConfig, {"adv_estimator": "ppo"}, "algorithm.adv_estimator"),
        (AlgorithmConfig, {"gamma": 1.5}, "algorithm.gamma"),
        (AlgorithmConfig, {"kl_penalty": "full"}, "algorithm.kl_penalty"),
    ],
)
def test_config_validation_names_key(cls, kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cls(**kwargs)


def test_paper_defaults():
    a, c = ActorConfig(), AlgorithmConfig()
    assert (c.adv_estimator, c.gamma, c.lam) == ("grpo", 1.0, 1.0)
    assert (a.lr, a.kl_loss_coef, a.kl_loss_type, a.entropy_coeff) == (
        1e-6,
        0.001,
        "low_var_kl",
        0.001,
    )
    assert (a.clip_ratio_low, a.clip_ratio_high, a.grad_clip, a.use_kl_loss) == (
        0.2,
        0.2,
        1.0,
        True,
    )
