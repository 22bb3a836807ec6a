"""Config loading: YAML + dotted overrides, veRL aliases, errors naming the key."""

import glob
import os
import subprocess
import sys

import pytest
import yaml

from agentgym_jax.config import ConfigError, load_config, to_yaml
from tests.helpers import ROOT


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))), ids=os.path.basename
)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.train_batch_size * cfg.rollout.n % cfg.actor.ppo_mini_batch_size == 0


def test_paper_recipe_values():
    cfg = load_config(os.path.join(ROOT, "configs", "babyai_scaling_inter.yaml"))
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor.lr == 1e-6 and cfg.actor.kl_loss_coef == 0.001
    assert cfg.actor.kl_loss_type == "low_var_kl" and cfg.actor.entropy_coeff == 0.001
    assert cfg.algorithm.rounds_ctrl.rounds == [6, 13, 20]
    assert cfg.algorithm.rounds_ctrl.steps_scaling_inter == 100
    fixed = load_config(os.path.join(ROOT, "configs", "textcraft_agentgym_rl.yaml"))
    assert fixed.algorithm.rounds_ctrl.type == "fixed" and fixed.algorithm.rounds_ctrl.rounds == [
        30
    ]


def test_overrides_and_verl_aliases(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "actor_rollout_ref:\n  rollout: {n: 4}\n  actor: {ppo_mini_batch_size: 8}\ndata: {train_batch_size: 4}\n"
    )
    cfg = load_config(
        str(y),
        [
            "actor_rollout_ref.actor.kl_loss_coef=0.01",
            "rollout.temperature=0.7",
            "env.kwargs={levels: [GoToObj]}",
        ],
    )
    assert cfg.rollout.n == 4 and cfg.actor.ppo_mini_batch_size == 8
    assert cfg.actor.kl_loss_coef == 0.01 and cfg.rollout.temperature == 0.7
    assert cfg.env.kwargs == {"levels": ["GoToObj"]}


# override(s), two spaces apart  =>  the regex the error must match
BAD_VALUES = """\
actor.lr=abc  =>  actor.lr
actor.not_a_knob=1  =>  actor.not_a_knob.*allowed keys
algorithm.adv_estimator=ppo2  =>  adv_estimator.*grpo
actor.old_logprobs=vllm  =>  old_logprobs.*recompute
model.dtype=fp8  =>  model.dtype.*bfloat16
rollout.n=1  actor.ppo_mini_batch_size=16  =>  rollout.n >= 2
actor.ppo_mini_batch_size=7  =>  ppo_mini_batch_size
algorithm.rounds_ctrl.type=linear  =>  rounds_ctrl.type
trainer.logger=[stdout]  =>  trainer.logger
noequals  =>  dotted.key=value
rollout.val_max_turns=-1  =>  val_max_turns
model.attn_q_block=-8  =>  attn_q_block
rollout.unclosed_turn_score=often  =>  unclosed_turn_score
rollout.val_max_tokens_per_turn=-1  =>  val_max_tokens_per_turn
rollout.temperature=0  =>  rollout.temperature=0.*val_temperature=0
rollout.temperature=0.7  actor.temperature=1.0  =>  actor.temperature=1.0 differs
actor.temperature=0.7  =>  actor.temperature=0.7 differs
"""


@pytest.mark.parametrize(
    "override,match",
    [
        (row.split("  =>  ")[0].split("  "), row.split("  =>  ")[1])
        for row in BAD_VALUES.splitlines()
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_update_temperature_follows_the_sampler():
    assert load_config(None).actor.temperature == 1.0
    cfg = load_config(None, ["rollout.temperature=0.7"])
    assert cfg.actor.temperature == 0.7
    same = load_config(None, ["rollout.temperature=0.7", "actor.temperature=0.7"])
    assert same.actor.temperature == 0.7
    # Greedy evaluation stays available.
    assert load_config(None, ["rollout.val_temperature=0"]).rollout.val_temperature == 0.0
    # The written config (resolved temperature) loads back.
    d = yaml.safe_load(to_yaml(cfg))
    assert d["actor"]["temperature"] == 0.7
    again = load_config(None, base=d)
    assert again.actor.temperature == again.rollout.temperature == 0.7


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("actor: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_help_and_config_error_exit_code():
    exe = [sys.executable, "-m", "agentgym_jax.cli"]
    out = subprocess.run(exe + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "serve-env" in out.stdout
    bad = subprocess.run(
        exe + ["train", "actor.bogus=1"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert "actor.bogus" in bad.stderr
