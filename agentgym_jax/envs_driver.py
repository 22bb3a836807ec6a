"""What the rollout needs from environments, keyed by episode uid:

    submit_reset(uid, task_id) / submit_step(uid, reply_text)   (non-blocking)
    poll(timeout) -> [(uid, StepResult)]                          (completed requests)
    initial_messages(uid, first_observation) -> chat messages
    end_episode(uid) / close()

A reset result is a ``StepResult`` whose observation is the first observation. Failures never
raise here: they come back as results with ``info["error"]`` and ``done=True``.
"""

from __future__ import annotations

import collections
import logging
import traceback
from typing import Any

import envs
from envs.base import StepResult

log = logging.getLogger(__name__)


class LocalDriver:
  """Envs in this process, stepped synchronously (notebooks, tests, ``env.num_workers=0``)."""

  def __init__(self, name: str, kwargs: dict | None = None):
    self.name, self.kwargs = name, dict(kwargs or {})
    self._proto = envs.make(name, **self.kwargs)  # validates name/kwargs up front
    self._idle = [self._proto]
    self._live: dict[int, Any] = {}
    self._out: collections.deque = collections.deque()

  def _env(self, uid: int):
    if uid not in self._live:
      self._live[uid] = self._idle.pop() if self._idle else envs.make(self.name, **self.kwargs)
    return self._live[uid]

  def submit_reset(self, uid: int, task_id: int) -> None:
    try:
      obs = self._env(uid).reset(task_id)
      self._out.append((uid, StepResult(obs, 0.0, False, {})))
    except Exception as e:  # an env bug must end this episode, not the run
      log.error("env %s reset(%s) failed: %s", self.name, task_id, e)
      self._out.append((uid, StepResult("", 0.0, True, {"error": f"reset failed: {e!r}",
                                                         "traceback": traceback.format_exc()})))

  def submit_step(self, uid: int, text: str) -> None:
    try:
      res = self._env(uid).step(text)
    except Exception as e:
      log.error("env %s step failed: %s", self.name, e)
      res = StepResult("", 0.0, True, {"error": f"step failed: {e!r}"})
    self._out.append((uid, res))

  def poll(self, timeout: float = 0.0) -> list[tuple[int, StepResult]]:
    out = list(self._out)
    self._out.clear()
    return out

  def initial_messages(self, uid: int, first_obs: str) -> list[dict]:
    return envs.initial_messages(self._live.get(uid, self._proto), first_obs)

  def end_episode(self, uid: int) -> None:
    env = self._live.pop(uid, None)
    if env is not None:
      self._idle.append(env)

  def close(self) -> None:
    for env in list(self._live.values()) + self._idle:
      try:
        env.close()
      except Exception:
        pass
    self._live.clear()
    self._idle.clear()


def make_driver(env_cfg) -> Any:
  """The env driver for an ``EnvSection`` config: a worker-process pool or in-process envs."""
  if env_cfg.num_workers <= 0:
    return LocalDriver(env_cfg.name, env_cfg.kwargs)
  from envs.pool import EnvPool  # noqa: F401 (import error = clear message below)

  return PoolDriver(env_cfg)


class PoolDriver:
  """Adapter over ``envs.pool.EnvPool`` (worker processes, timeouts, restarts)."""

  def __init__(self, env_cfg):
    from envs.pool import EnvPool

    self.name, self.kwargs = env_cfg.name, dict(env_cfg.kwargs)
    self._proto = envs.make(self.name, **self.kwargs)
    self.pool = EnvPool(num_workers=env_cfg.num_workers, step_timeout=env_cfg.step_timeout_s)

  def submit_reset(self, uid, task_id):
    self.pool.submit_reset(uid, self.name, task_id, self.kwargs)

  def submit_step(self, uid, text):
    self.pool.submit_step(uid, text)

  def poll(self, timeout=0.0):
    return self.pool.poll(timeout)

  def initial_messages(self, uid, first_obs):
    return envs.initial_messages(self._proto, first_obs)

  def end_episode(self, uid):
    self.pool.end_episode(uid)

  def close(self):
    self.pool.close()
    self._proto.close()
