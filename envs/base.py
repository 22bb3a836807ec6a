"""The environment protocol: `Env`, `StepResult`, AgentGym's action parser and chat prompt.

An `Env` takes the model's raw reply text in `step`; parsing lives here so every env answers a
malformed reply the way AgentGym does instead of raising.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

ACK = "OK. I'll follow your instructions and try my best to solve the task."
MULTI_ACTION_ERROR = (
    "Error: Only one 'Action' is allowed per response. Please adjust your response."
)
EPISODE_OVER = "Error: the episode has ended; call reset() before stepping again."
NOT_RESET = "Error: the environment has not been reset; call reset(task_id) first."
SPLITS = ("train", "test")
# Replies longer than this are cut before parsing: the env never needs more, and a runaway
# generation should not cost regex time proportional to its length.
MAX_ACTION_CHARS = 4096

_ACTION_RE = re.compile(r"Action:\s*(.*?)(?=\n|$)", re.DOTALL)


@dataclasses.dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Parsed:
    """Outcome of parsing a reply: either an action for the env or a reply to send back as is."""

    action: str | None
    error: str | None = None


def parse_agentgym_action(text: str) -> Parsed:
    """AgentGym's BabyAI/TextCraft parser: exactly one `Action:` line, cleaned to [A-Za-z0-9, ].

    No match gives the empty action, which the env answers with its own invalid-action text.
    """
    matches = _ACTION_RE.findall(text[:MAX_ACTION_CHARS])
    if len(matches) > 1:
        return Parsed(None, MULTI_ACTION_ERROR)
    action = matches[-1] if matches else ""
    action = re.sub(r"[^A-Za-z0-9, ]+", "", action)
    return Parsed(" ".join(action.split()))


def parse_last_action(text: str) -> Parsed:
    """SciWorld's parser: whatever follows the last `Action:` (or the whole reply), stripped."""
    text = text[:MAX_ACTION_CHARS]
    if text.endswith("</s>"):
        text = text[: -len("</s>")]
    return Parsed(text.rsplit("Action:", 1)[-1].strip())


def format_instruction(preamble: str, actions: Sequence[str] = ()) -> str:
    """Env instruction in AgentGym's shape: description, actions list, Thought/Action format."""
    parts = [preamble.rstrip()]
    if actions:
        parts.append(
            "You can use the following actions:\n\n" + "\n\n".join(f"- {a}" for a in actions)
        )
    parts.append(
        "Your response should use the following format:\nThought:\n<Your Thought>\n\nAction:\n<Your Action>"
    )
    return "\n\n".join(parts)


class Env:
    """Base class. Subclasses implement `_reset`, `_step`, `instruction`, and `task_ids`.

    `step(reply)` parses the model's reply with `parse`; a parse error is answered with reward 0
    and done False without touching the underlying simulator.
    """

    name: ClassVar[str] = "env"
    ack: ClassVar[str] = ACK
    max_turns: ClassVar[int] = 20
    # AgentGym clients send the parsed action to the server, except SearchQA's, which sends the
    # raw reply; the HTTP client and server follow the same split.
    server_parses: ClassVar[bool] = False

    def __init__(self) -> None:
        self._started = False
        self._done = False
        self.task_id: int | None = None

    # -- the contract -------------------------------------------------------------------------
    def reset(self, task_id: int) -> str:
        """Start task `task_id`; returns the first observation (it states the task)."""
        task_id = int(task_id)
        obs = self._reset(task_id)
        self.task_id, self._started, self._done = task_id, True, False
        return obs

    def step(self, reply: str) -> StepResult:
        """Apply the model's reply text; never raises for any string."""
        if not self._started:
            return StepResult(NOT_RESET, 0.0, True, {"error": "not reset"})
        if self._done:
            return StepResult(EPISODE_OVER, 0.0, True, {"error": "episode finished"})
        if not isinstance(reply, str):
            reply = str(reply)
        parsed = self.parse(reply)
        if parsed.action is None:
            return StepResult(parsed.error or "", 0.0, False, {"parse_error": True})
        return self.step_action(parsed.action)

    def step_action(self, action: str) -> StepResult:
        """Apply an already-parsed action (what AgentGym clients post to `/step`)."""
        if not self._started:
            return StepResult(NOT_RESET, 0.0, True, {"error": "not reset"})
        if self._done:
            return StepResult(EPISODE_OVER, 0.0, True, {"error": "episode finished"})
        result = self._step(str(action)[:MAX_ACTION_CHARS])
        result.info.setdefault("action", action)
        self._done = bool(result.done)
        return result

    def parse(self, reply: str) -> Parsed:
        return parse_agentgym_action(reply)

    def instruction(self) -> str:
        raise NotImplementedError

    @classmethod
    def task_ids(cls, split: str = "train", **kwargs: Any) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- for subclasses -----------------------------------------------------------------------
    def _reset(self, task_id: int) -> str:
        raise NotImplementedError

    def _step(self, action: str) -> StepResult:
        raise NotImplementedError

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def initial_messages(
    env: Env | Mapping[str, Any], first_obs: str, system: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for the start of an episode, as AgentGym builds them.

    user = env instruction, assistant = acknowledgement, user = first observation. `env` is an
    `Env` or a pool reset result's `info` (which carries "instruction" and "ack"). `system` is
    left out by default so the chat template inserts the model's own default (Qwen does).
    """
    if isinstance(env, Env):
        instruction, ack = env.instruction(), env.ack
    else:
        instruction, ack = env["instruction"], env.get("ack", ACK)
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs += [
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": ack},
        {"role": "user", "content": first_obs},
    ]
    return msgs
