"""Multi-turn rollout: drives the slot engine and the env pool, emits token-exact trajectories.

Each episode lives in one engine slot for its whole life: the prompt is prefilled once, every
env reply is appended to the slot's KV cache as the chat template's token delta, and the
trajectory is exactly the token ids the model saw and produced (no re-tokenisation of text).

Concurrency: all model turns in flight decode together; as soon as a slot's turn ends its
action goes to the env pool and the engine keeps decoding the others (``return_on_first``);
env replies are appended as they arrive, and free slots are refilled with waiting episodes.
Each episode has a ``Phase``; the loop moves it through ``EpisodeBook.move``, which refuses
transitions that cannot happen, and a pool result's kind (reset or step) must match the phase.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from agentgym_jax.engine import Engine, SlotFullError
from agentgym_jax.engine.chat import ChatDeltas
from agentgym_jax.seeding import mix_seed
from envs.pool import Kind, PoolResult

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where an episode is: RESETTING -> READY -> (DECODING <-> WAITING_ENV) -> DONE."""

    RESETTING = "resetting"  # reset submitted; waiting for the env's first observation
    READY = "ready"  # prompt built; waiting for an engine slot
    DECODING = "decoding"  # a model turn is being decoded in the episode's slot
    WAITING_ENV = "waiting_env"  # the turn's reply is with the env
    DONE = "done"


_NEXT = {
    Phase.RESETTING: (Phase.READY, Phase.DONE),
    Phase.READY: (Phase.DECODING,),
    Phase.DECODING: (Phase.WAITING_ENV, Phase.DONE),
    Phase.WAITING_ENV: (Phase.DECODING, Phase.DONE),
    Phase.DONE: (),
}
# The phase an episode must be in for a pool result of each kind to be its answer.
_AWAITS = {Kind.RESET: Phase.RESETTING, Kind.STEP: Phase.WAITING_ENV}


@dataclasses.dataclass
class Episode:
    uid: int
    task_id: int
    group: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    turn_ends: list[int] = dataclasses.field(default_factory=list)
    """Index (into tokens) of each model turn's last token."""
    turn_rewards: list[float] = dataclasses.field(default_factory=list)
    messages: list[dict] = dataclasses.field(default_factory=list)
    prompt_len: int = 0
    turns: int = 0
    turns_stopped: int = 0
    """Model turns that ended on a stop token (the rest hit max_tokens_per_turn)."""
    score: float = 0.0
    success: bool = False
    env_done: bool = False
    truncated: str | None = None
    """None, "horizon" (max turns reached), "length" (token budget), "prompt" (prompt too long),
  "turn" (a turn hit max_tokens_per_turn; see ``RolloutSettings.unclosed_turn_score``)."""
    error: str | None = None
    slot: int = -1
    phase: Phase = Phase.RESETTING

    @property
    def finished(self) -> bool:
        return self.phase is Phase.DONE

    def transcript(self) -> dict:
        return dict(
            uid=self.uid,
            task_id=self.task_id,
            group=self.group,
            score=self.score,
            success=self.success,
            turns=self.turns,
            truncated=self.truncated,
            error=self.error,
            num_tokens=len(self.tokens),
            messages=self.messages,
        )


@dataclasses.dataclass
class RolloutSettings:
    max_turns: int
    max_tokens_per_turn: int
    max_prompt_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    """Episode ``i`` samples with seed ``hash(seed, i)``: independent of timing and slot."""
    unclosed_turn_score: float | None = None
    """None: a turn cut at ``max_tokens_per_turn`` goes to the env as is (AgentGym). A number:
  it ends the episode with this score (``truncated="turn"``), so RL stops rewarding replies
  that ramble past their action and never close."""
    max_response_length: int | None = None
    """Token budget after the prompt (model turns + env replies), as the original's
  ``data.max_response_length``; an episode that would pass it ends (``truncated="length"``).
  None: only the engine's ``max_len`` bounds it."""

    def turn_budget(self, response_len: int) -> int:
        """New tokens the next model turn may take, ``response_len`` tokens after the prompt."""
        if self.max_response_length is None:
            return self.max_tokens_per_turn
        return max(1, min(self.max_tokens_per_turn, self.max_response_length - response_len))

    def out_of_budget(self, response_len: int) -> bool:
        """No room for another model token after ``response_len`` tokens."""
        return self.max_response_length is not None and response_len >= self.max_response_length


