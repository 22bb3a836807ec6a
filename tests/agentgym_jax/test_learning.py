"""RL must make the shipped tiny agent better: a short, seeded GRPO run on BabyAI raises held-out
success clearly above the base model's. This fails when learning breaks anywhere in the
loop (rollout trajectories, log-probs, advantages, loss, optimizer, weight sync to the engine)."""

import os

from agentgym_jax.config import load_config
from agentgym_jax.metrics import read_jsonl
from agentgym_jax.trainer import train
from tests.helpers import ROOT

DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def test_short_grpo_run_beats_the_base_model(tmp_path):
    cfg = load_config(
        DEMO,
        [
            f"trainer.output_dir={tmp_path}",
            "env.kwargs={levels: [GoToObj, GoToRedBallNoDists], test_seeds: 10}",  # 20 held-out tasks
            "data.val_batch_size=20",
            # Sampled (temperature 1) evaluation, 8 episodes per task: a low-variance estimate of the
            # policy itself. Greedy decoding of a 1M-parameter model early in training swings
            # between 0% and 60% from one step to the next (it locks into one degenerate reply).
            "rollout.val_temperature=1.0",
            "rollout.val_n=8",
            "algorithm.rounds_ctrl={type: fixed, rounds: [2]}",
            "trainer.total_training_steps=10",
            "trainer.test_freq=10",
            "trainer.save_freq=100",  # only the final checkpoint
            "trainer.logger=[jsonl]",
            "trainer.seed=0",
        ],
    )
    summary = train(cfg)
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    before, after = rows[0]["eval/success_rate"], rows[-1]["eval/success_rate"]
    assert (before, after) == (summary["eval_success_before"], summary["eval_success_after"])
    print(f"held-out sampled success {before:.2f} -> {after:.2f}")
    # Measured: 0.22 -> 0.64 (seed 0) and 0.24 -> 0.59 (seed 1).
    assert after >= before + 0.25, (before, after, [r.get("train/success_rate") for r in rows])
