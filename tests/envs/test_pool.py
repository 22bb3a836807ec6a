"""Env pool: concurrency, fault injection (kill -9, hang, raise), in-process backend.

Bystander replay and reward validation at scale: test_pool_faults.py."""

import os
import signal
import time

import pytest

import envs
from envs.base import EPISODE_OVER
from envs.pool import EnvPool, Kind, PoolResult

envs.register("fault", "envs.testing:FaultEnv", overwrite=True)


def act(text):
    return f"Thought:\nok\n\nAction:\n{text}"


@pytest.fixture(scope="module")
def pool():
    with EnvPool(num_workers=2, step_timeout=3.0, reset_timeout=30.0) as p:
        yield p


@pytest.fixture(autouse=True)
def close_episodes(pool):
    # Episodes left open would be replayed after every later restart, slowing later tests.
    yield
    for ep in list(pool._home):
        pool.close_episode(ep)


def collect(pool, n, timeout=30.0, kind=None):
    out, end = {}, time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        for r in pool.poll(timeout=0.5):
            assert isinstance(r, PoolResult) and r.episode_id not in out, f"two results for {r}"
            assert kind is None or r.kind is kind, r
            out[r.episode_id] = r.result
    assert len(out) == n, f"got {len(out)} of {n} results"
    return out


def test_reset_result_carries_prompt(pool):
    res = pool.reset("p0", "fault", 3, {"greeting": "Hello"})
    assert res.observation == "Hello 3"
    assert not res.done and res.reward == 0.0
    msgs = envs.initial_messages(res.info, res.observation)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == envs.ACK and msgs[2]["content"] == res.observation
    assert pool.step("p0", act("win")).reward == 1.0
    # After done: answered, not raised, not dropped.
    again = pool.step("p0", act("win"))
    assert again.done and again.observation == EPISODE_OVER


def test_episodes_run_concurrently_on_two_workers(pool):
    for i in range(2):
        pool.submit_reset(f"c{i}", "fault", i)
    collect(pool, 2, kind=Kind.RESET)
    assert {pool.worker_of("c0"), pool.worker_of("c1")} == {0, 1}
    start = time.monotonic()
    for i in range(2):
        pool.submit_step(f"c{i}", act("sleep 1"))
    res = collect(pool, 2, kind=Kind.STEP)
    assert time.monotonic() - start < 1.8, "two 1 s steps on two workers should overlap"
    assert all(r.observation == "slept" for r in res.values())


def test_unknown_env_and_bad_kwargs_fail_in_caller(pool):
    with pytest.raises(ValueError, match="valid envs: .*babyai"):
        pool.submit_reset("x", "nope", 0)
    with pytest.raises(TypeError, match="valid arguments: \\['greeting'\\]"):
        pool.submit_reset("x", "fault", 0, {"colour": 1})
    with pytest.raises(KeyError, match="never reset"):
        pool.submit_step("never", act("win"))


def test_raising_env_ends_only_its_episode(pool):
    pool.submit_reset("r0", "fault", 0)
    pool.submit_reset("r1", "fault", 1)
    collect(pool, 2)
    pids = pool.worker_pids()
    pool.submit_step("r0", act("raise"))
    pool.submit_step("r1", act("echo still here"))
    res = collect(pool, 2)
    assert res["r0"].done and res["r0"].reward == 0.0
    assert "RuntimeError: injected env failure" in res["r0"].info["error"]
    assert res["r1"].observation == "echo: still here" and not res["r1"].done
    assert pool.worker_pids() == pids, "an env exception must not restart the worker"


