"""Task-id datasets: a seeded, endlessly reshuffled stream of env task ids in batches.

Built on grain's `MapDataset` (source -> seeded shuffle -> repeat -> batch), so the order is a
pure function of (task ids, seed) and the iterator state is one integer: restoring it resumes
the exact same sequence (checkpoint.py stores `get_state()` next to the params).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np


class Task(NamedTuple):
    """One episode to run: the env's task id and its group (GRPO / RLOO: same group = same
    task, sampled ``rollout.n`` times)."""

    task_id: int
    group: int


def expand_groups(task_ids: Sequence[int], group_size: int) -> list[Task]:
    """Each task id ``group_size`` times in a row; group ``g`` is the ``g``-th distinct task."""
    return [Task(int(t), g) for g, t in enumerate(task_ids) for _ in range(group_size)]


def host_share(tasks: Sequence[Task], index: int, count: int) -> tuple[list[Task], int]:
    """Process ``index`` of ``count``'s share of a step's tasks -> (its tasks, the position of
    the first in ``tasks``).

    Whole groups only (a GRPO group's advantage needs all its episodes on one host), in
    contiguous blocks in process order, so the global batch is the shares concatenated.
    Shares differ by at most one group when the groups do not divide evenly. ``tasks`` must
    hold each group's tasks together, as ``expand_groups`` makes them.
    """
    if not 0 <= index < count:
        raise ValueError(f"host_share: process index {index} not in [0, {count})")
    if count == 1:
        return list(tasks), 0
    groups = list(dict.fromkeys(t.group for t in tasks))
    starts = [i for i, t in enumerate(tasks) if i == 0 or t.group != tasks[i - 1].group]
    if len(starts) != len(groups):
        raise ValueError("host_share: a group's tasks are not contiguous (use expand_groups)")
    lo, hi = index * len(groups) // count, (index + 1) * len(groups) // count
    begin = starts[lo] if lo < len(starts) else len(tasks)
    end = starts[hi] if hi < len(starts) else len(tasks)
    return list(tasks[begin:end]), begin


def _fingerprint(task_ids: Sequence[int], seed: int, batch_size: int, group_size: int) -> str:
    h = hashlib.sha256(np.asarray(task_ids, dtype=np.int64).tobytes())
    h.update(f"{seed}/{batch_size}/{group_size}".encode())
    return h.hexdigest()[:16]


class TaskSampler:
    """Batches of tasks (`Task(task_id, group)`), reshuffled every epoch with `seed`.

    Args:
      task_ids: the pool to draw from, e.g. `envs.task_ids("babyai", "train")`.
      batch_size: distinct tasks per batch (prompts per step).
      seed: shuffle seed; the same seed gives the same order on every machine.
      group_size: each task id is repeated this many times in a row (GRPO's rollout.n), so a
        batch holds `batch_size * group_size` tasks, numbered by group.
    """

    def __init__(
        self, task_ids: Sequence[int], batch_size: int, seed: int = 0, group_size: int = 1
    ) -> None:
        import grain

        if len(task_ids) == 0:
            raise ValueError("task_ids is empty")
        if batch_size < 1 or group_size < 1:
            raise ValueError(
                f"batch_size and group_size must be >= 1, got {batch_size}, {group_size}"
            )
        self.task_ids = [int(t) for t in task_ids]
        self.batch_size, self.seed, self.group_size = batch_size, int(seed), group_size
        # drop_remainder: an endless repeat has sys.maxsize elements, and the ceil in grain's
        # length without it overflows an index for batch_size 1 (the stream itself is the same).
        self._dataset = (
            grain.MapDataset.source(self.task_ids)
            .seed(self.seed)
            .shuffle()
            .repeat()
            .batch(batch_size, drop_remainder=True)
        )
        self._fingerprint = _fingerprint(self.task_ids, self.seed, batch_size, group_size)
        self._iter = iter(self._dataset)

    def __iter__(self) -> Iterator[list[Task]]:
        return self

    def __next__(self) -> list[Task]:
        return expand_groups(next(self._iter), self.group_size)

    def batch_at(self, index: int) -> list[Task]:
        """The `index`-th batch without moving the iterator (random access into the stream)."""
        return expand_groups(self._dataset[index], self.group_size)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; `set_state` on a sampler built alike resumes exactly."""
        state = dict(self._iter.get_state())
        state.update(fingerprint=self._fingerprint, seed=self.seed)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "sampler state was saved for different task ids, seed, batch_size or group_size "
                f"(saved fingerprint {state.get('fingerprint')!r}, this sampler {self._fingerprint!r})"
            )
        self._iter.set_state({k: v for k, v in state.items() if k not in ("fingerprint", "seed")})


def env_task_sampler(
    env_name: str, split: str, batch_size: int, seed: int = 0, group_size: int = 1, **env_kwargs
) -> TaskSampler:
    """A `TaskSampler` over `envs.task_ids(env_name, split, **env_kwargs)`."""
    import envs

    return TaskSampler(envs.task_ids(env_name, split, **env_kwargs), batch_size, seed, group_size)
