"""BabyAI on minigrid with AgentGym's text interface.

The agent sees a sentence description of its 7x7 egocentric view and a list of high-level
actions ("go to red ball 1", "pick up red ball 1", "toggle and go through red closed door 1");
each high-level action is compiled into minigrid's low-level moves by a breadth-first path plan
over the visible cells, and executed until a move stops changing the view (as AgentGym does).

Task ids follow AgentGym: level `ALL_LEVELS[id % 40]`, seed `id // 40`. With `levels=[...]`
the same scheme runs over the given levels only: level `levels[id % n]`, seed `id // n`.

Reward (documented choice): AgentGym's server reports minigrid's own success reward
`1 - 0.9 * steps / max_steps` as `score`. We give reward 1.0 on success by default (the paper
reports success rates), and minigrid's value with `reward="score"`; `info["score"]` always
carries minigrid's value. An episode ends on success, failure, or minigrid's step limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from envs.base import Env, StepResult, check_split, format_instruction

ALL_LEVELS = (
    "GoToRedBallGrey",
    "GoToRedBall",
    "GoToRedBallNoDists",
    "GoToObjS6",
    "GoToLocalS8N7",
    "GoToObjMazeS7",
    "GoToImpUnlock",
    "GoToSeqS5R2",
    "GoToRedBlueBall",
    "GoToDoor",
    "GoToObjDoor",
    "Open",
    "OpenRedDoor",
    "OpenDoorLoc",
    "OpenRedBlueDoorsDebug",
    "OpenDoorsOrderN4Debug",
    "Pickup",
    "UnblockPickup",
    "PickupLoc",
    "PickupDistDebug",
    "PickupAbove",
    "PutNextLocalS6N4",
    "PutNextS7N4Carrying",
    "Unlock",
    "UnlockLocalDist",
    "KeyInBox",
    "UnlockPickupDist",
    "BlockedUnlockPickup",
    "UnlockToUnlock",
    "ActionObjDoor",
    "FindObjS7",
    "KeyCorridorS6R3",
    "OneRoomS20",
    "MoveTwoAcrossS8N9",
    "SynthS5R2",
    "SynthLoc",
    "SynthSeq",
    "MiniBossLevel",
    "BossLevel",
    "BossLevelNoUnlock",
)
TEST_SEEDS = 10  # default: seeds [0, 10) of every level form the test split
TRAIN_SEEDS = 100  # default: the next 100 seeds, [10, 110), form the train split

INSTRUCTION = format_instruction(
    "You are an exploration master that wants to finish every goal you are given. Every round I "
    "will give you an observation, and you have to respond an action and your thought based on "
    "the observation to finish the given task. You are placed in a room and you need to "
    "accomplish the given goal with actions.",
    [
        "turn right",
        "turn left",
        "move forward",
        "go to <obj> <id>",
        "pick up <obj> <id>",
        "go through <door> <id>: <door> must be an open door.",
        "toggle and go through <door> <id>: <door> can be a closed door or a locked door. If you "
        "want to open a locked door, you need to carry a key that is of the same color as the "
        "locked door.",
        "toggle: there is a closed or locked door right in front of you and you can toggle it.",
        "drop: put down the object you are carrying in front of you.",
    ],
)

LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE = range(6)
DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # minigrid: 0 east, 1 south, 2 west, 3 north
OBJECTS = {2: "wall", 4: "door", 5: "key", 6: "ball", 7: "box", 8: "goal", 9: "lava"}
COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
DOOR_STATES = ("open", "closed", "locked")
BLOCKING = ("wall", "box", "lava", "ball", "key")


def _level_id(level: str) -> str:
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI-* ids)

    base = level.removeprefix("BabyAI-").split("-v")[0]
    for version in ("v0", "v1"):
        if f"BabyAI-{base}-{version}" in gym.registry:
            return f"BabyAI-{base}-{version}"
    valid = sorted({k.split("-")[1] for k in gym.registry if k.startswith("BabyAI-")})
    raise ValueError(f"unknown BabyAI level {level!r}; valid levels: {', '.join(valid)}")


REWARDS = ("success", "score")


def _levels(levels: Sequence[str] | str | None) -> tuple[str, ...]:
    """The configured levels (None: AgentGym's 40); an explicit empty list is an error, not a
    silent fallback to all 40."""
    if levels is None:
        return ALL_LEVELS
    if isinstance(levels, str):  # `levels: GoToRedBall` in YAML means one level, not its letters
        levels = [levels]
    levels = tuple(levels)
    if not levels:
        raise ValueError(
            "BabyAI levels is empty; name at least one (e.g. [GoToRedBallNoDists]) or leave it "
            f"unset for AgentGym's {len(ALL_LEVELS)} levels"
        )
    bad = [lv for lv in levels if not isinstance(lv, str)]
    if bad:
        raise TypeError(f"BabyAI levels must be level names (strings); got {bad}")
    return levels


def _check_seeds(test_seeds: int, train_seeds: int) -> None:
    if test_seeds < 1 or train_seeds < 1:
        raise ValueError(
            f"test_seeds and train_seeds must be >= 1, got {test_seeds}, {train_seeds}"
        )


class BabyAIEnv(Env):
    name = "babyai"
    max_turns = 20

    def __init__(
        self,
        levels: Sequence[str] | None = None,
        reward: str = "success",
        test_seeds: int = TEST_SEEDS,
        train_seeds: int = TRAIN_SEEDS,
    ) -> None:
        # test_seeds / train_seeds only shape the splits (see ``task_ids``); accepting them here
        # lets one ``env.kwargs`` mapping serve both ``envs.make`` and ``envs.task_ids``.
        super().__init__()
        self.check_kwargs(levels, reward, test_seeds=test_seeds, train_seeds=train_seeds)
        self.levels = _levels(levels)
        self._gym_ids = [_level_id(lv) for lv in self.levels]
        self.reward_mode = reward
        self._envs: dict[str, Any] = {}  # one gym env per level, reused across resets
        self._env: Any = None
        self.actions: dict[str, list[int]] = {}
        self.errors: dict[str, str] = {}

    @classmethod
    def task_ids(
        cls,
        split: str = "train",
        levels: Sequence[str] | None = None,
        test_seeds: int = TEST_SEEDS,
        train_seeds: int = TRAIN_SEEDS,
        **_: Any,
    ) -> list[int]:
        """Task ``i`` is seed ``i // n`` of level ``i % n``: the test split takes seeds
        ``[0, test_seeds)``, the train split the next ``train_seeds``, so they never overlap."""
        _check_seeds(test_seeds, train_seeds)
        n = len(_levels(levels))
        test = check_split(split) == "test"
        lo, hi = (0, test_seeds) if test else (test_seeds, test_seeds + train_seeds)
        return list(range(lo * n, hi * n))

    @classmethod
    def check_kwargs(cls, levels=None, reward: str = "success", **seeds: int) -> None:
        """Validate constructor arguments by value without building any gym env (``seeds``:
        test_seeds / train_seeds; their names were checked against the constructor)."""
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}; got {reward!r}")
        _check_seeds(seeds.get("test_seeds", TEST_SEEDS), seeds.get("train_seeds", TRAIN_SEEDS))
        for lv in _levels(levels):
            _level_id(lv)

    def level_of(self, task_id: int) -> tuple[str, int]:
        n = len(self.levels)
        return self._gym_ids[task_id % n], task_id // n

    def instruction(self) -> str:
        return INSTRUCTION

    # -- episode ---------------------------------------------------------------------------------
    def _reset(self, task_id: int) -> str:
        import gymnasium as gym

        if task_id < 0:
            raise ValueError(f"task_id must be >= 0, got {task_id}")
        gym_id, seed = self.level_of(task_id)
        if gym_id not in self._envs:
            self._envs[gym_id] = gym.make(gym_id)
        self._env = self._envs[gym_id]
        obs, _ = self._env.reset(seed=seed)
        self.goal = self._env.unwrapped.mission.replace("then", "and").replace("after you", "and")
        self.steps, self.score = 0, 0.0
        self._image = obs["image"]
        desc = self._describe(obs)
        return f"Your goal: {self.goal}\n{desc}{self._actions_suffix()}"

    def _actions_suffix(self) -> str:
        return "\nAvailable actions: [" + ", ".join(f'"{a}"' for a in self.actions) + "]"

    def _step(self, action: str) -> StepResult:
        action = action.lower().strip()
        if action.startswith("pickup "):
            action = "pick up " + action[len("pickup ") :]
        info: dict[str, Any] = {"level": self._env.spec.id, "action_is_valid": True}
        if "check" in action:
            text = "You can take the following actions: " + ", ".join(self.actions)
            return StepResult(text + self._actions_suffix(), 0.0, False, info)
        if action not in self.actions:
            info["action_is_valid"] = False
            text = self.errors.get(action) or (
                "No change in state."
                if action == ""
                else "The action is not recognized. Please check valid actions."
            )
            return StepResult(text + self._actions_suffix(), 0.0, False, info)
        terminated = truncated = False
        reward, obs = 0.0, None
        # An empty plan means the agent already faces its target: "done" lets BabyAI verify the
        # instruction without moving (and keeps obs defined).
        for low in self.actions[action] or [self._env.unwrapped.actions.done]:
            obs, reward, terminated, truncated, _ = self._env.step(low)
            self.steps += 1
            changed = (obs["image"] != self._image).any()
            self._image = obs["image"]
            # A move that leaves the view unchanged failed (e.g. blocked); stop the plan there.
            if terminated or truncated or not changed:
                break
        desc = self._describe(obs)
        success = bool(terminated and reward > 0)
        self.score = float(reward) if success else 0.0
        done = bool(terminated or truncated)
        if success:
            desc += "\n The task is completed."
        info.update(score=self.score, success=success, low_level_steps=self.steps)
        out_reward = (1.0 if success else 0.0) if self.reward_mode == "success" else self.score
        return StepResult(desc + self._actions_suffix(), out_reward, done, info)

    # -- perception and planning -----------------------------------------------------------------
    def _describe(self, obs: dict[str, Any]) -> str:
        """Sentence description of the view and the table of high-level actions (AgentGym's)."""
        u = self._env.unwrapped
        image, d = obs["image"], int(obs["direction"])
        (px, py), vs = (int(u.agent_pos[0]), int(u.agent_pos[1])), u.agent_view_size
        fx, fy = DIRS[d]
        rx, ry = DIRS[(d + 1) % 4]
        ox, oy = px + fx * (vs - 1) - rx * (vs // 2), py + fy * (vs - 1) - ry * (vs // 2)
        objs, barriers, free = [], [], set()
        for j in range(vs):
            for i in range(vs):
                ax, ay = ox - fx * j + rx * i, oy - fy * j + ry * i
                if ax < 0 or ay < 0 or (ax, ay) == (px, py):
                    continue
                t, c, s = (int(v) for v in image[i, j])
                if t in (1, 3):  # empty / floor
                    free.add((ax, ay))
                if t not in OBJECTS:
                    continue
                kind = OBJECTS[t]
                name = (
                    f"{COLORS[c]} {DOOR_STATES[s]} door"
                    if kind == "door"
                    else f"{COLORS[c]} {kind}"
                )
                rel = (ax - px, ay - py)
                objs.append({"name": name, "pos": (ax, ay), "dis": abs(rel[0]) + abs(rel[1])})
                if name.endswith("open door") or kind == "goal":
                    free.add((ax, ay))
                front = rel[0] * fx + rel[1] * fy
                if kind in ("box", "wall") and rel[0] * fy - rel[1] * fx == 0 and front > 0:
                    barriers.append((front, kind))
        objs.sort(key=lambda o: o["dis"])
        barriers.sort()
        self._plan_ctx = ((px, py), d, free)

        seen: dict[str, int] = {}
        parts = []
        for o in objs:
            if o["name"].endswith("wall"):
                continue
            seen[o["name"]] = seen.get(o["name"], 0) + 1
            rel = (o["pos"][0] - px, o["pos"][1] - py)
            front, right = rel[0] * fx + rel[1] * fy, rel[0] * rx + rel[1] * ry
            if right == 0:
                where = f"right in front of you {front} steps away. "
            else:
                side = "right" if right > 0 else "left"
                where = f"{front} steps in front of you and {abs(right)} steps to your {side}. "
            parts.append(f"There is a {o['name']} {seen[o['name']]} {where} ")
        desc = (
            "In front of you in this room, you can see several objects: " + "".join(parts)
            if objs
            else "You cannot see any objects within sight."
        )
        desc += "The room has walls around you. "
        if barriers:
            desc += f"You are facing a {barriers[0][1]} {barriers[0][0]} steps away. "
        carrying = u.carrying
        desc += (
            f"You are carrying a {carrying.color} {carrying.type}."
            if carrying is not None
            else "You are not carrying anything."
        )
        self._build_actions(objs, barriers, carrying)
        return desc

    def _path(self, goal: tuple[int, int], arrive: bool) -> list[int] | None:
        """Shortest move sequence to stand on `goal` (arrive) or to face it from a free cell."""
        start_pos, start_dir, free = self._plan_ctx
        start = (start_pos, start_dir)
        prev: dict[tuple, tuple] = {start: (None, None)}
        queue = deque([start])
        while queue:
            pos, d = queue.popleft()
            front = (pos[0] + DIRS[d][0], pos[1] + DIRS[d][1])
            if (arrive and pos == goal) or (not arrive and front == goal):
                path, state = [], (pos, d)
                while prev[state][0] is not None:
                    state, act = prev[state]
                    path.append(act)
                return path[::-1]
            for act, nxt in (
                (FORWARD, (front, d)),
                (LEFT, (pos, (d - 1) % 4)),
                (RIGHT, (pos, (d + 1) % 4)),
            ):
                if act == FORWARD and front not in free:
                    continue
                if nxt not in prev:
                    prev[nxt] = ((pos, d), act)
                    queue.append(nxt)
        return None

    def _offer(self, acts, errs, action, pos, *, arrive, then=(), what=None) -> list[int] | None:
        """Offer ``action``: the path to ``pos`` then ``then``, or an error naming ``what`` (default
        the action) when no path leads there. Returns the path (None without one)."""
        path = self._path(pos, arrive=arrive)
        if path is None:
            errs[action] = f"You cannot {what or action}, as there is no path leading to it."
        else:
            acts[action] = path + list(then)
        return path

    def _build_actions(self, objs: list[dict], barriers: list[tuple], carrying: Any) -> None:
        acts: dict[str, list[int]] = {"turn left": [LEFT], "turn right": [RIGHT]}
        errs: dict[str, str] = {}
        if not barriers or barriers[0][0] > 1:
            acts["move forward"] = [FORWARD]
        else:
            errs["move forward"] = "There is a barrier in front of you, you can't move forward."
        (px, py), d, _ = self._plan_ctx
        front_cell = (px + DIRS[d][0], py + DIRS[d][1])
        named = [o for o in objs if not o["name"].endswith("wall")]
        counts: dict[str, int] = {}
        for o in named:  # numbering shared by every action that names an object
            counts[o["name"]] = counts.get(o["name"], 0) + 1
            o["label"] = f"{o['name']} {counts[o['name']]}"
        if carrying is None:
            for o in named:
                if o["name"].split()[-1] in ("door", "goal"):
                    continue
                self._offer(
                    acts, errs, f"pick up {o['label']}", o["pos"], arrive=False, then=[PICKUP]
                )
        else:
            if any(o["pos"] == front_cell and o["name"].split()[-1] in BLOCKING for o in objs):
                errs["drop"] = (
                    "You cannot drop the object, as there is already an object in front of you."
                )
            else:
                acts["drop"] = [DROP]
        if carrying is None:
            errs.setdefault("drop", "You cannot drop the object, as you are not carrying anything.")
        for o in named:
            name, label = o["name"], o["label"]
            if name.endswith("open door"):
                self._offer(acts, errs, f"go through {label}", o["pos"], arrive=True)
            elif name.endswith("closed door") or name.endswith("locked door"):
                action = f"toggle and go through {label}"
                if name.endswith("locked door") and (carrying is None or carrying.type != "key"):
                    errs[action] = f"You cannot {action}, as you are not carrying a key."
                    continue
                if name.endswith("locked door") and carrying.color != name.split()[0]:
                    errs[action] = (
                        f"You cannot {action}, as the color of the key you are "
                        "carrying does not match the color of door."
                    )
                    continue
                then = [TOGGLE, FORWARD]
                if self._offer(acts, errs, action, o["pos"], arrive=False, then=then) == []:
                    acts["toggle"] = [TOGGLE]  # already facing the door
                errs[f"go through {label}"] = (
                    f"You cannot go through {label}, as it is closed. You should toggle it first."
                )
        for o in objs:
            if o["name"].endswith("goal"):
                self._offer(acts, errs, "go to goal", o["pos"], arrive=True, what="go to the goal")
        for o in named:
            if o["name"].endswith("goal"):
                continue
            self._offer(acts, errs, f"go to {o['label']}", o["pos"], arrive=False)
        acts["check available actions"] = []
        self.actions, self.errors = acts, errs

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def expert_action(observation: str, turn: int = 0) -> str:
    """A scripted policy for GoTo / Pickup / Open missions (tests and benchmarks).

    Takes the high-level action that names the goal object if one is offered, else explores by
    walking forward and turning. Not an oracle for the harder levels.
    """
    import re

    goal = re.search(r"Your goal: (.*)", observation)
    if goal:
        expert_action.goal = goal.group(1)  # type: ignore[attr-defined]
    mission = getattr(expert_action, "goal", "")
    offered = re.findall(r'"([^"]+)"', observation.rsplit("Available actions:", 1)[-1])
    m = re.search(
        r"(go to|pick up|open) (?:the|a) (?:(red|green|blue|purple|yellow|grey) )?(\w+)", mission
    )
    if m:
        verb, color, kind = m.groups()
        verbs = ("toggle and go through", "go through") if verb == "open" else (verb,)
        for a in offered:
            words = a.split()
            if (
                any(a.startswith(v + " ") for v in verbs)
                and kind in words
                and (color is None or color in words)
            ):
                return a
    if "move forward" in offered and turn % 4 != 3:
        return "move forward"
    return "turn left"
