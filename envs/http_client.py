"""Client for AgentGym env servers (unchanged upstream servers, or ours from envs/server.py).

    env = envs.make("http", base_url="http://127.0.0.1:36001", env_name="babyai")

Protocol quirks reproduced from AgentGym's clients: the reply is parsed here and only the action
is posted (SearchQA posts the raw reply); BabyAI and SciWorld report the step reward as `score`;
SearchQA addresses envs by `env_idx`, its `/create` returns a bare id and its `/reset` takes the
task index as `id`; errors arrive as `{"error": ...}` with HTTP 200.
"""

from __future__ import annotations

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

SCORE_AS_REWARD = {"babyai", "sciworld"}
REWARD_SCALE = {"sciworld": 0.01}  # ScienceWorld scores 0-100; we report 0-1, raw in info
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
    ) -> None:
        """base_url: the env server, e.g. "http://127.0.0.1:36001"; env_name: which AgentGym env
        it serves (selects protocol quirks, parser and default instruction)."""
        super().__init__()
        import httpx

        self.base_url, self.env_name = base_url.rstrip("/"), env_name.lower()
        self.retries, self.backoff = retries, backoff
        self._instruction = (
            instruction
            or _known_instruction(self.env_name)
            or format_instruction(f"You are an agent in the {env_name} environment.")
        )
        self._client = httpx.Client(timeout=timeout)
        self._id_key = "env_idx" if self.env_name == "searchqa" else "id"
        created = self._request("POST", "/create", json=create_body or {}, retry_timeouts=True)
        self.env_id = created if isinstance(created, int) else created["id"]
        self.observation = created.get("observation", "") if isinstance(created, dict) else ""

    @classmethod
    def task_ids(cls, split: str = "train", **_: Any) -> list[int]:
        raise TypeError(
            "task ids of a remote env are defined by its server; pass them to TaskSampler directly"
        )

    def instruction(self) -> str:
        return self._instruction

    def parse(self, reply: str) -> Parsed:
        if self.env_name == "searchqa":
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
        data = resp.json()
        if isinstance(data, dict) and "error" in data:
            raise EnvServerError(f"{method} {path}: {data['error']}")
        return data

    def _reset(self, task_id: int) -> str:
        body = {
            self._id_key: self.env_id,
            ("id" if self.env_name == "searchqa" else "data_idx"): task_id,
        }
        data = self._request("POST", "/reset", json=body)
        obs = data.get("observation", "") if isinstance(data, dict) else str(data)
        if self.env_name == "sciworld" and isinstance(data, dict) and "task_description" in data:
            obs = data["task_description"] + "\n" + obs  # as AgentGym's SciWorld client builds it
        if self.env_name == "searchqa" and not obs:
            obs = self._request("GET", "/observation", params={self._id_key: self.env_id})
        self.observation = obs if isinstance(obs, str) else str(obs)
        return self.observation

    def _step(self, action: str) -> StepResult:
        # A step is not idempotent: a timed-out request may have been applied, so only
        # connection failures (request never sent) are retried here.
        try:
            data = self._request(
                "POST",
                "/step",
                json={self._id_key: self.env_id, "action": action},
                retry_timeouts=False,
            )
        except EnvServerError as e:
            return StepResult(f"Error: {e}", 0.0, True, {"error": str(e)})
        key = "score" if self.env_name in SCORE_AS_REWARD and "score" in data else "reward"
        raw = float(data.get(key, 0.0) or 0.0)
        info = {k: v for k, v in data.items() if k not in ("observation", "done")}
        info["raw_reward"] = raw
        self.observation = data.get("observation", "")
        return StepResult(
            self.observation,
            raw * REWARD_SCALE.get(self.env_name, 1.0),
            bool(data.get("done")),
            info,
        )

    def close(self) -> None:
        try:
            self._request("POST", "/close", json={self._id_key: self.env_id}, retry_timeouts=False)
        except Exception:  # upstream BabyAI/SciWorld servers have no /close
            pass
        self._client.close()
