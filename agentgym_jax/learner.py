"""The learner step: one jitted preparation, then the jitted critic and actor updates.

``Learner.step(state, batch, step)`` takes the host batch of one training step (``to_batch``),
shards it over the mesh once, and runs:

1. ``prepare`` (one jit): old-policy log-probs, reference log-probs, critic values, the
   in-reward KL and the advantages, all on device. Nothing of shape [B, T] comes back to the host
   between the forward passes and the updates.
2. the critic update (GAE only) and the actor update (``rl.update``), each one jit that donates
   the train state it replaces.

The learner's state (``LearnerState``: actor, critic, frozen reference params, the in-reward KL
coefficient) is an explicit value: the loop owns it, checkpoints it and passes it back in.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from agentgym_jax import sharding as shd
from agentgym_jax.config import TrainConfig
from agentgym_jax.rl import packing as PK
from agentgym_jax.rl import update as U
from agentgym_jax.rl.advantages import compute_advantages, make_kl_controller

# Host batch keys that the learner reads (``rollout.to_batch`` makes them).
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "loss_mask",
    "rollout_logprobs",
    "rewards",
    "scores",
    "group_ids",
    "valid",
)


@dataclasses.dataclass
class LearnerState:
    actor: U.TrainState
    critic: U.TrainState | None
    ref_params: Any | None
    """Frozen reference policy (KL loss / KL in reward); None without ``ref.enable``."""
    kl_coef: float
    """In-reward KL coefficient (the KL controller's state; fixed unless ``kl_ctrl.type`` is
    adaptive)."""


def _masked_mean(x, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


class Learner:
    """Jitted functions of one config and mesh; all state goes in and out explicitly."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh, actor: U.TrainState, critic=None):
        self.cfg, self.mesh = cfg, mesh
        self.actor_update = U.make_actor_update(cfg.actor, mesh, actor)
        self.critic_update = (
            U.make_critic_update(cfg.critic, mesh, critic) if critic is not None else None
        )
        self._kl_ctrl = make_kl_controller(cfg.algorithm.kl_ctrl)
        actor_sh = U.train_state_shardings(actor, mesh).params
        critic_sh = U.train_state_shardings(critic, mesh).params if critic is not None else None
        batch_sh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
        self._prepare = jax.jit(
            functools.partial(
                _prepare, cfg, actor.graphdef, critic.graphdef if critic is not None else None
            ),
            in_shardings=(
                actor_sh,
                actor_sh if cfg.ref.enable else None,
                critic_sh,
                batch_sh,
                rep,
                rep,
            ),
            out_shardings=(batch_sh, rep),
        )
        self.packed = cfg.model.use_remove_padding
        # Micro-batch sizes of the log-prob / value passes.
        self._micros = [cfg.actor.micro_batch_size]
        if critic is not None:
            self._micros.append(cfg.critic.micro_batch_size)

    def init_state(self, actor: U.TrainState, critic: U.TrainState | None) -> LearnerState:
        # The update donates (frees) the old params, so the reference needs its own copy.
        ref = jax.tree.map(jnp.copy, actor.params) if self.cfg.ref.enable else None
        return LearnerState(actor, critic, ref, self._kl_ctrl.value)

    def prepare(
        self, state: LearnerState, batch: dict, lengths: np.ndarray | None = None
    ) -> tuple[dict, dict]:
        """(device batch with old_logprobs / ref_logprobs / values / advantages / returns,
        device metrics) for a host batch (with several processes: this host's rows of the
        global batch, see ``sharding.shard_batch``). ``lengths``: ``Learner.lengths(batch)``
        when the caller has it already (it is a collective across hosts)."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"learner: batch lacks {missing}")
        dev = shd.shard_batch({k: batch[k] for k in BATCH_KEYS}, self.mesh)
        packing = None
        if self.packed:
            lengths = self.lengths(batch) if lengths is None else lengths
            p = PK.pack(lengths, dev["input_ids"].shape[1])
            p = p.with_rows(self._prepare_rows(p.n_rows, len(lengths)))
            if PK.worth_it(p.n_rows, len(lengths)):
                packing = {"src": p.src, "pos": p.pos, "row": p.row, "offset": p.offset}
        return self._prepare(
            state.actor.params,
            state.ref_params,
            state.critic.params if state.critic is not None else None,
            dev,
            jnp.float32(state.kl_coef),
            packing,
        )

    def _prepare_rows(self, n: int, b: int) -> int:
        """Rows of the packed log-prob / value passes: one micro-batch below the smallest
        micro-batch size, else whole micro-batches of every size; at most ``b``, the batch."""
        r = PK.rows_for(n, min(self._micros), shd.data_parallel_ways(self.mesh))
        if r > min(self._micros):
            r = PK.bucket(n, math.lcm(*self._micros))
        return min(r, b)

    @staticmethod
    def lengths(batch: dict) -> np.ndarray:
        """Tokens of every episode of the global batch (all hosts' rows, in process order)."""
        local = np.asarray(batch["attention_mask"]).sum(axis=-1).astype(np.int32)
        return shd.process_allgather_np(local).reshape(-1)

    def step(self, state: LearnerState, batch: dict, step: int) -> tuple[LearnerState, dict]:
        """One training step on a host batch -> (new state, host metrics).

        On a non-finite gradient norm the update skips the optimizer step (params unchanged);
        the donated old state is gone either way, so the returned state is the one to keep.
        """
        lengths = self.lengths(batch) if self.packed else None
        dev, metrics = self.prepare(state, batch, lengths)
        rng = jax.random.fold_in(jax.random.key(self.cfg.trainer.seed), step)
        t = dev["input_ids"].shape[1]

        def pack(update, k):  # the same shuffle on every host: seeded by (seed, step, update)
            if not self.packed:
                return None
            plan = update.plan(lengths, t, (self.cfg.trainer.seed, step, k))
            return plan if PK.worth_it(plan["src"].shape[1], plan["members"].shape[1]) else None

        critic = state.critic
        if self.critic_update is not None:
            crng = jax.random.fold_in(rng, 1)
            critic, cm = self.critic_update(critic, dev, crng, pack(self.critic_update, 1))
            metrics.update(cm)
        actor, am = self.actor_update(state.actor, dev, rng, pack(self.actor_update, 0))
        metrics.update(am)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        kl_coef = state.kl_coef
        if self.cfg.algorithm.use_kl_in_reward:
            self._kl_ctrl.value = kl_coef
            # The global batch: with several processes ``batch`` is this host's share.
            n_seqs = int(dev["input_ids"].shape[0])
            self._kl_ctrl.update(metrics["train/kl_in_reward"], n_steps=n_seqs)
            kl_coef = self._kl_ctrl.value
            metrics["train/kl_coef"] = kl_coef
        return dataclasses.replace(state, actor=actor, critic=critic, kl_coef=kl_coef), metrics


def _prepare(
    cfg: TrainConfig, actor_def, critic_def, actor_p, ref_p, critic_p, batch, kl_coef, packing=None
):
    """Forward passes and advantages of one step, inside one jit (see the module doc);
    ``packing`` (of the whole batch) runs the model on packed rows."""
    micro, temp = cfg.actor.micro_batch_size, cfg.actor.temperature
    out = dict(batch)
    metrics = {}
    if cfg.actor.old_logprobs == "rollout":
        out["old_logprobs"] = batch["rollout_logprobs"]
    else:
        old, _ = U.compute_logprobs(actor_def, actor_p, batch, micro, temp, packing)
        out["old_logprobs"] = old
        # Sampler vs trainer log-probs of the same tokens: ~0 for a token-exact rollout.
        diff = jnp.abs(old - batch["rollout_logprobs"])
        metrics["train/logprob_mismatch"] = _masked_mean(diff, batch["loss_mask"])
    if ref_p is not None:
        out["ref_logprobs"], _ = U.compute_logprobs(actor_def, ref_p, batch, micro, temp, packing)
    if critic_def is not None:
        out["values"] = U.compute_values(
            critic_def, critic_p, batch, cfg.critic.micro_batch_size, packing
        )
    adv = compute_advantages(cfg.algorithm.adv_estimator, out, cfg.algorithm, kl_coef=kl_coef)
    out["advantages"], out["returns"] = adv["advantages"], adv["returns"]
    mask = batch["loss_mask"]
    if "kl_in_reward" in adv:
        has_tokens = jnp.any(mask > 0, axis=-1)
        metrics["train/kl_in_reward"] = _masked_mean(adv["kl_in_reward"], has_tokens)
    return out, metrics


def host_metrics_finite(metrics: dict[str, float]) -> bool:
    """Whether every loss and grad norm of a step is finite (a skipped step is not)."""
    return all(np.isfinite(v) for k, v in metrics.items() if k.endswith(("loss", "grad_norm")))
