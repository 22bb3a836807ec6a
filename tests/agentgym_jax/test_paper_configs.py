"""The paper recipes reproduce the original AgentGym-RL runs: every value below is the original's
(its examples/train and examples/eval scripts, and what its veRL actor really does with them)."""

import glob
import os

import pytest

from agentgym_jax.config import load_config
from agentgym_jax.rollout import Rollout, RolloutSettings
from agentgym_jax.schedule import make_horizon
from agentgym_jax.trainer import rollout_settings
from tests.helpers import ROOT

FIXED, SI = "fixed", "scaling_inter_stepwise"
# recipe: (n, prompts per step, prompts per mini-batch, prompt len, response len,
#          new tokens per turn, horizon type, rounds, steps per ScalingInter stage)
TRAIN = {
    "babyai_agentgym_rl": (8, 16, 8, 1024, 4096, 200, FIXED, [20], None),
    "babyai_scaling_inter": (4, 32, 8, 512, 8192, 512, SI, [6, 13, 20], 100),
    "sciworld_agentgym_rl": (8, 16, 8, 1024, 4096, 200, FIXED, [20], None),
    "sciworld_scaling_inter": (8, 16, 8, 1024, 8192, 200, SI, [10, 20, 30], 100),
    "searchqa_agentgym_rl": (4, 32, 8, 1024, 8192, 512, FIXED, [5], None),
    "searchqa_scaling_inter": (4, 32, 8, 1024, 8192, 512, SI, [5, 8, 10], 100),
    "textcraft_agentgym_rl": (8, 32, 8, 512, 10240, 512, FIXED, [30], None),
    "textcraft_scaling_inter": (8, 32, 8, 512, 10240, 512, SI, [10, 20, 30], 100),
    "webarena_agentgym_rl": (4, 32, 4, 750, 14098, 512, FIXED, [15], None),
    "webarena_scaling_inter": (4, 32, 4, 750, 14098, 512, SI, [8, 12, 15], 80),
}
# Turn limit of the original's eval scripts, per env.
EVAL_TURNS = {"babyai": 20, "sciworld": 30, "textcraft": 30, "searchqa": 30, "webarena": 15}

# The same in every recipe. The update's shape is what the original's actor really does:
# one-sequence micro-batches (seq-mean-token-mean), one pass over the mini-batches, no dual clip.
COMMON = {
    "algorithm.adv_estimator": "grpo",
    "algorithm.norm_adv_by_std_in_grpo": True,
    "algorithm.gamma": 1.0,
    "algorithm.lam": 1.0,
    "algorithm.use_kl_in_reward": False,
    "actor.lr": 1e-6,
    "actor.warmup_steps": 0,
    "actor.lr_schedule": "constant",
    "actor.use_kl_loss": True,
    "actor.kl_loss_coef": 0.001,
    "actor.kl_loss_type": "low_var_kl",
    "actor.entropy_coeff": 0.001,
    "actor.clip_ratio_low": 0.2,
    "actor.clip_ratio_high": 0.2,
    "actor.clip_ratio_c": None,
    "actor.grad_clip": 1.0,
    "actor.ppo_epochs": 1,
    "actor.loss_agg_mode": "seq-mean-token-mean",
    "actor.temperature": 1.0,
    "rollout.temperature": 1.0,
    "rollout.top_p": 1.0,
    "rollout.top_k": 0,
    "rollout.unclosed_turn_score": None,
    "ref.enable": True,
    # Evaluation: sampled at temperature 1, one sample per task, 200 new tokens per turn.
    "rollout.val_temperature": 1.0,
    "rollout.val_n": 1,
    "rollout.val_max_tokens_per_turn": 200,
}


def _get(cfg, dotted):
    obj = cfg
    for k in dotted.split("."):
        obj = getattr(obj, k)
    return obj


def _path(name):
    return os.path.join(ROOT, "configs", name + ".yaml")


