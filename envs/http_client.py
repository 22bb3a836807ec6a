"""Client for AgentGym env servers (unchanged upstream servers, or ours from envs/server.py).

    env = envs.make("http", base_url="http://127.0.0.1:36001", env_name="babyai")

Each AgentGym env server speaks its own dialect (`WIRES`), reproduced from AgentGym's clients:
BabyAI, TextCraft and SciWorld name the env `id` and take the task as `data_idx`; SearchQA,
WebShop and WebArena name it `env_idx`, return a bare id (WebArena: `{"env_idx"}`) from
`/create`, and give the first observation from `GET /observation` (SearchQA's reset takes the
task as `id`, WebShop's as `session_id`, WebArena's as `idx`). TextCraft's `/create` also
resets. BabyAI and SciWorld report the step reward as `score`; WebShop's step reply names the
observation `state`, WebArena's names done `terminated`. The reply is parsed here and only the
action is posted (SearchQA and WebArena post the raw reply). Errors arrive as `{"error": ...}`
with HTTP 200, or as a non-200 status; both raise `EnvServerError` (a step records a failure).
An env the server has dropped (idle expiry) is created anew on the next reset.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from envs.base import (
    Env,
    Parsed,
    StepResult,
    format_instruction,
    parse_agentgym_action,
    parse_last_action,
)


@dataclasses.dataclass(frozen=True)
class Wire:
    """One AgentGym server's dialect, as its own client speaks it."""

    env_key: str = "id"  # request field / query parameter naming the env
    task_key: str = "data_idx"  # /reset field carrying the task id
    create_body: dict | None = None  # JSON body of /create (None: no body)
    observe_after_reset: bool = False  # first observation from GET /observation
    obs_key: str = "observation"  # step reply field with the observation
    done_key: str = "done"
    reward_key: str = "reward"
    reward_scale: float = 1.0
    reset_extra: tuple[tuple[str, Any], ...] = ()
    raw_reply: bool = False  # the server parses the model's reply itself


WIRES = {
    "babyai": Wire(reward_key="score"),
    "textcraft": Wire(create_body={"commands": None, "goal": None}),
    # ScienceWorld scores 0-100; we report 0-1 (failures, -100, as 0), raw in info
    "sciworld": Wire(reward_key="score", reward_scale=0.01),
    "searchqa": Wire("env_idx", "id", {"id": 0}, True, raw_reply=True),
    "webshop": Wire("env_idx", "session_id", None, True, obs_key="state"),
    "webarena": Wire(
        "env_idx", "idx", None, True, done_key="terminated", reset_extra=(("seed", 0),)
    ),
}
LAST_ACTION_PARSER = {"sciworld", "webshop"}


def _known_instruction(env_name: str) -> str | None:
    import importlib

    module = {
        "babyai": "envs.babyai",
        "textcraft": "envs.textcraft",
        "sciworld": "envs.sciworld",
        "searchqa": "envs.searchqa",
        "webshop": "envs.webshop",
    }.get(env_name)
    return importlib.import_module(module).INSTRUCTION if module else None


class EnvServerError(RuntimeError):
    """The server answered `{"error": ...}` or could not be reached after retries."""


