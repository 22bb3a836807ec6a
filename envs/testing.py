"""Test-only envs for fault injection and protocol tests (importable by spawn workers).

Register with `envs.register("fault", "envs.testing:FaultEnv")`. Actions (after "Action:"):
  `win` -> reward 1, done;  `echo words` -> observation "echo: words";
  `add N` -> adds N to a running total, observation "total T" (state a replay must rebuild);
  `pid` -> observation "pid P" (differs per process: a replay elsewhere diverges);
  `sleep N` -> sleeps N seconds (hung step);  `raise` -> raises RuntimeError (env bug);
  `exit` -> the process dies at once (os._exit, like a segfault);
  `badreward nan|inf|text` -> a NaN, infinite or string reward;  `baddone` -> done "yes".
"""

from __future__ import annotations

import os
import time
from typing import Any

from envs.base import Env, StepResult, check_split, format_instruction

BAD_REWARDS = {"nan": float("nan"), "inf": float("inf"), "text": "1.0"}


class FaultEnv(Env):
    name = "fault"
    max_turns = 10

    def __init__(self, greeting: str = "Task") -> None:
        super().__init__()
        self.greeting = greeting

    @classmethod
    def task_ids(cls, split: str = "train", **_: Any) -> list[int]:
        return list(range(10, 40)) if check_split(split) == "train" else list(range(10))

    def instruction(self) -> str:
        return format_instruction(
            "A test env.",
            ["win", "echo <text>", "add <n>", "pid", "sleep <seconds>", "raise", "exit"],
        )

    def _reset(self, task_id: int) -> str:
        self.turns, self.total = 0, task_id
        return f"{self.greeting} {task_id}"

    def _step(self, action: str) -> StepResult:
        self.turns += 1
        if action == "win":
            return StepResult("You won.", 1.0, True, {"turns": self.turns})
        if action.startswith("sleep"):
            parts = action.split()
            time.sleep(float(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 1.0)
            return StepResult("slept", 0.0, False, {})
        if action == "raise":
            raise RuntimeError("injected env failure")
        if action == "exit":
            os._exit(17)
        if action.startswith("echo"):
            return StepResult(f"echo: {action[5:]}", 0.0, False, {"turns": self.turns})
        if action.startswith("add ") and action[4:].isdigit():
            self.total += int(action[4:])
            return StepResult(f"total {self.total}", 0.0, False, {"turns": self.turns})
        if action == "pid":
            return StepResult(f"pid {os.getpid()}", 0.0, False, {})
        if action.startswith("badreward "):
            return StepResult("bad reward", BAD_REWARDS.get(action[10:], None), False, {})
        if action == "baddone":
            return StepResult("bad done", 0.0, "yes", {})
        return StepResult("Invalid action.", 0.0, False, {})
