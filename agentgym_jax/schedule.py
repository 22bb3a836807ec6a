"""Schedules as pure functions of the training step: the ScalingInter-RL horizon and the lr.

ScalingInter-RL (AgentGym-RL): the interaction budget per episode (``max_turns``) starts small and
is raised at fixed steps. Config mirrors the original's ``algorithm.rounds_ctrl``:
``type`` in {fixed, scaling_inter_stepwise}, ``rounds`` (an int or a list) and
``steps_scaling_inter`` (steps per stage). Steps are 1-based training steps: steps 1..N use
rounds[0], N+1..2N rounds[1], ..., and the last value holds after. Step 0 (e.g. a validation pass
before training) uses the first stage. The recipes' values live in ``configs/*.yaml`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

ROUNDS_CTRL_TYPES = ("fixed", "scaling_inter_stepwise")


def _check_pos_int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"rounds_ctrl.{key}={v!r}: must be a positive int")
    return v


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int,)) and not hasattr(step, "__index__"):
        raise TypeError(f"max_turns(step): step must be an int, got {type(step).__name__}")
    step = int(step)
    if step < 0:
        raise ValueError(f"max_turns(step): step must be >= 0, got {step}")
    return step


def fixed(n: int) -> Callable[[int], int]:
    """max_turns(step) = n for every step."""
    n = _check_pos_int("rounds", n)

    def max_turns(step: int) -> int:
        _check_step(step)
        return n

    return max_turns


def scaling_inter(rounds: Sequence[int], every: int) -> Callable[[int], int]:
    """Staged horizon: steps 1..every -> rounds[0], the next ``every`` -> rounds[1], ... last holds.

    ``rounds`` must be positive ints, non-decreasing (the method only ever widens the horizon).
    """
    if isinstance(rounds, (str, bytes)) or not isinstance(rounds, Sequence) or not rounds:
        raise ValueError(
            f"rounds_ctrl.rounds={rounds!r}: must be a non-empty list of positive ints"
        )
    rounds = tuple(_check_pos_int("rounds", r) for r in rounds)
    if any(b < a for a, b in zip(rounds, rounds[1:])):
        raise ValueError(f"rounds_ctrl.rounds={list(rounds)}: must be non-decreasing")
    every = _check_pos_int("steps_scaling_inter", every)

    def max_turns(step: int) -> int:
        step = _check_step(step)
        stage = max(step - 1, 0) // every
        return rounds[min(stage, len(rounds) - 1)]

    return max_turns


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def make_horizon(cfg: Any) -> Callable[[int], int]:
    """``max_turns(step)`` from a rounds_ctrl config (``config.RoundsCtrl``, mapping or object).

    Also accepts a parent config holding ``rounds_ctrl`` (e.g. the algorithm section).
    """
    if _get(cfg, "rounds_ctrl") is not None:
        cfg = _get(cfg, "rounds_ctrl")
    kind = _get(cfg, "type", "fixed")
    rounds = _get(cfg, "rounds")
    if kind not in ROUNDS_CTRL_TYPES:
        raise ValueError(f"rounds_ctrl.type={kind!r}: allowed {list(ROUNDS_CTRL_TYPES)}")
    if rounds is None:
        raise ValueError(
            "rounds_ctrl.rounds: required (an int, or a list for scaling_inter_stepwise)"
        )
    if kind == "fixed":
        if isinstance(rounds, Sequence) and not isinstance(rounds, (str, bytes)):
            if len(rounds) != 1:
                raise ValueError(f"rounds_ctrl.rounds={rounds!r}: type=fixed takes one value")
            rounds = rounds[0]
        return fixed(rounds)
    if not isinstance(rounds, Sequence) or isinstance(rounds, (str, bytes)):
        rounds = [rounds]
    return scaling_inter(list(rounds), _get(cfg, "steps_scaling_inter"))


# --------------------------------------------------------------------------------------------
# learning rate


def lr_schedule(
    lr: float,
    warmup_steps: int = 0,
    kind: str = "constant",
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> Callable:
    """lr(step) for 0-based optimizer-schedule steps; works on Python ints and traced arrays.

    Warmup is linear, lr * (step + 1) / warmup_steps (the first step already moves, unlike HF's
    schedule that starts at 0). ``cosine`` then decays to ``min_lr_ratio * lr`` at ``total_steps``
    (half a cosine, as veRL / HF) and holds.
    """
    if kind not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule={kind!r}: allowed ['constant', 'cosine']")
    if kind == "cosine" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"total_steps={total_steps!r}: cosine needs total_steps > warmup_steps")

    def f(step):
        s = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum((s + 1.0) / max(warmup_steps, 1), 1.0) if warmup_steps > 0 else 1.0
        if kind == "constant":
            return lr * warm
        prog = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cos = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * prog))
        return lr * jnp.where(s < warmup_steps, warm, cos)

    return f