class HttpEnv(Env):
    name = "http"

    def __init__(
        self,
        base_url: str,
        env_name: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        instruction: str | None = None,
        create_body: dict | None = None,
        train_ids: tuple[int, int] | list[int] | None = None,
        test_ids: tuple[int, int] | list[int] | None = None,
    ) -> None:
        """base_url: the env server, e.g. "http://127.0.0.1:36001"; env_name: which AgentGym env
        it serves (selects its dialect, parser and default instruction). train_ids / test_ids:
        ``[start, stop)`` of the server's task ids per split (read by ``task_ids``)."""
        super().__init__()
        import httpx

        self.base_url, self.env_name = base_url.rstrip("/"), env_name.lower()
        self.wire = WIRES.get(self.env_name, Wire())
        self.retries, self.backoff = retries, backoff
        self._instruction = (
            instruction
            or _known_instruction(self.env_name)
            or format_instruction(f"You are an agent in the {env_name} environment.")
        )
        self._create_body = create_body if create_body is not None else self.wire.create_body
        self._client = httpx.Client(timeout=timeout)
        self.observation = ""
        self._create()

    def _create(self) -> None:
        created = self._request("POST", "/create", json=self._create_body)
        if isinstance(created, dict):
            key = next((k for k in (self.wire.env_key, "id", "env_idx") if k in created), None)
            if key is None:
                raise EnvServerError(f"POST /create: no env id in {str(created)[:300]}")
            self.env_id = created[key]
            self.observation = str(created.get("observation", ""))  # TextCraft resets here
        else:
            self.env_id = created

    @classmethod
    def task_ids(cls, split: str = "train", train_ids=None, test_ids=None, **_: Any) -> list[int]:
        """A remote env's task ids are its server's (AgentGym passes a data length): the split's
        ``[start, stop)`` from ``env.kwargs.train_ids`` / ``test_ids``."""
        bounds = {"train": train_ids, "test": test_ids}.get(split)
        if bounds is None:
            raise ValueError(
                f"env http: the server's task ids for split {split!r} are unknown; set "
                "env.kwargs.train_ids and env.kwargs.test_ids to [start, stop) of its task ids"
            )
        start, stop = (int(b) for b in bounds)
        if not 0 <= start < stop:
            raise ValueError(
                f"env http: {split}_ids={list(bounds)} must be [start, stop), start < stop"
            )
        return list(range(start, stop))

    def instruction(self) -> str:
        return self._instruction

    def parse(self, reply: str) -> Parsed:
        if self.wire.raw_reply:
            return Parsed(reply)
        return (
            parse_last_action(reply)
            if self.env_name in LAST_ACTION_PARSER
            else parse_agentgym_action(reply)
        )

    def _request(
        self,
        method: str,
        path: str,
        json: dict | None = None,
        params: dict | None = None,
        retry_timeouts: bool = True,
    ) -> Any:
        import httpx

        retryable: tuple = (httpx.ConnectError, httpx.RemoteProtocolError)
        if retry_timeouts:
            retryable += (httpx.TimeoutException,)
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.request(method, self.base_url + path, json=json, params=params)
                break
            except retryable as e:
                if attempt == self.retries:
                    raise EnvServerError(
                        f"{method} {self.base_url}{path} failed after {attempt + 1} tries: {e!r}"
                    ) from e
                time.sleep(self.backoff * 2**attempt)
        if resp.status_code != 200:
            raise EnvServerError(f"{method} {path} -> HTTP {resp.status_code}: {resp.text[:500]}")
        try:
            data = resp.json()
        except ValueError as e:
            raise EnvServerError(f"{method} {path}: reply is not JSON: {resp.text[:200]}") from e
        if isinstance(data, dict) and "error" in data:
            raise EnvServerError(f"{method} {path}: {data['error']}")
        return data

    def _reset(self, task_id: int) -> str:
        try:
            return self._reset_once(task_id)
        except EnvServerError as e:
            if "is not valid" not in str(e):
                raise
        self._create()  # the server dropped our env (idle expiry, restart): start a new one
        return self._reset_once(task_id)

    def _reset_once(self, task_id: int) -> str:
        wire = self.wire
        body = {wire.env_key: self.env_id, wire.task_key: task_id, **dict(wire.reset_extra)}
        data = self._request("POST", "/reset", json=body)
        if wire.observe_after_reset:
            # As AgentGym's clients do: the reset reply is ignored, /observation is the prompt.
            data = self._request("GET", "/observation", params={wire.env_key: self.env_id})
        if isinstance(data, list):  # WebShop: [observation, null]
            data = data[0] if data else ""
        if isinstance(data, dict):
            obs = str(data.get("observation", ""))
            if data.get("task_description"):  # SciWorld: as AgentGym's client joins them
                obs = data["task_description"] + ("\n" + obs if obs else "")
        else:
            obs = str(data)
        if self.env_name == "searchqa" and obs.startswith(self._instruction):
            obs = obs[len(self._instruction) :].lstrip("\n")  # it is our first message already
        self.observation = obs
        return obs

    def _step(self, action: str) -> StepResult:
        wire = self.wire
        # A step is not idempotent: a timed-out request may have been applied, so only
        # connection failures (request never sent) are retried here.
        try:
            data = self._request(
                "POST",
                "/step",
                json={wire.env_key: self.env_id, "action": action},
                retry_timeouts=False,
            )
        except EnvServerError as e:
            return StepResult(f"Error: {e}", 0.0, True, {"error": str(e)})
        if not isinstance(data, dict):
            msg = f"POST /step: unexpected reply {str(data)[:200]}"
            return StepResult(f"Error: {msg}", 0.0, True, {"error": msg})
        obs_key = next((k for k in (wire.obs_key, "observation", "state") if k in data), None)
        done_key = next((k for k in (wire.done_key, "done", "terminated") if k in data), None)
        reward_key = wire.reward_key if wire.reward_key in data else "reward"
        raw = float(data.get(reward_key, 0.0) or 0.0)
        info = dict(data["info"]) if isinstance(data.get("info"), dict) else {}
        info.update((k, v) for k, v in data.items() if k not in (obs_key, done_key, "info"))
        info["raw_reward"] = raw
        self.observation = str(data.get(obs_key, "")) if obs_key else ""
        done = bool(data.get(done_key)) if done_key else False
        if self.env_name == "sciworld":
            done, raw = done or raw < 0, max(raw, 0.0)  # ScienceWorld's -100 is a failed end
        return StepResult(self.observation, raw * wire.reward_scale, done, info)

    def close(self) -> None:
        try:
            self._request(
                "POST", "/close", json={self.wire.env_key: self.env_id}, retry_timeouts=False
            )
        except Exception:  # some upstream servers have no /close
            pass
        self._client.close()