@dataclasses.dataclass
class RolloutResult:
    episodes: list[Episode]
    """One per requested task, in request order."""
    stats: dict[str, float]
    """Wall times: rollout_s, env_wait_s (blocked on envs), decode_s."""


def episode_seed(seed: int, uid: int) -> int:
    return mix_seed(seed, uid * 7919 + 17)


class EpisodeBook:
    """The episodes of one run by phase. Every phase change goes through ``move``, which raises
    on one the loop never makes (a bug). Each phase keeps arrival order: READY episodes get
    slots first come, first served."""

    def __init__(self, episodes: Sequence[Episode]):
        self.episodes = {e.uid: e for e in episodes}
        self._in: dict[Phase, dict[int, Episode]] = {p: {} for p in Phase}
        for e in episodes:
            self._in[e.phase][e.uid] = e

    def move(self, e: Episode, to: Phase) -> None:
        if to not in _NEXT[e.phase]:
            raise RuntimeError(f"episode {e.uid}: no transition {e.phase.name} -> {to.name} (bug)")
        del self._in[e.phase][e.uid]
        self._in[to][e.uid] = e
        e.phase = to

    def answered(self, r: PoolResult) -> Episode:
        """The episode a pool result answers; it must be waiting for a result of that kind."""
        e = self.episodes.get(r.episode_id)
        if e is None or e.phase is not _AWAITS.get(r.kind):
            where = "unknown" if e is None else f"in phase {e.phase.name}"
            raise RuntimeError(f"{r.kind.value} result for episode {r.episode_id} {where} (bug)")
        return e

    def __getitem__(self, phase: Phase) -> list[Episode]:
        return list(self._in[phase].values())

    def count(self, *phases: Phase) -> int:
        return sum(len(self._in[p]) for p in phases)


