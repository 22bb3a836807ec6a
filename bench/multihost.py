"""Rollout wall time of one training step: 2 JAX processes (each runs half the episodes on its
own devices) against 1 process running them all, same total batch and same total devices.

Both runs are ``agentgym-jax train`` on the embedded tiny model (``configs/tiny_cpu.yaml``):
1 process x 2 fake CPU devices, and 2 processes x 1 device over loopback
(``launch/local_multiprocess.py``). The figure is the median ``timing/rollout_s`` (the slowest
host's) of the steps after the first (which compiles). Prints one JSON object.

On one CPU machine the processes share the same cores, so this measures the cost of the split
(gathers, per-host engines) rather than the speed-up that separate hosts give.

Usage: python bench/multihost.py [--steps 4] [--batch 4] [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(nproc: int, devices_per_process: int, out: str, args: list[str]) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    cli = [sys.executable, "-m", "agentgym_jax.cli"]
    if nproc == 1:
        cmd = [*cli, "train", *args]
    else:
        env.update(LOCAL_DEVICES=str(devices_per_process), LAUNCH_TIMEOUT="900")
        env["LAUNCH_CMD"] = " ".join([*cli, "--distributed", "train"])
        cmd = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), str(nproc)]
        cmd += args
    subprocess.run(
        cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="tasks per step (x rollout.n = 4)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    import numpy as np

    result = {}
    for nproc, per in ((1, 2), (2, 1)):
        out = tempfile.mkdtemp(prefix=f"bench_multihost_{nproc}p_")
        args = [
            "--config",
            os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
            f"trainer.output_dir={out}",
            f"trainer.total_training_steps={a.steps}",
            f"data.train_batch_size={a.batch}",
            "algorithm.rounds_ctrl.type=fixed",
            "algorithm.rounds_ctrl.rounds=[2]",
            "trainer.val_before_train=false",
            "trainer.test_freq=0",
            "trainer.save_freq=1000",
            "trainer.plot=false",
            "trainer.logger=[jsonl]",
            "mesh.devices=0",
            "mesh.fsdp=-1",
            *a.overrides,
        ]
        rows = run(nproc, per, out, args)
        roll = [r["timing/rollout_s"] for r in rows[1:]]
        result[f"{nproc}proc"] = {
            "devices_per_process": per,
            "episodes_per_step": a.batch * 4,
            "rollout_s_median": float(np.median(roll)),
            "rollout_s_first_step": rows[0]["timing/rollout_s"],
            "update_s_median": float(np.median([r["timing/update_s"] for r in rows[1:]])),
        }
    result["rollout_ratio_2proc_over_1proc"] = (
        result["2proc"]["rollout_s_median"] / result["1proc"]["rollout_s_median"]
    )
    print(json.dumps({"bench": "multihost", "cpus": os.cpu_count(), **result}, indent=2))


if __name__ == "__main__":
    main()
