"""The env side of the rollout: an ``envs.pool.EnvPool`` bound to one env name and its kwargs.

The rollout keys episodes by uid and needs: submit_reset / submit_step (non-blocking),
poll(timeout) -> [PoolResult(kind, uid, StepResult)], initial_messages(reset_result),
end_episode, close. Failures (crashed or hung workers, env exceptions) come back as results of
the submission's kind with ``info["error"]`` and ``done=True``; they never raise here.
"""

from __future__ import annotations

import envs
from envs.base import StepResult
from envs.pool import EnvPool, PoolResult


class EnvDriver:
    def __init__(
        self,
        name: str,
        kwargs: dict | None = None,
        *,
        num_workers: int = 0,
        step_timeout_s: float = 60.0,
        reset_timeout_s: float | None = None,
    ):
        spec = envs.factory_spec(name)  # unknown env names fail here, before anything compiles
        envs._check_kwargs(name, envs.resolve(spec), dict(kwargs or {}))
        self.name, self.kwargs = name, dict(kwargs or {})
        self.pool = EnvPool(
            num_workers=num_workers,
            step_timeout=step_timeout_s,
            reset_timeout=max(step_timeout_s, reset_timeout_s or 120.0),
        )

    def submit_reset(self, uid: int, task_id: int) -> None:
        self.pool.submit_reset(uid, self.name, task_id, self.kwargs)

    def submit_step(self, uid: int, text: str) -> None:
        self.pool.submit_step(uid, text)

    def poll(self, timeout: float = 0.0) -> list[PoolResult]:
        return self.pool.poll(timeout)

    @staticmethod
    def initial_messages(reset: StepResult) -> list[dict]:
        return envs.initial_messages(reset.info, reset.observation)

    def end_episode(self, uid: int) -> None:
        self.pool.close_episode(uid)

    def close(self) -> None:
        self.pool.close()


def make_driver(env_cfg) -> EnvDriver:
    """The driver for an ``EnvSection`` config (``num_workers=0``: envs in this process)."""
    return EnvDriver(
        env_cfg.name,
        env_cfg.kwargs,
        num_workers=env_cfg.num_workers,
        step_timeout_s=env_cfg.step_timeout_s,
    )
