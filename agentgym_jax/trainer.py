"""The training loop: horizon schedule, rollout, learner step, evaluation cadence, checkpoints,
signals and metrics. Setup lives in ``context.py``, the jitted learner step in ``learner.py``.

Determinism: the sampling seeds of step k are ``mix_seed(trainer.seed, rollout.seed, 2k + eval)``,
the update RNG is ``fold_in(key(trainer.seed), k)``, and the task order comes from the
checkpointed sampler, so a run resumed at step k reproduces the straight run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

import jax
import numpy as np

from agentgym_jax import sharding as shd
from agentgym_jax.config import TrainConfig, to_yaml
from agentgym_jax.context import Context, build_context, checkpointer_for, load_actor
from agentgym_jax.data import Task, expand_groups, host_share
from agentgym_jax.learner import host_metrics_finite
from agentgym_jax.metrics import MetricsLogger, plot_run
from agentgym_jax.rollout import (
    TABLE_COLUMNS,
    Episode,
    RolloutSettings,
    episode_table,
    table_metrics,
    to_batch,
)
from agentgym_jax.seeding import mix_seed

log = logging.getLogger(__name__)


class AllEnvsFailedError(RuntimeError):
    """A whole training step's episodes failed in the env: training would learn nothing."""


class _Preempted(Exception):
    """Raised by the signal handler to abandon a rollout or evaluation in progress."""


