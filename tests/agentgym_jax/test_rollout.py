"""Rollout: trajectories are exactly what the model saw and produced; limits truncate cleanly."""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from agentgym_jax.engine import Engine, EngineConfig
from agentgym_jax.engine.chat import ChatDeltas
from agentgym_jax.envs_driver import EnvDriver
from agentgym_jax.models import from_pretrained, load_tokenizer
from agentgym_jax.rl.losses import sequence_logprobs
from agentgym_jax.rollout import (
    Episode,
    EpisodeBook,
    Phase,
    Rollout,
    RolloutSettings,
    rollout_metrics,
    to_batch,
)
from envs.base import StepResult
from envs.pool import Kind, PoolResult

LEVELS = {"levels": ["GoToRedBallNoDists"]}


@pytest.fixture(scope="module")
def agent(agent_dir):
    d = agent_dir
    tok = load_tokenizer(d)
    model = from_pretrained(d)
    return d, tok, model


def _rollout(agent, *, max_len=1600, slots=3, buckets=(64, 256, 1024)):
    _, tok, model = agent
    engine = Engine(model, EngineConfig(num_slots=slots, max_len=max_len, prefill_buckets=buckets))
    chat = ChatDeltas(tok)
    return Rollout(
        engine, EnvDriver("babyai", LEVELS), chat, stop_token_ids=model.config.eos_token_ids
    ), chat


