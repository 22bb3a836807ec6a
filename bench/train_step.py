"""Training-step wall time split into rollout / env / update, on the embedded tiny model.

Prints one JSON object. Usage: python bench/train_step.py [--config configs/demo.yaml]
[--steps 3] [dotted.key=value ...]. The first step includes compiles and is reported apart.
"""

import argparse
import json
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import numpy as np

    from agentgym_jax.config import load_config
    from agentgym_jax.trainer import Trainer

    out = tempfile.mkdtemp(prefix="bench_train_step_")
    cfg = load_config(
        args.config, [f"trainer.output_dir={out}", "trainer.logger=[jsonl]", *args.overrides]
    )
    trainer = Trainer.from_config(cfg)
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
