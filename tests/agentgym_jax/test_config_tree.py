"""Malformed configs fail at load with the key named (exit 2 from the CLI), not later."""

import os
import subprocess
import sys

import pytest

from agentgym_jax.config import load_config
from agentgym_jax.config_tree import ConfigError
from tests.helpers import ROOT

TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer=5", "section 'trainer' must be a mapping"),
        ("env=[1, 2]", "section 'env' must be a mapping"),
        ("actor.lr=.nan", "'actor.lr' must be a finite number"),
        ("critic.lr=-.inf", "'critic.lr' must be a finite number"),
        ("algorithm.kl_ctrl.kl_coef=.nan", "kl_ctrl.kl_coef' must be a finite number"),
        ("env.step_timeout_s=0", "env.step_timeout_s must be > 0"),
        ("env.step_timeout_s=-3", "env.step_timeout_s must be > 0"),
        ("env.num_workers=-1", "env.num_workers must be >= 0"),
        ("trainer.max_bad_steps=0", "trainer.max_bad_steps must be >= 1"),
    ],
)
def test_malformed_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        load_config(TINY, [override])


def test_section_that_is_not_a_mapping_in_yaml_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: 5\n")
    with pytest.raises(ConfigError, match="section 'trainer'"):
        load_config(str(bad))
    out = subprocess.run(
        [sys.executable, "-m", "agentgym_jax.cli", "train", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "config error" in out.stderr, out.stderr[-2000:]
