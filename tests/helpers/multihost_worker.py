"""One process of a multi-process training run, for ``tests/agentgym_jax/test_multihost.py``.

Runs ``agentgym-jax --distributed train ARGS`` (the real CLI path, under
``launch/local_multiprocess.py``) with two hooks on the trainer:

- after each step it writes this process's share of the step to ``$MH_DUMP/p{i}_step{k}.npz``:
  the episodes' uids, task ids and groups, and the host batch it handed the learner;
- with ``MH_STOP_AFTER=k`` and ``MH_STOP_PROCESS=i``, process i alone acts as if it got
  SIGTERM after step k (the others must stop with it: the stop is agreed).

It prints ``MH_RESULT {json}`` (process index, summary) at the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

from agentgym_jax import cli
from agentgym_jax import trainer as T


def main(argv: list[str]) -> int:
    dump = os.environ["MH_DUMP"]
    pid = int(os.environ["JAX_PROCESS_ID"])
    stop_after = int(os.environ.get("MH_STOP_AFTER", "0"))
    stop_here = int(os.environ.get("MH_STOP_PROCESS", "-1")) == pid
    captured: dict = {}
    to_batch, step = T.to_batch, T.Trainer.step

    def capture_batch(*a, **k):
        captured["batch"] = to_batch(*a, **k)
        return captured["batch"]

    def step_and_dump(self, k):
        m, eps = step(self, k)
        np.savez(
            os.path.join(dump, f"p{pid}_step{k}.npz"),
            uids=np.array([e.uid for e in eps]),
            task_ids=np.array([e.task_id for e in eps]),
            groups=np.array([e.group for e in eps]),
            rollout_s=np.array(m["timing/rollout_s"]),
            **captured.pop("batch"),
        )
        if stop_here and k == stop_after:
            self._stop_signal = signal.SIGTERM
        return m, eps

    T.to_batch, T.Trainer.step = capture_batch, step_and_dump
    summary: dict = {}
    train = T.train

    def train_and_keep(cfg):
        summary.update(train(cfg))
        return summary

    T.train = train_and_keep
    rc = cli.main(["--distributed", "train", *argv])
    # One write (a pipe keeps writes under 4 KiB whole), not print's text-then-newline.
    sys.stdout.write(
        "MH_RESULT " + json.dumps({"process": pid, "rc": rc, "summary": summary}) + "\n"
    )
    sys.stdout.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
