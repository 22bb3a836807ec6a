"""Faults end only the episode at fault; the worker's other episodes are replayed from reset.

Measured: 30 episodes on 3 workers, one env hangs past step_timeout and another worker is
SIGKILLed from outside mid-step; every other episode must finish with the observations of a
fault-free run. Also: a request that crashes its worker twice, a replay that diverges, and
rewards / flags that break the contract (NaN, inf, str reward, non-bool done).
"""

import json
import os
import signal
import time

import pytest

import envs
from envs.base import EPISODE_OVER
from envs.pool import EnvPool, Kind

envs.register("fault", "envs.testing:FaultEnv", overwrite=True)

N_EPISODES, N_WORKERS, ROUNDS = 30, 3, 5
HANG_EP, HANG_ROUND, KILL_ROUND = 7, 2, 3
STEP_TIMEOUT = 2.0


def act(text):
    return f"Thought:\nok\n\nAction:\n{text}"


def collect(pool, eps, timeout=30.0):
    """One result per episode in `eps`; fails on a second result or a missing one."""
    out, end = {}, time.monotonic() + timeout
    while len(out) < len(eps) and time.monotonic() < end:
        for r in pool.poll(timeout=0.5):
            assert r.episode_id in eps and r.episode_id not in out, f"unexpected {r}"
            out[r.episode_id] = r
    assert len(out) == len(eps), f"got {len(out)} of {len(eps)} results"
    return out


def run_episodes(faults: bool):
    """Runs the scripted episodes; returns (trace per episode, pool counters, seconds)."""
    start = time.monotonic()
    traces = {ep: [] for ep in range(N_EPISODES)}
    with EnvPool(N_WORKERS, step_timeout=STEP_TIMEOUT, reset_timeout=30.0) as pool:
        for ep in range(N_EPISODES):
            pool.submit_reset(ep, "fault", 10 + ep)
        for ep, r in collect(pool, set(traces)).items():
            assert r.kind is Kind.RESET
            traces[ep].append(r.result.observation)
        # The kill lands while this episode's 1 s step runs (in both runs, so traces match):
        # the worker dies under an innocent request.
        victim = (pool.worker_of(HANG_EP) + 1) % N_WORKERS
        slow_ep = min(ep for ep in traces if pool.worker_of(ep) == victim)
        live = set(traces)
        for rnd in range(ROUNDS):
            for ep in sorted(live):
                if rnd == ROUNDS - 1:
                    action = "win"
                elif faults and ep == HANG_EP and rnd == HANG_ROUND:
                    action = "sleep 60"
                elif ep == slow_ep and rnd == KILL_ROUND:
                    action = "sleep 1"
                else:
                    action = f"add {ep + rnd}"
                pool.submit_step(ep, act(action))
            if faults and rnd == KILL_ROUND:
                time.sleep(0.3)
                os.kill(pool.worker_pids()[victim], signal.SIGKILL)
            for ep, r in collect(pool, live).items():
                assert r.kind is Kind.STEP
                res = r.result
                traces[ep].append((res.observation, res.reward, res.done, res.info.get("error")))
                if res.done:
                    live.discard(ep)
        counters = dict(
            restarts=pool.restarts, replayed=pool.replayed, replay_failed=pool.replay_failed
        )
    return traces, counters, time.monotonic() - start