def test_table_covers_every_paper_config():
    shipped = glob.glob(_path("*_agentgym_rl")) + glob.glob(_path("*_scaling_inter"))
    assert sorted(os.path.basename(p)[:-5] for p in shipped) == sorted(TRAIN)


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_paper_config_matches_the_original(name):
    cfg = load_config(_path(name))
    n, prompts, mini_prompts, p_len, r_len, per_turn, kind, rounds, stage = TRAIN[name]
    got = {k: _get(cfg, k) for k in COMMON}
    assert got == COMMON
    assert cfg.rollout.n == n and cfg.data.train_batch_size == prompts
    # veRL counts the mini-batch in prompts; ours is in sequences.
    assert cfg.actor.ppo_mini_batch_size == mini_prompts * n
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (p_len, r_len)
    assert cfg.rollout.max_tokens_per_turn == per_turn
    rc = cfg.algorithm.rounds_ctrl
    assert (rc.type, rc.rounds) == (kind, rounds)
    if stage is not None:
        assert rc.steps_scaling_inter == stage
    env = name.split("_")[0]
    assert cfg.rollout.val_max_turns == EVAL_TURNS[env]
    want_env = "http" if env == "webarena" else env
    assert cfg.env.name == want_env


@pytest.mark.parametrize("name", ["babyai_scaling_inter", "sciworld_agentgym_rl"])
def test_paper_rollout_settings(name):
    cfg = load_config(_path(name))
    horizon = make_horizon(cfg.algorithm.rounds_ctrl)
    train = rollout_settings(cfg, horizon, 1, eval_mode=False)
    ev = rollout_settings(cfg, horizon, 1, eval_mode=True)
    for s in (train, ev):
        assert s.max_response_length == cfg.data.max_response_length
        assert (s.temperature, s.top_p, s.top_k) == (1.0, 1.0, 0)
    assert train.max_turns == cfg.algorithm.rounds_ctrl.rounds[0]
    assert train.max_tokens_per_turn == cfg.rollout.max_tokens_per_turn
    assert ev.max_turns == cfg.rollout.val_max_turns and ev.max_tokens_per_turn == 200


def test_demo_keeps_greedy_evaluation():
    cfg = load_config(_path("demo"))
    ev = rollout_settings(cfg, make_horizon(cfg.algorithm.rounds_ctrl), 1, eval_mode=True)
    assert ev.temperature == 0.0 and ev.max_tokens_per_turn == cfg.rollout.max_tokens_per_turn


def test_turn_budget_arithmetic():
    s = RolloutSettings(max_turns=3, max_tokens_per_turn=16, max_prompt_length=100)
    assert s.turn_budget(10**6) == 16 and not s.out_of_budget(10**6)  # no budget set
    s = RolloutSettings(3, 16, 100, max_response_length=40)
    assert [s.turn_budget(r) for r in (0, 24, 30, 39)] == [16, 16, 10, 1]
    assert not s.out_of_budget(39) and s.out_of_budget(40)


def test_response_budget_bounds_tokens_after_the_prompt(agent_dir):
    """An engine with room to spare: the response budget, not max_len, ends the episodes."""
    from agentgym_jax.engine import Engine, EngineConfig
    from agentgym_jax.engine.chat import ChatDeltas
    from agentgym_jax.envs_driver import EnvDriver
    from agentgym_jax.models import from_pretrained, load_tokenizer

    tok = load_tokenizer(agent_dir)
    model = from_pretrained(agent_dir)
    engine = Engine(model, EngineConfig(num_slots=3, max_len=2048, prefill_buckets=(64, 256, 1024)))
    ro = Rollout(
        engine,
        EnvDriver("babyai", {"levels": ["GoToRedBallNoDists"]}),
        ChatDeltas(tok),
        stop_token_ids=model.config.eos_token_ids,
    )
    budget = 60
    s = RolloutSettings(
        max_turns=8, max_tokens_per_turn=24, max_prompt_length=1500, max_response_length=budget
    )
    eps = ro.run([(t, t) for t in range(4)], s).episodes
    assert all(e.finished and e.error is None for e in eps)
    assert any(e.truncated == "length" for e in eps)
    for e in eps:
        assert len(e.tokens) - e.prompt_len <= budget
        assert len(e.tokens) == len(e.loss_mask) == len(e.logprobs)
