"""One demo step's rollout with prefix sharing (``EngineConfig.share_prefix_min``) vs without.

The same tasks, settings, seeds and params each time, alternating the two modes after a warm-up
of each; prints one JSON object with the median rollout wall times and ``prefix_share_speedup``.

    python bench/rollout.py [--config configs/demo.yaml] [--repeats 3] [dotted.key=value ...]
"""

import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_args, bench_trainer  # noqa: E402


def main():
    args = bench_args(__doc__)

    import jax

    from agentgym_jax.trainer import rollout_settings

    cfg, trainer = bench_trainer(args, "bench_rollout_")
    ctx = trainer.ctx
    eng = ctx.engine
    shared = eng.config.share_prefix_min or 32
    tasks = list(next(ctx.sampler))
    settings = rollout_settings(cfg, ctx.horizon, 1, eval_mode=False)
    times = {"shared": [], "full": [], "prefill_shared": [], "prefill_full": []}
    tokens = {}
    try:
        for rep in range(args.repeats + 1):
            for mode in ("shared", "full"):
                eng.config = dataclasses.replace(
                    eng.config, share_prefix_min=shared if mode == "shared" else 0
                )
                t0 = time.perf_counter()
                result = ctx.rollout.run(tasks, settings)
                dt = time.perf_counter() - t0
                if rep:  # the first round compiles
                    times[mode].append(dt)
                tokens[mode] = sum(len(e.tokens) for e in result.episodes)
        # The prefill alone: the step's 32 initial prompts into free slots, both ways.
        prompts = [e.tokens[: e.prompt_len] for e in result.episodes]
        slots = list(range(len(prompts)))
        for rep in range(args.repeats + 1):
            for mode in ("shared", "full"):
                eng.config = dataclasses.replace(
                    eng.config, share_prefix_min=shared if mode == "shared" else 0
                )
                eng.release(range(eng.num_slots))
                t0 = time.perf_counter()
                eng.prefill(slots, prompts, seeds=slots)
                jax.block_until_ready(eng.state)
                if rep:
                    times[f"prefill_{mode}"].append(time.perf_counter() - t0)
        eng.release(range(eng.num_slots))
    finally:
        trainer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "bench": "rollout",
                "config": args.config,
                "episodes": len(tasks),
                "rollout_s_shared": round(med["shared"], 3),
                "rollout_s_full": round(med["full"], 3),
                "prefix_share_speedup": round(med["full"] / med["shared"], 3),
                "prefill_s_shared": round(med["prefill_shared"], 4),
                "prefill_s_full": round(med["prefill_full"], 4),
                "prefill_speedup": round(med["prefill_full"] / med["prefill_shared"], 3),
                "prompt_tokens": sum(len(p) for p in prompts),
                "distinct_prompts": len({tuple(p) for p in prompts}),
                "tokens_shared": tokens["shared"],
                "tokens_full": tokens["full"],
                "repeats": args.repeats,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