def test_trajectory_is_prompt_plus_turns_plus_deltas(agent):
    _, tok, model = agent
    ro, chat = _rollout(agent)
    # 5 episodes on 3 slots: slots are refilled as episodes end.
    tasks = [(t, t // 2) for t in range(5)]
    s = RolloutSettings(
        max_turns=3, max_tokens_per_turn=12, max_prompt_length=1200, temperature=1.0, seed=3
    )
    eps = ro.run(tasks, s).episodes
    assert len(eps) == 5 and all(e.finished for e in eps)
    for e in eps:
        assert len(e.tokens) == len(e.loss_mask) == len(e.logprobs)
        assert e.turns >= 1 and e.error is None
        # Rebuild the sequence from its parts: prompt + (model turn + env delta)*.
        msgs = e.messages
        rebuilt = chat.prompt_ids(msgs[:3])
        assert e.tokens[: e.prompt_len] == rebuilt
        mask = np.array(e.loss_mask)
        segs = np.split(np.arange(len(mask)), np.nonzero(np.diff(mask))[0] + 1)
        model_segs = [sg for sg in segs if mask[sg[0]] == 1]
        assert len(model_segs) == e.turns
        pos = e.prompt_len
        for k, sg in enumerate(model_segs):
            assert sg[0] == pos
            turn = [e.tokens[i] for i in sg]
            assert tok.decode(turn, skip_special_tokens=True) == msgs[3 + 2 * k]["content"]
            pos = sg[-1] + 1
            if pos < len(e.tokens):  # the env reply that followed, as a template delta
                ended = turn[-1] == chat.end_of_turn_id
                delta = chat.delta_ids(msgs[: 4 + 2 * k], [msgs[4 + 2 * k]], model_ended_turn=ended)
                assert e.tokens[pos : pos + len(delta)] == delta
                pos += len(delta)
        assert pos == len(e.tokens)


def test_sampler_logprobs_match_a_full_forward_of_the_trajectory(agent):
    """The KV cache held exactly the trajectory's tokens: a fresh forward gives the same log-probs."""
    _, _, model = agent
    ro, _ = _rollout(agent)
    s = RolloutSettings(
        max_turns=3, max_tokens_per_turn=10, max_prompt_length=1200, temperature=1.0, seed=1
    )
    eps = ro.run([(0, 0), (7, 1)], s).episodes
    batch = to_batch(eps)
    logits = model(
        jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"])
    )
    lp = np.asarray(sequence_logprobs(logits, jnp.asarray(batch["input_ids"])))
    m = batch["loss_mask"].astype(bool)
    assert m.sum() > 10
    np.testing.assert_allclose(lp[m], batch["rollout_logprobs"][m], atol=2e-4)


def test_outcome_reward_on_last_model_token_and_metrics(agent):
    ro, _ = _rollout(agent)
    eps = ro.run([(t, t) for t in range(3)], RolloutSettings(2, 8, 1200, seed=2)).episodes
    for e in eps:  # make one episode "succeed" to check placement
        e.score = 1.0
    b = to_batch(eps, pad_multiple=64)
    assert b["input_ids"].shape[1] % 64 == 0
    for i in range(len(eps)):
        last = np.nonzero(b["loss_mask"][i])[0][-1]
        assert b["rewards"][i, last] == 1.0 and b["rewards"][i].sum() == 1.0
    m = rollout_metrics(eps)
    assert m["train/turns_mean"] == pytest.approx(np.mean([e.turns for e in eps]))
    closed = sum(e.tokens[i] == ro.chat.end_of_turn_id for e in eps for i in e.turn_ends)
    assert m["train/turn_stop_frac"] == pytest.approx(closed / sum(e.turns for e in eps))
    assert 0.0 <= m["train/horizon_cut_frac"] <= 1.0


def test_length_limit_truncates_without_crashing(agent):
    _, tok, model = agent
    drv = EnvDriver("babyai", LEVELS)
    drv.submit_reset(0, 0)
    prompt_len = len(ChatDeltas(tok).prompt_ids(drv.initial_messages(drv.poll()[0].result)))
    ro, _ = _rollout(agent, max_len=prompt_len + 40, slots=2, buckets=(64, 256))
    eps = ro.run(
        [(0, 0), (1, 0), (2, 1)],
        RolloutSettings(
            max_turns=6, max_tokens_per_turn=16, max_prompt_length=prompt_len + 20, seed=0
        ),
    ).episodes
    assert all(e.finished for e in eps)
    assert any(e.truncated == "length" for e in eps)
    for e in eps:
        assert len(e.tokens) <= prompt_len + 40
    ro2, _ = _rollout(agent, max_len=2000, slots=2)
    eps2 = ro2.run(
        [(0, 0)], RolloutSettings(max_turns=2, max_tokens_per_turn=8, max_prompt_length=10)
    ).episodes
    assert eps2[0].truncated == "prompt" and eps2[0].loss_mask == []
    assert rollout_metrics(eps2)["train/truncated_frac"] == 1.0


def test_unclosed_turn_score_ends_the_episode(agent):
    """With unclosed_turn_score set, a turn cut at max_tokens_per_turn ends its episode with that
    score on its last token; closed turns still go to the env."""
    ro, chat = _rollout(agent)
    tasks = [(t, t) for t in range(4)]
    base = dict(max_turns=3, max_tokens_per_turn=6, max_prompt_length=1200, temperature=1.0, seed=5)
    plain = ro.run(tasks, RolloutSettings(**base)).episodes
    cut = ro.run(tasks, RolloutSettings(**base, unclosed_turn_score=-0.5)).episodes
    eot = chat.end_of_turn_id
    n_cut = 0
    for p, c in zip(plain, cut):
        # Same seeds: identical up to the first unclosed turn, which now ends the episode.
        first_open = next((k for k, i in enumerate(p.turn_ends) if p.tokens[i] != eot), None)
        if first_open is None:
            assert c.tokens == p.tokens and c.truncated != "turn"
            continue
        n_cut += 1
        assert c.truncated == "turn" and c.score == -0.5 and not c.success
        assert c.turns == first_open + 1 and c.tokens == p.tokens[: p.turn_ends[first_open] + 1]
        assert to_batch([c])["rewards"].sum() == -0.5
    assert n_cut >= 1  # a 6-token budget cuts the untrained model's turns
    assert rollout_metrics(cut)["train/unclosed_end_frac"] == n_cut / len(cut)


# ---- phases and result kinds (no model: a scripted pool, a stub engine and chat) ----
class ScriptedPool:
    """Answers each reset with the results ``script(uid)`` gives."""

    def __init__(self, script):
        self.script, self.out, self.ended = script, [], []

    def submit_reset(self, uid, task_id):
        self.out += self.script(uid)

    def poll(self, timeout=0.0):
        out, self.out = self.out, []
        return out

    def initial_messages(self, res):
        return [{"role": "user", "content": res.observation}]

    def end_episode(self, uid):
        self.ended.append(uid)


def _scripted(script, prompt_len=3):
    engine = SimpleNamespace(free_slots=lambda: [], config=SimpleNamespace(max_len=100))
    chat = SimpleNamespace(end_of_turn_id=0, prompt_ids=lambda msgs: [1] * prompt_len)
    pool = ScriptedPool(script)
    return Rollout(engine, pool, chat), pool


def _res(error=None):
    return StepResult("obs", 0.0, error is not None, {"error": error} if error else {})


S = RolloutSettings(max_turns=2, max_tokens_per_turn=4, max_prompt_length=10)


def test_step_result_for_a_resetting_episode_raises():
    ro, _ = _scripted(lambda uid: [PoolResult(Kind.STEP, uid, _res())])
    with pytest.raises(RuntimeError, match="step result for episode 0 in phase RESETTING"):
        ro.run([(0, 0)], S)


def test_reset_result_is_told_by_its_kind():
    # A failed reset ends its episode as a reset: no prompt, no turn, no step reward.
    ro, pool = _scripted(lambda uid: [PoolResult(Kind.RESET, uid, _res("boom"))])
    [e] = ro.run([(0, 0)], S).episodes
    assert e.finished and e.error == "boom" and e.tokens == [] and e.turn_rewards == []
    assert pool.ended == [0]
    # A second reset result for the same episode (now READY) is a bug, not a new prompt.
    ro, _ = _scripted(lambda uid: [PoolResult(Kind.RESET, uid, _res())] * 2)
    with pytest.raises(RuntimeError, match="reset result for episode 0 in phase READY"):
        ro.run([(0, 0)], S)
    ro, _ = _scripted(lambda uid: [PoolResult(Kind.CLOSE, uid, _res())])
    with pytest.raises(RuntimeError, match="close result"):
        ro.run([(0, 0)], S)


def test_stall_raises_instead_of_spinning():
    # READY episodes, no free slot, nothing decoding or waiting on an env: nothing can move.
    ro, _ = _scripted(lambda uid: [PoolResult(Kind.RESET, uid, _res())])
    with pytest.raises(RuntimeError, match="stalled"):
        ro.run([(0, 0)], S)


def test_impossible_phase_transitions_raise():
    e = Episode(uid=7, task_id=0, group=0)
    book = EpisodeBook([e])
    assert e.phase is Phase.RESETTING and not e.finished
    with pytest.raises(RuntimeError, match="RESETTING -> DECODING"):
        book.move(e, Phase.DECODING)
    for to in (Phase.READY, Phase.DECODING, Phase.WAITING_ENV, Phase.DECODING, Phase.DONE):
        book.move(e, to)
    assert e.finished and book[Phase.DONE] == [e] and book.count(Phase.DECODING) == 0
    with pytest.raises(RuntimeError, match="DONE -> DONE"):  # finishing twice is a bug
        book.move(e, Phase.DONE)
