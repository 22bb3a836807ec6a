"""Every paper recipe trains end to end: ``agentgym-jax train --config
configs/<env>_scaling_inter.yaml`` for two GRPO steps with the tiny agent and size overrides
only, so each recipe's prompts, parsers, stop tokens, reward scales and ScalingInter horizon run
for real. WebArena goes through the HTTP client (``env.name=http``) to a loopback stand-in.
"""

import json
import math
import os

import pytest

from agentgym_jax import cli
from agentgym_jax.data import TaskSampler
from agentgym_jax.metrics import read_jsonl
from envs.sciworld import java_version
from tests.helpers import ROOT

# Sizes only: the recipe's env, algorithm, loss, dtype and remat stay as the paper sets them.
# Prompt budgets are raised because the tiny tokenizer (400 tokens) spends ~3x Qwen's tokens.
SIZE = [
    "mesh.devices=1",
    "model.attn_q_block=0",  # one attention block: same values, half the update's compile time
    "data.train_batch_size=1",  # also the batch-size-1 start-up bug (grain length overflow)
    "data.val_batch_size=1",
    "data.max_prompt_length=2048",
    "data.max_response_length=512",
    "rollout.n=2",
    "rollout.max_tokens_per_turn=8",
    "actor.ppo_mini_batch_size=2",
    "actor.ppo_micro_batch_size=2",
    "algorithm.rounds_ctrl.rounds=[1,2]",  # step 1: one turn, step 2: two (ScalingInter)
    "algorithm.rounds_ctrl.steps_scaling_inter=1",
    "env.num_workers=0",
    "trainer.total_training_steps=2",
    "trainer.test_freq=0",
    "trainer.val_before_train=false",
    "trainer.logger=[jsonl]",
    "trainer.plot=false",
]

# Text each env puts in its first observation, and in its reply to a model turn.
FIRST_OBS = {
    "babyai": "Your goal:",
    "textcraft": "Goal: craft",
    "sciworld": "Your task is",
    "searchqa": "Question:",
    "webarena": "WebShop [SEP]",
}


def run_recipe(env: str, agent_dir: str, out: str, *extra: str) -> list[dict]:
    config = os.path.join(ROOT, "configs", f"{env}_scaling_inter.yaml")
    argv = ["train", "--config", config, f"model.path={agent_dir}", f"trainer.output_dir={out}"]
    assert cli.main(argv + SIZE + list(extra)) == 0
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["train/horizon"] for r in rows] == [1.0, 2.0]
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert 0.0 <= r["train/reward_mean"] <= 1.0  # rewards on one scale (SciWorld: /100)
    for k in ("actor/pg_loss", "actor/grad_norm", "actor/kl_loss", "train/turns_mean"):
        assert k in rows[-1], k

    with open(os.path.join(out, "rollouts", "step_000002.json")) as f:
        episodes = json.load(f)
    assert episodes and not any(e["error"] for e in episodes), episodes
    for e in episodes:
        users = [m["content"] for m in e["messages"] if m["role"] == "user"]
        assert FIRST_OBS[env] in users[1], users[1][:200]  # users[0] is the instruction
        # A two-turn episode got the env's reply to the model's first action.
        if e["turns"] == 2:
            assert len(users) >= 3 and users[2].strip()
    assert any(e["turns"] == 2 for e in episodes)
    return episodes


@pytest.mark.parametrize("env", ["babyai", "textcraft", "searchqa"])
def test_recipe_trains_two_steps(env, agent_dir, tmp_path):
    run_recipe(env, agent_dir, str(tmp_path / env))


@pytest.mark.skipif((java_version() or 0) < 17, reason="SciWorld needs Java 17+")
def test_sciworld_recipe_trains_two_steps(agent_dir, tmp_path):
    pytest.importorskip("scienceworld")
    run_recipe("sciworld", agent_dir, str(tmp_path / "sciworld"))


def test_webarena_recipe_trains_through_http_client(agent_dir, tmp_path):
    """The webarena recipe's HTTP client against our server on loopback (serving WebShop-lite
    as the stand-in web env), pointed there by its own client setting, env.kwargs.base_url."""
    from envs.server import create_app
    from tests.helpers.env_server import LoopbackServer

    with LoopbackServer(create_app("webshop", max_envs=8)) as server:
        run_recipe(
            "webarena",
            agent_dir,
            str(tmp_path / "webarena"),
            f"env.kwargs.base_url={server.url}",
            # The stand-in's task ids (WebShop-lite: test 0-49, train 50-299).
            "env.kwargs.train_ids=[50, 300]",
            "env.kwargs.test_ids=[0, 50]",
        )


def test_train_batch_size_one_samples_forever():
    """data.train_batch_size=1 used to fail at start: grain's length of an endless repeat
    batched by 1 overflowed an index."""
    s = TaskSampler(range(3), batch_size=1, seed=0, group_size=2)
    batches = [next(s) for _ in range(6)]
    assert all(len(b) == 2 and b[0] == b[1] for b in batches)
    assert sorted(b[0].task_id for b in batches[:3]) == [0, 1, 2]
    assert s.batch_at(4) == batches[4]
