"""Packed rows: several trajectories per fixed-length row instead of one row per trajectory
padded to the step's longest.

The learner keeps the step's batch in its padded layout ([B, T], right-padded: episode b holds
positions ``0 .. len_b - 1``); only the model's forward (and backward) passes run on packed rows.
A packing is an index map, made on the host from the episode lengths:

- ``src`` [R, L]: the episode whose token sits in each slot of each packed row (-1: empty),
- ``pos`` [R, L]: that token's position within its episode,
- ``row`` / ``offset`` [B]: where each episode starts in the packed layout (for unpacking).

``gather`` takes any padded [B, T] array to the packed layout, ``unpack`` brings per-token model
outputs back. In a packed row a token attends only to its own episode (``segment_ids``), with
the episode's own positions, so every per-token value equals the padded computation's (tested
per attention path); losses, advantages and metrics stay in terms of episodes.

Rows are filled first-fit in decreasing length (the classic bin-packing heuristic: within 11/9 of
the fewest rows); callers round the row count up (``rows_for``, ``Packing.with_rows``): to one
micro-batch of fewer rows when they fit, else to whole micro-batches, along a short ladder of
sizes so the number of distinct compiled shapes stays small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Packing:
    src: np.ndarray  # [R, L] int32, -1 = empty slot
    pos: np.ndarray  # [R, L] int32
    row: np.ndarray  # [n] int32: packed row of each packed episode (in ``episodes`` order)
    offset: np.ndarray  # [n] int32: its first slot in that row

    @property
    def n_rows(self) -> int:
        return int(self.src.shape[0])

    def with_rows(self, n: int) -> Packing:
        """The same packing with empty rows appended up to ``n``."""
        extra = ((0, n - self.n_rows), (0, 0))
        return dataclasses.replace(
            self, src=np.pad(self.src, extra, constant_values=-1), pos=np.pad(self.pos, extra)
        )

    def fill(self) -> float:
        """Fraction of slots that hold a token."""
        return float(np.mean(self.src >= 0)) if self.src.size else 0.0


def bucket(n: int, multiple: int) -> int:
    """``multiple`` x the smallest power of two with that product >= n: each pass has at most
    one packed shape per power of two (compiles are what a short CPU run pays for most)."""
    k = -(-max(n, 1) // multiple)
    return multiple * (1 << (k - 1).bit_length())


def pack(lengths: Sequence[int], row_len: int, episodes: Sequence[int] | None = None) -> Packing:
    """First-fit-decreasing packing of ``episodes`` (indices into ``lengths``; default all) into
    as few rows of ``row_len`` slots as it finds."""
    lengths = np.asarray(lengths, np.int64)
    eps = np.arange(len(lengths)) if episodes is None else np.asarray(episodes, np.int64)
    if len(eps) and lengths[eps].max() > row_len:
        raise ValueError(f"an episode of {lengths[eps].max()} tokens exceeds rows of {row_len}")
    free: list[int] = []  # free slots per row
    row = np.zeros(len(eps), np.int32)
    offset = np.zeros(len(eps), np.int32)
    # Stable sort: equal lengths keep their order, so a packing is a pure function of its input.
    for i in np.argsort(-lengths[eps], kind="stable"):
        n = int(lengths[eps[i]])
        r = next((j for j, f in enumerate(free) if f >= n), len(free))
        if r == len(free):
            free.append(row_len)
        row[i], offset[i] = r, row_len - free[r]
        free[r] -= n
    src = np.full((len(free), row_len), -1, np.int32)
    pos = np.zeros((len(free), row_len), np.int32)
    for i, e in enumerate(eps):
        n = int(lengths[e])
        src[row[i], offset[i] : offset[i] + n] = e
        pos[row[i], offset[i] : offset[i] + n] = np.arange(n)
    return Packing(src, pos, row, offset)


# Packing pays when it removes at least this fraction of the rows. With fewer, the gathers and
# an extra compiled shape cost about what the rows save (the demo at its 4-turn horizon: 31
# rows for 32 episodes, 0.9x).
MIN_SAVING = 0.25


def worth_it(packed_rows: int, padded_rows: int) -> bool:
    """Whether a pass over ``packed_rows`` beats one over ``padded_rows`` padded rows."""
    return packed_rows <= (1 - MIN_SAVING) * padded_rows


def rows_for(n: int, micro: int, multiple: int = 1) -> int:
    """Rows to hold ``n`` packed rows when micro-batches take at most ``micro`` rows (a multiple
    of ``multiple``, the data-parallel ways): fewer than ``micro`` rows make one smaller
    micro-batch (``bucket(n, multiple)``), more make whole ones (``bucket(n, micro)``)."""
    r = bucket(n, multiple)
    return r if r <= micro else bucket(n, micro)


def micro_rows(rows: int, micro: int) -> int:
    """Rows per micro-batch of a packed pass over ``rows`` (from ``rows_for``)."""
    return min(rows, micro)


def gather(x, src, pos):
    """Padded [B, T, ...] -> packed [..., L, ...] by (src, pos); empty slots are 0."""
    empty = src < 0
    v = x[jnp.maximum(src, 0), pos]
    return jnp.where(empty.reshape(empty.shape + (1,) * (v.ndim - empty.ndim)), 0, v)


def segment_ids(src):
    """Segment ids of packed rows: episode index + 1, 0 on empty slots."""
    return src + 1


def unpack(y, row, offset, lengths, t: int):
    """Packed per-token outputs [R, L] -> padded [n, t], for outputs aligned to the tokens by a
    right shift (log-probs, values): position 0 has no predecessor in its episode and is 0, as
    in a padded pass (in a packed row its slot holds the previous episode's last output), and
    so is everything beyond the episode's length."""
    j = jnp.arange(t)
    cols = jnp.minimum(offset[:, None] + j, y.shape[1] - 1)
    v = y[row[:, None], cols]
    return jnp.where((j > 0) & (j < lengths[:, None]), v, 0)
