"""Packed rows (``model.use_remove_padding``): the packing itself, and log-probs, values,
advantages, losses and gradients of packed passes against the padded ones."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentgym_jax.rl import packing as PK
from agentgym_jax.rl import update as U
from agentgym_jax.rl.advantages import compute_advantages
from agentgym_jax.rl.config import AlgorithmConfig, CriticConfig
from tests.agentgym_jax.rl.test_update import BASE, host, max_diff, one_device_mesh
from tests.helpers.rl_toy import make_batch, tiny_model


@pytest.mark.parametrize("seed", range(5))
def test_pack_places_every_token_once_within_rows(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 41, size=int(rng.integers(1, 30)))
    p = PK.pack(lengths, 40)
    assert p.src.shape[1] == 40
    for e, n in enumerate(lengths):
        slots = np.argwhere(p.src == e)
        assert len(slots) == n and set(slots[:, 0]) == {p.row[e]}  # one row, n slots
        cols = slots[:, 1]
        assert cols.tolist() == list(range(p.offset[e], p.offset[e] + n))  # contiguous
        assert p.pos[p.row[e], cols].tolist() == list(range(n))
    # First-fit decreasing uses at most 11/9 OPT + 1 rows; OPT >= total / row length.
    assert p.n_rows <= 11 / 9 * np.ceil(lengths.sum() / 40) + 1
    assert p.fill() == pytest.approx(lengths.sum() / p.src.size)
    q = p.with_rows(p.n_rows + 3)
    assert q.n_rows == p.n_rows + 3 and (q.src[p.n_rows :] == -1).all()


def test_pack_subset_and_errors():
    p = PK.pack([5, 9, 3, 7], 10, episodes=[3, 1])
    assert sorted(set(p.src[p.src >= 0].tolist())) == [1, 3]
    assert p.n_rows == 2  # 9 and 7 do not share a row of 10
    with pytest.raises(ValueError, match="exceeds rows of 8"):
        PK.pack([5, 9], 8)


def test_bucket_ladder_and_rows():
    assert [PK.bucket(n, 4) for n in (1, 4, 5, 9, 13, 17, 25, 33)] == [4, 4, 8, 16, 16, 32, 32, 64]
    # Below one micro-batch of 16: a smaller one (over 2 data ways); above: whole ones.
    assert [PK.rows_for(n, 16, 2) for n in (1, 3, 5, 7, 13, 17, 40)] == [2, 4, 8, 8, 16, 32, 64]
    assert [PK.micro_rows(r, 16) for r in (2, 8, 16, 64)] == [2, 8, 16, 16]
    assert PK.worth_it(24, 32) and not PK.worth_it(25, 32)


def test_gather_and_unpack_against_numpy():
    rng = np.random.default_rng(0)
    lengths = np.array([7, 3, 10, 1, 6])
    t = 10
    x = rng.normal(size=(5, t)).astype(np.float32)
    p = PK.pack(lengths, t).with_rows(4)
    g = np.asarray(PK.gather(jnp.asarray(x), p.src, p.pos))
    ref = np.zeros(p.src.shape, np.float32)
    for r, c in zip(*np.nonzero(p.src >= 0)):
        ref[r, c] = x[p.src[r, c], p.pos[r, c]]
    np.testing.assert_array_equal(g, ref)
    back = np.asarray(PK.unpack(jnp.asarray(g), p.row, p.offset, jnp.asarray(lengths), t))
    keep = (np.arange(t) > 0) & (np.arange(t) < lengths[:, None])
    np.testing.assert_array_equal(back, np.where(keep, x, 0))


def _batch(seed, b=8):
    """``make_batch`` episodes (12-24 tokens) right-padded to 48: two or three fit in a row."""
    batch = make_batch(seed, b=b, t=24)
    return {k: np.pad(v, ((0, 0), (0, 24))) if v.ndim == 2 else v for k, v in batch.items()}


def _packing(batch, multiple=1):
    lengths = batch["attention_mask"].sum(-1)
    p = PK.pack(lengths, batch["input_ids"].shape[1])
    p = p.with_rows(min(PK.bucket(p.n_rows, multiple), len(lengths)))
    return {"src": p.src, "pos": p.pos, "row": p.row, "offset": p.offset}


def test_packed_logprobs_values_and_advantages_equal_padded():
    batch = _batch(3)
    pk = _packing(batch, multiple=2)
    assert pk["src"].shape[0] < 8  # the test packs something
    actor = tiny_model(0)
    from flax import nnx

    gd, params = nnx.split(actor)
    lp, ent = U.compute_logprobs(gd, params, batch, 2)
    lp_p, ent_p = U.compute_logprobs(gd, params, batch, 2, 1.0, pk)
    real = batch["attention_mask"] > 0
    assert np.abs(np.asarray(lp)[real]).max() > 0.1
    # Equal on every episode token; padding (which the padded pass also computes) is 0.
    np.testing.assert_allclose(np.asarray(lp_p)[real], np.asarray(lp)[real], atol=2e-6)
    np.testing.assert_allclose(np.asarray(ent_p)[real], np.asarray(ent)[real], atol=2e-6)
    assert not np.asarray(lp_p)[~real].any()
    cgd, cparams = nnx.split(tiny_model(1, critic=True))
    # A zero-initialised value head would make any two passes agree: give it weights.
    cparams = jax.tree.map(lambda x: x + 0.05, cparams)
    v = U.compute_values(cgd, cparams, batch, 4)
    v_p = U.compute_values(cgd, cparams, batch, 4, pk)
    assert np.abs(np.asarray(v)[real]).max() > 0.05
    np.testing.assert_allclose(np.asarray(v_p)[real], np.asarray(v)[real], atol=2e-6)
    # GAE reads the values: packed-pass values give the same advantages and returns.
    b = {**batch, "valid": np.ones(8, np.int32)}
    cfg = AlgorithmConfig(adv_estimator="gae", gamma=0.99, lam=0.95)
    a = compute_advantages("gae", {**b, "values": v}, cfg)
    a_p = compute_advantages("gae", {**b, "values": v_p}, cfg)
    for k in ("advantages", "returns"):
        np.testing.assert_allclose(np.asarray(a_p[k]), np.asarray(a[k]), atol=1e-5)


# The padded path shuffles on device, the packed one on the host: compare them unshuffled.
ACTOR = dataclasses.replace(BASE, ppo_micro_batch_size=2, shuffle=False)


@pytest.mark.parametrize(
    "mode, micro",
    [("token-mean", 2), ("seq-mean-token-mean", 2), ("seq-mean-token-sum", None)],
)
def test_packed_update_equals_padded(mode, micro):
    # micro None: the mini-batch is one micro-batch, packed into fewer rows than sequences.
    cfg = dataclasses.replace(ACTOR, loss_agg_mode=mode, ppo_micro_batch_size=micro)
    batch = _batch(1)
    batch["loss_mask"][5] = 0  # a sequence without loss tokens counts in no seq-mean
    mesh = one_device_mesh()
    runs = {}
    for packed in (False, True):
        state = U.init_train_state(tiny_model(0), U.make_optimizer(cfg), mesh)
        upd = U.make_actor_update(cfg, mesh, state)
        pack = upd.plan(batch["attention_mask"].sum(-1), 48, 0) if packed else None
        if packed:
            assert pack["src"].shape[1] < 4  # fewer rows than sequences per mini-batch
        state, m = upd(state, batch, jax.random.key(0), pack)
        runs[packed] = (state, {k: float(v) for k, v in m.items()})
    (s0, m0), (s1, m1) = runs[False], runs[True]
    assert max_diff(s0.params, tiny_model(0)) > 1e-3  # the update moved the params
    assert max_diff(s0.params, s1.params) <= 2e-6
    for k, v in m0.items():
        assert m1[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_packed_critic_update_equals_padded():
    cfg = CriticConfig(lr=1e-2, ppo_mini_batch_size=8, ppo_micro_batch_size=4, shuffle=False)
    batch = _batch(2)
    mesh = one_device_mesh()
    out = []
    for packed in (False, True):
        state = U.init_train_state(tiny_model(0, critic=True), U.make_optimizer(cfg), mesh)
        upd = U.make_critic_update(cfg, mesh, state)
        pack = upd.plan(batch["attention_mask"].sum(-1), 48, 0) if packed else None
        state, m = upd(state, batch, jax.random.key(0), pack)
        out.append((state, {k: float(v) for k, v in m.items()}))
    assert max_diff(out[0][0].params, out[1][0].params) <= 2e-6
    for k, v in out[0][1].items():
        assert out[1][1][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_loss_and_gradients_of_packed_micro_batch_equal_padded():
    """One micro-batch: the loss and its gradient, packed vs padded (no optimizer in between)."""
    cfg = dataclasses.replace(ACTOR, loss_agg_mode="seq-mean-token-mean")
    batch = {k: jnp.asarray(v) for k, v in _batch(4, b=4).items()}
    from flax import nnx

    gd, params = nnx.split(tiny_model(0))
    lm = batch["loss_mask"].astype(jnp.float32)
    n_tok, n_seq = jnp.sum(lm), jnp.sum(jnp.any(lm > 0, -1).astype(jnp.float32))
    grad = jax.value_and_grad(U.actor_loss, has_aux=True)
    (l0, _), g0 = grad(params, gd, batch, n_tok, n_seq, cfg)
    p = PK.pack(np.asarray(batch["attention_mask"]).sum(-1), 48)
    mb = {k: PK.gather(v, p.src, p.pos) for k, v in batch.items() if v.ndim == 2}
    mb.pop("attention_mask")
    tok = jnp.sum(lm, -1)
    mb.update(
        positions=jnp.asarray(p.pos),
        segment_ids=PK.segment_ids(jnp.asarray(p.src)),
        row_tokens=jnp.where(p.src >= 0, tok[np.maximum(p.src, 0)], 0.0),
    )
    (l1, _), g1 = grad(params, gd, mb, n_tok, n_seq, cfg)
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    flat0, flat1 = host(g0), host(g1)
    assert max(np.abs(x).max() for x in flat0) > 1e-3
    for a, b in zip(flat0, flat1):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)


def test_plan_shuffles_every_epoch_and_covers_each_sequence():
    cfg = dataclasses.replace(ACTOR, shuffle=True)
    mesh = one_device_mesh()
    state = U.init_train_state(tiny_model(0), U.make_optimizer(cfg), mesh)
    upd = U.make_actor_update(cfg, mesh, state)
    lengths = _batch(0)["attention_mask"].sum(-1)
    plan = upd.plan(lengths, 48, (7, 1))
    members = plan["members"]
    assert members.shape == (4, 4)  # 2 epochs x 2 mini-batches of 4
    for e in range(2):
        assert sorted(members[2 * e : 2 * e + 2].ravel()) == list(range(8))
    assert not (members[:2] == members[2:]).all()  # the epochs differ
    np.testing.assert_array_equal(upd.plan(lengths, 48, (7, 1))["src"], plan["src"])
    for k in range(4):  # each mini-batch's rows hold exactly its members' tokens
        src = plan["src"][k]
        got = {e: int((src == e).sum()) for e in np.unique(src[src >= 0])}
        assert got == {int(e): int(lengths[e]) for e in members[k]}
