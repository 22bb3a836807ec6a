"""Env pool throughput: steps/s with 1 and 2 worker processes on BabyAI and TextCraft.

Each episode is driven by the scripted expert, many episodes in flight, steps submitted
asynchronously the way the rollout does. Prints one JSON object.
"""

from __future__ import annotations

import json
import time

from envs.babyai import expert_action
from envs.pool import EnvPool, Kind
from envs.textcraft import expert_plan

BABYAI = dict(levels=["GoToRedBallNoDists", "GoToObj", "GoToLocal", "PickupLoc"])


def run(
    env_name: str, kwargs: dict, num_workers: int, episodes: int = 16, duration: float = 6.0
) -> float:
    plans: dict[int, list[str]] = {}
    obs: dict[int, str] = {}
    turns: dict[int, int] = {}
    # TextCraft ids below 30 have fast live resets even without the precomputed task table.
    next_task = [1000 if env_name == "babyai" else 0]
    steps = 0

    def action(ep: int) -> str:
        if env_name == "babyai":
            turns[ep] += 1
            return f"Thought:\nok\n\nAction:\n{expert_action(obs[ep], turns[ep])}"
        plan = plans[ep] or ["inventory"]
        return f"Thought:\nok\n\nAction:\n{plan.pop(0)}"

    with EnvPool(num_workers=num_workers, step_timeout=60) as pool:
        for ep in range(episodes):
            pool.submit_reset(
                ep, env_name, (next_task[0] + ep) % (10**6 if env_name == "babyai" else 30), kwargs
            )
        next_task[0] += episodes
        warm = pool.poll(timeout=60)
        pending = {r.episode_id for r in warm}
        while len(pending) < episodes:
            warm += pool.poll(timeout=60)
            pending = {r.episode_id for r in warm}
        queue = warm
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            for r in queue:
                ep, res = r.episode_id, r.result
                if r.kind is Kind.RESET:
                    obs[ep], turns[ep] = res.observation, 0
                    plans[ep] = expert_plan(res.observation) if env_name == "textcraft" else []
                elif res.done or turns.get(ep, 0) > 20:
                    pool.submit_reset(
                        ep, env_name, next_task[0] % (10**6 if env_name == "babyai" else 30), kwargs
                    )
                    next_task[0] += 1
                    continue
                else:
                    steps += 1
                    obs[ep] = res.observation
                pool.submit_step(ep, action(ep))
            queue = pool.poll(timeout=1.0)
        return steps / (time.perf_counter() - start)


def main() -> None:
    out: dict[str, float] = {}
    for name, kwargs in (("babyai", BABYAI), ("textcraft", {})):
        one, two = run(name, kwargs, 1), run(name, kwargs, 2)
        out[f"{name}_steps_per_s_1_worker"] = round(one, 1)
        out[f"{name}_steps_per_s_2_workers"] = round(two, 1)
        out[f"{name}_ratio_2_over_1"] = round(two / one, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
