"""Setup: everything a run needs, built once from the config.

``build_context(cfg, purpose)`` makes the mesh, tokenizer, models, engine, env driver, rollout
and (for training) the learner, its initial state, the task sampler and the checkpointer.
``purpose="eval"`` builds only what evaluation needs: the actor's parameters without optimizer
state, critic or reference. Export needs no engine or envs at all (see ``trainer.export``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Literal

import jax
from flax import nnx
from jax.sharding import Mesh

import envs
from agentgym_jax import sharding as shd
from agentgym_jax.checkpoint import Checkpointer
from agentgym_jax.config import TrainConfig
from agentgym_jax.config_tree import ConfigError
from agentgym_jax.data import TaskSampler
from agentgym_jax.engine import Engine, EngineConfig
from agentgym_jax.engine.chat import ChatDeltas
from agentgym_jax.envs_driver import EnvDriver, make_driver
from agentgym_jax.learner import Learner, LearnerState
from agentgym_jax.models import (
    ModelConfig,
    critic_from_pretrained,
    dtype_from_name,
    from_pretrained,
    load_tokenizer,
    resolve_model_path,
)
from agentgym_jax.rl import update as U
from agentgym_jax.rollout import Rollout
from agentgym_jax.schedule import make_horizon


@dataclasses.dataclass
class Context:
    cfg: TrainConfig
    out_dir: str
    mesh: Mesh
    """The training mesh: every device of every process."""
    tokenizer: Any
    model_config: ModelConfig
    engine: Engine
    driver: EnvDriver
    rollout: Rollout
    val_ids: list[int]
    """Held-out task ids evaluated at each eval (the first ``data.val_batch_size`` of the split)."""
    horizon: Any
    """``max_turns(step)``: the ScalingInter-RL schedule."""
    checkpointer: Checkpointer | None = None
    """Training only: saves and restores the run's state in ``out_dir/checkpoints``."""
    learner: Learner | None = None
    """Training only."""
    state: LearnerState | None = None
    """Training: the initial learner state (the loop replaces it every step)."""
    actor_params: Any = None
    """Evaluation only: the actor's parameters (training reads them from ``state``)."""
    sampler: TaskSampler | None = None
    """Training only: the checkpointed stream of training tasks."""
    rollout_mesh: Mesh | None = None
    """The engine's mesh: ``mesh`` with one process, this process's devices with several."""

    def sync_engine(self, params) -> None:
        """Hand the actor's new params to the engine (after every update and on resume)."""
        self.engine.set_params(shd.to_local(params, self.mesh, self.rollout_mesh))

    def close(self) -> None:
        if self.checkpointer is not None:
            with contextlib.suppress(Exception):
                self.checkpointer.close()
        with contextlib.suppress(Exception):
            self.driver.close()


def engine_slots(cfg: TrainConfig, mesh: Mesh, processes: int = 1) -> int:
    """Engine slots of one process: ``rollout.num_slots`` or its share of a training step's
    episodes, rounded up to a multiple of the data-parallel ways (slots are sharded like the
    batch)."""
    slots = cfg.rollout.num_slots or cfg.data.train_batch_size * cfg.rollout.n // processes
    dp = shd.data_parallel_ways(mesh)
    return -(-slots // dp) * dp


def load_actor(cfg: TrainConfig, mesh: Mesh | None = None, *, critic: bool = False):
    """The actor (or, with ``critic``, the value model) from ``model.path`` as the config says."""
    m = cfg.model
    load = critic_from_pretrained if critic else from_pretrained
    return load(
        resolve_model_path(m.path),
        dtype_from_name(m.dtype),
        mesh,
        param_dtype=dtype_from_name(m.param_dtype),
        remat=m.remat,
        attn_q_block=m.attn_q_block,
        attention=m.attention,
        logits_chunk=m.logits_chunk,
    )


def checkpointer_for(
    cfg: TrainConfig, run_dir: str | None = None, *, read_only: bool = False
) -> Checkpointer:
    """The run's checkpointer. ``read_only`` (eval, export) leaves temporary save folders alone:
    the run may still be training and writing one."""
    t = cfg.trainer
    return Checkpointer(
        os.path.join(run_dir or t.output_dir, "checkpoints"),
        save_every=t.save_freq,
        max_to_keep=t.max_to_keep,
        async_save=t.async_checkpoint,
        clean_tmp=not read_only,
    )


def build_context(cfg: TrainConfig, purpose: Literal["train", "eval"] = "train") -> Context:
    if purpose not in ("train", "eval"):
        raise ValueError(f"build_context: purpose={purpose!r}: allowed 'train', 'eval'")
    out_dir = os.path.abspath(cfg.trainer.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    processes = jax.process_count()
    if cfg.data.train_batch_size % processes:
        raise ConfigError(
            f"data.train_batch_size={cfg.data.train_batch_size} must be a multiple of the "
            f"{processes} processes: each runs an equal share of whole task groups"
        )
    mesh = shd.make_mesh(cfg.mesh)
    rmesh = shd.rollout_mesh(cfg.mesh, mesh)
    model_dir = resolve_model_path(cfg.model.path)
    tok_dir = (
        resolve_model_path(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else model_dir
    )
    tokenizer = load_tokenizer(tok_dir)
    driver = make_driver(cfg.env)  # unknown envs and bad kwargs fail here, before compiling
    actor = load_actor(cfg, mesh)
    engine = Engine(
        # Several processes: the engine gets its own copy, loaded onto this host's devices.
        actor if rmesh is mesh else load_actor(cfg, rmesh),
        EngineConfig(
            num_slots=engine_slots(cfg, rmesh, processes),
            max_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
        ),
        mesh=rmesh,
    )
    rollout = Rollout(
        engine, driver, ChatDeltas(tokenizer), stop_token_ids=actor.config.eos_token_ids
    )
    val_ids = envs.task_ids(cfg.env.name, cfg.env.test_split, **cfg.env.kwargs)
    ctx = Context(
        cfg=cfg,
        out_dir=out_dir,
        mesh=mesh,
        tokenizer=tokenizer,
        model_config=actor.config,
        engine=engine,
        driver=driver,
        rollout=rollout,
        val_ids=val_ids[: cfg.data.val_batch_size],
        horizon=make_horizon(cfg.algorithm.rounds_ctrl),
        rollout_mesh=rmesh,
    )
    if purpose == "eval":
        ctx.actor_params = nnx.state(actor)
        return ctx
    actor_state = U.init_train_state(actor, U.make_optimizer(cfg.actor), mesh)
    critic_state = None
    if cfg.uses_critic:
        critic = load_actor(cfg, mesh, critic=True)
        critic_state = U.init_train_state(critic, U.make_optimizer(cfg.critic), mesh)
    ctx.checkpointer = checkpointer_for(cfg)
    ctx.learner = Learner(cfg, mesh, actor_state, critic_state)
    ctx.state = ctx.learner.init_state(actor_state, critic_state)
    train_ids = envs.task_ids(cfg.env.name, cfg.env.train_split, **cfg.env.kwargs)
    ctx.sampler = TaskSampler(
        train_ids, cfg.data.train_batch_size, seed=cfg.data.seed, group_size=cfg.rollout.n
    )
    return ctx
