"""Env worker pool: env steps run in separate processes while the accelerator decodes.

    with EnvPool(num_workers=4, step_timeout=30) as pool:
        pool.submit_reset(ep, "babyai", task_id, {"levels": [...]})
        pool.submit_step(ep, reply_text)
        for r in pool.poll(timeout=0.0): ...  # PoolResult(kind, episode_id, result) per submission

Every submission yields exactly one result, of the submission's kind (a failed reset is a reset
result). An episode lives on one worker (its env object is there).

Faults end only the episode at fault. A worker whose request exceeds the timeout, or crashes a
worker twice (once, then again on a fresh worker), is killed and replaced; that episode gets
`StepResult("", 0.0, True, {"error": ...})`. The worker's other episodes are rebuilt on the new
worker by replaying their actions from reset (envs are deterministic given the task id); one
whose replayed observation differs from the last one handed out ends with
`info["error"] = "replay diverged: ..."`. A worker killed from outside (OOM, SIGKILL) thus loses
no episode. An env that raises, or returns a reward that is not a finite number or a `done` that
is not a bool, ends only its own episode (reward 0, `info["error"]`).
`num_workers=0` runs everything in-process at submit time (notebooks, tests; no timeouts).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import enum
import math
import multiprocessing as mp
import numbers
import time
import traceback
import weakref
from collections.abc import Hashable
from multiprocessing.connection import Connection, wait
from typing import Any, ClassVar

from envs.base import EPISODE_OVER, StepResult

EpisodeId = Hashable


class Kind(enum.Enum):
    RESET = "reset"
    STEP = "step"
    CLOSE = "close"
    REPLAY = "replay"  # internal: rebuilds an episode on a new worker; never handed out


# Requests and results are our own records: they cross the pipe to workers (pickled), never HTTP.
@dataclasses.dataclass(frozen=True)
class ResetRequest:
    episode_id: EpisodeId
    env_name: str
    spec: Any
    """The registered factory (``envs.factory_spec``), resolved in the worker."""
    task_id: int
    kwargs: dict[str, Any]
    kind: ClassVar[Kind] = Kind.RESET


@dataclasses.dataclass(frozen=True)
class StepRequest:
    episode_id: EpisodeId
    action: str
    kind: ClassVar[Kind] = Kind.STEP


@dataclasses.dataclass(frozen=True)
class CloseRequest:
    episode_id: EpisodeId
    kind: ClassVar[Kind] = Kind.CLOSE


@dataclasses.dataclass(frozen=True)
class ReplayRequest:
    """Reset as `reset` did, apply `actions`; the last observation must equal `expect`."""

    episode_id: EpisodeId
    reset: ResetRequest
    actions: tuple[str, ...]
    expect: str
    kind: ClassVar[Kind] = Kind.REPLAY


Request = ResetRequest | StepRequest | CloseRequest | ReplayRequest


@dataclasses.dataclass(frozen=True)
class PoolResult:
    """The answer to one submission: its kind, so a reset's result is never taken for a step's."""

    kind: Kind
    episode_id: EpisodeId
    result: StepResult


def _failure(req: Request, reason: str) -> PoolResult:
    return PoolResult(req.kind, req.episode_id, StepResult("", 0.0, True, {"error": reason}))


def _is_bool(x: Any) -> bool:
    # numpy bools count (dtype kind "b", 0-d) without importing numpy into every worker.
    return isinstance(x, bool) or (
        getattr(getattr(x, "dtype", None), "kind", None) == "b" and getattr(x, "shape", 1) == ()
    )


def checked(result: Any) -> StepResult:
    """`result` with a float reward and bool done, or an error result (reward 0, done) if the env
    broke the contract: one NaN score would make every advantage of the batch NaN."""
    if not isinstance(result, StepResult):
        problem = f"env returned {type(result).__name__}, not StepResult"
    elif not isinstance(result.reward, numbers.Real) or isinstance(result.reward, bool):
        problem = f"reward {result.reward!r} is not a number"
    elif not math.isfinite(result.reward):
        problem = f"reward {result.reward!r} is not finite"
    elif not _is_bool(result.done):
        problem = f"done {result.done!r} is not a bool"
    elif not isinstance(result.observation, str):
        problem = f"observation of type {type(result.observation).__name__} is not a str"
    elif not isinstance(result.info, dict):
        problem = f"info of type {type(result.info).__name__} is not a dict"
    else:
        result.reward, result.done = float(result.reward), bool(result.done)
        return result
    obs = getattr(result, "observation", "")
    info = getattr(result, "info", None)
    info = dict(info) if isinstance(info, dict) else {}
    info["error"] = f"invalid env result: {problem}"
    return StepResult(obs if isinstance(obs, str) else "", 0.0, True, info)


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

    def handle(self, req: Request) -> PoolResult:
        return PoolResult(req.kind, req.episode_id, self._run(req))

    def _reset(self, req: ResetRequest) -> tuple[Any, str]:
        import envs

        episode_id = req.episode_id
        key = (req.env_name, repr(sorted(req.kwargs.items())))
        if episode_id in self.live and self.live[episode_id][0] == key:
            env = self.live[episode_id][1]
        else:
            self._release(episode_id)
            env = self.idle[key].pop() if self.idle[key] else envs.resolve(req.spec)(**req.kwargs)
            self.live[episode_id] = (key, env)
        obs = env.reset(req.task_id)
        if not isinstance(obs, str):
            raise TypeError(f"reset returned {type(obs).__name__}, not str")
        return env, obs

    def _replay(self, req: ReplayRequest) -> StepResult:
        env, obs = self._reset(req.reset)
        for n, action in enumerate(req.actions, 1):
            r = checked(env.step(action))
            if r.done or r.info.get("error"):
                return self._diverged(req, f"action {n} of {len(req.actions)} ended the episode")
            obs = r.observation
        if obs != req.expect:
            return self._diverged(req, f"last observation differs after {len(req.actions)} actions")
        return StepResult("", 0.0, False, {})

    def _diverged(self, req: ReplayRequest, why: str) -> StepResult:
        self._release(req.episode_id)
        return StepResult("", 0.0, True, {"error": f"replay diverged: {why}"})

    def _run(self, req: Request) -> StepResult:
        episode_id = req.episode_id
        try:
            if isinstance(req, ResetRequest):
                env, obs = self._reset(req)
                return StepResult(
                    obs,
                    0.0,
                    False,
                    {"instruction": env.instruction(), "ack": env.ack},
                )
            if isinstance(req, StepRequest):
                if episode_id not in self.live:
                    return StepResult(
                        EPISODE_OVER,
                        0.0,
                        True,
                        {"error": "episode has no env (finished or never reset)"},
                    )
                result = checked(self.live[episode_id][1].step(req.action))
                if result.done:
                    self._release(episode_id)
                return result
            if isinstance(req, ReplayRequest):
                return self._replay(req)
            if isinstance(req, CloseRequest):
                self._release(episode_id)
                return StepResult("", 0.0, True, {})
            raise TypeError(f"unknown request {req!r}")
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
        if req is None:  # shutdown
            return
        reply = host.handle(req)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # e.g. an unpicklable info value: pickling fails before writing
            host._release(req.episode_id, broken=True)
            conn.send(_failure(req, f"result could not be sent: {type(e).__name__}: {e}"))


# -- parent side --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Worker:
    proc: Any
    conn: Connection
    pending: collections.deque[Request] = dataclasses.field(default_factory=collections.deque)
    inflight: Request | None = None
    deadline: float = 0.0  # of the inflight request
    episodes: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _Trace:
    """What rebuilds a live episode on a new worker: its reset, the actions answered since, and
    the last observation handed out (the replay must reproduce it)."""

    reset: ResetRequest
    actions: list[str]
    last_obs: str


class EnvPool:
    """Asynchronous env steps over `num_workers` processes (0 = in-process).

    Args:
      num_workers: worker processes; 0 runs envs in this process, synchronously.
      step_timeout: seconds one step may take before its worker is killed and replaced.
      reset_timeout: same for resets (env construction can be slow, e.g. the SciWorld JVM).
      start_method: multiprocessing start method; "spawn" keeps workers free of JAX state.

    Counters: `restarts` (workers replaced), `replayed` (episodes rebuilt on a new worker),
    `replay_failed` (episodes ended because their replay diverged or failed).
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
        self._lost: dict[EpisodeId, str] = {}  # ended while idle: next submission gets the error
        self._done: set = set()
        self._traces: dict[EpisodeId, _Trace] = {}
        # Worker deaths while an episode's request was in flight, unanswered; the second one
        # puts the fault on that request (a SIGKILL from outside hits a request once).
        self._crashes: dict[EpisodeId, int] = {}
        self._ready: collections.deque[PoolResult] = collections.deque()  # not yet handed out
        self.restarts = self.replayed = self.replay_failed = 0
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
        self._submit(ResetRequest(episode_id, env_name, spec, int(task_id), kwargs))

    def submit_step(self, episode_id: EpisodeId, action: str) -> None:
        """Send the model's reply for `episode_id`; the result arrives through `poll`."""
        if episode_id not in self._home:
            raise KeyError(f"episode {episode_id!r} was never reset; call submit_reset first")
        req = StepRequest(episode_id, action)
        if episode_id in self._lost:
            self._ready.append(_failure(req, self._lost.pop(episode_id)))
            self._done.add(episode_id)
            return
        if episode_id in self._done:
            over = StepResult(EPISODE_OVER, 0.0, True, {"error": "episode finished"})
            self._ready.append(PoolResult(Kind.STEP, episode_id, over))
            return
        self._submit(req)

    def close_episode(self, episode_id: EpisodeId) -> None:
        """Forget an episode and hand its env back for reuse (no result is produced)."""
        home = self._home.pop(episode_id, None)
        self._lost.pop(episode_id, None)
        self._done.discard(episode_id)
        self._traces.pop(episode_id, None)
        self._crashes.pop(episode_id, None)
        if home is None:
            return
        if self._local is not None:
            self._local._release(episode_id)
            return
        self._workers[home].episodes.discard(episode_id)
        self._workers[home].pending.append(CloseRequest(episode_id))
        self._dispatch(home)

    def _submit(self, req: ResetRequest | StepRequest) -> None:
        if self._local is not None:
            self._record(self._local.handle(req))
            return
        home = self._home[req.episode_id]
        self._workers[home].episodes.add(req.episode_id)
        self._workers[home].pending.append(req)
        self._dispatch(home)

    def _record(self, r: PoolResult) -> None:
        if r.result.done:
            self._done.add(r.episode_id)
        self._ready.append(r)

    def _dispatch(self, index: int) -> None:
        w = self._workers[index]
        if w.inflight is not None or not w.pending:
            return
        req = w.pending.popleft()
        w.inflight, w.deadline = req, time.monotonic() + self._timeout(req)
        try:
            w.conn.send(req)
        except (OSError, ValueError) as e:
            # The worker died idle: the request never reached it, so it is not at fault.
            self._fail_worker(index, f"worker crashed (pipe broken: {e})", blame=None)

    def _timeout(self, req: Request) -> float:
        if isinstance(req, ReplayRequest):
            return self.reset_timeout + self.step_timeout * len(req.actions)
        return self.reset_timeout if req.kind is Kind.RESET else self.step_timeout

    # -- results --------------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> list[PoolResult]:
        """Results that are ready, waiting up to `timeout` seconds for at least one."""
        end = time.monotonic() + max(timeout, 0.0)
        for i, w in enumerate(self._workers):
            if w.inflight is None and w.proc.exitcode is not None:  # died idle: rebuild now
                self._fail_worker(i, f"worker died (exit code {w.proc.exitcode})", blame=None)
        while not self._ready and self._workers:
            busy = [i for i, w in enumerate(self._workers) if w.inflight is not None]
            if not busy:
                break
            deadline = min(self._workers[i].deadline for i in busy)
            wait_for = max(0.0, min(end, deadline) - time.monotonic())
            handles = [self._workers[i].conn for i in busy] + [
                self._workers[i].proc.sentinel for i in busy
            ]
            ready = set(wait(handles, timeout=wait_for))
            for i in busy:
                w = self._workers[i]
                if w.conn in ready:
                    try:
                        reply: PoolResult = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(timeout=1.0)
                        self._fail_worker(i, f"worker crashed (exit code {w.proc.exitcode})")
                        continue
                    req, w.inflight = w.inflight, None
                    self._answered(i, req, reply)
                    self._dispatch(i)
                elif w.proc.sentinel in ready:
                    w.proc.join(timeout=1.0)
                    self._fail_worker(i, f"worker crashed (exit code {w.proc.exitcode})")
                elif time.monotonic() >= w.deadline:
                    req = w.inflight
                    msg = f"{req.kind.value} timed out after {self._timeout(req):g}s"
                    self._fail_worker(i, f"{msg}; worker restarted", blame="timeout")
            if time.monotonic() >= end:
                break
        out = list(self._ready)
        self._ready.clear()
        return out

    def _answered(self, index: int, req: Request, reply: PoolResult) -> None:
        ep, res = req.episode_id, reply.result
        if req.kind is Kind.CLOSE:  # closes produce no result
            return
        if req.kind is Kind.REPLAY:
            if self._home.get(ep) != index:  # closed meanwhile
                return
            if res.done or res.info.get("error"):
                self._end_replayed(index, ep, str(res.info.get("error", "replay failed")))
            else:
                self.replayed += 1
            return
        self._crashes.pop(ep, None)
        if self._home.get(ep) == index:
            if res.done or res.info.get("error"):
                self._traces.pop(ep, None)
            elif req.kind is Kind.RESET:
                self._traces[ep] = _Trace(req, [], res.observation)
            elif (trace := self._traces.get(ep)) is not None:
                trace.actions.append(req.action)
                trace.last_obs = res.observation
        self._record(reply)

    def _end_replayed(self, index: int, ep: EpisodeId, reason: str) -> None:
        """End an episode whose replay failed: its queued steps (up to a new reset) get the
        error; with none queued, its next step does."""
        self._traces.pop(ep, None)
        self.replay_failed += 1
        w = self._workers[index]
        keep: collections.deque[Request] = collections.deque()
        answered = restarted = False
        for r in w.pending:
            if r.episode_id == ep and not restarted:
                if r.kind is Kind.STEP:
                    self._record(_failure(r, reason))
                    answered = True
                    continue
                restarted = r.kind is Kind.RESET
            keep.append(r)
        w.pending = keep
        if not answered and not restarted:
            self._lost[ep] = reason

    def _fail_worker(self, index: int, reason: str, blame: str | None = "crash") -> None:
        """Kill and replace worker `index`; end only the episode at fault, replay the others.

        blame: "timeout" (the request in flight hung: at fault), "crash" (it was in flight when
        the worker died: at fault if that already happened once), None (nobody is at fault).
        """
        w = self._workers[index]
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5.0)
        w.conn.close()
        fresh = self._spawn()
        fresh.episodes = w.episodes
        self._workers[index] = fresh
        self.restarts += 1

        culprit = suspect = None
        if w.inflight is not None and blame is not None and w.inflight.kind is not Kind.CLOSE:
            ep = w.inflight.episode_id
            crashes = self._crashes.pop(ep, 0) + 1
            if blame == "timeout" or crashes > 1:
                culprit = ep
                self.replay_failed += w.inflight.kind is Kind.REPLAY
                if crashes > 1:
                    reason += ", also on a fresh worker"
            else:
                self._crashes[ep], suspect = crashes, ep
        queue = ([w.inflight] if w.inflight is not None else []) + list(w.pending)
        if culprit is not None:
            # The request at fault and those of its episode queued behind it are answered.
            self._traces.pop(culprit, None)
            ours = [r for r in queue if r.episode_id == culprit and r.kind in _ANSWERED]
            for r in ours:
                self._record(_failure(r, reason))
            if not ours and culprit in self._home:  # its replay hung or crashed
                self._lost[culprit] = reason
        # Unanswered requests keep their order, each behind its episode's replay. The suspect
        # goes first, so if it crashes the new worker too, the others are not replayed twice.
        requeue = [r for r in queue if r.episode_id != culprit and r.kind in _ANSWERED]
        first: list[Request] = []
        if suspect is not None:
            if suspect in self._traces:
                first.append(self._replay_request(suspect))
            if w.inflight.kind is not Kind.REPLAY:
                first.append(requeue.pop(0))  # the inflight request heads the queue
        replays = [
            self._replay_request(ep)
            for ep in w.episodes
            if ep != suspect and ep != culprit and ep in self._traces
        ]
        fresh.pending.extend(first + replays + requeue)
        self._dispatch(index)

    def _replay_request(self, ep: EpisodeId) -> ReplayRequest:
        t = self._traces[ep]
        return ReplayRequest(ep, t.reset, tuple(t.actions), t.last_obs)

    # -- blocking conveniences ------------------------------------------------------------------
    def _await(self, kind: Kind, episode_id: EpisodeId) -> StepResult:
        stash = []
        try:
            while True:
                for r in self.poll(timeout=1.0):
                    if r.kind is kind and r.episode_id == episode_id:
                        return r.result
                    stash.append(r)
        finally:
            self._ready.extendleft(reversed(stash))

    def reset(
        self, episode_id: EpisodeId, env_name: str, task_id: int, env_kwargs: dict | None = None
    ) -> StepResult:
        self.submit_reset(episode_id, env_name, task_id, env_kwargs)
        return self._await(Kind.RESET, episode_id)

    def step(self, episode_id: EpisodeId, action: str) -> StepResult:
        self.submit_step(episode_id, action)
        return self._await(Kind.STEP, episode_id)

    def step_many(self, actions: dict[EpisodeId, str]) -> dict[EpisodeId, StepResult]:
        """Step several episodes concurrently and wait for all of them."""
        for ep, action in actions.items():
            self.submit_step(ep, action)
        out: dict[EpisodeId, StepResult] = {}
        stash = []
        while len(out) < len(actions):
            for r in self.poll(timeout=1.0):
                if r.kind is Kind.STEP and r.episode_id in actions and r.episode_id not in out:
                    out[r.episode_id] = r.result
                else:
                    stash.append(r)
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


_ANSWERED = (Kind.RESET, Kind.STEP)  # request kinds whose submitter waits for a result


def _close_ref(ref: weakref.ref[EnvPool]) -> None:
    pool = ref()
    if pool is not None:
        pool.close()
