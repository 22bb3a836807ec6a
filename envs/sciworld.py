"""ScienceWorld (SciWorld) with AgentGym's task ids, prompt and parsing. Needs Java 17+.

Task id i indexes AgentGym's game list: every variation of every task in ScienceWorld's order,
minus tasks 5-1, 5-2, 9-1..9-3, 10-1, 10-2 (the list ships in envs/data/sciworld_games.json so
task ids need no JVM). Splits are ScienceWorld's own train / test variations (dev ones are in
neither). Reward = ScienceWorld score / 100 (raw score in `info["score"]`); the first observation
is the task description followed by "look around", as AgentGym's client builds it. `tasks=[...]`
keeps only the given tasks in the splits (by key "4-2" or name "find-non-living-thing").
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from envs.base import Env, Parsed, StepResult, check_split, parse_last_action

INSTRUCTION = (
    "You are an agent for science world. Every round I will give you an observation, you have to respond an "
    "action based on the observation to finish the given task. Here are the actions you may take: "
    + json.dumps(
        [
            {"action": a, "description": d}
            for a, d in (
                ("open/close OBJ", "open/close a container"),
                ("de/activate OBJ", "activate/deactivate a device"),
                ("connect OBJ to OBJ", "connect electrical components"),
                ("disconnect OBJ", "disconnect electrical components"),
                ("use OBJ [on OBJ]", "use a device/item"),
                ("look around", "describe the current room"),
                ("look at OBJ", "describe an object in detail"),
                ("look in OBJ", "describe a container's contents"),
                ("read OBJ", "read a note or book"),
                ("move OBJ to OBJ", "move an object to a container"),
                ("pick up OBJ", "move an object to the inventory"),
                ("put down OBJ", "drop an inventory item"),
                ("pour OBJ into OBJ", "pour a liquid into a container"),
                ("dunk OBJ into OBJ", "dunk a container into a liquid"),
                ("mix OBJ", "chemically mix a container"),
                ("go to LOC", "move to a new location"),
                ("eat OBJ", "eat a food"),
                ("flush OBJ", "flush a toilet"),
                ("focus on OBJ", "signal intent on a task object"),
                ("wait", "take no action for 10 iterations"),
                ("wait1", "take no action for 1 iteration"),
                ("task", "describe current task"),
                ("inventory", "list your inventory"),
            )
        ]
    )
    + "\nYour response should use the following format:\nThought:\nyour thoughts.\n\nAction:\nyour next action"
)


@functools.lru_cache(maxsize=1)
def games() -> list[tuple[str, str, int, str]]:
    """(task key, task name, variation, split letter) in AgentGym's order."""
    path = importlib.resources.files("envs") / "data" / "sciworld_games.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [(t["key"], t["name"], v, s) for t in data["tasks"] for v, s in enumerate(t["splits"])]


def java_version() -> int | None:
    """Major version of the `java` on PATH, or None when there is none."""
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for token in out.replace('"', " ").split():
        head = token.split(".")[0]
        if head.isdigit() and token[0].isdigit():
            return int(head) if head != "1" else int(token.split(".")[1])
    return None


def task_keys(tasks: Sequence[str] | str | None) -> set[str] | None:
    """Task keys ("4-2") selected by keys or names ("find-non-living-thing"); None: all."""
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [tasks]
    by_name = {name: key for key, name, _, _ in games()}
    known = set(by_name.values())
    keys, bad = set(), []
    for t in tasks:
        key = (t if t in known else by_name.get(t)) if isinstance(t, str) else None
        if key is None:
            bad.append(t)
        else:
            keys.add(key)
    if bad or not keys:
        valid = ", ".join(f"{k} {n}" for n, k in sorted(by_name.items(), key=_task_order))
        what = f"unknown SciWorld task(s) {bad}" if bad else "SciWorld tasks is empty"
        raise ValueError(f"{what}; valid tasks (key or name): {valid}")
    return keys