def pad_bucket(n: int, cap: int) -> int:
    """Training sequence length: the next of 128 * 1.25^k (so a handful of update compiles,
    and attention, quadratic in it, wastes at most ~25% on padding), capped at ``cap``."""
    t = 128
    while t < n:
        t = -(-int(t * 1.25) // 64) * 64
    return min(t, cap)


def my_share(tasks: list[Task]) -> tuple[list[Task], int]:
    """This process's whole groups of ``tasks`` and the position of the first (one process:
    all of them, at 0)."""
    return host_share(tasks, jax.process_index(), jax.process_count())


def global_table(table: np.ndarray, rows: int) -> np.ndarray:
    """Every process's ``episode_table`` rows in process order; each passes at most ``rows``
    (the largest share). One process: ``table`` itself."""
    if jax.process_count() == 1:
        return table
    width = len(TABLE_COLUMNS)
    padded = np.zeros((rows, width + 1), np.float64)
    padded[: len(table), 0] = 1.0  # row present
    padded[: len(table), 1:] = table
    got = shd.process_allgather_np(padded).reshape(-1, width + 1)
    return got[got[:, 0] == 1.0, 1:]


def _uids_from(first: int) -> dict[str, int]:
    """``Rollout.run``'s ``first_uid``, passed only when it is not 0: the 1-process call stays
    ``run(tasks, settings)`` (a stand-in rollout need not know about shares)."""
    return {"first_uid": first} if first else {}


_SEQ_LEN, _ENV_ERROR = TABLE_COLUMNS.index("seq_len"), TABLE_COLUMNS.index("env_error")


def rollout_settings(cfg: TrainConfig, horizon, step: int, *, eval_mode: bool) -> RolloutSettings:
    """Sampling settings of training step ``step`` (or of the evaluation after it)."""
    r = cfg.rollout
    if eval_mode:
        max_turns = r.val_max_turns or max(cfg.algorithm.rounds_ctrl.rounds)
        per_turn = r.val_max_tokens_per_turn or r.max_tokens_per_turn
    else:
        max_turns = horizon(max(step, 1))
        per_turn = r.max_tokens_per_turn
    return RolloutSettings(
        max_turns=max_turns,
        max_tokens_per_turn=per_turn,
        max_prompt_length=cfg.data.max_prompt_length,
        max_response_length=cfg.data.max_response_length,
        temperature=r.val_temperature if eval_mode else r.temperature,
        top_p=1.0 if eval_mode else r.top_p,
        top_k=0 if eval_mode else r.top_k,
        seed=mix_seed(cfg.trainer.seed, r.seed, 2 * step + int(eval_mode)),
        unclosed_turn_score=None if eval_mode else r.unclosed_turn_score,
    )


class Trainer:
    """The loop over a built ``Context``: ``step`` trains once, ``evaluate`` runs held-out tasks,
    ``fit`` runs to ``trainer.total_training_steps`` with checkpoints and signals.

    ``Trainer.from_config(cfg)`` builds the context too; ``close()`` releases env workers and
    the checkpointer.
    """

    def __init__(self, ctx: Context):
        if ctx.learner is None:
            raise ValueError("Trainer needs a training context: build_context(cfg, 'train')")
        self.ctx, self.cfg = ctx, ctx.cfg
        self.state = ctx.state
        self.step_count = 0
        self.bad_steps = 0
        self._stop_signal: int | None = None
        self._abandon_ok = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Trainer:
        return cls(build_context(cfg, "train"))

    # ---- checkpoints ----
    def _ckpt_tree(self) -> dict:
        s = self.state
        tree = {"actor": _train_state_tree(s.actor)}
        if s.critic is not None:
            tree["critic"] = _train_state_tree(s.critic)
        return tree

    def save(self, force: bool = False) -> bool:
        """Queue a checkpoint of ``step_count``; True if one was queued now, False if off the
        ``save_freq`` grid (without ``force``) or this step already has this run's checkpoint."""
        meta = {
            "step": self.step_count,
            "data": self.ctx.sampler.get_state(),
            "bad_steps": self.bad_steps,
            "kl_coef": self.state.kl_coef,
            "rng_seed": self.cfg.trainer.seed,
        }
        return self.ctx.checkpointer.save(self.step_count, self._ckpt_tree(), meta, force=force)

    def maybe_resume(self) -> int:
        """Restore the newest loadable checkpoint of the output dir; returns its step (0: none).

        ``trainer.resume=never`` moves existing checkpoints aside and starts at 0. Otherwise,
        checkpoints that exist but none of which loads are an error: starting at 0 would let
        later saves delete the old run's checkpoints."""
        from agentgym_jax.checkpoint import NoLoadableCheckpointError

        ck = self.ctx.checkpointer
        if self.cfg.trainer.resume == "never":
            folder = ck.set_aside()
            if folder:
                log.warning(
                    "trainer.resume=never: old checkpoints moved to %s; starting at 0", folder
                )
            return 0
        got = ck.restore(self._ckpt_tree())
        if got is None:
            if ck.all_steps():
                newest = max(ck.failed)  # the others are logged above; usually the same reason
                why = f"step {newest}: {ck.failed[newest]}" + (
                    f" (and {len(ck.failed) - 1} older steps)" if len(ck.failed) > 1 else ""
                )
                raise NoLoadableCheckpointError(
                    f"{ck.directory} has checkpoints (steps {ck.all_steps()}) but none loads into "
                    f"this run's state (changed model or config?): {why}. To start over set "
                    "trainer.resume=never (moves them aside, deletes nothing) or use another "
                    "trainer.output_dir."
                )
            return 0
        step, tree, meta = got
        s = self.state
        self.state = dataclasses.replace(
            s,
            actor=s.actor.replace(**tree["actor"]),
            critic=s.critic.replace(**tree["critic"]) if s.critic is not None else None,
            kl_coef=float(meta.get("kl_coef", s.kl_coef)),
        )
        self.ctx.sampler.set_state(meta["data"])
        self.bad_steps = int(meta.get("bad_steps", 0))
        self.step_count = step
        self.ctx.sync_engine(self.state.actor.params)
        log.info("resumed from %s at step %d", self.ctx.checkpointer.directory, step)
        return step

    # ---- one step ----
    def step(self, step: int) -> tuple[dict[str, float], list[Episode]]:
        """Roll out training step ``step``, update, sync the engine -> (metrics, episodes)."""
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        settings = rollout_settings(cfg, ctx.horizon, step, eval_mode=False)
        # Several processes: each runs its share of whole groups; the rest of the step is
        # agreed from gathered numbers (a few per episode), never from one host's view.
        tasks, first = my_share(next(ctx.sampler))
        with self._abandonable():
            result = ctx.rollout.run(
                tasks, settings, check=self._raise_if_stopping, **_uids_from(first)
            )
        episodes = result.episodes
        t_roll = time.perf_counter()
        hosts = shd.process_allgather_np(
            np.asarray([t_roll - t0, result.stats["env_wait_s"]], np.float64)
        )
        table = global_table(episode_table(episodes), len(episodes))
        if table[:, _ENV_ERROR].sum() == len(table):
            failed = [e.error for e in episodes if e.error is not None and e.truncated is None]
            raise AllEnvsFailedError(
                f"step {step}: every one of {len(table)} episodes ended in an env failure, "
                f"e.g. {failed[0] if failed else 'on another process'!r}; nothing to train on. "
                f"Check env {cfg.env.name!r} (env.kwargs, env.step_timeout_s, the env server if "
                "HTTP)."
            )
        max_len = ctx.engine.config.max_len
        seq_len = pad_bucket(int(table[:, _SEQ_LEN].max()), max_len)  # one length on all hosts
        batch = to_batch(episodes, pad_multiple=seq_len, max_len=max_len)
        self.state, learner_metrics = ctx.learner.step(self.state, batch, step)
        ctx.sync_engine(self.state.actor.params)
        if host_metrics_finite(learner_metrics):
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            log.error(
                "step %d: non-finite loss or grad norm; update skipped (%d in a row): %s",
                step,
                self.bad_steps,
                learner_metrics,
            )
        t_upd = time.perf_counter()
        m = table_metrics(table, "train")
        tokens = int(np.minimum(table[:, _SEQ_LEN], batch["input_ids"].shape[1]).sum())
        m.update(
            {
                "train/horizon": float(settings.max_turns),
                # The slowest host's: the update waits for it.
                "timing/rollout_s": float(hosts[:, 0].max()),
                "timing/env_wait_s": float(hosts[:, 1].max()),
                "timing/update_s": t_upd - t_roll,
                "timing/step_s": t_upd - t0,
                "perf/tokens_per_s": tokens / max(t_upd - t0, 1e-9),
                "perf/seq_len_padded": float(batch["input_ids"].shape[1]),
            }
        )
        if jax.process_count() > 1:
            m["timing/rollout_s_fastest_host"] = float(hosts[:, 0].min())
        m.update(learner_metrics)
        return m, episodes

    def evaluate(
        self, step: int, task_ids=None, prefix: str = "eval"
    ) -> tuple[dict[str, float], list[Episode]]:
        return evaluate(self.ctx, step, task_ids, prefix, check=self._raise_if_stopping)

    # ---- the loop ----
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, no save
        self._stop_signal = signum
        if self._abandon_ok:
            log.warning("received signal %d: abandoning this step, saving the last one", signum)
            raise _Preempted
        log.warning("received signal %d: will save and stop after this step's update", signum)

    def _raise_if_stopping(self) -> None:
        """Polled by the rollout between engine calls: the handler's own raise can be lost
        (a signal handled inside a weakref callback or ``__del__`` only prints it)."""
        if self._abandon_ok and self._stop_signal is not None:
            raise _Preempted

    @contextlib.contextmanager
    def _abandonable(self):
        """Rollout and evaluation may be cut short by a signal (a preemption grace period is
        shorter than a step); the update may not, since it donates the state being replaced.
        Across processes every host must stop at the same step, so there the flag waits for the
        step's end and the processes agree on it (``_agreed_stop``)."""
        if jax.process_count() > 1:
            yield
            return
        self._abandon_ok = True
        try:
            if self._stop_signal is not None:
                raise _Preempted
            yield
        finally:
            self._abandon_ok = False

    def _agreed_stop(self) -> bool:
        flag = self._stop_signal is not None
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))

    def fit(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        total = cfg.trainer.total_training_steps
        start = self.maybe_resume()
        if _is_main_process():
            with open(os.path.join(ctx.out_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        logger = MetricsLogger(
            ctx.out_dir,
            loggers=cfg.trainer.logger,
            total_steps=total,
            start_step=start,
            enabled=_is_main_process(),
        )
        n_log = cfg.trainer.log_transcripts
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.perf_counter()
        first_eval = last_eval = first_score = last_score = None
        agreed_stop = False  # every process's view: a signal reached some process
        try:
            if start >= total:
                logger.write(f"nothing to do: checkpoint at step {start} >= {total} steps")
            elif cfg.trainer.val_before_train and start == 0:
                try:
                    with self._abandonable():
                        m, eps = self.evaluate(0)
                    first_eval, first_score = m["eval/success_rate"], m["eval/score_mean"]
                    logger.log(0, m)
                    logger.transcripts(0, [e.transcript() for e in eps[:n_log]], "eval_rollouts")
                    logger.write(
                        f"step 0 eval: success {first_eval:.3f}, mean score {first_score:.3f}"
                    )
                except _Preempted:
                    pass  # nothing trained yet: stop below without a checkpoint
            for step in range(start + 1, total + 1):
                sampler_state = ctx.sampler.get_state()
                try:
                    m, episodes = self.step(step)
                except _Preempted:
                    ctx.sampler.set_state(sampler_state)  # the abandoned step's tasks rerun
                    break
                self.step_count = step
                if cfg.trainer.test_freq and (step % cfg.trainer.test_freq == 0 or step == total):
                    try:
                        with self._abandonable():
                            em, eps = self.evaluate(step)
                        m.update(em)
                        last_eval, last_score = em["eval/success_rate"], em["eval/score_mean"]
                        logger.transcripts(
                            step, [e.transcript() for e in eps[:n_log]], "eval_rollouts"
                        )
                    except _Preempted:
                        pass  # the step itself is complete: log and save it without its eval
                logger.log(step, m)
                logger.transcripts(step, [e.transcript() for e in episodes[:n_log]])
                self.save(force=(step == total))
                if self.bad_steps >= cfg.trainer.max_bad_steps:
                    raise FloatingPointError(
                        f"{self.bad_steps} consecutive non-finite updates (trainer.max_bad_steps="
                        f"{cfg.trainer.max_bad_steps}); stopping. Last good checkpoint: "
                        f"{ctx.checkpointer.latest_step()}"
                    )
                if self._agreed_stop():
                    agreed_stop = True
                    break
            # All processes take this branch together (its save is a collective).
            if (self._stop_signal is not None or agreed_stop) and self.step_count > start:
                self.save(force=True)
                logger.write(
                    f"stopped by signal at step {self.step_count}; "
                    + (
                        "checkpoint saved"
                        if ctx.checkpointer.has_checkpoint(self.step_count)
                        else "NO CHECKPOINT SAVED"
                    )
                )
        finally:
            ctx.checkpointer.wait()
            for s, h in old.items():
                signal.signal(s, h)
            logger.close()
        summary = {
            "ok": True,
            "step": self.step_count,
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "eval_success_before": first_eval,
            "eval_success_after": last_eval,
            "eval_score_before": first_score,
            "eval_score_after": last_score,
            "preempted": self._stop_signal is not None or agreed_stop,
            "output_dir": ctx.out_dir,
        }
        if not _is_main_process():
            return summary
        if cfg.trainer.plot and os.path.exists(os.path.join(ctx.out_dir, "metrics.jsonl")):
            try:
                summary["curves"] = plot_run(ctx.out_dir)
            except Exception as e:  # plotting must never fail a finished run
                log.warning("plotting failed: %s", e)
        with open(os.path.join(ctx.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def close(self) -> None:
        self.ctx.close()


def _train_state_tree(ts) -> dict:
    return {"params": ts.params, "opt_state": ts.opt_state, "step": ts.step}


def _is_main_process() -> bool:
    return jax.process_index() == 0


def evaluate(
    ctx: Context, step: int, task_ids=None, prefix: str = "eval", check=None
) -> tuple[dict[str, float], list[Episode]]:
    """Held-out episodes (``rollout.val_n`` per task) with the engine's current weights ->
    (metrics of all of them, this process's episodes). ``check``: see ``Rollout.run``."""
    cfg = ctx.cfg
    task_ids = ctx.val_ids if task_ids is None else task_ids
    settings = rollout_settings(cfg, ctx.horizon, step, eval_mode=True)
    tasks = expand_groups(task_ids, cfg.rollout.val_n)
    mine, first = my_share(tasks)
    eps = ctx.rollout.run(mine, settings, check=check, **_uids_from(first)).episodes
    n = jax.process_count()
    rows = max(len(host_share(tasks, i, n)[0]) for i in range(n))
    m = table_metrics(global_table(episode_table(eps), rows), prefix)
    m[f"{prefix}/horizon"] = float(settings.max_turns)
    return m, eps


def train(cfg: TrainConfig) -> dict:
    """Build, fit, close; prints a short summary and returns it (also in summary.json)."""
    trainer = Trainer.from_config(cfg)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    before, after = summary.get("eval_success_before"), summary.get("eval_success_after")
    lines = [
        f"done: step {summary['step']} in {summary['elapsed_s']:.0f}s -> {summary['output_dir']}"
    ]
    if before is not None or after is not None:
        fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
        lines.append(f"held-out success: {fmt(before)} -> {fmt(after)}")
        num = lambda x: "n/a" if x is None else f"{x:.3f}"
        s0, s1 = summary.get("eval_score_before"), summary.get("eval_score_after")
        lines.append(f"held-out mean score: {num(s0)} -> {num(s1)}")
    if summary.get("curves"):
        lines.append(f"curves: {summary['curves']}")
    if _is_main_process():
        print("\n".join(lines), flush=True)
    return summary


def _restore_actor_params(cfg: TrainConfig, run_dir: str, params, step: int | None = None):
    """The actor params of a run's checkpoint (latest loadable, or ``step``); no optimizer."""
    ck = checkpointer_for(cfg, run_dir, read_only=True)
    try:
        got = ck.restore({"actor": {"params": params}}, step, partial=True)
    finally:
        ck.close()
    if got is None:
        raise FileNotFoundError(f"no loadable checkpoint in {run_dir}/checkpoints")
    return got[0], got[1]["actor"]["params"]


def evaluate_cli(
    cfg: TrainConfig,
    checkpoint_dir: str | None = None,
    num_tasks: int | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """``agentgym-jax eval``: held-out metrics and transcripts of a run's latest checkpoint (or
    of ``model.path`` without one), written to ``eval_step{N}.json`` in the run dir."""
    import envs

    if checkpoint_dir:
        cfg.trainer.output_dir = checkpoint_dir
    ctx = build_context(cfg, "eval")
    try:
        step = 0
        if checkpoint_dir:
            step, params = _restore_actor_params(cfg, checkpoint_dir, ctx.actor_params)
            ctx.sync_engine(params)
        ids = envs.task_ids(cfg.env.name, split or cfg.env.test_split, **cfg.env.kwargs)
        m, eps = evaluate(ctx, step, ids[: num_tasks or cfg.data.val_batch_size])
        if not _is_main_process():
            return m  # the metrics cover every process; the transcripts are process 0's
        out = os.path.join(ctx.out_dir, f"eval_step{step}.json")
        with open(out, "w") as f:
            json.dump({"metrics": m, "episodes": [e.transcript() for e in eps]}, f, indent=1)
        print(json.dumps(m, indent=2))
        print(f"transcripts: {out}")
        return m
    finally:
        ctx.close()


TOKENIZER_FILES = (
    "tokenizer",
    "special_tokens",
    "vocab",
    "merges",
    "generation_config",
    "chat_template",
)


def export_checkpoint(
    cfg: TrainConfig, out: str, step: int | None = None, dtype: str | None = None
) -> str:
    """Write the actor of the run in ``trainer.output_dir`` (latest or ``step``) as HF
    safetensors, with the tokenizer files. Loads no engine, envs or optimizer state."""
    from flax import nnx

    from agentgym_jax.models import dtype_from_name, resolve_model_path, save_pretrained

    model = load_actor(cfg)
    _, params = _restore_actor_params(cfg, cfg.trainer.output_dir, nnx.state(model), step)
    nnx.update(model, params)
    save_pretrained(model, out, dtype=dtype_from_name(dtype) if dtype else None)
    src = resolve_model_path(cfg.model.path)
    for fn in os.listdir(src):
        if fn.startswith(TOKENIZER_FILES):
            shutil.copy(os.path.join(src, fn), os.path.join(out, fn))
    return out


__all__ = [
    "AllEnvsFailedError",
    "Trainer",
    "evaluate",
    "evaluate_cli",
    "export_checkpoint",
    "pad_bucket",
    "rollout_settings",
    "train",
]