class Rollout:
    """Runs episodes for (task_id, group) pairs; see module docstring.

    ``pool`` is an env pool (``agentgym_jax.envs_driver``) whose episodes are keyed by our uid.
    """

    def __init__(
        self,
        engine: Engine,
        pool,
        chat: ChatDeltas,
        *,
        stop_token_ids: Sequence[int] = (),
        success_fn: Callable | None = None,
        gather_window_s: float = 0.02,
    ):
        self.engine = engine
        self.gather_window_s = gather_window_s
        self.pool = pool
        self.chat = chat
        self.stop_token_ids = tuple(dict.fromkeys([chat.end_of_turn_id, *stop_token_ids]))
        self.success_fn = success_fn or (
            lambda score, info, done: bool(info.get("success", done and score > 0))
        )

    def run(
        self,
        tasks: Sequence[tuple[int, int]],
        s: RolloutSettings,
        *,
        first_uid: int = 0,
        check: Callable[[], None] | None = None,
    ) -> RolloutResult:
        """Episodes for ``tasks`` (``data.Task`` or (task_id, group) pairs) under settings ``s``.

        Episode ``i`` gets uid ``first_uid + i``, and its sampling seed follows the uid: a host
        running its share of a step (``data.host_share``) passes the share's position in the
        whole step, so an episode samples the same stream whichever host runs it. ``check`` is
        called between engine calls; it may raise to abandon the rollout (a stop signal)."""
        eng = self.engine
        t0 = time.perf_counter()
        book = EpisodeBook(
            [
                Episode(uid=first_uid + i, task_id=int(t), group=int(g))
                for i, (t, g) in enumerate(tasks)
            ]
        )
        for e in book.episodes.values():
            self.pool.submit_reset(e.uid, e.task_id)
        env_wait = decode_time = 0.0
        while book.count(Phase.DONE) < len(book.episodes):
            if check is not None:
                check()
            # 1) Collect env replies (block only when the engine has nothing to do).
            if n_env := book.count(Phase.RESETTING, Phase.WAITING_ENV):
                tw = time.perf_counter()
                results = self._gather(n_env, book.count(Phase.DECODING))
                env_wait += time.perf_counter() - tw
                to_append: list[Episode] = []
                for r in results:
                    e = book.answered(r)
                    if r.kind is Kind.RESET:
                        self._on_reset(book, e, r.result, s)
                    elif self._on_step(book, e, r.result, s):
                        to_append.append(e)
                if to_append:
                    self._append(book, to_append, s)
            # 2) Start ready episodes in free slots (one batched prefill).
            free = eng.free_slots()
            if (ready := book[Phase.READY]) and free:
                batch = ready[: len(free)]
                for e, slot in zip(batch, free):
                    e.slot = slot
                    book.move(e, Phase.DECODING)
                eng.prefill(
                    [e.slot for e in batch],
                    [e.tokens for e in batch],
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    seeds=[episode_seed(s.seed, e.uid) for e in batch],
                )
                eng.begin_turn([e.slot for e in batch], s.turn_budget(0), self.stop_token_ids)
            # 3) Decode until some turn ends; hand finished turns to the envs.
            if decoding := book[Phase.DECODING]:
                td = time.perf_counter()
                done_turns = eng.step(return_on_first=True)
                decode_time += time.perf_counter() - td
                by_slot = {e.slot: e for e in decoding}
                for slot, turn in done_turns.items():
                    e = by_slot[slot]
                    if self._on_turn(e, turn, s):
                        book.move(e, Phase.WAITING_ENV)
                    else:
                        self._finish(book, e)
            elif book.count(Phase.READY) and not book.count(Phase.RESETTING, Phase.WAITING_ENV):
                raise RuntimeError("rollout stalled: episodes wait for slots none will free (bug)")
        stats = dict(rollout_s=time.perf_counter() - t0, env_wait_s=env_wait, decode_s=decode_time)
        return RolloutResult([book.episodes[u] for u in sorted(book.episodes)], stats)

    def _gather(self, n_waiting_env: int, n_decoding: int) -> list[PoolResult]:
        """Env replies that are ready, waiting up to ``gather_window_s`` for more while more
        episodes wait on envs than decode. A decode step costs the same for 1 or all slots, so
        starting a turn for one episode while the rest of the batch is a few ms behind wastes
        the accelerator; slow envs still cannot stall it for longer than the window."""
        results = self.pool.poll(timeout=0.0 if n_decoding else 0.05)
        deadline = time.perf_counter() + self.gather_window_s
        while len(results) < n_waiting_env and n_decoding < n_waiting_env - len(results):
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            more = self.pool.poll(timeout=min(left, 0.005))
            if more:
                results += more
                deadline = time.perf_counter() + self.gather_window_s
        return results

    # ---- event handlers ----
    def _on_reset(self, book: EpisodeBook, e: Episode, res, s: RolloutSettings):
        if res.info.get("error"):
            e.error = str(res.info["error"])
            self._finish(book, e)
            return
        msgs = self.pool.initial_messages(res)
        e.messages = list(msgs)
        ids = self.chat.prompt_ids(msgs)
        if len(ids) > s.max_prompt_length or len(ids) >= self.engine.config.max_len:
            e.truncated = "prompt"
            e.error = f"prompt of {len(ids)} tokens exceeds max_prompt_length={s.max_prompt_length}"
            self._finish(book, e)
            return
        e.tokens = list(ids)
        e.loss_mask = [0] * len(ids)
        e.logprobs = [0.0] * len(ids)
        e.prompt_len = len(ids)
        book.move(e, Phase.READY)

    def _on_turn(self, e: Episode, turn, s: RolloutSettings) -> bool:
        """Record a finished model turn; returns True if the action went to the env."""
        toks = list(turn.tokens)
        e.tokens += toks
        e.loss_mask += [1] * len(toks)
        e.logprobs += [float(x) for x in turn.logprobs]
        e.turns += 1
        if toks:
            e.turn_ends.append(len(e.tokens) - 1)
        e.turns_stopped += turn.finish_reason == "stop"
        text = self.chat.tokenizer.decode(toks, skip_special_tokens=True)
        e.messages.append({"role": "assistant", "content": text})
        # A turn cut by the response budget (its turn_budget) ends the episode like a full slot.
        over = turn.finish_reason == "length" and s.out_of_budget(len(e.tokens) - e.prompt_len)
        if turn.finish_reason == "max_len" or over:
            e.truncated = "length"
            return False
        if turn.finish_reason == "length" and s.unclosed_turn_score is not None:
            e.truncated = "turn"
            e.score = float(s.unclosed_turn_score)
            return False
        self.pool.submit_step(e.uid, text)
        return True

    def _on_step(self, book: EpisodeBook, e: Episode, res, s: RolloutSettings) -> bool:
        """Record the env's reply; returns True if the episode goes on (its reply is appended)."""
        e.turn_rewards.append(float(res.reward))
        e.score = float(res.reward)  # the paper's outcome: the last step's score
        e.env_done = bool(res.done)
        if res.info.get("error"):
            e.error = str(res.info["error"])
        e.messages.append({"role": "user", "content": res.observation})
        if e.env_done or e.error:
            e.success = self.success_fn(e.score, res.info, e.env_done) and not e.error
            self._finish(book, e)
            return False
        if e.turns >= s.max_turns:
            e.truncated = "horizon"
            self._finish(book, e)
            return False
        return True

    def _append(self, book: EpisodeBook, eps: list[Episode], s: RolloutSettings):
        """Append each episode's env reply to its slot and start its next turn."""
        live, deltas = [], []
        for e in eps:
            ended = bool(e.turn_ends) and e.tokens[e.turn_ends[-1]] == self.chat.end_of_turn_id
            # messages ends with [..., assistant, user(obs)]: the delta is that user message + gen prompt.
            delta = self.chat.delta_ids(e.messages[:-1], e.messages[-1:], model_ended_turn=ended)
            n = len(e.tokens) + len(delta)
            if n >= self.engine.config.max_len or s.out_of_budget(n - e.prompt_len):
                e.truncated = "length"
                self._finish(book, e)
                continue
            live.append(e)
            deltas.append(delta)
            e.tokens += delta
            e.loss_mask += [0] * len(delta)
            e.logprobs += [0.0] * len(delta)
        if not live:
            return
        slots = [e.slot for e in live]
        try:
            self.engine.append(slots, deltas)
        except SlotFullError:  # guarded above; keep the episode data consistent if it happens
            for e in live:
                e.truncated = "length"
                self._finish(book, e)
            return
        by_budget: dict[int, list[int]] = {}
        for e in live:
            by_budget.setdefault(s.turn_budget(len(e.tokens) - e.prompt_len), []).append(e.slot)
        for budget, group in by_budget.items():
            self.engine.begin_turn(group, budget, self.stop_token_ids)
        for e in live:
            book.move(e, Phase.DECODING)

    def _finish(self, book: EpisodeBook, e: Episode):
        book.move(e, Phase.DONE)
        if e.slot >= 0:
            self.engine.release([e.slot])
        self.pool.end_episode(e.uid)


