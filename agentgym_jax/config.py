"""The training config tree: YAML file + dotted CLI overrides -> validated ``TrainConfig``.

Section and knob names follow veRL where users know them. veRL's nesting is accepted as an
alias: ``actor_rollout_ref.actor.X`` -> ``actor.X``, ``actor_rollout_ref.rollout.X`` ->
``rollout.X``, ``actor_rollout_ref.ref.X`` -> ``ref.X``, ``trainer.total_epochs`` is not used
(training length is ``trainer.total_training_steps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from agentgym_jax import config_tree as ct
from agentgym_jax.config_tree import ConfigError
from agentgym_jax.rl.config import ActorConfig, AlgorithmConfig, CriticConfig
from agentgym_jax.sharding import MeshConfig

field = dataclasses.field


@dataclasses.dataclass
class ModelSection:
    path: str = "builtin:tiny-babyai"
    """Local HF model directory (config.json + safetensors), or ``builtin:tiny-babyai`` for the
  embedded demo model. Never a hub id: nothing is downloaded at run time."""
    tokenizer_path: str | None = None
    """Tokenizer directory; default: the model directory."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype (bfloat16 on TPU/GPU, float32 on CPU)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the trained parameters (master weights)."""
    remat: Literal["none", "full", "dots"] | bool = "none"
    """Recomputation in the backward pass, trading compute for activation memory: ``none``,
  ``full`` (each layer recomputed) or ``dots`` (keep the matmul outputs, recompute the rest).
  ``true`` / ``false`` mean full / none."""
    logits_chunk: int = 0
    """Positions per LM-head chunk in the update and log-prob passes: the [B, T, vocab] logits
  are never whole, and the backward pass recomputes each chunk (0 = no chunking). 1024 keeps a
  150k-vocabulary model's logits to a few hundred MB per sequence."""
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"
    """Attention kernel of the passes over whole sequences (update, log-probs): ``splash`` (TPU
  Pallas), ``cudnn`` (GPU), ``xla`` (any backend), ``auto`` = the one for the backend."""
    attn_q_block: int = 128
    """Query block of causal attention over whole sequences (update, log-probs): blocks only read
  keys up to their end, halving the work; 0 = one block."""
    use_remove_padding: bool = True
    """Run the update and log-prob passes on packed rows: several trajectories per row of the
  step's padded length, each attending only to itself (segment ids), instead of one row per
  trajectory padded to the longest. Same values and gradients (tested), fewer tokens computed.
  A pass that packing would not shrink by a quarter of its rows runs padded."""


@dataclasses.dataclass
class DataConfig:
    """Task batches and token budgets. Tasks are the env's ``env.train_split`` /
    ``env.test_split`` ids, in a seeded order reshuffled every epoch."""

    train_batch_size: int = 16
    """Tasks per training step; each is rolled out ``rollout.n`` times (GRPO groups)."""
    val_batch_size: int = 64
    """Held-out tasks per evaluation (test split)."""
    max_prompt_length: int = 1024
    """Longest initial prompt (instruction + first observation) in tokens; longer ones are cut."""
    max_response_length: int = 4096
    """Token budget after the prompt (model turns + env replies); an episode reaching it is
  truncated and counted in ``train/truncated_frac``."""
    seed: int = 0
    """Seed of the task order (reshuffled every epoch; the position is checkpointed)."""

    def __post_init__(self):
        for k in ("train_batch_size", "val_batch_size", "max_prompt_length", "max_response_length"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"data.{k} must be > 0, got {getattr(self, k)}")


