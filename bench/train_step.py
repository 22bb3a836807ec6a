"""Training-step wall time split into rollout / env / update, on the embedded tiny model.

Prints one JSON object. Usage: python bench/train_step.py [--config configs/demo.yaml]
[--steps 3] [dotted.key=value ...]. The first step includes compiles and is reported apart.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_args, bench_trainer  # noqa: E402


def main():
    args = bench_args(__doc__, steps=True)

    import numpy as np

    cfg, trainer = bench_trainer(args, "bench_train_step_")
    rows = []
    try:
        for step in range(1, args.steps + 1):
            rows.append(trainer.step(step)[0])
    finally:
        trainer.close()
    keys = (
        "timing/rollout_s",
        "timing/env_wait_s",
        "timing/update_s",
        "timing/step_s",
        "perf/tokens_per_s",
        "train/seq_len_mean",
        "train/turns_mean",
    )
    warm = rows[1:] or rows
    result = {
        "bench": "train_step",
        "config": args.config,
        "episodes_per_step": cfg.data.train_batch_size * cfg.rollout.n,
        "first_step": {k: round(rows[0][k], 3) for k in keys},
        "steady_mean": {k: round(float(np.mean([r[k] for r in warm])), 3) for k in keys},
    }
    s = result["steady_mean"]
    result["rollout_fraction"] = round(s["timing/rollout_s"] / s["timing/step_s"], 3)
    result["update_fraction"] = round(s["timing/update_s"] / s["timing/step_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