# Per-episode numbers behind ``rollout_metrics``: hosts gather these rows, not episodes.
TABLE_COLUMNS = (
    "score",
    "success",
    "turns",
    "turns_stopped",
    "response_tokens",
    "seq_len",
    "truncated",
    "unclosed_end",
    "horizon_cut",
    "env_error",
)


def episode_table(episodes: Sequence[Episode]) -> np.ndarray:
    """[len(episodes), len(TABLE_COLUMNS)] float64: what ``table_metrics`` needs of each."""
    rows = [
        (
            e.score,
            e.success,
            e.turns,
            e.turns_stopped,
            sum(e.loss_mask),
            len(e.tokens),
            e.truncated in ("length", "prompt"),
            e.truncated == "turn",
            e.truncated == "horizon",
            e.error is not None and e.truncated is None,
        )
        for e in episodes
    ]
    return np.asarray(rows, np.float64).reshape(len(rows), len(TABLE_COLUMNS))


def table_metrics(table: np.ndarray, prefix: str = "train") -> dict[str, float]:
    """Rollout metrics of the episodes in ``table`` (``episode_table`` rows, maybe of many
    hosts: the numbers do not depend on which host ran which episode)."""
    col = {k: table[:, i] for i, k in enumerate(TABLE_COLUMNS)}
    count = len(table)
    n = max(count, 1)
    scores = col["score"]
    mean = float(scores.mean()) if count else 0.0
    turns = float(col["turns"].sum())
    return {
        f"{prefix}/reward_mean": mean,
        f"{prefix}/reward_std": float(scores.std()) if count else 0.0,
        # The paper reports both: the success rate and the mean score (the env's final score).
        f"{prefix}/success_rate": float(col["success"].sum()) / n,
        f"{prefix}/score_mean": mean,
        f"{prefix}/turns_mean": turns / n,
        f"{prefix}/turns_max": float(col["turns"].max()) if count else 0.0,
        # Falls toward 0 when the policy stops closing its turns (a common RL collapse).
        f"{prefix}/turn_stop_frac": float(col["turns_stopped"].sum()) / max(turns, 1),
        f"{prefix}/response_tokens_mean": float(np.mean(col["response_tokens"])) if count else 0.0,
        f"{prefix}/seq_len_mean": float(np.mean(col["seq_len"])) if count else 0.0,
        f"{prefix}/truncated_frac": float(col["truncated"].sum()) / n,
        f"{prefix}/unclosed_end_frac": float(col["unclosed_end"].sum()) / n,
        f"{prefix}/horizon_cut_frac": float(col["horizon_cut"].sum()) / n,
        f"{prefix}/env_error_frac": float(col["env_error"].sum()) / n,
    }


