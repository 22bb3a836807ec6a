"""The horizon study: does ScalingInter-RL beat a fixed short and a fixed long turn limit on
BabyAI levels that need many turns (the paper's Figure 7 claim, in miniature)?

    python examples/horizon_study.py [--seeds 3] [--steps N] [--out runs/horizon_study]
                                     [--arms fixed_short fixed_long scaling_inter] [k=v ...]

Three arms, identical but for ``algorithm.rounds_ctrl`` (fixed 5 turns, fixed 15, ScalingInter
5 -> 10 -> 15), each trained with every seed from ``configs/horizon_study.yaml`` and evaluated on
the same held-out tasks with the same 15-turn limit. Runs go seed by seed (all arms of seed 0
first), so a partial study stays balanced.

Interrupt it at any time (Ctrl-C / SIGTERM: the running step finishes and is saved) and run the
same command again: finished runs are skipped and an unfinished one resumes from its last
checkpoint. Results (per arm, one entry per finished seed) go to ``docs/horizon_study.json`` and
the plot to ``docs/horizon_study.png`` (``--results`` / ``--plot`` move them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARMS = {
    "fixed_short": ["algorithm.rounds_ctrl.type=fixed", "algorithm.rounds_ctrl.rounds=[5]"],
    "fixed_long": ["algorithm.rounds_ctrl.type=fixed", "algorithm.rounds_ctrl.rounds=[15]"],
    "scaling_inter": [
        "algorithm.rounds_ctrl.type=scaling_inter_stepwise",
        "algorithm.rounds_ctrl.rounds=[5,10,15]",
    ],
}
LABELS = {
    "fixed_short": "fixed 5 turns",
    "fixed_long": "fixed 15 turns",
    "scaling_inter": "ScalingInter 5->10->15",
}


def run_dir(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, arm, f"seed{seed}")


def finished(d: str, steps: int) -> bool:
    try:
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return False
    return s.get("step", 0) >= steps and not s.get("preempted")


def check_same_settings(d: str, cfg) -> None:
    """A run found in ``d`` must have been made with ``cfg``: a study whose config, model or
    overrides changed would otherwise mix results of different settings."""
    from agentgym_jax.config import load_config, to_yaml

    saved = os.path.join(d, "config.yaml")
    if not os.path.exists(saved):
        return
    was = load_config(saved)
    # Not part of a run's identity: the path it was reached by, and its length (a longer study
    # continues its runs), which for a fixed limit also moves the unused stage length.
    was.trainer.output_dir = cfg.trainer.output_dir
    was.trainer.total_training_steps = cfg.trainer.total_training_steps
    if was.algorithm.rounds_ctrl.type == "fixed":
        was.algorithm.rounds_ctrl.steps_scaling_inter = (
            cfg.algorithm.rounds_ctrl.steps_scaling_inter
        )
    if to_yaml(was) != to_yaml(cfg):
        raise SystemExit(
            f"{d} was trained with other settings than this study's ({saved}); "
            "use a fresh --out (or move the old runs aside) after changing the config"
        )


def run_overrides(arm: str, seed: int, steps: int | None, out: str, extra) -> list[str]:
    ov = [*ARMS[arm], f"trainer.seed={seed}", f"data.seed={seed}"]
    if steps:
        ov.append(f"trainer.total_training_steps={steps}")
        # Three stages over the run, whatever its length.
        ov.append(f"algorithm.rounds_ctrl.steps_scaling_inter={max(1, steps // 3)}")
    return [*ov, f"trainer.output_dir={run_dir(out, arm, seed)}", *extra]


def _rows(d: str) -> list[dict]:
    """metrics.jsonl by step; a step logged twice (rerun after a crash) keeps its last row."""
    from agentgym_jax.metrics import read_jsonl

    path = os.path.join(d, "metrics.jsonl")
    by_step = {r["step"]: r for r in read_jsonl(path)} if os.path.exists(path) else {}
    return [by_step[s] for s in sorted(by_step)]


def run_curves(d: str, episodes_per_step: int) -> dict:
    rows = _rows(d)
    env_steps, total = {0: 0.0}, 0.0
    for r in rows:
        if "train/turns_mean" in r:
            total += r["train/turns_mean"] * episodes_per_step
            env_steps[r["step"]] = total
    ev = [r for r in rows if "eval/success_rate" in r]
    tr = [r for r in rows if "train/success_rate" in r]
    return {
        "eval_step": [r["step"] for r in ev],
        "eval_success": [r["eval/success_rate"] for r in ev],
        "eval_turns": [r.get("eval/turns_mean") for r in ev],
        "eval_env_steps": [env_steps.get(r["step"]) for r in ev],
        "train_step": [r["step"] for r in tr],
        "train_success": [r["train/success_rate"] for r in tr],
        "train_turns": [r["train/turns_mean"] for r in tr],
        "train_horizon": [r.get("train/horizon") for r in tr],
        "env_steps": [env_steps[r["step"]] for r in tr],
    }


def collect(out: str, arms, seeds, steps: int, episodes_per_step: int) -> dict:
    """Per arm, one entry per finished seed: final / best held-out success, turns used."""
    res = {}
    for arm in arms:
        a = {"seeds": [], "final_success": [], "best_success": [], "turns_used": [], "curves": []}
        for seed in seeds:
            d = run_dir(out, arm, seed)
            if not finished(d, steps):
                continue
            c = run_curves(d, episodes_per_step)
            trained = [s for st, s in zip(c["eval_step"], c["eval_success"]) if st > 0]
            if not trained:
                continue
            with open(os.path.join(d, "summary.json")) as f:
                elapsed = json.load(f).get("elapsed_s")
            a["seeds"].append(seed)
            a["final_success"].append(c["eval_success"][-1])
            a["best_success"].append(max(trained))
            a["turns_used"].append(c["eval_turns"][-1])
            a["curves"].append({**c, "elapsed_s": elapsed})
        res[arm] = a
    return res


def plot(results: dict, out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ev = results.get("eval", {})
    how = "greedy" if not ev.get("temperature") else f"temperature {ev['temperature']:g}"
    panels = [
        (
            "eval_step",
            "eval_success",
            "step",
            f"held-out success ({ev.get('max_turns')} turns, {how})",
        ),
        ("eval_env_steps", "eval_success", "environment steps", "held-out success"),
        ("eval_step", "eval_turns", "step", "held-out turns used"),
        ("train_step", "train_success", "step", "training success (own limit, sampled)"),
        ("train_step", "train_turns", "step", "training turns per episode"),
        ("train_step", "env_steps", "step", "environment steps (cumulative)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (xk, yk, xl, yl) in zip(axes.flat, panels):
        for arm, a in results["arms"].items():
            curves = [c for c in a["curves"] if c[xk] and c[yk]]
            if not curves:
                continue
            n = min(len(c[yk]) for c in curves)
            xs = np.array([[x or 0 for x in c[xk][:n]] for c in curves], float)
            ys = np.array([[y or 0 for y in c[yk][:n]] for c in curves], float)
            x, y = xs.mean(0), ys.mean(0)
            label = f"{LABELS.get(arm, arm)} ({len(curves)} seeds)"
            (line,) = ax.plot(x, y, marker="o", ms=3, label=label)
            ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"horizon study: mean over seeds, band = min..max ({', '.join(results['levels'])})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/horizon_study.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm: 0 .. N-1")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default="runs/horizon_study")
    ap.add_argument("--results", default="docs/horizon_study.json")
    ap.add_argument("--plot", default="docs/horizon_study.png")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (k=v)")
    args = ap.parse_args(argv)

    from agentgym_jax.config import load_config
    from agentgym_jax.trainer import train

    seeds = list(range(args.seeds))
    base = load_config(
        args.config, run_overrides(args.arms[0], 0, args.steps, args.out, args.overrides)
    )
    steps = base.trainer.total_training_steps
    t0, interrupted = time.perf_counter(), False
    for seed in seeds:
        for arm in args.arms:
            d = run_dir(args.out, arm, seed)
            cfg = load_config(
                args.config, run_overrides(arm, seed, args.steps, args.out, args.overrides)
            )
            check_same_settings(d, cfg)
            if finished(d, steps):
                print(f"== {arm} seed {seed}: finished, skipped ({d})", flush=True)
                continue
            print(f"== {arm} seed {seed} -> {d}", flush=True)
            if train(cfg).get("preempted"):
                interrupted = True
                break
        if interrupted:
            break

    results = {
        "arms": collect(
            args.out, args.arms, seeds, steps, base.data.train_batch_size * base.rollout.n
        ),
        "levels": list(base.env.kwargs.get("levels", [])),
        "seeds_requested": len(seeds),
        "steps": steps,
        "eval": {
            "tasks": base.data.val_batch_size,
            "max_turns": base.rollout.val_max_turns,
            "temperature": base.rollout.val_temperature,
        },
        "episodes_per_step": base.data.train_batch_size * base.rollout.n,
        "model": base.model.path,
        "this_invocation_s": round(time.perf_counter() - t0, 1),
    }
    results["complete"] = all(len(a["seeds"]) == len(seeds) for a in results["arms"].values())
    for path in (args.results, args.plot):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.plot)
    for arm, a in results["arms"].items():
        print(
            f"{arm:>14}: final {a['final_success']} best {a['best_success']} "
            f"turns {a['turns_used']} (seeds {a['seeds']})"
        )
    print(("interrupted: run the same command to continue\n" if interrupted else "") + args.results)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
