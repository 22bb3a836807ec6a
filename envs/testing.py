"""Test-only envs for fault injection and protocol tests (importable by spawn workers).

Register with `envs.register("fault", "envs.testing:FaultEnv")`. Actions (after "Action:"):
  `win` -> reward 1, done;  `echo words` -> observation "echo: words";
  `sleep N` -> sleeps N seconds (hung step);  `raise` -> raises RuntimeError (env bug);
  `exit` -> the process dies at once (os._exit, like a segfault or an OOM kill).
"""

from __future__ import annotations

import os
import time
from typing import Any

from envs.base import Env, StepResult, check_split, format_instruction


class FaultEnv(Env):
    name = "fault"
    max_turns = 10

    def __init__(self, greeting: str = "Task") -> None:
        super().__init__()
        self.greeting = greeting
        self.pid = os.getpid()

    @classmethod
    def task_ids(cls, split: str = "train", **_: Any) -> list[int]:
        return list(range(10, 40)) if check_split(split) == "train" else list(range(10))

    def instruction(self) -> str:
        return format_instruction(
            "A test env.", ["win", "echo <text>", "sleep <seconds>", "raise", "exit"]
        )

    def _reset(self, task_id: int) -> str:
        self.turns = 0
        return f"{self.greeting} {task_id} (pid {self.pid})"

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
        return StepResult("Invalid action.", 0.0, False, {})
