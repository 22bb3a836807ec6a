"""End to end: GRPO and PPO (GAE + critic) runs, exact resume, SIGTERM, corrupt checkpoints, NaN."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from agentgym_jax.config import load_config
from agentgym_jax.context import build_context
from agentgym_jax.metrics import read_jsonl
from agentgym_jax.trainer import Trainer, evaluate, rollout_settings, train
from tests.helpers import ROOT

TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def model_dir(agent_dir):
    return agent_dir


def cfg_for(model_dir, out, *extra):
    return load_config(
        TINY,
        [
            f"model.path={model_dir}",
            f"trainer.output_dir={out}",
            "trainer.val_before_train=false",
            *extra,
        ],
    )


def params_of(run_dir, model_dir, step):
    cfg = cfg_for(model_dir, run_dir)
    t = Trainer.from_config(cfg)
    try:
        got = t.ctx.checkpointer.restore(t._ckpt_tree(), step)
        return jax.tree.map(np.asarray, got[1])
    finally:
        t.close()


def rollout_batch(t, cfg):
    """One training rollout of trainer ``t`` as a host batch."""
    from agentgym_jax.rollout import to_batch

    settings = rollout_settings(cfg, t.ctx.horizon, 1, eval_mode=False)
    return to_batch(t.ctx.rollout.run(next(t.ctx.sampler), settings).episodes, pad_multiple=128)


def test_grpo_run_then_resume_is_bit_identical(model_dir, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    s = train(cfg_for(model_dir, straight, "trainer.total_training_steps=4", "actor.lr=1e-3"))
    assert s["step"] == 4
    rows = read_jsonl(os.path.join(straight, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for k in (
        "train/reward_mean",
        "train/success_rate",
        "train/horizon",
        "actor/grad_norm",
        "actor/entropy",
        "timing/rollout_s",
        "timing/update_s",
        "perf/tokens_per_s",
    ):
        assert k in rows[0], k
    assert [r["train/horizon"] for r in rows] == [2.0, 2.0, 3.0, 3.0]  # ScalingInter stages
    assert os.path.isfile(os.path.join(straight, "rollouts", "step_000004.json"))
    assert "eval/success_rate" in rows[-1]

    train(cfg_for(model_dir, resumed, "trainer.total_training_steps=2", "actor.lr=1e-3"))
    train(cfg_for(model_dir, resumed, "trainer.total_training_steps=4", "actor.lr=1e-3"))
    rows_r = read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    assert [r["step"] for r in rows_r] == [1, 2, 3, 4]  # no step logged twice
    for a, b in zip(rows, rows_r):
        for k in ("train/reward_mean", "train/turns_mean", "actor/pg_loss", "actor/grad_norm"):
            assert a[k] == b[k], (a["step"], k)
    pa, pb = params_of(straight, model_dir, 4), params_of(resumed, model_dir, 4)
    leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
    p1 = params_of(straight, model_dir, 3)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(p1), leaves_a)), (
        "params never moved"
    )


def test_ppo_with_critic_runs(model_dir, tmp_path):
    out = str(tmp_path / "ppo")
    s = train(
        cfg_for(
            model_dir,
            out,
            "algorithm.adv_estimator=gae",
            "critic.ppo_mini_batch_size=4",
            "critic.lr=1e-3",
            "actor.lr=1e-3",
            "trainer.total_training_steps=3",
            "trainer.test_freq=0",
        )
    )
    assert s["step"] == 3
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 3
    for k in ("critic/vf_loss", "critic/vf_explained_var", "actor/pg_loss"):
        assert all(np.isfinite(r[k]) for r in rows), k
    # Export the trained actor (partial restore: the checkpoint also holds the critic).
    import torch
    import transformers

    from agentgym_jax.trainer import export_checkpoint

    exported = export_checkpoint(cfg_for(model_dir, out), str(tmp_path / "hf"))
    ids = torch.tensor([[5, 9, 13, 21, 34]])
    with torch.no_grad():
        new = transformers.AutoModelForCausalLM.from_pretrained(exported)(ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert transformers.AutoTokenizer.from_pretrained(exported).chat_template
    assert not torch.allclose(new, base), "export did not carry the trained weights"


def damage_state(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")


def test_corrupt_latest_checkpoint_falls_back(model_dir, tmp_path, caplog, capsys):
    out = str(tmp_path / "run")
    extra = ("trainer.test_freq=0", "trainer.async_checkpoint=false")
    train(cfg_for(model_dir, out, "trainer.total_training_steps=2", "trainer.save_freq=1", *extra))
    ck = os.path.join(out, "checkpoints")
    assert sorted(int(d) for d in os.listdir(ck) if d.isdigit()) == [1, 2]
    good = params_of(out, model_dir, 2)
    damage_state(os.path.join(ck, "2"))
    # Step 2 is now off the save grid and not the last: only the signal's forced save writes it.
    more = ("trainer.total_training_steps=3", "trainer.save_freq=1000", *extra)
    t = Trainer.from_config(cfg_for(model_dir, out, *more))
    try:
        with caplog.at_level("ERROR"):
            assert t.maybe_resume() == 1
        assert "CORRUPT" in caplog.text
        assert os.path.isdir(os.path.join(ck, "2"))  # kept for inspection, never deleted
        # SIGTERM during the retrained step 2: its save must really replace the corrupt step.
        real = t.ctx.learner.step

        def step_then_signal(*a, **kw):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **kw)

        t.ctx.learner.step = step_then_signal
        summary = t.fit()
    finally:
        t.close()
    assert summary["preempted"] and summary["step"] == 2
    printed = capsys.readouterr()
    assert "stopped by signal at step 2; checkpoint saved" in printed.out + printed.err
    names = os.listdir(ck)
    assert sorted(int(d) for d in names if d.isdigit()) == [1, 2]
    assert len([n for n in names if n.startswith("2.corrupt-")]) == 1  # set aside, not deleted
    again = params_of(out, model_dir, 2)  # raises if step 2 is still the corrupt one
    for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y)  # the fallback replayed step 2 exactly


def test_unloadable_checkpoints_stop_unless_resume_never(model_dir, tmp_path):
    from agentgym_jax.checkpoint import NoLoadableCheckpointError

    out = str(tmp_path / "run")
    extra = ("trainer.total_training_steps=1", "trainer.test_freq=0")
    extra += ("trainer.async_checkpoint=false",)
    train(cfg_for(model_dir, out, *extra))
    ck = os.path.join(out, "checkpoints")
    # A config change that alters the saved tree: PPO adds a critic the checkpoint lacks.
    gae = ("algorithm.adv_estimator=gae", "critic.ppo_mini_batch_size=4", *extra)
    t = Trainer.from_config(cfg_for(model_dir, out, *gae))
    try:
        with pytest.raises(NoLoadableCheckpointError, match="trainer.resume=never") as err:
            t.maybe_resume()
    finally:
        t.close()
    assert "step 1:" in str(err.value) and "critic" in str(err.value), str(err.value)
    assert os.listdir(ck).count("1") == 1  # untouched
    s = train(cfg_for(model_dir, out, *gae, "trainer.resume=never"))
    assert s["step"] == 1
    old = [n for n in os.listdir(ck) if n.startswith("old-")]
    assert len(old) == 1 and os.listdir(os.path.join(ck, old[0])) == ["1"]
    t = Trainer.from_config(cfg_for(model_dir, out, *gae))
    try:
        assert t.maybe_resume() == 1  # the new run's checkpoint
    finally:
        t.close()


def test_nan_loss_is_skipped_then_stops(model_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    cfg = cfg_for(
        model_dir,
        out,
        "trainer.total_training_steps=5",
        "trainer.max_bad_steps=2",
        "trainer.test_freq=0",
    )
    t = Trainer.from_config(cfg)
    real = t.ctx.learner.actor_update

    def poisoned(state, batch, rng, pack=None):  # NaN advantages -> NaN loss and grads
        batch = dict(batch, advantages=batch["advantages"] * np.nan)
        return real(state, batch, rng, pack)

    poisoned.plan = real.plan
    t.ctx.learner.actor_update = poisoned
    before = jax.tree.map(np.asarray, t.state.actor.params)
    try:
        with pytest.raises(FloatingPointError, match="max_bad_steps"):
            t.fit()
    finally:
        t.close()
    after = jax.tree.map(np.asarray, t.state.actor.params)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)  # the bad updates were skipped
    assert t.step_count == 2


def test_sigterm_saves_and_resumes(model_dir, tmp_path):
    out = str(tmp_path / "term")
    cmd = [
        sys.executable,
        "-m",
        "agentgym_jax.cli",
        "train",
        "--config",
        TINY,
        "--output-dir",
        out,
        "--steps",
        "50",
        f"model.path={model_dir}",
        "trainer.save_freq=1000",
        "trainer.test_freq=0",
        "trainer.val_before_train=false",
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT
    )
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 600  # startup and the first step: minutes on a busy 2-core machine
    while time.time() < deadline and not (os.path.exists(metrics) and read_jsonl(metrics)):
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    if not (os.path.exists(metrics) and read_jsonl(metrics)):
        proc.kill()
        pytest.fail("no step logged:\n" + proc.communicate()[0].decode()[-3000:])
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, text[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["preempted"] and summary["step"] < 50
    steps = [int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()]
    assert steps == [summary["step"]]  # off the save_freq grid: saved because of the signal


def test_step_returns_metrics_and_episodes_and_eval_builds_no_optimizer(model_dir, tmp_path):
    t = Trainer.from_config(cfg_for(model_dir, str(tmp_path / "a")))
    try:
        metrics, episodes = t.step(1)
    finally:
        t.close()
    assert len(episodes) == 8 and all(e.finished for e in episodes)  # 2 tasks x rollout.n 4
    assert metrics["train/success_rate"] == sum(e.success for e in episodes) / 8
    assert np.isfinite(metrics["actor/pg_loss"]) and "train/logprob_mismatch" in metrics
    ctx = build_context(cfg_for(model_dir, str(tmp_path / "b")), "eval")
    try:
        assert ctx.learner is None and ctx.state is None and ctx.checkpointer is None
        assert ctx.actor_params is not None and ctx.sampler is None
        m, eps = evaluate(ctx, 0, ctx.val_ids[:2])
        assert len(eps) == 2 and 0.0 <= m["eval/success_rate"] <= 1.0
    finally:
        ctx.close()


def test_jitted_prepare_matches_host_reference_on_8_devices(model_dir, tmp_path):
    """Old / reference log-probs and advantages from the one jitted preparation, sharded over 8
    fake devices, equal a host computation (unsharded forward + compute_advantages)."""
    from agentgym_jax.rl.advantages import compute_advantages
    from agentgym_jax.rl.update import compute_logprobs

    cfg = cfg_for(
        model_dir,
        str(tmp_path),
        "mesh={data: 1, fsdp: 4, tensor: 2, devices: 8}",
        "algorithm.use_kl_in_reward=true",
        "algorithm.kl_ctrl.kl_coef=0.3",
    )
    t = Trainer.from_config(cfg)
    try:
        batch = rollout_batch(t, cfg)
        dev, metrics = t.ctx.learner.prepare(t.state, batch)
        params = jax.device_get(t.state.actor.params)
        host = {k: jax.numpy.asarray(v) for k, v in batch.items()}
        old, _ = compute_logprobs(t.state.actor.graphdef, params, host)
    finally:
        t.close()
    # Packed rows or padded ones (model.use_remove_padding decides per step): equal on every
    # real token (padding is not a token: a packed pass leaves it 0).
    real = batch["attention_mask"] > 0
    for k in ("old_logprobs", "ref_logprobs"):
        np.testing.assert_allclose(np.asarray(dev[k])[real], np.asarray(old)[real], atol=2e-5)
    host["old_logprobs"], host["ref_logprobs"] = old, old
    want = compute_advantages("grpo", host, cfg.algorithm, kl_coef=0.3)
    np.testing.assert_allclose(np.asarray(dev["advantages"]), want["advantages"], atol=1e-4)
    assert len(dev["advantages"].sharding.device_set) == 8
    assert float(metrics["train/kl_in_reward"]) == pytest.approx(0.0, abs=1e-5)  # ref == actor


def test_old_logprobs_from_the_rollout_skip_the_pass_and_equal_a_recompute(model_dir, tmp_path):
    """actor.old_logprobs=rollout: the update's behaviour log-probs are the sampler's, which
    equal the actor's forward pass on every model token (this engine runs the same model code)."""
    from agentgym_jax.rl.update import compute_logprobs

    cfg = cfg_for(model_dir, str(tmp_path), "actor.old_logprobs=rollout")
    t = Trainer.from_config(cfg)
    try:
        batch = rollout_batch(t, cfg)
        dev, metrics = t.ctx.learner.prepare(t.state, batch)
        host = {k: jax.numpy.asarray(v) for k, v in batch.items()}
        old, _ = compute_logprobs(
            t.state.actor.graphdef, jax.device_get(t.state.actor.params), host
        )
        _, step_metrics = t.ctx.learner.step(t.state, batch, 1)
    finally:
        t.close()
    np.testing.assert_array_equal(np.asarray(dev["old_logprobs"]), batch["rollout_logprobs"])
    assert "train/logprob_mismatch" not in metrics
    mask = batch["loss_mask"] > 0
    assert mask.sum() > 50
    np.testing.assert_allclose(batch["rollout_logprobs"][mask], np.asarray(old)[mask], atol=2e-5)
    assert np.isfinite(step_metrics["actor/pg_loss"])  # the update runs on them


