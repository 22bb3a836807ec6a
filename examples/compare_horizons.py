"""Horizon comparison (the paper's ScalingInter-RL claim, in miniature): train the demo with a
fixed short horizon, a fixed long horizon and the ScalingInter schedule, then plot held-out
success vs step side by side.

    python examples/compare_horizons.py [--steps 40] [--out runs/horizons] [extra.key=value ...]

Each variant is ``configs/demo.yaml`` with ``algorithm.rounds_ctrl`` overridden; runs resume if
their directory already has checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

VARIANTS = {
    "fixed short": ["algorithm.rounds_ctrl.type=fixed", "algorithm.rounds_ctrl.rounds=[2]"],
    # The paper's baseline: the final ScalingInter horizon from the first step.
    "fixed long": ["algorithm.rounds_ctrl.type=fixed", "algorithm.rounds_ctrl.rounds=[4]"],
    "ScalingInter": [],  # demo.yaml's own staged schedule, [2, 3, 4]
}
# Every variant is evaluated with the same turn limit, whatever it trained with.
EVAL = ["rollout.val_max_turns=4"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant")
    ap.add_argument("--out", default="runs/horizons")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from agentgym_jax.config import load_config
    from agentgym_jax.metrics import plot_compare
    from agentgym_jax.trainer import train

    dirs = {}
    for name, extra in VARIANTS.items():
        out = os.path.join(args.out, name.replace(" ", "_").lower())
        ov = [*extra, *EVAL, f"trainer.output_dir={out}", *args.overrides]
        if args.steps:
            ov.append(f"trainer.total_training_steps={args.steps}")
        print(f"== {name}: {' '.join(extra) or '(demo schedule)'}", flush=True)
        train(load_config(args.config, ov))
        dirs[name] = out
    png = plot_compare(
        dirs,
        "eval/success_rate",
        os.path.join(args.out, "horizons.png"),
        title="held-out success vs step",
    )
    summary = {n: json.load(open(os.path.join(d, "summary.json"))) for n, d in dirs.items()}
    for n, s in summary.items():
        print(
            f"{n:>14}: success {s['eval_success_before']} -> {s['eval_success_after']} in {s['elapsed_s']}s"
        )
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
