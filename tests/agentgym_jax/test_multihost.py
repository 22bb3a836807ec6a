"""Two JAX processes x 2 CPU devices over loopback (``launch/local_multiprocess.py``) against one
process with the same 4-device mesh.

The 2-process run must: give each process half of every step's episodes (whole groups, the
sampler's order), train on the global batch of both halves (its checkpointed params equal those
of a 1-process 4-device update on the same trajectories), log metrics of all episodes once,
sample with the weights being trained (each engine synced after every update and on resume),
resume from its checkpoint (same task stream, same params as the 1-process update from that
checkpoint), and stop every process at the same step when only one is told to stop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import envs
from agentgym_jax.config import load_config
from agentgym_jax.context import build_context
from agentgym_jax.data import TaskSampler, host_share
from agentgym_jax.metrics import read_jsonl
from agentgym_jax.trainer import Trainer
from tests.helpers import ROOT

LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.py")
WORKER = os.path.join(ROOT, "tests", "helpers", "multihost_worker.py")
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
LAUNCH_TIMEOUT_S = 240  # the launcher kills its processes; the test waits a little longer


def overrides(model_dir: str, out: str) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"trainer.output_dir={out}",
        "trainer.val_before_train=false",
        "trainer.test_freq=0",
        "trainer.plot=false",
        "actor.lr=1e-3",
        "data.max_response_length=64",
        "rollout.max_tokens_per_turn=8",
        "algorithm.rounds_ctrl.type=fixed",  # one horizon: no new compiles at step 3
        "algorithm.rounds_ctrl.rounds=[2]",
        # the training mesh: all 4 devices (2 per process, or the first 4 of one process)
        "mesh.devices=4",
        "mesh.data=1",
        "mesh.fsdp=-1",
    ]


def launch(tmp, model_dir, out, steps, **env_extra) -> dict[int, dict]:
    """Run the 2-process training; returns each process's MH_RESULT."""
    env = dict(os.environ)
    env.update(
        LOCAL_DEVICES="2",
        LAUNCH_TIMEOUT=str(LAUNCH_TIMEOUT_S),
        LAUNCH_CMD=f"{sys.executable} {WORKER}",
        MH_DUMP=str(tmp),
        # Compiles dominate a 2-step run: the second launch reuses the first one's.
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TOKENIZERS_PARALLELISM="false",
        **env_extra,
    )
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    args = ["--config", TINY, *overrides(model_dir, out), f"trainer.total_training_steps={steps}"]
    p = subprocess.Popen(
        [sys.executable, LAUNCHER, "2", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: killed whole if anything hangs
    )
    try:
        log, _ = p.communicate(timeout=LAUNCH_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        pytest.fail(f"2-process run hung past {LAUNCH_TIMEOUT_S + 30}s:\n{log[-4000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, f"2-process run failed ({p.returncode}):\n{log[-6000:]}"
    results = {}
    # Both processes write to one pipe: a result may share a line with the other's output.
    dec = json.JSONDecoder()
    for piece in log.split("MH_RESULT ")[1:]:
        r, _ = dec.raw_decode(piece)
        results[r["process"]] = r
    assert sorted(results) == [0, 1], log[-4000:]
    return results


def dumped(tmp, step: int) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(tmp / f"p{p}_step{step}.npz")) for p in (0, 1)]


def global_batch(parts: list[dict]) -> dict[str, np.ndarray]:
    from agentgym_jax.learner import BATCH_KEYS

    return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_two_processes_match_one(agent_dir, tmp_path):
    out = str(tmp_path / "run")
    # Launch 1: steps 1-2. Launch 2: resumes at 2; process 1 alone "gets SIGTERM" after step 3,
    # so both must stop there (of 4 steps), with a checkpoint.
    first = launch(tmp_path, agent_dir, out, 2)
    assert all(r["summary"]["step"] == 2 for r in first.values())
    second = launch(tmp_path, agent_dir, out, 4, MH_STOP_AFTER="3", MH_STOP_PROCESS="1")
    for r in second.values():
        assert (r["summary"]["step"], r["summary"]["preempted"]) == (3, True), r
    assert not (tmp_path / "p0_step4.npz").exists()

    cfg = load_config(TINY, overrides(agent_dir, out))
    train_ids = envs.task_ids(cfg.env.name, cfg.env.train_split, **cfg.env.kwargs)
    sampler = TaskSampler(train_ids, cfg.data.train_batch_size, cfg.data.seed, cfg.rollout.n)
    steps = {k: dumped(tmp_path, k) for k in (1, 2, 3)}
    for k, parts in steps.items():
        expected = sampler.batch_at(k - 1)  # step 3 ran after the resume: the stream continued
        n = len(expected)
        for p, part in enumerate(parts):
            share, first_uid = host_share(expected, p, 2)
            assert len(part["uids"]) == n // 2, (k, p)  # half the episodes each
            np.testing.assert_array_equal(part["uids"], np.arange(first_uid, first_uid + n // 2))
            np.testing.assert_array_equal(part["task_ids"], [t.task_id for t in share])
            np.testing.assert_array_equal(part["groups"], [t.group for t in share])
            assert part["input_ids"].shape == parts[0]["input_ids"].shape  # one padded length
            assert part["loss_mask"].sum(axis=1).min() > 0  # every episode has model tokens
        assert not set(parts[0]["groups"]) & set(parts[1]["groups"])  # whole groups per host

    # Metrics: written once (process 0), over both processes' episodes. The engines sampled
    # with the weights being trained: after an update (step 2) and after the resume (step 3).
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Transcripts: each host writes the episodes it ran.
    for host in (0, 1):
        assert os.path.exists(os.path.join(out, "rollouts", f"step_000001.host{host}.json"))
    for r in rows:
        scores = np.concatenate([p["scores"] for p in steps[r["step"]]])
        assert r["train/reward_mean"] == pytest.approx(float(scores.mean()), abs=1e-6)
        assert r["timing/rollout_s"] >= r["timing/rollout_s_fastest_host"]
        assert r["train/logprob_mismatch"] < 1e-4, r["step"]

    # The same trajectories through one process on the same 4-device mesh: step 1 from the
    # initial state, steps 2 and 3 from the 2-process run's checkpoints of the step before.
    t = Trainer(build_context(cfg, "train"))
    try:
        assert jax.process_count() == 1 and t.ctx.mesh.devices.size == 4
        ck = t.ctx.checkpointer
        saved = {k: ck.restore(t._ckpt_tree(), k)[1]["actor"] for k in (1, 2, 3)}
        want = {k: leaves(a["params"]) for k, a in saved.items()}
        assert any(not np.array_equal(a, b) for a, b in zip(want[2], want[3])), "no training"
        state = t.state
        for k in (1, 2, 3):
            if k > 1:
                state = dataclasses.replace(state, actor=state.actor.replace(**saved[k - 1]))
            state, m = t.ctx.learner.step(state, global_batch(steps[k]), k)
            check_same(leaves(state.actor.params), want[k], f"step {k}")
            for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/kl_loss"):
                assert rows[k - 1][key] == pytest.approx(m[key], rel=1e-5, abs=1e-7), (k, key)
    finally:
        t.close()


def check_same(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    """Same params up to the order of float32 sums.

    The 2-process run all-reduces gradients across processes with gloo, the 1-process run with
    XLA's in-process all-reduce: another summation order, so gradients differ by float32
    rounding (last bits of most elements). Adam's step is ``lr * m / (sqrt(v) + eps)``: ~lr *
    sign(g) where |g| >> eps, and where a gradient cancels to near 0 (|g| ~ eps = 1e-8) rounding
    moves it by up to ~1e-3 * lr (seen: 1.8e-6). Bound: 1e-2 * lr = 1e-5 per element. A wrong
    update (a missing share, rows in another order, another step rng) moves elements by ~lr.
    """
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=what)


def test_host_share_splits_whole_groups_in_order():
    from agentgym_jax.data import expand_groups

    tasks = expand_groups([7, 3, 9, 1, 5], 3)  # 5 groups of 3
    assert host_share(tasks, 0, 1) == (tasks, 0)
    shares = [host_share(tasks, p, 2) for p in range(2)]
    assert [len(s) for s, _ in shares] == [6, 9]  # uneven: 2 and 3 groups
    assert [first for _, first in shares] == [0, 6]
    assert shares[0][0] + shares[1][0] == tasks  # the global batch is the shares concatenated
    one = expand_groups([4], 2)  # more processes than groups: one runs nothing
    assert host_share(one, 0, 2) == ([], 0) and host_share(one, 1, 2) == (one, 0)
    with pytest.raises(ValueError, match="not contiguous"):
        host_share([tasks[0], tasks[3], tasks[1]], 0, 2)