def test_adaptive_kl_in_reward_moves_logs_and_resumes(model_dir, tmp_path):
    out = str(tmp_path / "kl")
    extra = (
        "algorithm.use_kl_in_reward=true",
        "algorithm.kl_ctrl={type: adaptive, kl_coef: 0.1, target_kl: 1.0, horizon: 10}",
        "actor.lr=1e-3",
        "trainer.test_freq=0",
    )
    train(cfg_for(model_dir, out, "trainer.total_training_steps=2", *extra))
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert all("train/kl_in_reward" in r and "train/kl_coef" in r for r in rows)
    # KL far below target: the controller lowers the coefficient, by at most 20% x 8/10 a step.
    coefs = [r["train/kl_coef"] for r in rows]
    assert coefs[0] < 0.1 and coefs[1] < coefs[0] and coefs[0] >= 0.1 * (1 - 0.2 * 8 / 10) - 1e-9
    t = Trainer.from_config(cfg_for(model_dir, out, *extra))
    try:
        assert t.maybe_resume() == 2
        assert t.state.kl_coef == pytest.approx(coefs[1])
    finally:
        t.close()


@pytest.mark.parametrize("lost_raise", [False, True])
def test_sigterm_abandons_a_long_evaluation_within_seconds(model_dir, tmp_path, lost_raise):
    """A signal during a (here: minutes-long) evaluation abandons it; the completed step is
    logged and saved, and fit returns promptly. ``lost_raise``: the handler ran but its raise
    was swallowed (as inside a weakref callback); the rollout's polling still stops it."""
    import threading

    cfg = cfg_for(
        model_dir,
        str(tmp_path / "abandon"),
        "trainer.total_training_steps=3",
        "trainer.test_freq=1",
        "trainer.save_freq=1000",
        "data.val_batch_size=400",
        "rollout.val_n=2",
        "rollout.val_max_turns=8",
        "rollout.val_temperature=1.0",
    )
    t = Trainer.from_config(cfg)
    sent = []

    def send_when_step_1_is_done():
        while t.step_count < 1:
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the evaluation after step 1
        sent.append(time.perf_counter())
        if lost_raise:
            t._stop_signal = signal.SIGTERM
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_step_1_is_done, daemon=True).start()
    try:
        summary = t.fit()
    finally:
        t.close()
    waited = time.perf_counter() - sent[0]
    assert summary["preempted"] and summary["step"] == 1
    assert waited < 30, f"took {waited:.0f}s to stop"
    rows = read_jsonl(os.path.join(cfg.trainer.output_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1] and "eval/success_rate" not in rows[0]
    ck = os.path.join(cfg.trainer.output_dir, "checkpoints")
    assert [int(d) for d in os.listdir(ck) if d.isdigit()] == [1]


def test_second_ctrl_c_exits_at_once_and_all_env_failures_stop(model_dir, tmp_path):
    from agentgym_jax.rollout import RolloutResult
    from agentgym_jax.trainer import AllEnvsFailedError

    t = Trainer.from_config(cfg_for(model_dir, str(tmp_path / "x")))
    try:
        t._on_signal(signal.SIGINT, None)  # outside a rollout: noted, acted on after the step
        assert t._stop_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            t._on_signal(signal.SIGINT, None)
        real = t.ctx.rollout.run

        def all_fail(tasks, settings, **kw):
            result = real(tasks, settings, **kw)
            for e in result.episodes:
                e.error, e.truncated = "env worker crashed", None
            return RolloutResult(result.episodes, result.stats)

        t.ctx.rollout.run = all_fail
        t._stop_signal = None
        with pytest.raises(AllEnvsFailedError, match="every one of 8 episodes"):
            t.step(1)
    finally:
        t.close()
