"""One way to derive seeds: ``mix_seed(base, *parts)``.

Every random stream in a run (an episode's sampling, a step's update, an evaluation) is named by
integers (run seed, step, episode uid, ...) and mixed here, so two streams never share a seed by
accident of formula, and a resumed run derives exactly the same seeds.
"""

from __future__ import annotations

_PRIME = 1_000_003
_MASK = 0x7FFFFFFF  # non-negative int32: valid for jax.random.key and numpy alike


def mix_seed(base: int, *parts: int) -> int:
    """``(((base * P + p0) * P + p1) ...) mod 2^31`` for a large prime P."""
    h = int(base) & _MASK
    for p in parts:
        h = (h * _PRIME + int(p)) & _MASK
    return h