def test_one_hang_and_one_kill_end_only_the_hung_episode(capsys):
    clean, clean_counters, _ = run_episodes(faults=False)
    assert clean_counters == dict(restarts=0, replayed=0, replay_failed=0)
    assert all(t[-1] == ("You won.", 1.0, True, None) for t in clean.values())

    faulty, counters, seconds = run_episodes(faults=True)
    failed = sorted(ep for ep, t in faulty.items() if any(step[3] for step in t[1:]))
    assert failed == [HANG_EP]
    obs, reward, done, error = faulty[HANG_EP][-1]
    assert done and reward == 0.0 and f"step timed out after {STEP_TIMEOUT:g}s" in error
    assert len(faulty[HANG_EP]) == 1 + HANG_ROUND + 1
    mismatched = [ep for ep in faulty if ep != HANG_EP and faulty[ep] != clean[ep]]
    assert not mismatched, f"episodes differ from the fault-free run: {mismatched}"
    bystanders = 2 * N_EPISODES // N_WORKERS - 1  # 9 beside the hang, 10 on the killed worker
    assert counters == dict(restarts=2, replayed=bystanders, replay_failed=0)
    figures = dict(
        episodes=N_EPISODES,
        workers=N_WORKERS,
        faults_injected={"hang": 1, "sigkill": 1},
        episodes_failed=len(failed),
        bystanders_on_faulty_workers=bystanders,
        bystanders_restored=counters["replayed"],
        worker_restarts=counters["restarts"],
        faulty_run_s=round(seconds, 1),
    )
    with capsys.disabled():
        print("\npool faults:", json.dumps(figures))


def test_request_that_crashes_twice_ends_only_its_episode():
    with EnvPool(num_workers=1, step_timeout=5.0) as pool:
        for ep in "abc":
            pool.reset(ep, "fault", 1)
        pool.step_many({ep: act("add 2") for ep in "abc"})
        pool.submit_step("a", act("exit"))  # os._exit in the env: its own fault, every time
        pool.submit_step("b", act("add 3"))
        pool.submit_step("c", act("add 4"))
        res = {ep: r.result for ep, r in collect(pool, set("abc")).items()}
        assert res["a"].done and "exit code 17), also on a fresh worker" in res["a"].info["error"]
        assert (res["b"].observation, res["c"].observation) == ("total 6", "total 7")
        assert not res["b"].done and not res["c"].done
        assert pool.restarts == 2  # the first crash is retried: it might have been a kill


def test_replay_that_diverges_ends_its_episode_with_the_reason():
    with EnvPool(num_workers=1, step_timeout=5.0) as pool:
        pool.reset("x", "fault", 1)
        pool.reset("y", "fault", 1)
        assert pool.step("x", act("pid")).observation == f"pid {pool.worker_pids()[0]}"
        assert pool.step("y", act("add 3")).observation == "total 4"
        os.kill(pool.worker_pids()[0], signal.SIGKILL)  # both episodes idle on it
        time.sleep(0.3)
        pool.submit_step("x", act("add 1"))
        pool.submit_step("y", act("add 1"))
        res = {ep: r.result for ep, r in collect(pool, {"x", "y"}).items()}
        assert res["x"].done and res["x"].reward == 0.0
        assert res["x"].info["error"].startswith("replay diverged: last observation differs")
        assert res["y"].observation == "total 5" and not res["y"].done
        assert (pool.restarts, pool.replayed, pool.replay_failed) == (1, 1, 1)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_invalid_reward_or_done_ends_only_that_episode(num_workers):
    bad = {
        "nan": ("badreward nan", "reward nan is not finite"),
        "inf": ("badreward inf", "reward inf is not finite"),
        "str": ("badreward text", "reward '1.0' is not a number"),
        "done": ("baddone", "done 'yes' is not a bool"),
    }
    with EnvPool(num_workers=num_workers, step_timeout=5.0) as pool:
        for ep in [*bad, "good"]:
            pool.reset(ep, "fault", 2)
        out = pool.step_many({**{ep: act(a) for ep, (a, _) in bad.items()}, "good": act("add 1")})
        for ep, (_, why) in bad.items():
            res = out[ep]
            assert res.done is True and res.reward == 0.0 and type(res.reward) is float
            assert res.info["error"] == f"invalid env result: {why}", res.info
            assert pool.step(ep, act("add 1")).observation == EPISODE_OVER
        assert out["good"].observation == "total 3" and not out["good"].done
        assert pool.step("good", act("win")).reward == 1.0
        assert pool.restarts == 0