def test_hung_step_times_out_and_worker_is_replaced(pool):
    pool.submit_reset("h0", "fault", 0)
    pool.submit_reset("h1", "fault", 1)
    collect(pool, 2)
    restarts = pool.restarts
    pool.submit_step("h0", act("sleep 60"))
    pool.submit_step("h1", act("echo fine"))
    start = time.monotonic()
    res = collect(pool, 2)
    assert time.monotonic() - start < 10
    assert res["h0"].done and "timed out after 3s" in res["h0"].info["error"]
    assert res["h1"].observation == "echo: fine"
    assert pool.restarts == restarts + 1
    # The replacement worker serves new episodes.
    assert pool.reset("h0", "fault", 5).observation.startswith("Task 5")
    assert pool.step("h0", act("win")).reward == 1.0


def test_failed_requests_keep_their_kind(pool):
    """A reset queued behind a hung step fails as a reset; the step fails as a step."""
    pool.reset("q0", "fault", 0)
    pool.submit_step("q0", act("sleep 60"))
    pool.submit_reset("q0", "fault", 1)
    out, end = [], time.monotonic() + 15
    while len(out) < 2 and time.monotonic() < end:
        out += pool.poll(timeout=0.5)
    assert [(r.kind, r.episode_id) for r in out] == [(Kind.STEP, "q0"), (Kind.RESET, "q0")]
    assert all(r.result.done and "timed out" in r.result.info["error"] for r in out)
    assert pool.reset("q0", "fault", 2).observation.startswith("Task 2")


def test_kill_9_mid_episode_loses_no_episode(pool):
    eps = [f"k{i}" for i in range(4)]
    for i, ep in enumerate(eps):
        pool.submit_reset(ep, "fault", i)
    collect(pool, 4)
    assert pool.step_many({ep: act("add 5") for ep in eps})["k1"].observation == "total 6"
    victim = pool.worker_of("k0")
    victim_eps = [ep for ep in eps if pool.worker_of(ep) == victim]
    replayed, restarts = pool.replayed, pool.restarts
    os.kill(pool.worker_pids()[victim], signal.SIGKILL)
    for ep in eps:
        pool.submit_step(ep, act("add 1"))
    res = collect(pool, 4)
    # Every episode, idle on the dead worker or not, goes on with its state rebuilt.
    assert {ep: r.observation for ep, r in res.items()} == {
        ep: f"total {i + 6}" for i, ep in enumerate(eps)
    }
    assert not any(r.done or r.info.get("error") for r in res.values())
    assert pool.restarts == restarts + 1
    assert pool.replayed == replayed + len(victim_eps)
    assert pool.step("k0", act("win")).reward == 1.0


def test_worker_exit_during_step(pool):
    pool.reset("e0", "fault", 0)
    res = pool.step("e0", act("exit"))
    assert res.done and "exit code 17" in res.info["error"]
    assert pool.reset("e0", "fault", 1).observation.startswith("Task 1")


def test_in_process_backend_matches():
    with EnvPool(num_workers=0) as p:
        res = p.reset("a", "fault", 4)
        assert res.observation == "Task 4"
        p.submit_step("a", act("raise"))
        [r] = p.poll()
        assert (r.kind, r.episode_id) == (Kind.STEP, "a")
        assert r.result.done and "injected" in r.result.info["error"]
        p.submit_reset("a", "fault", 2)
        [r] = p.poll()
        assert (r.kind, r.episode_id) == (Kind.RESET, "a")
        assert r.result.observation.startswith("Task 2")
        p.reset("b", "fault", 1)
        out = p.step_many({"b": act("echo x")})
        assert out["b"].observation == "echo: x"


def test_real_envs_through_workers(pool):
    res = pool.reset("bb", "babyai", 0, {"levels": ["GoToRedBallNoDists"]})
    assert res.observation.startswith("Your goal: go to the red ball\n")
    step = pool.step("bb", act("go to red ball 1"))
    assert step.done and step.reward == 1.0
    pool.close_episode("bb")


def test_close_stops_workers():
    p = EnvPool(num_workers=1)
    procs = [w.proc for w in p._workers]
    p.close()
    assert all(not proc.is_alive() for proc in procs)
    p.close()  # idempotent
