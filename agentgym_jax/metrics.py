"""Metrics sinks: metrics.jsonl (one object per step), TensorBoard, Weights & Biases, console
progress bar, per-step rollout transcripts, and PNG curves (``agentgym-jax plot RUN_DIR``)."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Shown on the progress bar, in this order, when present.
BAR_KEYS = (
    ("train/reward_mean", "reward"),
    ("train/success_rate", "success"),
    ("eval/success_rate", "eval"),
    ("train/horizon", "horizon"),
    ("train/turns_mean", "turns"),
    ("actor/kl_loss", "kl"),
    ("timing/step_s", "s/step"),
)


def _scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if hasattr(v, "shape") and getattr(v, "shape", None) == ():
        return float(v)
    return None


WANDB_MISSING = (
    "trainer.logger includes 'wandb' but the wandb package is not installed: "
    "pip install 'agentgym-jax[wandb]' (or drop wandb from trainer.logger)"
)


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError(WANDB_MISSING) from None
    return wandb


def _start_wandb(output_dir: str):
    """An offline W&B run under ``output_dir/wandb`` unless WANDB_MODE says otherwise.

    The run id is kept in ``output_dir/wandb_run_id`` so a resumed run continues the same W&B run.
    """
    wandb = _import_wandb()
    id_path = os.path.join(output_dir, "wandb_run_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    config = None
    cfg_path = os.path.join(output_dir, "config.yaml")  # written by the trainer before the logger
    if os.path.exists(cfg_path):
        import yaml

        with open(cfg_path) as f:
            config = yaml.safe_load(f)
    name = os.path.basename(os.path.abspath(output_dir))
    return wandb.init(
        dir=output_dir,
        project=os.environ.get("WANDB_PROJECT") or "agentgym-jax",
        name=os.environ.get("WANDB_NAME") or name,
        id=run_id,
        resume="allow",
        config=config,
        # Offline by default: training never needs the network; `wandb sync` uploads later.
        mode=os.environ.get("WANDB_MODE") or "offline",
        # Console capture would wrap stdout / stderr under the progress bar.
        settings=wandb.Settings(console="off"),
    )


def read_jsonl(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: skipping a torn line (interrupted write?)", path)
    return rows


class MetricsLogger:
    """Writes each step's metrics to every configured sink.

    ``resume_step``: rows at or after this step left by an interrupted run are dropped so a
    resumed run never logs a step twice.
    """

    def __init__(
        self,
        output_dir: str,
        *,
        loggers: Iterable[str] = ("console", "jsonl", "tensorboard"),
        total_steps: int | None = None,
        start_step: int = 0,
        enabled: bool = True,
    ):
        self.dir = output_dir
        self.loggers = set(loggers)
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if "jsonl" in self.loggers:
            rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
            with open(self.path + ".tmp", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            os.replace(self.path + ".tmp", self.path)
        if "tensorboard" in self.loggers:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(
                    os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1
                )
            except ImportError:
                log.warning("tensorboardX not installed: TensorBoard logging off")
        if "wandb" in self.loggers:
            self._wandb = _start_wandb(output_dir)
        if "console" in self.loggers and total_steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        scalars = {}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                scalars[k] = s
                row[k] = s if math.isfinite(s) else str(s)
        if "jsonl" in self.loggers:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        if self._bar is not None:
            post = {
                short: f"{row[k]:.3g}" for k, short in BAR_KEYS if isinstance(row.get(k), float)
            }
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(max(0, step - self._bar.n))
        elif "console" in self.loggers:
            print(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )

    def write(self, text: str) -> None:
        """A message that does not garble the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def transcripts(self, step: int, episodes: list[dict], subdir: str = "rollouts") -> None:
        """Episodes of this process as JSON; every process writes its own (``.host{p}`` when
        there are several: each host ran different episodes)."""
        import jax

        d = os.path.join(self.dir, subdir)
        os.makedirs(d, exist_ok=True)
        host = f".host{jax.process_index()}" if jax.process_count() > 1 else ""
        with open(os.path.join(d, f"step_{step:06d}{host}.json"), "w") as f:
            json.dump(episodes, f, indent=1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
            wandb = _import_wandb()
            # finish() can return before wandb-core has written the offline .wandb file; stopping
            # the service flushes it (unless someone else's run still uses the service).
            if wandb.run is None:
                wandb.teardown()


PLOT_KEYS = (
    ("train/reward_mean", "train reward"),
    ("train/success_rate", "train success"),
    ("eval/success_rate", "held-out success"),
    ("train/horizon", "horizon (max turns)"),
    ("train/turns_mean", "turns per episode"),
    ("actor/entropy", "entropy"),
    ("actor/kl_loss", "KL to reference"),
    ("actor/grad_norm", "grad norm"),
)


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write a grid of curves from ``RUN_DIR/metrics.jsonl`` to a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise FileNotFoundError(f"no metrics in {run_dir}/metrics.jsonl")
    keys = [(k, t) for k, t in PLOT_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    n = max(1, len(keys))
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (k, title) in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_compare(run_dirs: Mapping[str, str], key: str, out: str, title: str | None = None) -> str:
    """One curve per run for ``key`` (e.g. the horizon comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, d in run_dirs.items():
        pts = [
            (r["step"], r[key])
            for r in read_jsonl(os.path.join(d, "metrics.jsonl"))
            if isinstance(r.get(key), (int, float))
        ]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
