"""The training loop: rollout -> log-probs / values -> advantages -> jitted update, with eval,
metrics, checkpoints and exact resume.

Determinism: the sampling seeds and the update RNG of step k are functions of
(trainer.seed, k), and the task order comes from the checkpointed sampler, so a run resumed at
step k reproduces the straight run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agentgym_jax import sharding as shd
from agentgym_jax.checkpoint import Checkpointer
from agentgym_jax.config import TrainConfig, to_yaml
from agentgym_jax.data import TaskSampler, expand_groups
from agentgym_jax.metrics import MetricsLogger, plot_run
from agentgym_jax.rollout import Rollout, RolloutSettings, rollout_metrics, to_batch
from agentgym_jax.schedule import make_horizon

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_model_path(path: str) -> str:
    """``builtin:NAME`` -> the embedded model directory; anything else must be a local dir."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        d = os.path.join(os.path.dirname(__file__), "assets", name)
        if not os.path.isdir(d):
            avail = (
                sorted(os.listdir(os.path.join(os.path.dirname(__file__), "assets")))
                if os.path.isdir(os.path.join(os.path.dirname(__file__), "assets"))
                else []
            )
            raise FileNotFoundError(f"no embedded model {name!r}; available: {avail}")
        return d
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model.path={path!r} is not a local directory (weights load from local paths only; "
            "download a checkpoint first, e.g. with huggingface-cli, then point model.path at it)"
        )
    return path


