"""Env worker pool: env steps run in separate processes while the accelerator decodes.

    with EnvPool(num_workers=4, step_timeout=30) as pool:
        pool.submit_reset(ep, "babyai", task_id, {"levels": [...]})
        pool.submit_step(ep, reply_text)
        for ep, result in pool.poll(timeout=0.0): ...       # StepResult per submission

Every submission yields exactly one result. An episode lives on one worker (its env object is
there). A worker that crashes or exceeds the timeout is killed and replaced; the episode being
served gets `StepResult("", 0.0, True, {"error": ...})`, and the worker's other episodes get the
same as the answer to their next submission. An env that raises ends only its own episode.
`num_workers=0` runs everything in-process at submit time (notebooks, tests; no timeouts).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import multiprocessing as mp
import time
import traceback
import weakref
from collections.abc import Hashable
from multiprocessing.connection import Connection, wait
from typing import Any

from envs.base import EPISODE_OVER, StepResult

EpisodeId = Hashable


# -- worker side --------------------------------------------------------------------------------
class _EnvHost:
    """Holds env instances in one process; recycles them across episodes (JVM/tree start-up)."""

    def __init__(self) -> None:
        self.live: dict[EpisodeId, tuple[Any, Any]] = {}  # episode -> (key, env)
        self.idle: dict[Any, list[Any]] = collections.defaultdict(list)

    def _release(self, episode_id: EpisodeId, broken: bool = False) -> None:
        key, env = self.live.pop(episode_id, (None, None))
        if env is None:
            return
        if broken:
            try:
                env.close()
            except Exception:
                pass
        else:
            self.idle[key].append(env)

    def handle(self, req: tuple) -> StepResult:
        kind, episode_id = req[0], req[1]
        try:
            if kind == "reset":
                import envs

                name, spec, task_id, kwargs = req[2:]
                key = (name, repr(sorted(kwargs.items())))
                if episode_id in self.live and self.live[episode_id][0] == key:
                    env = self.live[episode_id][1]
                else:
                    self._release(episode_id)
                    env = self.idle[key].pop() if self.idle[key] else envs.resolve(spec)(**kwargs)
                    self.live[episode_id] = (key, env)
                obs = env.reset(task_id)
                return StepResult(
                    obs,
                    0.0,
                    False,
                    {"reset": True, "instruction": env.instruction(), "ack": env.ack},
                )
            if kind == "step":
                if episode_id not in self.live:
                    return StepResult(
                        EPISODE_OVER,
                        0.0,
                        True,
                        {"error": "episode has no env (finished or never reset)"},
                    )
                result = self.live[episode_id][1].step(req[2])
                if result.done:
                    self._release(episode_id)
                return result
            if kind == "close":
                self._release(episode_id)
                return StepResult("", 0.0, True, {"closed": True})
            raise ValueError(f"unknown request kind {kind!r}")
        except Exception as e:  # an env bug ends its episode, never the worker
            self._release(episode_id, broken=True)
            return StepResult(
                "",
                0.0,
                True,
                {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()},
            )


def _worker_main(conn: Connection) -> None:
    host = _EnvHost()
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if req is None:
            return
        conn.send((req[1], host.handle(req)))


# -- parent side --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Worker:
    proc: Any
    conn: Connection
    pending: collections.deque = dataclasses.field(default_factory=collections.deque)
    inflight: tuple | None = None  # (request, deadline)
    episodes: set = dataclasses.field(default_factory=set)


class EnvPool:
    """Asynchronous env steps over `num_workers` processes (0 = in-process).

    Args:
      num_workers: worker processes; 0 runs envs in this process, synchronously.
      step_timeout: seconds one step may take before its worker is killed and replaced.
      reset_timeout: same for resets (env construction can be slow, e.g. the SciWorld JVM).
      start_method: multiprocessing start method; "spawn" keeps workers free of JAX state.
    """

    def __init__(
        self,
        num_workers: int = 2,
        step_timeout: float = 30.0,
        reset_timeout: float = 120.0,
        start_method: str = "spawn",
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers, self.step_timeout, self.reset_timeout = (
            num_workers,
            step_timeout,
            reset_timeout,
        )
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = [self._spawn() for _ in range(num_workers)]
        self._local = _EnvHost() if num_workers == 0 else None
        self._home: dict[EpisodeId, int] = {}  # episode -> worker index
        self._lost: dict[EpisodeId, str] = {}  # episodes whose worker died while idle
        self._done: set = set()
        self._ready: collections.deque = collections.deque()  # results not yet handed out
        self.restarts = 0
        self._closed = False
        atexit.register(_close_ref, weakref.ref(self))

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    # -- submissions ----------------------------------------------------------------------------
    def submit_reset(
        self,
        episode_id: EpisodeId,
        env_name: str,
        task_id: int,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Start (or restart) `episode_id` on task `task_id`; its result carries the first
        observation and, in `info`, the env's `instruction` and `ack` for the prompt."""
        import envs

        spec = envs.factory_spec(env_name)  # unknown names fail here, in the caller
        kwargs = dict(env_kwargs or {})
        envs._check_kwargs(env_name, envs.resolve(spec), kwargs)
        self._lost.pop(episode_id, None)
        self._done.discard(episode_id)
        if episode_id not in self._home:
            load = [len(w.episodes) + len(w.pending) for w in self._workers] or [0]
            self._home[episode_id] = load.index(min(load))
        self._submit(episode_id, ("reset", episode_id, env_name, spec, int(task_id), kwargs))

    def submit_step(self, episode_id: EpisodeId, action: str) -> None:
        """Send the model's reply for `episode_id`; the result arrives through `poll`."""
        if episode_id not in self._home:
            raise KeyError(f"episode {episode_id!r} was never reset; call submit_reset first")
        if episode_id in self._lost:
            self._ready.append(
                (episode_id, StepResult("", 0.0, True, {"error": self._lost.pop(episode_id)}))
            )
            self._done.add(episode_id)
            return
        if episode_id in self._done:
            self._ready.append(
                (episode_id, StepResult(EPISODE_OVER, 0.0, True, {"error": "episode finished"}))
            )
            return
        self._submit(episode_id, ("step", episode_id, action))

    def close_episode(self, episode_id: EpisodeId) -> None:
        """Forget an episode and hand its env back for reuse (no result is produced)."""
        home = self._home.pop(episode_id, None)
        self._lost.pop(episode_id, None)
        self._done.discard(episode_id)
        if home is None:
            return
        if self._local is not None:
            self._local._release(episode_id)
            return
        self._workers[home].episodes.discard(episode_id)
        self._workers[home].pending.append(("close", episode_id))
        self._dispatch(home)

    def _submit(self, episode_id: EpisodeId, req: tuple) -> None:
        if self._local is not None:
            self._record(episode_id, self._local.handle(req))
            return
        home = self._home[episode_id]
        self._workers[home].episodes.add(episode_id)
        self._workers[home].pending.append(req)
        self._dispatch(home)

    def _record(self, episode_id: EpisodeId, result: StepResult) -> None:
        if result.done:
            self._done.add(episode_id)
        self._ready.append((episode_id, result))

    def _dispatch(self, index: int) -> None:
        w = self._workers[index]
        if w.inflight is not None or not w.pending:
            return
        req = w.pending.popleft()
        timeout = self.reset_timeout if req[0] == "reset" else self.step_timeout
        w.inflight = (req, time.monotonic() + timeout)
        try:
            w.conn.send(req)
        except (OSError, ValueError) as e:
            self._fail_worker(index, f"worker crashed (pipe broken: {e})")

    # -- results --------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> list[tuple[EpisodeId, StepResult]]:
        """Results that are ready, waiting up to `timeout` seconds for at least one."""
        end = time.monotonic() + max(timeout, 0.0)
        while not self._ready and self._workers:
            busy = [i for i, w in enumerate(self._workers) if w.inflight is not None]
            if not busy:
                break
            deadline = min(self._workers[i].inflight[1] for i in busy)
            wait_for = max(0.0, min(end, deadline) - time.monotonic())
            handles = [self._workers[i].conn for i in busy] + [
                self._workers[i].proc.sentinel for i in busy
            ]
            ready = set(wait(handles, timeout=wait_for))
            for i in busy:
                w = self._workers[i]
                if w.conn in ready:
                    try:
                        episode_id, result = w.conn.recv()
                    except (EOFError, OSError):
                        self._fail_worker(i, f"worker crashed (exit code {w.proc.exitcode})")
                        continue
                    w.inflight = None
                    if result.info.get("closed"):
                        w.episodes.discard(episode_id)
                    else:
                        self._record(episode_id, result)
                    self._dispatch(i)
                elif w.proc.sentinel in ready:
                    w.proc.join(timeout=1.0)
                    self._fail_worker(i, f"worker crashed (exit code {w.proc.exitcode})")
                elif time.monotonic() >= w.inflight[1]:
                    kind = w.inflight[0][0]
                    limit = self.reset_timeout if kind == "reset" else self.step_timeout
                    self._fail_worker(i, f"{kind} timed out after {limit:g}s; worker restarted")
            if time.monotonic() >= end:
                break
        out = list(self._ready)
        self._ready.clear()
        return out

    def _fail_worker(self, index: int, reason: str) -> None:
        """Kill and replace worker `index`; end the episode it was serving and mark the rest lost."""
        w = self._workers[index]
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5.0)
        w.conn.close()
        served = w.inflight[0][1] if w.inflight is not None else None
        if served is not None and w.inflight[0][0] != "close":
            self._record(served, StepResult("", 0.0, True, {"error": reason}))
        for req in w.pending:  # queued behind the failure: answered, never dropped
            if req[0] != "close":
                self._record(req[1], StepResult("", 0.0, True, {"error": reason}))
        for ep in w.episodes:
            if ep != served and all(req[1] != ep for req in w.pending) and ep not in self._done:
                self._lost[ep] = reason
        fresh = self._spawn()
        self._workers[index] = fresh
        self.restarts += 1

    # -- blocking conveniences ------------------------------------------------------------------
    def _await(self, episode_id: EpisodeId) -> StepResult:
        stash = []
        try:
            while True:
                for ep, res in self.poll(timeout=1.0):
                    if ep == episode_id:
                        return res
                    stash.append((ep, res))
        finally:
            self._ready.extendleft(reversed(stash))

    def reset(
        self, episode_id: EpisodeId, env_name: str, task_id: int, env_kwargs: dict | None = None
    ) -> StepResult:
        self.submit_reset(episode_id, env_name, task_id, env_kwargs)
        return self._await(episode_id)

    def step(self, episode_id: EpisodeId, action: str) -> StepResult:
        self.submit_step(episode_id, action)
        return self._await(episode_id)

    def step_many(self, actions: dict[EpisodeId, str]) -> dict[EpisodeId, StepResult]:
        """Step several episodes concurrently and wait for all of them."""
        for ep, action in actions.items():
            self.submit_step(ep, action)
        out: dict[EpisodeId, StepResult] = {}
        stash = []
        while len(out) < len(actions):
            for ep, res in self.poll(timeout=1.0):
                (
                    out.__setitem__(ep, res)
                    if ep in actions and ep not in out
                    else stash.append((ep, res))
                )
        self._ready.extendleft(reversed(stash))
        return out

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.proc.join(timeout=2.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=2.0)
            w.conn.close()
        self._workers = []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def worker_of(self, episode_id: EpisodeId) -> int:
        return self._home[episode_id]


def _close_ref(ref: weakref.ref[EnvPool]) -> None:
    pool = ref()
    if pool is not None:
        pool.close()
