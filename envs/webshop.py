"""WebShop-lite: WebShop's search / click / buy loop over a small shipped catalogue.

Pages and actions follow WebShop's text mode: `search[query]` on the search page, then
`click[<button>]` on results (`click[B00012]`, `click[Next >]`, `click[Back to Search]`) and on
a product page (`click[red]` selects an option, `click[Buy Now]` ends the episode). The reward
is WebShop's attribute-match score of the bought product against the goal:
    r = r_type * (matched attributes + matched options + [price <= limit]) / (n_attr + n_opt + 1)
with r_type 1 for the goal's product type, 0.5 for its category, 0.1 otherwise. The catalogue
(envs/data/webshop_lite.json: 150 products, 300 goals) is self-made.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
from typing import Any

from envs.base import MULTI_ACTION_ERROR, Env, Parsed, StepResult, check_split

PAGE_SIZE = 10
INSTRUCTION = (
    "You are web shopping.\nI will give you instructions about what to do.\nYou have to follow the "
    "instructions.\nEvery round I will give you an observation and a list of available actions, you "
    "have to respond an action based on the state and instruction.\nYou can use search action if "
    "search is available.\nYou can click one of the buttons in clickables.\nAn action should be of "
    "the following structure:\nsearch[keywords]\nclick[value]\nIf the action is not valid, perform "
    "nothing.\nKeywords in search are up to you, but the value in click must be a value in the list "
    "of available actions.\nRemember that your keywords in search should be carefully designed.\n"
    "Your response should use the following format:\n\nThought:\nI think ...\n\nAction:\nclick[something]"
)
_ACTION_RE = re.compile(r"Action:\s*(.*?)(?=\n|$)", re.DOTALL)
_CMD_RE = re.compile(r"^(search|click)\[(.*)\]$", re.DOTALL)


@functools.lru_cache(maxsize=2)
def load_catalogue(path: str | None = None) -> dict[str, Any]:
    path = path or str(importlib.resources.files("envs") / "data" / "webshop_lite.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["by_asin"] = {p["asin"]: p for p in data["products"]}
    return data


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def attribute_reward(
    product: dict[str, Any], selected: dict[str, str], goal: dict[str, Any]
) -> dict[str, float]:
    """WebShop's score for buying `product` with `selected` options against `goal`."""
    r_type = (
        1.0
        if product["type"] == goal["type"]
        else 0.5
        if product["category"] == goal["category"]
        else 0.1
    )
    attrs = sum(a in product["attributes"] for a in goal["attributes"])
    opts = sum(selected.get(k) == v for k, v in goal["options"].items())
    price_ok = float(product["price"] <= goal["price_upper"])
    total = len(goal["attributes"]) + len(goal["options"]) + 1
    return {
        "reward": r_type * (attrs + opts + price_ok) / total,
        "r_type": r_type,
        "r_att": attrs / max(len(goal["attributes"]), 1),
        "r_option": opts / max(len(goal["options"]), 1),
        "r_price": price_ok,
    }


