"""examples/horizon_study.py: one tiny step per arm, then a resumed run and a skipped one."""

import importlib.util
import json
import os

import pytest

from tests.helpers import ROOT

TINY = [
    "data.train_batch_size=1",
    "rollout.n=2",
    "actor.ppo_mini_batch_size=2",
    "actor.ppo_micro_batch_size=2",
    "rollout.max_tokens_per_turn=16",
    "data.max_response_length=1024",  # fewer attention buckets to compile
    "trainer.val_before_train=false",
    "env.kwargs.levels=[GoToLocal,Unlock]",
    "env.kwargs.test_seeds=1",
    "data.val_batch_size=2",
    "trainer.save_freq=1",
]


def _study():
    path = os.path.join(ROOT, "examples", "horizon_study.py")
    spec = importlib.util.spec_from_file_location("horizon_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_study_runs_every_arm_then_resumes_and_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    study = _study()
    out, res = tmp_path / "runs", tmp_path / "study.json"
    args = [
        "--seeds",
        "1",
        "--out",
        str(out),
        "--results",
        str(res),
        "--plot",
        str(tmp_path / "p.png"),
    ]
    assert study.main(["--steps", "1", *args, *TINY]) == 0
    r = json.loads(res.read_text())
    assert set(r["arms"]) == {"fixed_short", "fixed_long", "scaling_inter"}
    assert (
        r["complete"]
        and r["steps"] == 1
        and r["eval"]["max_turns"] == 15
        and r["levels"] == ["GoToLocal", "Unlock"]
    )
    for arm, a in r["arms"].items():
        assert a["seeds"] == [0], arm
        assert 0.0 <= a["final_success"][0] <= 1.0 and 0 < a["turns_used"][0] <= 15
        rows = _metrics(out / arm / "seed0")
        assert [m["step"] for m in rows if "eval/success_rate" in m] == [1]
    horizons = {
        arm: _metrics(out / arm / "seed0")[-1]["train/horizon"]
        for arm in ("fixed_short", "fixed_long")
    }
    assert horizons == {"fixed_short": 5.0, "fixed_long": 15.0}
    assert os.path.getsize(tmp_path / "p.png") > 10_000

    # A longer study resumes the finished step-1 run from its checkpoint: step 1 is not rerun.
    capsys.readouterr()
    assert study.main(["--steps", "2", "--arms", "fixed_short", *args, *TINY]) == 0
    steps = [m["step"] for m in _metrics(out / "fixed_short" / "seed0")]
    assert steps.count(1) == 1 and steps[-1] == 2
    # Run again: nothing left to do, the run is skipped without building a trainer.
    capsys.readouterr()
    assert study.main(["--steps", "2", "--arms", "fixed_short", *args, *TINY]) == 0
    assert "finished, skipped" in capsys.readouterr().out
    assert json.loads(res.read_text())["arms"]["fixed_short"]["seeds"] == [0]
    # Other settings in the same --out: refused, not mixed into the results.
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--steps", "2", "--arms", "fixed_short", *args, *TINY, "actor.lr=1e-5"])
