"""SearchQA (Search-R1 style deep search): `<search>q</search>` / `<answer>a</answer>` turns.

A search returns the top-k BM25 passages (`bm25s`) wrapped in `<information>...</information>`;
an answer ends the episode with exact-match reward (normalised: lowercase, no punctuation, no
articles, single spaces). The shipped data (envs/data/searchqa_*.jsonl) is a small self-made
world of fictional countries and people, so answers cannot come from pretraining; NQ, TriviaQA
or HotpotQA questions can be read from locally prepared tensorflow-datasets instead.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
import string
from typing import Any

from envs.base import Env, Parsed, StepResult, check_split

INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can "
    "call a search engine by <search> query </search> and it will return the top searched results "
    "between <information> and </information>. You can search as many times as your want. If you "
    "find no further external knowledge needed, you can directly provide the answer inside <answer> "
    "and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>."
)
INVALID = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer between "
    "<answer> and </answer>. Let me try again.\n"
)
_TAG_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
TFDS_FIELDS = {  # dataset -> (question field, answers field) in tensorflow-datasets
    "natural_questions_open": ("question", "answer"),
    "trivia_qa/unfiltered.nocontext": ("question", "answer/aliases"),
    "mrqa/hotpot_qa": ("question", "answers"),  # TFDS has HotpotQA only inside MRQA
}


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def _data_path(name: str) -> str:
    return str(importlib.resources.files("envs") / "data" / name)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@functools.lru_cache(maxsize=4)
def _load_corpus(path: str) -> tuple[list[dict[str, Any]], Any]:
    import bm25s

    docs = _read_jsonl(path)
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(
            [f"{d['title']} {d['text']}" for d in docs], stopwords="en", show_progress=False
        ),
        show_progress=False,
    )
    return docs, retriever


@functools.lru_cache(maxsize=4)
def _load_questions(source: str) -> list[dict[str, Any]]:
    if not source.startswith("tfds:"):
        return _read_jsonl(source)
    name, _, split = source[len("tfds:") :].partition("@")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "tfds question sources need `pip install tensorflow-datasets` and the dataset "
            "prepared locally (no downloads are made)"
        ) from e
    if name not in TFDS_FIELDS:
        raise ValueError(f"unknown tfds dataset {name!r}; valid: {', '.join(TFDS_FIELDS)}")
    q_field, a_field = TFDS_FIELDS[name]
    ds = tfds.load(name, split=split or "validation", download=False)
    out = []
    for ex in tfds.as_numpy(ds):
        ans: Any = ex
        for part in a_field.split("/"):
            ans = ans[part]
        ans = [
            a.decode() if isinstance(a, bytes) else str(a)
            for a in (ans if hasattr(ans, "__iter__") and not isinstance(ans, bytes) else [ans])
        ]
        q = ex[q_field]
        out.append({"question": q.decode() if isinstance(q, bytes) else str(q), "answers": ans})
    return out


class SearchQAEnv(Env):
    name = "searchqa"
    max_turns = 5
    server_parses = True

    def __init__(
        self, corpus: str | None = None, questions: str | None = None, top_k: int = 3
    ) -> None:
        """corpus: JSONL of {id, title, text}; questions: JSONL of {question, answers} or
        "tfds:<name>@<split>" (see TFDS_FIELDS). Defaults: the shipped toy world."""
        super().__init__()
        self.corpus_path = corpus or _data_path("searchqa_corpus.jsonl")
        self.questions_source = questions or _data_path("searchqa_questions.jsonl")
        self.top_k = top_k
        self.docs, self._retriever = _load_corpus(self.corpus_path)
        self.questions = _load_questions(self.questions_source)

    @classmethod
    def check_kwargs(
        cls, corpus: str | None = None, questions: str | None = None, top_k: int = 3
    ) -> None:
        """Validate arguments by value without indexing the corpus or reading questions."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"SearchQA top_k must be an int >= 1, got {top_k!r}")
        if questions is not None and questions.startswith("tfds:"):
            name = questions[len("tfds:") :].partition("@")[0]
            if name not in TFDS_FIELDS:
                raise ValueError(
                    f"unknown tfds dataset {name!r} in {questions!r}; valid: "
                    + ", ".join(f"tfds:{n}@<split>" for n in TFDS_FIELDS)
                )
            questions = None
        for what, path in (("corpus", corpus), ("questions", questions)):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"SearchQA {what} file not found: {path!r}")

    @classmethod
    def task_ids(cls, split: str = "train", questions: str | None = None, **_: Any) -> list[int]:
        n = len(_load_questions(questions or _data_path("searchqa_questions.jsonl")))
        test = check_split(split) == "test"
        return [i for i in range(n) if (i % 5 == 0) == test]  # every 5th question is held out

    def instruction(self) -> str:
        return INSTRUCTION

    def parse(self, reply: str) -> Parsed:
        m = _TAG_RE.search(reply[:16384])
        return Parsed(f"{m.group(1)}:{m.group(2).strip()}" if m else "")

    def _reset(self, task_id: int) -> str:
        if not 0 <= task_id < len(self.questions):
            raise ValueError(f"task_id {task_id} out of range [0, {len(self.questions)})")
        self.item = self.questions[task_id]
        return f"Question: {self.item['question'].strip()}"

    def search(self, query: str) -> str:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab or not any(len(ids) for ids in tokens.ids):
            return "No results."
        k = min(self.top_k, len(self.docs))
        idx, _ = self._retriever.retrieve(tokens, k=k, show_progress=False)
        return "\n".join(
            f"Doc {i + 1}(Title: {self.docs[j]['title']}) {self.docs[j]['text']}"
            for i, j in enumerate(idx[0])
        )

    def _step(self, action: str) -> StepResult:
        kind, _, content = action.partition(":")
        if kind == "answer":
            ok = exact_match(content, self.item["answers"])
            return StepResult(
                "",
                float(ok),
                True,
                {"answer": content, "success": ok, "golden": self.item["answers"]},
            )
        if kind == "search" and content:
            return StepResult(
                f"\n\n<information>{self.search(content)}</information>\n\n",
                0.0,
                False,
                {"query": content},
            )
        return StepResult(INVALID, 0.0, False, {"invalid": True})
