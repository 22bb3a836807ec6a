"""Typed configs for the RL core: algorithm (advantages, KL in reward), actor and critic updates.

Knob names follow veRL (``algorithm.*``, ``actor_rollout_ref.actor.*``, ``critic.*``) so recipes
read the same. Defaults are the AgentGym-RL paper's: GRPO, lr 1e-6, KL loss 0.001 low_var_kl,
entropy 0.001, clip 0.2, grad clip 1.0, gamma = lam = 1. Plain dataclasses, validated on
construction; errors name the key and the allowed values.
"""

from __future__ import annotations

import dataclasses

from agentgym_jax.rl.advantages import ADV_ESTIMATORS
from agentgym_jax.rl.losses import KL_TYPES, LOSS_AGG_MODES

LR_SCHEDULES = ("constant", "cosine")
KL_CTRL_TYPES = ("fixed", "adaptive")


def _fail(prefix: str, key: str, value, allowed: str):
    raise ValueError(f"{prefix}.{key}={value!r}: {allowed}")


def _positive(prefix, key, value, *, integer=False, allow_zero=False):
    ok_type = (
        isinstance(value, int) and not isinstance(value, bool)
        if integer
        else isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    ok = ok_type and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "an int" if integer else "a number"
        _fail(prefix, key, value, f"must be {kind} {'>= 0' if allow_zero else '> 0'}")


def _choice(prefix, key, value, allowed):
    if value not in allowed:
        _fail(prefix, key, value, f"allowed {list(allowed)}")


@dataclasses.dataclass
class KLCtrlConfig:
    """``algorithm.kl_ctrl.*``: the in-reward KL coefficient (used with ``use_kl_in_reward``)."""

    type: str = "fixed"
    """fixed: kl_coef throughout. adaptive: Ziegler et al.'s proportional controller moves the
    coefficient after every step toward target_kl (per-sequence KL), as veRL's."""
    kl_coef: float = 0.001
    """Initial (fixed: constant) coefficient."""
    target_kl: float = 0.1
    """adaptive: the per-sequence KL the controller steers toward."""
    horizon: int = 10000
    """adaptive: sequences over which a full correction is made (smaller moves faster)."""

    def __post_init__(self):
        p = "algorithm.kl_ctrl"
        _choice(p, "type", self.type, KL_CTRL_TYPES)
        _positive(p, "kl_coef", self.kl_coef, allow_zero=True)
        _positive(p, "target_kl", self.target_kl)
        _positive(p, "horizon", self.horizon, integer=True)


@dataclasses.dataclass
class AlgorithmConfig:
    """``algorithm.*``: advantage estimator and KL-in-reward."""

    adv_estimator: str = "grpo"
    """One of gae, grpo, drgrpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline."""
    gamma: float = 1.0
    """Discount per model token (GAE, REINFORCE++); env tokens are not steps."""
    lam: float = 1.0
    """GAE lambda."""
    norm_adv_by_std_in_grpo: bool = True
    """GRPO divides by the group std; False gives Dr.GRPO."""
    use_kl_in_reward: bool = False
    """Subtract kl_ctrl.kl_coef * KL(sampler || ref) per token from the reward before advantages."""
    kl_penalty: str = "kl"
    """KL estimator for the in-reward penalty: kl (k1), abs, mse (k2), low_var_kl (k3)."""
    kl_ctrl: KLCtrlConfig = dataclasses.field(default_factory=lambda: KLCtrlConfig())
    """The in-reward KL coefficient and how it moves (veRL's ``algorithm.kl_ctrl``)."""

    def __post_init__(self):
        p = "algorithm"
        _choice(p, "adv_estimator", self.adv_estimator, sorted(ADV_ESTIMATORS))
        for k in ("gamma", "lam"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                _fail(p, k, v, "must be a number in [0, 1]")
        _choice(p, "kl_penalty", self.kl_penalty, KL_TYPES)
        if isinstance(self.kl_ctrl, dict):  # built directly from a mapping
            self.kl_ctrl = KLCtrlConfig(**self.kl_ctrl)


@dataclasses.dataclass
class OptimConfig:
    """Fields shared by the actor and critic updates (optimizer, schedule, batching)."""

    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 0
    """Linear warmup over this many training steps (update calls), from lr/warmup_steps to lr."""
    lr_schedule: str = "constant"
    """constant | cosine (after warmup; cosine needs total_steps)."""
    total_steps: int | None = None
    """Training steps of the run; the cosine schedule decays to min_lr_ratio * lr at this step."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (veRL default 0.01)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (b1, b2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global-norm gradient clipping; a non-finite norm skips the optimizer step (as veRL)."""
    ppo_mini_batch_size: int = 64
    """Sequences per optimizer step (veRL counts prompts and multiplies by rollout.n; here it is
  already in sequences). The batch size must be a multiple."""
    ppo_micro_batch_size: int | None = None
    """Sequences per forward/backward (gradient accumulation); None = the mini-batch. Exact: the
  aggregation normaliser is the mini-batch's."""
    ppo_epochs: int = 1
    """Passes over the batch per training step."""
    loss_agg_mode: str = "token-mean"
    """token-mean | seq-mean-token-sum | seq-mean-token-mean."""
    shuffle: bool = True
    """Shuffle sequences into mini-batches each epoch (jax PRNG)."""

    def _validate_optim(self, p: str):
        _positive(p, "lr", self.lr, allow_zero=True)
        _positive(p, "warmup_steps", self.warmup_steps, integer=True, allow_zero=True)
        _choice(p, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.lr_schedule == "cosine":
            if self.total_steps is None:
                _fail(
                    p,
                    "total_steps",
                    None,
                    "required (an int > warmup_steps) when lr_schedule=cosine",
                )
            _positive(p, "total_steps", self.total_steps, integer=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail(p, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _positive(p, "weight_decay", self.weight_decay, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail(p, "betas", self.betas, "must be two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)
        _positive(p, "eps", self.eps)
        _positive(p, "grad_clip", self.grad_clip)
        _positive(p, "ppo_mini_batch_size", self.ppo_mini_batch_size, integer=True)
        if self.ppo_micro_batch_size is not None:
            _positive(p, "ppo_micro_batch_size", self.ppo_micro_batch_size, integer=True)
            if self.ppo_mini_batch_size % self.ppo_micro_batch_size:
                _fail(
                    p,
                    "ppo_micro_batch_size",
                    self.ppo_micro_batch_size,
                    f"must divide ppo_mini_batch_size={self.ppo_mini_batch_size}",
                )
        _positive(p, "ppo_epochs", self.ppo_epochs, integer=True)
        _choice(p, "loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)

    @property
    def micro_batch_size(self) -> int:
        return self.ppo_micro_batch_size or self.ppo_mini_batch_size


@dataclasses.dataclass
class ActorConfig(OptimConfig):
    """``actor_rollout_ref.actor.*``: the policy update."""

    clip_ratio_low: float = 0.2
    """PPO ratio clip below: ratio >= 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.2
    """PPO ratio clip above: ratio <= 1 + clip_ratio_high (DAPO clip-higher: e.g. 0.28)."""
    clip_ratio_c: float | None = 3.0
    """Dual-clip bound for negative advantages (> 1); None disables dual clip."""
    entropy_coeff: float = 0.001
    """Entropy bonus coefficient (loss -= coeff * entropy)."""
    use_kl_loss: bool = True
    """Add kl_loss_coef * KL(policy || ref) to the loss (needs ref_logprobs in the batch)."""
    kl_loss_coef: float = 0.001
    """Coefficient of the KL loss."""
    kl_loss_type: str = "low_var_kl"
    """kl (k1) | abs | mse (k2) | low_var_kl (k3, clamped to [-10, 10])."""
    temperature: float | None = None
    """Logits are divided by it before log-probs. None (default): the sampler's, i.e.
  ``rollout.temperature`` in a TrainConfig (which refuses any other value), 1.0 alone."""
    old_logprobs: str = "recompute"
    """Where the PPO ratio's behaviour log-probs come from. ``recompute`` (veRL's default): one
  more forward pass of the actor over the batch before the update. ``rollout``: the sampler's own
  log-probs of the tokens it drew (full softmax at the rollout temperature), which skips that
  pass. Safe when sampler and trainer compute the same numbers (this engine in float32 runs the
  trainer's model code: ``train/logprob_mismatch`` ~1e-7 on the demo); keep ``recompute`` when
  rollout numerics differ (bf16 decode vs float32 training, another engine)."""

    def __post_init__(self):
        p = "actor"
        self._validate_optim(p)
        _choice(p, "old_logprobs", self.old_logprobs, ("recompute", "rollout"))
        if (
            not isinstance(self.clip_ratio_low, (int, float))
            or not 0.0 <= self.clip_ratio_low < 1.0
        ):
            _fail(p, "clip_ratio_low", self.clip_ratio_low, "must be a number in [0, 1)")
        _positive(p, "clip_ratio_high", self.clip_ratio_high, allow_zero=True)
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            _fail(p, "clip_ratio_c", self.clip_ratio_c, "must be > 1 or None (dual clip off)")
        _positive(p, "entropy_coeff", self.entropy_coeff, allow_zero=True)
        _positive(p, "kl_loss_coef", self.kl_loss_coef, allow_zero=True)
        _choice(p, "kl_loss_type", self.kl_loss_type, KL_TYPES)
        # Not a field: to_dict / to_yaml write the resolved temperature.
        self._temperature_follows_rollout = self.temperature is None
        if self.temperature is None:
            self.temperature = 1.0
        _positive(p, "temperature", self.temperature)


@dataclasses.dataclass
class CriticConfig(OptimConfig):
    """``critic.*``: the value-model update (GAE only)."""

    lr: float = 1e-5
    """Peak learning rate (AdamW); veRL's critic default."""
    cliprange_value: float = 0.5
    """Value clip around the rollout-time values."""

    def __post_init__(self):
        self._validate_optim("critic")
        _positive("critic", "cliprange_value", self.cliprange_value)