def _pad_bucket(n: int, cap: int) -> int:
    """Training sequence length: the next of 128 * 1.25^k (so a handful of update compiles,
    and attention, quadratic in it, wastes at most ~25% on padding), capped at ``cap``."""
    t = 128
    while t < n:
        t = -(-int(t * 1.25) // 64) * 64
    return min(t, cap)


class _Preempted(Exception):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import transformers

        import envs
        from agentgym_jax.engine import Engine, EngineConfig
        from agentgym_jax.engine.chat import ChatDeltas
        from agentgym_jax.envs_driver import make_driver
        from agentgym_jax.models import critic_from_pretrained, from_pretrained
        from agentgym_jax.rl import update as U

        self.cfg = cfg
        self.out = os.path.abspath(cfg.trainer.output_dir)
        os.makedirs(self.out, exist_ok=True)
        self.mesh = shd.make_mesh(cfg.mesh)
        path = resolve_model_path(cfg.model.path)
        tok_path = (
            resolve_model_path(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else path
        )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path)
        dtype, pdtype = _DTYPES[cfg.model.dtype], _DTYPES[cfg.model.param_dtype]
        actor = from_pretrained(
            path,
            dtype,
            self.mesh,
            param_dtype=pdtype,
            remat=cfg.model.remat,
            attn_q_block=cfg.model.attn_q_block,
        )
        self.model_config = actor.config
        self.U = U
        self.actor = U.init_train_state(actor, U.make_optimizer(cfg.actor), self.mesh)
        self.actor_update = U.make_actor_update(cfg.actor, self.mesh, self.actor)
        # The update donates (frees) the old params, so the frozen reference needs its own copy.
        self.ref_params = jax.tree.map(jnp.copy, self.actor.params) if cfg.ref.enable else None
        self.critic = None
        if cfg.uses_critic:
            critic = critic_from_pretrained(
                path,
                dtype,
                self.mesh,
                param_dtype=pdtype,
                remat=cfg.model.remat,
                attn_q_block=cfg.model.attn_q_block,
            )
            self.critic = U.init_train_state(critic, U.make_optimizer(cfg.critic), self.mesh)
            self.critic_update = U.make_critic_update(cfg.critic, self.mesh, self.critic)

        seqs = cfg.data.train_batch_size * cfg.rollout.n
        slots = cfg.rollout.num_slots or seqs
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        slots = -(-slots // dp) * dp
        self.max_len = cfg.data.max_prompt_length + cfg.data.max_response_length
        self.engine = Engine(
            actor,
            EngineConfig(num_slots=slots, max_len=self.max_len, seed=cfg.rollout.seed),
            mesh=self.mesh,
        )
        self.chat = ChatDeltas(self.tokenizer)
        self.driver = make_driver(cfg.env)
        eos = self.model_config.eos_token_ids
        self.rollout = Rollout(self.engine, self.driver, self.chat, stop_token_ids=eos)
        self.horizon = make_horizon(cfg.algorithm.rounds_ctrl)
        train_ids = envs.task_ids(cfg.env.name, cfg.env.train_split, **cfg.env.kwargs)
        self.val_ids = envs.task_ids(cfg.env.name, cfg.env.test_split, **cfg.env.kwargs)[
            : cfg.data.val_batch_size
        ]
        self.sampler = TaskSampler(
            train_ids, cfg.data.train_batch_size, seed=cfg.data.seed, group_size=cfg.rollout.n
        )
        self.ckpt = Checkpointer(
            os.path.join(self.out, "checkpoints"),
            save_every=cfg.trainer.save_freq,
            max_to_keep=cfg.trainer.max_to_keep,
            async_save=cfg.trainer.async_checkpoint,
        )
        self.step = 0
        self.bad_steps = 0
        self._stop_signal: int | None = None

    # ---- state for checkpoints ----
    def _ckpt_state(self) -> dict:
        st = {
            "actor": {
                "params": self.actor.params,
                "opt_state": self.actor.opt_state,
                "step": self.actor.step,
            }
        }
        if self.critic is not None:
            st["critic"] = {
                "params": self.critic.params,
                "opt_state": self.critic.opt_state,
                "step": self.critic.step,
            }
        return st

    def _meta(self) -> dict:
        return {
            "step": self.step,
            "data": self.sampler.get_state(),
            "bad_steps": self.bad_steps,
            "rng_seed": self.cfg.trainer.seed,
        }

    def save(self, force: bool = False) -> bool:
        return self.ckpt.save(self.step, self._ckpt_state(), self._meta(), force=force)

    def maybe_resume(self) -> int:
        got = self.ckpt.restore(self._ckpt_state())
        if got is None:
            return 0
        step, st, meta = got
        self.actor = self.actor.replace(**st["actor"])
        if self.critic is not None and "critic" in st:
            self.critic = self.critic.replace(**st["critic"])
        self.sampler.set_state(meta["data"])
        self.bad_steps = int(meta.get("bad_steps", 0))
        self.step = step
        self.engine.set_params(self.actor.params)
        log.info("resumed from %s at step %d", self.ckpt.directory, step)
        return step

    # ---- one training step ----
    def settings(self, step: int, *, eval_mode: bool = False) -> RolloutSettings:
        r = self.cfg.rollout
        return RolloutSettings(
            max_turns=self.horizon(max(step, 1)) if not eval_mode else self._eval_horizon(),
            max_tokens_per_turn=r.max_tokens_per_turn,
            max_prompt_length=self.cfg.data.max_prompt_length,
            temperature=r.val_temperature if eval_mode else r.temperature,
            top_p=1.0 if eval_mode else r.top_p,
            top_k=0 if eval_mode else r.top_k,
            seed=(self.cfg.trainer.seed * 100_003 + step * 2 + int(eval_mode)) & 0x7FFFFFFF,
            unclosed_turn_score=None if eval_mode else r.unclosed_turn_score,
        )

    def _eval_horizon(self) -> int:
        return self.cfg.rollout.val_max_turns or max(self.cfg.algorithm.rounds_ctrl.rounds)

    def train_step(self, step: int) -> dict[str, float]:
        cfg, U = self.cfg, self.U
        t0 = time.perf_counter()
        tasks = next(self.sampler)
        s = self.settings(step)
        result = self.rollout.run(tasks, s)
        episodes = result.episodes
        t_roll = time.perf_counter()
        t_len = _pad_bucket(max(len(e.tokens) for e in episodes), self.max_len)
        batch = to_batch(episodes, pad_multiple=t_len, max_len=self.max_len)
        dev = U.shard_batch({k: v for k, v in batch.items() if v.ndim == 2}, self.mesh)
        micro = cfg.actor.micro_batch_size
        old_lp, entropy = U.compute_logprobs(
            self.actor.graphdef,
            self.actor.params,
            dev,
            micro_batch_size=micro,
            temperature=cfg.actor.temperature,
        )
        dev["old_logprobs"] = old_lp
        host = dict(batch)
        host["old_logprobs"] = old_lp
        if self.ref_params is not None:
            ref_lp, _ = U.compute_logprobs(
                self.actor.graphdef,
                self.ref_params,
                dev,
                micro_batch_size=micro,
                temperature=cfg.actor.temperature,
            )
            dev["ref_logprobs"] = ref_lp
            host["ref_logprobs"] = ref_lp
        if self.critic is not None:
            values = U.compute_values(
                self.critic.graphdef,
                self.critic.params,
                dev,
                micro_batch_size=cfg.critic.micro_batch_size,
            )
            host["values"] = values
        adv = self._advantages(host)
        dev["advantages"] = adv["advantages"]
        if self.critic is not None:
            dev["values"], dev["returns"] = host["values"], adv["returns"]
        dev = U.shard_batch(dev, self.mesh)  # host-computed advantages join the sharded batch
        metrics: dict[str, Any] = {}
        rng = jax.random.fold_in(jax.random.key(cfg.trainer.seed), step)
        if self.critic is not None:
            new_critic, cm = self.critic_update(self.critic, dev, jax.random.fold_in(rng, 1))
            metrics.update(jax.device_get(cm))
        new_actor, am = self.actor_update(self.actor, dev, rng)
        metrics.update(jax.device_get(am))
        # On a non-finite grad norm the update skips the optimizer step (params unchanged); the
        # donated old state is gone either way, so the returned state is always the one to keep.
        self.actor = new_actor
        if self.critic is not None:
            self.critic = new_critic
        self.engine.set_params(self.actor.params)
        if all(
            np.isfinite(float(v)) for k, v in metrics.items() if k.endswith(("loss", "grad_norm"))
        ):
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            log.error(
                "step %d: non-finite loss or grad norm; update skipped (%d in a row): %s",
                step,
                self.bad_steps,
                {k: float(v) for k, v in metrics.items()},
            )
        t_upd = time.perf_counter()
        m = rollout_metrics(episodes, "train")
        mask = batch["loss_mask"].astype(bool)
        old_np = np.asarray(old_lp)
        tokens = int(batch["attention_mask"].sum())
        m.update(
            {
                "train/horizon": float(s.max_turns),
                "train/logprob_mismatch": float(
                    np.abs(old_np - batch["rollout_logprobs"])[mask].mean()
                )
                if mask.any()
                else 0.0,
                "timing/rollout_s": t_roll - t0,
                "timing/env_wait_s": result.stats["env_wait_s"],
                "timing/update_s": t_upd - t_roll,
                "timing/step_s": t_upd - t0,
                "perf/tokens_per_s": tokens / max(t_upd - t0, 1e-9),
                "perf/seq_len_padded": float(batch["input_ids"].shape[1]),
            }
        )
        m.update({k: float(v) for k, v in metrics.items()})
        self._last_episodes = episodes
        return m

    def _advantages(self, host: dict) -> dict:
        from agentgym_jax.rl.advantages import compute_advantages

        keys = (
            "loss_mask",
            "rewards",
            "scores",
            "group_ids",
            "old_logprobs",
            "ref_logprobs",
            "values",
        )
        b = {k: host[k] for k in keys if k in host}
        return compute_advantages(self.cfg.algorithm.adv_estimator, b, self.cfg.algorithm)

    def evaluate(self, step: int, task_ids=None, prefix: str = "eval") -> tuple[dict, list]:
        task_ids = self.val_ids if task_ids is None else task_ids
        n = self.cfg.rollout.val_n
        tasks = expand_groups(task_ids, n)
        eps = self.rollout.run(tasks, self.settings(step, eval_mode=True)).episodes
        m = rollout_metrics(eps, prefix)
        m[f"{prefix}/horizon"] = float(self._eval_horizon())
        return m, eps

    # ---- the loop ----
    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        log.warning("received signal %d: will save and stop after the current step", signum)

    def fit(self) -> dict:
        cfg = self.cfg
        total = cfg.trainer.total_training_steps
        start = self.maybe_resume()
        with open(os.path.join(self.out, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        logger = MetricsLogger(
            self.out,
            loggers=cfg.trainer.logger,
            total_steps=total,
            start_step=start,
            enabled=jax.process_index() == 0,
        )
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.perf_counter()
        first_eval = last_eval = None
        try:
            if start >= total:
                logger.write(
                    f"nothing to do: checkpoint at step {start} >= total_training_steps={total}"
                )
            elif cfg.trainer.val_before_train and start == 0:
                m, eps = self.evaluate(0)
                first_eval = m["eval/success_rate"]
                logger.log(0, m)
                logger.transcripts(
                    0, [e.transcript() for e in eps[: cfg.trainer.log_transcripts]], "eval_rollouts"
                )
                logger.write(
                    f"step 0 eval: success {first_eval:.3f}, reward {m['eval/reward_mean']:.3f}"
                )
            for step in range(start + 1, total + 1):
                self.step = step
                m = self.train_step(step)
                if cfg.trainer.test_freq and (step % cfg.trainer.test_freq == 0 or step == total):
                    em, eps = self.evaluate(step)
                    m.update(em)
                    last_eval = em["eval/success_rate"]
                    logger.transcripts(
                        step,
                        [e.transcript() for e in eps[: cfg.trainer.log_transcripts]],
                        "eval_rollouts",
                    )
                logger.log(step, m)
                logger.transcripts(
                    step,
                    [e.transcript() for e in self._last_episodes[: cfg.trainer.log_transcripts]],
                )
                self.save(force=(step == total))
                if self.bad_steps >= cfg.trainer.max_bad_steps:
                    raise FloatingPointError(
                        f"{self.bad_steps} consecutive non-finite updates (trainer.max_bad_steps="
                        f"{cfg.trainer.max_bad_steps}); stopping. Last good checkpoint: {self.ckpt.latest_step()}"
                    )
                if self._stop_signal is not None:
                    self.save(force=True)
                    raise _Preempted()
        except _Preempted:
            logger.write(f"stopped by signal at step {self.step}; checkpoint saved")
        finally:
            self.ckpt.wait()
            for s, h in old.items():
                signal.signal(s, h)
            logger.close()
        elapsed = time.perf_counter() - t_start
        summary = {
            "ok": True,
            "step": self.step,
            "elapsed_s": round(elapsed, 1),
            "eval_success_before": first_eval,
            "eval_success_after": last_eval,
            "preempted": self._stop_signal is not None,
            "output_dir": self.out,
        }
        if cfg.trainer.plot and os.path.exists(os.path.join(self.out, "metrics.jsonl")):
            try:
                summary["curves"] = plot_run(self.out)
            except Exception as e:  # plotting must never fail a finished run
                log.warning("plotting failed: %s", e)
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def close(self):
        with contextlib.suppress(Exception):
            self.ckpt.close()
        with contextlib.suppress(Exception):
            self.driver.close()


def train(cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
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
    if summary.get("curves"):
        lines.append(f"curves: {summary['curves']}")
    print("\n".join(lines), flush=True)
    return summary


def evaluate_cli(
    cfg: TrainConfig,
    checkpoint_dir: str | None = None,
    num_tasks: int | None = None,
    split: str | None = None,
) -> dict:
    import envs

    if checkpoint_dir:
        cfg.trainer.output_dir = checkpoint_dir
    trainer = Trainer(cfg)
    try:
        if checkpoint_dir:
            trainer.maybe_resume()
        ids = envs.task_ids(cfg.env.name, split or cfg.env.test_split, **cfg.env.kwargs)
        ids = ids[: num_tasks or cfg.data.val_batch_size]
        m, eps = trainer.evaluate(trainer.step, ids)
        out = os.path.join(trainer.out, f"eval_step{trainer.step}.json")
        with open(out, "w") as f:
            json.dump({"metrics": m, "episodes": [e.transcript() for e in eps]}, f, indent=1)
        print(json.dumps(m, indent=2))
        print(f"transcripts: {out}")
        return m
    finally:
        trainer.close()


def export_checkpoint(
    cfg: TrainConfig, out: str, step: int | None = None, dtype: str | None = None
) -> str:
    """Write the actor of the run in ``trainer.output_dir`` (latest or ``step``) as HF safetensors."""
    import shutil

    from flax import nnx

    from agentgym_jax.models import from_pretrained, save_pretrained

    path = resolve_model_path(cfg.model.path)
    model = from_pretrained(
        path, _DTYPES[cfg.model.dtype], param_dtype=_DTYPES[cfg.model.param_dtype]
    )
    ck = Checkpointer(os.path.join(cfg.trainer.output_dir, "checkpoints"), async_save=False)
    target = {"actor": {"params": nnx.state(model)}}
    got = ck.restore(target, step, partial=True)
    if got is None:
        raise FileNotFoundError(f"no loadable checkpoint in {cfg.trainer.output_dir}/checkpoints")
    nnx.update(model, got[1]["actor"]["params"])
    save_pretrained(model, out, dtype=_DTYPES[dtype] if dtype else None)
    for fn in os.listdir(path):  # tokenizer files travel with the weights
        if fn.startswith(
            ("tokenizer", "special_tokens", "vocab", "merges", "generation_config", "chat_template")
        ):
            shutil.copy(os.path.join(path, fn), os.path.join(out, fn))
    ck.close()
    return out