def _task_order(name_key: tuple[str, str]) -> tuple[int, ...]:
    return tuple(int(p) for p in name_key[1].split("-"))


class SciWorldEnv(Env):
    name = "sciworld"
    max_turns = 20

    def __init__(
        self,
        step_limit: int = 100,
        gold_path: bool = False,
        tasks: Sequence[str] | None = None,
    ) -> None:
        """step_limit: ScienceWorld's own move limit; gold_path: also generate the reference
        solution on reset (for `gold_actions()`, slower); tasks: task keys ("4-2") or names
        ("find-non-living-thing") the splits keep (None: all; task ids stay global)."""
        super().__init__()
        self.check_kwargs(step_limit, gold_path, tasks)
        version = java_version()
        if version is None or version < 17:
            found = "no java on PATH" if version is None else f"java {version}"
            raise RuntimeError(
                f"SciWorld needs Java 17 or newer ({found}); e.g. `apt-get install openjdk-17-jre-headless`"
            )
        try:
            from scienceworld import ScienceWorldEnv
        except ImportError as e:
            raise ImportError(
                "SciWorld needs `pip install scienceworld` (extra: agentgym-jax[sciworld])"
            ) from e
        self._sim = ScienceWorldEnv("", envStepLimit=step_limit)
        self.gold_path = gold_path
        self.observation = ""

    @classmethod
    def check_kwargs(
        cls, step_limit: int = 100, gold_path: bool = False, tasks: Sequence[str] | None = None
    ) -> None:
        """Validate arguments by value without starting the JVM."""
        if isinstance(step_limit, bool) or not isinstance(step_limit, int) or step_limit < 1:
            raise ValueError(f"SciWorld step_limit must be an int >= 1, got {step_limit!r}")
        task_keys(tasks)

    @classmethod
    def task_ids(
        cls, split: str = "train", tasks: Sequence[str] | None = None, **_: Any
    ) -> list[int]:
        letter = "r" if check_split(split) == "train" else "e"  # r(train), e(test), d(dev)
        keys = task_keys(tasks)
        return [
            i for i, g in enumerate(games()) if g[3] == letter and (keys is None or g[0] in keys)
        ]

    def instruction(self) -> str:
        return INSTRUCTION

    def parse(self, reply: str) -> Parsed:
        return parse_last_action(reply)

    def _reset(self, task_id: int) -> str:
        table = games()
        if not 0 <= task_id < len(table):
            raise ValueError(f"task_id {task_id} out of range [0, {len(table)})")
        key, name, variation, _ = table[task_id]
        self._sim.load(name, variation, generateGoldPath=self.gold_path)
        self.task = {"task_key": key, "task_name": name, "var_num": variation}
        description = self._sim.get_task_description()
        obs, _, _, _ = self._sim.step("look around")
        self.observation = obs
        return description + "\n" + obs

    def _step(self, action: str) -> StepResult:
        if not action:
            return StepResult(
                "Invalid Action.\n\n" + self.observation, 0.0, False, {"invalid": True}
            )
        obs, _, done, info = self._sim.step(action)
        if obs.startswith("No known action matches"):  # unparseable: state unchanged, say so
            return StepResult(
                "Invalid Action.\n\n" + self.observation, 0.0, False, {"invalid": True}
            )
        score = float(info.get("score", 0))
        if score < 0:  # ScienceWorld signals a failed task with -100: episode over, no reward
            done = True
        self.observation = obs
        return StepResult(
            obs,
            max(score, 0.0) / 100.0,
            bool(done),
            {"score": score, "moves": info.get("moves"), **self.task},
        )

    def gold_actions(self) -> list[str]:
        """ScienceWorld's reference solution for the loaded task (tests, demo warm-up)."""
        return list(self._sim.get_gold_action_sequence())

    def close(self) -> None:
        try:
            self._sim.close()
        except Exception:
            pass