class WebShopEnv(Env):
    name = "webshop"
    max_turns = 15

    def __init__(self, catalogue: str | None = None) -> None:
        super().__init__()
        self.data = load_catalogue(catalogue)

    @classmethod
    def check_kwargs(cls, catalogue: str | None = None) -> None:
        if catalogue is not None and not os.path.isfile(catalogue):
            raise FileNotFoundError(f"WebShop catalogue file not found: {catalogue!r}")

    @classmethod
    def task_ids(cls, split: str = "train", catalogue: str | None = None, **_: Any) -> list[int]:
        n = len(load_catalogue(catalogue)["goals"])
        return list(range(50)) if check_split(split) == "test" else list(range(50, n))

    def instruction(self) -> str:
        return INSTRUCTION

    def parse(self, reply: str) -> Parsed:
        # Brackets carry the command here, so the [A-Za-z0-9, ] clean-up of BabyAI does not apply.
        matches = _ACTION_RE.findall(reply[:4096])
        if len(matches) > 1:
            return Parsed(None, MULTI_ACTION_ERROR)
        return Parsed(" ".join(matches[-1].split()) if matches else "")

    def _reset(self, task_id: int) -> str:
        goals = self.data["goals"]
        if not 0 <= task_id < len(goals):
            raise ValueError(f"task_id {task_id} out of range [0, {len(goals)})")
        self.goal = goals[task_id]
        self.page, self.query, self.results, self.page_no = "search", "", [], 0
        self.item: dict[str, Any] | None = None
        self.selected: dict[str, str] = {}
        return self._render()

    # -- pages ------------------------------------------------------------------------------------
    def _clickables(self) -> list[str]:
        if self.page == "search":
            return []
        if self.page == "results":
            shown = self.results[self.page_no * PAGE_SIZE : (self.page_no + 1) * PAGE_SIZE]
            nav = (["< Prev"] if self.page_no > 0 else []) + (
                ["Next >"] if (self.page_no + 1) * PAGE_SIZE < len(self.results) else []
            )
            return ["Back to Search"] + nav + [p["asin"] for p in shown]
        opts = [v for vals in self.item["options"].values() for v in vals]
        return ["Back to Search", "< Prev"] + opts + ["Buy Now"]

    def _render(self) -> str:
        head = f"Instruction: [SEP] {self.goal['instruction']}"
        if self.page == "search":
            body = "WebShop [SEP] " + head + " [SEP] Search"
        elif self.page == "results":
            shown = self.results[self.page_no * PAGE_SIZE : (self.page_no + 1) * PAGE_SIZE]
            items = " [SEP] ".join(
                f"{p['asin']} [SEP] {p['name']} [SEP] ${p['price']:.2f}" for p in shown
            )
            nav = [c for c in self._clickables() if c in ("< Prev", "Next >")]
            body = " [SEP] ".join(
                [
                    head,
                    "Back to Search",
                    f"Page {self.page_no + 1} (Total results: {len(self.results)})",
                    *nav,
                ]
                + ([items] if items else [])
            )
        else:
            p = self.item
            opts = " [SEP] ".join(
                f"{k} [SEP] " + " [SEP] ".join(v) for k, v in p["options"].items()
            )
            chosen = ", ".join(f"{k}: {v}" for k, v in self.selected.items()) or "none"
            body = (
                f"{head} [SEP] Back to Search [SEP] < Prev [SEP] {opts} [SEP] {p['name']} [SEP] "
                f"Price: ${p['price']:.2f} [SEP] Rating: N.A. [SEP] {p['description']} [SEP] "
                f"Selected: {chosen} [SEP] Buy Now"
            )
        avail = {"has_search_bar": self.page == "search", "clickables": self._clickables()}
        return body + "\n\nAvailable Actions: " + json.dumps(avail)

    def _search(self, query: str) -> list[dict[str, Any]]:
        words = set(_tokens(query))
        scored = []
        for p in self.data["products"]:
            text = _tokens(" ".join([p["name"], p["type"], *p["attributes"]]))
            score = sum(w in words for w in text)
            if score:
                scored.append((-score, p["asin"], p))
        return [p for _, _, p in sorted(scored, key=lambda s: (s[0], s[1]))][:50]

    def _step(self, action: str) -> StepResult:
        m = _CMD_RE.match(action.strip())
        if not m:
            return StepResult(
                "Invalid action! Use search[keywords] or click[value].\n\n" + self._render(),
                0.0,
                False,
                {"invalid": True},
            )
        kind, arg = m.group(1), m.group(2).strip()
        if kind == "search":
            if self.page != "search":
                return StepResult(
                    "Invalid action! There is no search bar on this page.\n\n" + self._render(),
                    0.0,
                    False,
                    {"invalid": True},
                )
            self.query, self.results, self.page_no, self.page = arg, self._search(arg), 0, "results"
            return StepResult(self._render(), 0.0, False, {})
        if arg not in self._clickables():
            return StepResult(
                f"Invalid action! {arg!r} is not clickable.\n\n" + self._render(),
                0.0,
                False,
                {"invalid": True},
            )
        if arg == "Back to Search":
            self.page, self.item, self.selected = "search", None, {}
        elif arg == "Next >":
            self.page_no += 1
        elif arg == "< Prev":
            if self.page == "item":
                self.page, self.item, self.selected = "results", None, {}
            else:
                self.page_no -= 1
        elif self.page == "results":
            self.page, self.item, self.selected = "item", self.data["by_asin"][arg], {}
        elif arg == "Buy Now":
            score = attribute_reward(self.item, self.selected, self.goal)
            score.update(
                asin=self.item["asin"], selected=dict(self.selected), success=score["reward"] == 1.0
            )
            return StepResult(
                f"Thank you for shopping with us! Your score: {score['reward']:.2f}",
                score["reward"],
                True,
                score,
            )
        else:  # an option value on the product page
            for k, vals in self.item["options"].items():
                if arg in vals:
                    self.selected[k] = arg
        return StepResult(self._render(), 0.0, False, {})


def expert_actions(goal: dict[str, Any]) -> list[str]:
    """Search for the goal's attributes and type, open its product, choose options, buy."""
    acts = [f"search[{' '.join(goal['attributes'])} {goal['type']}]"]
    return (
        acts
        + [f"click[{goal['asin']}]"]
        + [f"click[{v}]" for v in goal["options"].values()]
        + ["click[Buy Now]"]
    )
