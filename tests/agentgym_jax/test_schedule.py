"""ScalingInter-RL horizon and lr schedules."""

from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest

from agentgym_jax import schedule as S
from agentgym_jax.config import RoundsCtrl, load_config
from agentgym_jax.config_tree import ConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def loop_reference(rounds, every, step):
    """Walk the stages one step at a time: stage k covers steps k*every+1 .. (k+1)*every."""
    stage, seen = 0, 0
    for _ in range(1, max(step, 1) + 1):
        if seen == every:
            stage, seen = stage + 1, 0
        seen += 1
    return rounds[min(stage, len(rounds) - 1)]


@pytest.mark.parametrize(
    "rounds,every", [([6, 13, 20], 100), ([8, 12, 15], 80), ([2, 3], 1), ([5], 7)]
)
def test_scaling_inter_matches_loop(rounds, every):
    f = S.scaling_inter(rounds, every)
    for step in list(range(0, 3 * every + 5)) + [10 * every + 3]:
        assert f(step) == loop_reference(rounds, every, step), step


def test_scaling_inter_boundaries():
    f = S.scaling_inter([6, 13, 20], 100)
    assert [f(1), f(100), f(101), f(200), f(201), f(10_000)] == [6, 6, 13, 13, 20, 20]
    assert f(0) == 6  # pre-training validation uses the first stage
    assert f(np.int64(150)) == 13
    with pytest.raises(ValueError, match="step"):
        f(-1)


def test_fixed():
    assert S.fixed(7)(0) == 7 and S.fixed(7)(10**6) == 7


# The paper's horizons (AgentGym-RL): ScalingInter-RL (rounds per stage, steps per stage) and the
# fixed max rounds of the plain AgentGym-RL runs. The shipped recipes are the only copy.
PAPER_SCALING = {
    "babyai": ([6, 13, 20], 100),
    "sciworld": ([10, 20, 30], 100),
    "searchqa": ([5, 8, 10], 100),
    "textcraft": ([10, 20, 30], 100),
    "webarena": ([8, 12, 15], 80),
}
PAPER_FIXED = {"babyai": 20, "sciworld": 20, "searchqa": 5, "textcraft": 30, "webarena": 15}


@pytest.mark.parametrize("env", sorted(PAPER_SCALING))
def test_shipped_recipes_give_paper_horizons(env):
    rounds, every = PAPER_SCALING[env]
    rc = load_config(os.path.join(CONFIGS, f"{env}_scaling_inter.yaml")).algorithm.rounds_ctrl
    assert rc.type == "scaling_inter_stepwise"
    f = S.make_horizon(rc)
    assert [f(1), f(every), f(every + 1), f(2 * every + 1), f(99 * every)] == [
        rounds[0],
        rounds[0],
        rounds[1],
        rounds[2],
        rounds[2],
    ]
    assert (list(rc.rounds), rc.steps_scaling_inter) == (rounds, every)
    rc = load_config(os.path.join(CONFIGS, f"{env}_agentgym_rl.yaml")).algorithm.rounds_ctrl
    assert rc.type == "fixed"
    f = S.make_horizon(rc)
    assert f(0) == f(1) == f(10_000) == PAPER_FIXED[env]


def test_make_horizon_from_configs():
    f = S.make_horizon(
        {"type": "scaling_inter_stepwise", "rounds": [10, 20, 30], "steps_scaling_inter": 100}
    )
    assert (f(100), f(101), f(300), f(301)) == (10, 20, 30, 30)
    nested = {"rounds_ctrl": {"type": "fixed", "rounds": 15}}
    assert S.make_horizon(nested)(500) == 15
    obj = types.SimpleNamespace(type="fixed", rounds=[5], steps_scaling_inter=None)
    assert S.make_horizon(obj)(3) == 5
    cfg = RoundsCtrl(type="scaling_inter_stepwise", rounds=[6, 13, 20], steps_scaling_inter=2)
    assert [S.make_horizon(cfg)(s) for s in range(1, 8)] == [6, 6, 13, 13, 20, 20, 20]


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"type": "linear", "rounds": [1, 2]}, "rounds_ctrl.type"),
        ({"type": "fixed", "rounds": 0}, "rounds_ctrl.rounds"),
        ({"type": "fixed", "rounds": [3, 4]}, "rounds_ctrl.rounds"),
        ({"type": "fixed"}, "rounds_ctrl.rounds"),
        (
            {"type": "scaling_inter_stepwise", "rounds": [5, 3], "steps_scaling_inter": 10},
            "non-decreasing",
        ),
        (
            {"type": "scaling_inter_stepwise", "rounds": [5, 2.5], "steps_scaling_inter": 10},
            "rounds_ctrl.rounds",
        ),
        (
            {"type": "scaling_inter_stepwise", "rounds": [], "steps_scaling_inter": 10},
            "rounds_ctrl.rounds",
        ),
        (
            {"type": "scaling_inter_stepwise", "rounds": [5, 8], "steps_scaling_inter": 0},
            "steps_scaling_inter",
        ),
        ({"type": "scaling_inter_stepwise", "rounds": [5, 8]}, "steps_scaling_inter"),
    ],
)
def test_make_horizon_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        S.make_horizon(cfg)


@pytest.mark.parametrize(
    "override,match",
    [
        ("algorithm.rounds_ctrl.type=stepwise", "rounds_ctrl.type"),
        ("algorithm.rounds_ctrl.rounds=[5, 3]", r"algorithm\.rounds_ctrl\.rounds.*non-decreasing"),
        ("algorithm.rounds_ctrl.rounds=[]", r"algorithm\.rounds_ctrl\.rounds"),
        (
            "algorithm.rounds_ctrl={type: fixed, rounds: [3, 4]}",
            r"algorithm\.rounds_ctrl\.rounds.*one value",
        ),
        (
            "algorithm.rounds_ctrl.steps_scaling_inter=0",
            r"algorithm\.rounds_ctrl\.steps_scaling_inter",
        ),
    ],
)
def test_bad_horizon_fails_at_config_load(override, match):
    # tiny_cpu is scaling_inter_stepwise, so steps_scaling_inter is checked too.
    with pytest.raises(ConfigError, match=match):
        load_config(os.path.join(CONFIGS, "tiny_cpu.yaml"), [override])


def test_rounds_ctrl_validates_itself():
    with pytest.raises(ConfigError, match=r"algorithm\.rounds_ctrl\.rounds=0"):
        RoundsCtrl(type="fixed", rounds=[0])
    assert S.make_horizon(RoundsCtrl())(1) == 20


def test_lr_schedules():
    const = S.lr_schedule(1e-3, warmup_steps=4)
    got = [float(const(s)) for s in range(6)]
    np.testing.assert_allclose(got, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    assert float(S.lr_schedule(2e-3)(0)) == pytest.approx(2e-3)
    cos = S.lr_schedule(1.0, warmup_steps=2, kind="cosine", total_steps=12, min_lr_ratio=0.1)
    for s in range(16):
        if s < 2:
            ref = (s + 1) / 2
        else:
            prog = min((s - 2) / 10, 1.0)
            ref = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))
        assert float(cos(s)) == pytest.approx(ref, rel=1e-5), s
    with pytest.raises(ValueError, match="total_steps"):
        S.lr_schedule(1.0, kind="cosine")
    with pytest.raises(ValueError, match="lr_schedule"):
        S.lr_schedule(1.0, kind="linear")