def rollout_metrics(episodes: Sequence[Episode], prefix: str = "train") -> dict[str, float]:
    return table_metrics(episode_table(episodes), prefix)


def to_batch(
    episodes: Sequence[Episode], pad_multiple: int = 64, max_len: int | None = None
) -> dict[str, np.ndarray]:
    """Right-padded training arrays. The outcome score sits on the last model token.

    An episode that ended on an env failure (``error`` set, not truncated) says nothing about the
    policy: it keeps its tokens but gets a zero loss mask and ``valid`` 0, which leaves it out of
    its group's advantage statistics (``rl.advantages``).
    """
    b = len(episodes)
    longest = max((len(e.tokens) for e in episodes), default=1)
    t = -(-max(longest, 1) // pad_multiple) * pad_multiple
    if max_len is not None:
        t = min(t, max_len)
    ids = np.zeros((b, t), np.int32)
    attn = np.zeros((b, t), np.int32)
    lmask = np.zeros((b, t), np.int32)
    lps = np.zeros((b, t), np.float32)
    rewards = np.zeros((b, t), np.float32)
    valid = np.array([e.error is None or e.truncated is not None for e in episodes], np.int32)
    for i, e in enumerate(episodes):
        n = min(len(e.tokens), t)
        ids[i, :n] = e.tokens[:n]
        attn[i, :n] = 1
        if valid[i]:
            lmask[i, :n] = e.loss_mask[:n]
        lps[i, :n] = e.logprobs[:n]
        model_pos = np.nonzero(lmask[i])[0]
        if len(model_pos):
            rewards[i, model_pos[-1]] = e.score
    return dict(
        input_ids=ids,
        attention_mask=attn,
        loss_mask=lmask,
        rollout_logprobs=lps,
        rewards=rewards,
        scores=np.array([e.score for e in episodes], np.float32),
        group_ids=np.array([e.group for e in episodes], np.int32),
        valid=valid,
    )