@dataclasses.dataclass
class EnvSection:
    name: str = "babyai"
    """Registered env name (``agentgym-jax envs`` lists them)."""
    kwargs: dict = field(default_factory=dict)
    """Constructor arguments of the env (e.g. ``levels`` for BabyAI)."""
    num_workers: int = 2
    """Env worker processes; 0 runs envs in the trainer process (notebooks, debugging)."""
    step_timeout_s: float = 60.0
    """A step slower than this kills and restarts the worker; the episode ends with an error."""
    train_split: str = "train"
    test_split: str = "test"

    def __post_init__(self):
        if self.step_timeout_s <= 0:
            raise ConfigError(f"env.step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.num_workers < 0:
            raise ConfigError(f"env.num_workers must be >= 0, got {self.num_workers}")


@dataclasses.dataclass
class RolloutConfig:
    n: int = 8
    """Episodes per task (group size for GRPO / RLOO)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (> 0); ``actor.temperature`` follows it."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    max_tokens_per_turn: int = 200
    """A model turn stops at end-of-turn or after this many tokens."""
    unclosed_turn_score: float | None = None
    """None: a turn cut at max_tokens_per_turn goes to the env as is (AgentGym). A number: such a
  turn ends the episode with this score, so RL stops rewarding replies that never close
  (training rollouts only; evaluation always sends the turn to the env)."""
    num_slots: int = 0
    """Concurrent episodes in the engine (KV-cache slots); 0 = every episode of a training step at
  once. Evaluation runs its episodes through the same slots, refilling them as episodes end (a
  decode step costs the same for every slot, live or not, so spare slots would slow training)."""
    val_temperature: float = 0.0
    """Sampling temperature for evaluation (0 = greedy; the original's eval scripts sample at 1,
  top_p 1)."""
    val_n: int = 1
    """Episodes per held-out task during evaluation."""
    val_max_turns: int = 0
    """Turn limit of evaluation episodes; 0 = the largest training horizon (max of
  algorithm.rounds_ctrl.rounds). Set it to compare runs trained with different horizons."""
    val_max_tokens_per_turn: int = 0
    """Per-turn token limit of evaluation episodes; 0 = ``max_tokens_per_turn`` (the original
  evaluates with 200)."""
    seed: int = 0
    """Offsets the episodes' sampling streams from ``trainer.seed``: step k samples with
    ``mix_seed(trainer.seed, rollout.seed, 2k + eval)``. Change it to draw other episodes with the
    same task order and update RNG."""

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"rollout.n must be >= 1, got {self.n}")
        if self.temperature < 0 or self.val_temperature < 0:
            raise ConfigError("rollout.temperature / val_temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens_per_turn < 1 or self.val_max_tokens_per_turn < 0:
            raise ConfigError(
                "rollout.max_tokens_per_turn must be >= 1 and rollout.val_max_tokens_per_turn >= 0"
                f" (0 = as training); got {self.max_tokens_per_turn}, {self.val_max_tokens_per_turn}"
            )


@dataclasses.dataclass
class RoundsCtrl:
    type: Literal["fixed", "scaling_inter_stepwise"] = "fixed"
    """fixed: ``rounds[0]`` turns always. scaling_inter_stepwise (ScalingInter-RL): steps
  1..N use rounds[0], N+1..2N rounds[1], ..., the last value holds."""
    rounds: list[int] = field(default_factory=lambda: [20])
    steps_scaling_inter: int = 100
    """N above: training steps per horizon stage."""

    def __post_init__(self):
        from agentgym_jax.schedule import make_horizon

        # One validator for the horizon: the schedule itself.
        try:
            make_horizon(self)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"algorithm.{e}") from None


@dataclasses.dataclass
class AlgorithmSection(AlgorithmConfig):
    rounds_ctrl: RoundsCtrl = field(default_factory=RoundsCtrl)
    """Interaction horizon (max turns per episode) as a function of the training step."""


@dataclasses.dataclass
class RefSection:
    enable: bool = True
    """Keep a frozen reference policy (needed for the KL loss / KL in reward)."""


@dataclasses.dataclass
class TrainerSection:
    total_training_steps: int = 100
    """Total training steps; rerunning with a larger value on the same output dir continues."""
    output_dir: str = "runs/default"
    save_freq: int = 10
    """Checkpoint every k steps (and at the end, and on SIGTERM)."""
    max_to_keep: int | None = 3
    """Checkpoints kept (older ones are deleted); null keeps all."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest checkpoint in ``output_dir`` that loads, and stop with an
  error if checkpoints exist but none loads (e.g. model shapes changed). never: start at step 0
  and move the old checkpoints aside into ``checkpoints/old-<time>/`` (nothing is deleted)."""
    test_freq: int = 10
    """Evaluate on held-out tasks every k steps (0 = never; also at the start and end)."""
    val_before_train: bool = True
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    """Any of console, jsonl, tensorboard, wandb (offline unless WANDB_MODE is set)."""
    seed: int = 0
    """Seed of the run: episode sampling (with ``rollout.seed``) and mini-batch shuffles."""
    max_bad_steps: int = 3
    """Stop after this many consecutive non-finite (NaN/inf) losses or grads; each is skipped."""
    log_transcripts: int = 4
    """Episodes per step written to ``rollouts/step_*.json``."""
    async_checkpoint: bool = True
    plot: bool = True
    """Write ``curves.png`` at the end."""

    def __post_init__(self):
        bad = set(self.logger) - {"console", "jsonl", "tensorboard", "wandb"}
        if bad:
            raise ConfigError(
                f"trainer.logger: unknown {sorted(bad)}; allowed: console, jsonl, tensorboard, wandb"
            )
        if "wandb" in self.logger:
            import importlib.util

            from agentgym_jax.metrics import WANDB_MISSING

            # Fail at config load, not after the model is built.
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError(WANDB_MISSING)
        if self.total_training_steps < 0 or self.save_freq < 1:
            raise ConfigError(
                "trainer.total_training_steps must be >= 0 and trainer.save_freq >= 1"
            )
        if self.max_bad_steps < 1:
            raise ConfigError(f"trainer.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            # orbax would delete every checkpoint right after writing it.
            raise ConfigError(
                f"trainer.max_to_keep must be >= 1 (or null: keep all), got {self.max_to_keep}"
            )
        if self.resume not in ("auto", "never"):
            raise ConfigError(f"trainer.resume={self.resume!r}; allowed values: 'auto', 'never'")


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvSection = field(default_factory=EnvSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ref: RefSection = field(default_factory=RefSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    def __post_init__(self):
        seqs = self.data.train_batch_size * self.rollout.n
        if seqs % self.actor.ppo_mini_batch_size:
            raise ConfigError(
                f"actor.ppo_mini_batch_size={self.actor.ppo_mini_batch_size} must divide "
                f"data.train_batch_size * rollout.n = {seqs} (sequences per step)"
            )
        if self.uses_critic and seqs % self.critic.ppo_mini_batch_size:
            raise ConfigError(
                f"critic.ppo_mini_batch_size={self.critic.ppo_mini_batch_size} must divide {seqs}"
            )
        if self.algorithm.adv_estimator in ("grpo", "drgrpo", "rloo") and self.rollout.n < 2:
            raise ConfigError(
                f"algorithm.adv_estimator={self.algorithm.adv_estimator} needs rollout.n >= 2"
            )
        rc = self.algorithm.rounds_ctrl
        if not rc.rounds or any(r < 1 for r in rc.rounds):
            raise ConfigError("algorithm.rounds_ctrl.rounds must be a non-empty list of ints >= 1")
        r = self.rollout
        if r.val_max_turns < 0 or r.num_slots < 0 or r.val_n < 1:
            raise ConfigError(
                f"rollout: need val_max_turns >= 0, num_slots >= 0, val_n >= 1; got "
                f"{r.val_max_turns}, {r.num_slots}, {r.val_n}"
            )
        if self.model.logits_chunk < 0:
            raise ConfigError(
                f"model.logits_chunk must be >= 0 (0 = no chunking), got {self.model.logits_chunk}"
            )
        if self.model.attn_q_block < 0:
            raise ConfigError(
                f"model.attn_q_block must be >= 0 (0 = one block), got {self.model.attn_q_block}"
            )
        if (self.actor.use_kl_loss or self.algorithm.use_kl_in_reward) and not self.ref.enable:
            raise ConfigError("actor.use_kl_loss / algorithm.use_kl_in_reward need ref.enable=true")
        self._resolve_temperature()

    def _resolve_temperature(self):
        # Old-policy, reference and update log-probs must be the sampler's (as veRL's): one
        # temperature, rollout.temperature, for all of them.
        a, r = self.actor, self.rollout
        if r.temperature <= 0:
            raise ConfigError(
                f"rollout.temperature={r.temperature}: training samples need a temperature > 0 "
                "(the update's log-probs are the sampler's); for greedy evaluation set "
                "rollout.val_temperature=0"
            )
        if a._temperature_follows_rollout:
            a.temperature = r.temperature
        elif a.temperature != r.temperature:
            raise ConfigError(
                f"actor.temperature={a.temperature} differs from rollout.temperature="
                f"{r.temperature}: the update's log-probs must be those of the sampler; set only "
                "rollout.temperature (actor.temperature follows it)"
            )

    @property
    def uses_critic(self) -> bool:
        return self.algorithm.adv_estimator == "gae"


_ALIASES = {
    "actor_rollout_ref.actor.": "actor.",
    "actor_rollout_ref.rollout.": "rollout.",
    "actor_rollout_ref.ref.": "ref.",
    "actor_rollout_ref.model.path": "model.path",
    "trainer.total_steps": "trainer.total_training_steps",
    "trainer.default_local_dir": "trainer.output_dir",
}


def canonical_key(key: str) -> str:
    for old, new in _ALIASES.items():
        if key == old or key.startswith(old):
            return new + key[len(old) :]
    return key


def _apply_aliases(d: dict) -> dict:
    """Fold veRL's ``actor_rollout_ref: {actor, rollout, ref, model}`` nesting into our sections."""
    out = {k: v for k, v in d.items() if k != "actor_rollout_ref"}
    arr = d.get("actor_rollout_ref") or {}
    if not isinstance(arr, dict):
        raise ConfigError("actor_rollout_ref must be a mapping")
    for sub, v in arr.items():
        if sub not in ("actor", "rollout", "ref", "model"):
            raise ConfigError(
                f"unknown config key 'actor_rollout_ref.{sub}'; allowed: actor, rollout, ref, model"
            )
        out[sub] = ct.merge(out.get(sub) or {}, v or {})
    for old in ("trainer.total_steps", "trainer.default_local_dir"):
        sec, key = old.split(".")
        if key in out.get(sec, {}):
            out[sec] = dict(out[sec])
            out[sec][canonical_key(old).split(".")[1]] = out[sec].pop(key)
    return out


def _check_sections(d: Any, where: str) -> None:
    """Top-level sections are mappings (``trainer: 5`` is an error here, not a traceback later)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: the config must be a mapping of sections")
    sections = {f.name for f in dataclasses.fields(TrainConfig)} | {"actor_rollout_ref"}
    for k, v in d.items():
        if k in sections and not isinstance(v, dict):
            raise ConfigError(
                f"config section {k!r} must be a mapping of keys, got {type(v).__name__} {v!r}"
            )


def load_config(
    path: str | None = None, overrides: Sequence[str] = (), base: dict | None = None
) -> TrainConfig:
    """YAML (optional) + ``key=value`` overrides -> validated TrainConfig."""
    d: dict[str, Any] = dict(base or {})
    if path:
        loaded = ct.load_yaml(path)
        _check_sections(loaded, path)
        d = ct.merge(d, _apply_aliases(loaded))
    for o in overrides:
        keys, value = ct.parse_override(o)
        ct.set_dotted(d, canonical_key(".".join(keys)).split("."), value)
    _check_sections(d, "the overrides")
    # The cosine schedule needs the run length; default it from the trainer.
    steps = d.get("trainer", {}).get("total_training_steps")
    for sec in ("actor", "critic"):
        if d.get(sec, {}).get("lr_schedule") == "cosine" and "total_steps" not in d[sec]:
            d[sec]["total_steps"] = steps or TrainerSection.total_training_steps
    return ct.from_dict(TrainConfig, d)


def to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(ct.to_dict(cfg), sort_keys=False)
