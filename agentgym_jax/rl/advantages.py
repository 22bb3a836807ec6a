"""Advantage estimators (GAE, GRPO / Dr.GRPO, RLOO, REINFORCE++ and its baseline variant).

Pure functions of [B, T] arrays aligned to ``input_ids``: ``mask`` is the loss mask (1 on the
model's own tokens). In a multi-turn trajectory the model's turns are separated by environment
turns (mask 0); those tokens are not time steps. Temporal estimators (GAE, REINFORCE++) walk the
model tokens only, so the value of the first token of the next model turn bootstraps the last
token of the previous one, and gamma discounts once per model token.

Reward credit: a reward sitting on a token with mask 0 (an env turn, or the final outcome placed
after the last model token) is credited, undiscounted, to the closest *preceding* model token:
the env's reply is the consequence of that action. The original (veRL / AgentGym-RL) multiplies
rewards by the mask and so drops such rewards. A reward before the first model token (in the
prompt) has no action to credit and is ignored.

Outcome estimators (GRPO, RLOO, REINFORCE++-baseline) take one score per sequence ([B]) and a
group id per sequence ([B], equal ids = samples of the same task); groups are formed with a
[B, B] equality matrix, so any integer ids work inside jit.

Env failures: ``valid`` ([B], 1 = usable, 0 = the env crashed / hung / broke protocol; default all
ones) leaves an episode out of everything: its group's mean, std and leave-one-out baseline, and
the batch whitening of the REINFORCE++ variants. Its advantage is 0. A failed episode's score says
nothing about the policy, so counting it as a sibling would bias the others' advantages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


# --------------------------------------------------------------------------------------------
# helpers


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x - mean) / sqrt(var + eps) over masked entries; var unbiased as veRL's ``masked_whiten``."""
    m = mask.astype(x.dtype)
    n = jnp.sum(m)
    mean = jnp.sum(x * m) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x - mean) * m) / jnp.maximum(n, 1.0)
    var = var * n / jnp.maximum(n - 1.0, 1.0)  # Bessel, as torch's masked_var(unbiased=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def _discounted_scan(rewards: Array, values: Array, mask: Array, gamma: float, lam: float):
    """Reverse scan over T: GAE over model tokens, env tokens skipped (see module doc)."""
    f32 = jnp.float32
    rewards, values, m = rewards.astype(f32), values.astype(f32), mask.astype(bool)
    b = rewards.shape[0]

    def step(carry, xs):
        next_v, next_adv, pending = carry
        r, v, mt = xs
        # Rewards on mask-0 tokens accumulate in `pending` until the preceding model token is met.
        delta = r + pending + gamma * next_v - v
        adv = delta + gamma * lam * next_adv
        carry = (
            jnp.where(mt, v, next_v),
            jnp.where(mt, adv, next_adv),
            jnp.where(mt, 0.0, pending + r),
        )
        return carry, jnp.where(mt, adv, 0.0)

    zeros = jnp.zeros((b,), f32)
    xs = (rewards.T, values.T, m.T)  # scan over time
    _, adv_t = jax.lax.scan(step, (zeros, zeros, zeros), xs, reverse=True)
    adv = adv_t.T
    returns = jnp.where(m, adv + values, 0.0)
    return adv, returns


# --------------------------------------------------------------------------------------------
# temporal estimators


def gae(
    rewards: Array,
    values: Array,
    mask: Array,
    gamma: float = 1.0,  # discount
    lam: float = 1.0,  # 1: discounted returns minus values; 0: one-step TD errors
    whiten: bool = True,
) -> tuple[Array, Array]:
    """Generalised advantage estimation over model tokens -> (advantages, returns), both [B, T].

    ``values[b, t]`` is V of the state in which token t is chosen (see ``losses`` for the shift).
    Returns are ``advantages + values`` before whitening; advantages are whitened over the masked
    tokens of the batch when ``whiten`` (veRL does). Both are 0 where mask == 0.
    """
    adv, ret = _discounted_scan(rewards, values, mask, gamma, lam)
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, ret


def discounted_returns(rewards: Array, mask: Array, gamma: float = 1.0) -> Array:
    """sum_k gamma^k r over the following model tokens (env-token rewards credited as above)."""
    _, ret = _discounted_scan(rewards, jnp.zeros_like(rewards, jnp.float32), mask, gamma, 1.0)
    return ret


def _row_mask(mask: Array, valid: Array | None) -> Array:
    """Token mask with the rows of invalid episodes zeroed."""
    m = mask.astype(jnp.float32)
    return m if valid is None else m * valid.astype(jnp.float32)[:, None]


def reinforce_pp(
    rewards: Array, mask: Array, gamma: float = 1.0, valid: Array | None = None
) -> tuple[Array, Array]:
    """REINFORCE++: discounted returns over model tokens, whitened over the batch's valid tokens
    (tokens of ``valid`` rows only). Returns (advantages, returns) like the other estimators.
    """
    m = _row_mask(mask, valid)
    ret = discounted_returns(rewards, m, gamma)
    return masked_whiten(ret, m), ret


# --------------------------------------------------------------------------------------------
# outcome (group) estimators


def _valid(scores: Array, valid: Array | None) -> Array:
    if valid is None:
        return jnp.ones(scores.shape, jnp.float32)
    return valid.astype(jnp.float32)


def _group_mean_std(scores: Array, group_ids: Array, valid: Array):
    """Per row: its group's valid-member count n, mean and unbiased std (invalid members out)."""
    s = scores.astype(jnp.float32)
    same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32) * valid[None, :]
    n = jnp.sum(same, axis=1)
    mean = same @ s / jnp.maximum(n, 1.0)
    # Unbiased (n - 1) std, as torch.std in veRL's compute_grpo_outcome_advantage.
    dev = s[None, :] - mean[:, None]
    var = jnp.sum(same * jnp.square(dev), axis=1) / jnp.maximum(n - 1.0, 1.0)
    return s, n, mean, jnp.sqrt(var)


def _broadcast(seq_adv: Array, mask: Array) -> Array:
    return seq_adv[:, None] * mask.astype(jnp.float32)


def _group_relative(a: Array, n: Array, v: Array, mask: Array) -> tuple[Array, Array]:
    """Per-sequence advantages ``a`` -> token level, zero where the group has fewer than two
    valid members or the row is invalid (no relative signal)."""
    adv = _broadcast(jnp.where((n > 1) & (v > 0), a, 0.0), mask)
    return adv, adv


def grpo(
    scores: Array,
    group_ids: Array,
    mask: Array,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    valid: Array | None = None,
) -> tuple[Array, Array]:
    """GRPO: (s - group mean) / (group std + eps), std unbiased (torch.std, as veRL).

    ``norm_by_std=False`` is Dr.GRPO (mean-centred only). A group with fewer than two valid
    members gets advantage 0 (veRL instead uses mean 0 / std 1 for a group of size 1, i.e. the raw
    score; a lone sample carries no relative signal), and so does an invalid row. Returns
    (advantages, returns) with returns = advantages, as veRL.
    """
    v = _valid(scores, valid)
    s, n, mean, std = _group_mean_std(scores, group_ids, v)
    a = s - mean
    if norm_by_std:
        a = a / (std + eps)
    return _group_relative(a, n, v, mask)


def rloo(
    scores: Array, group_ids: Array, mask: Array, valid: Array | None = None
) -> tuple[Array, Array]:
    """RLOO: s_i minus the mean of the other valid samples of its group; 0 for groups with fewer
    than two valid members and for invalid rows."""
    v = _valid(scores, valid)
    s, n, mean, _ = _group_mean_std(scores, group_ids, v)
    a = (s - mean) * n / jnp.maximum(n - 1.0, 1.0)  # = s_i - mean_{j != i} s_j (i valid)
    return _group_relative(a, n, v, mask)


def reinforce_pp_baseline(
    scores: Array, group_ids: Array, mask: Array, valid: Array | None = None
) -> tuple[Array, Array]:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the batch's valid tokens.

    A group with one valid member keeps its raw score before whitening (baseline 0), as veRL does
    for a group of size 1; the batch whitening still centres it. Invalid rows are left out of the
    whitening and get 0.
    """
    v = _valid(scores, valid)
    s, n, mean, _ = _group_mean_std(scores, group_ids, v)
    a = jnp.where(n > 1, s - mean, s)
    m = _row_mask(mask, v)
    adv = masked_whiten(_broadcast(a, m), m)
    return adv, adv


# --------------------------------------------------------------------------------------------
# KL in the reward


def kl_penalty(logp: Array, ref_logp: Array, kind: str = "kl") -> Array:
    """Per-token KL estimate between the sampling policy and the reference (veRL names).

    kl (k1): logp - ref; abs: |logp - ref|; mse (k2): 0.5 (logp - ref)^2;
    low_var_kl (k3): exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10] as veRL.
    """
    logp, ref_logp = logp.astype(jnp.float32), ref_logp.astype(jnp.float32)
    d = logp - ref_logp
    if kind in ("kl", "k1"):
        return d
    if kind == "abs":
        return jnp.abs(d)
    if kind in ("mse", "k2"):
        return 0.5 * jnp.square(d)
    if kind in ("low_var_kl", "k3"):
        kl = jnp.clip(-d, -20.0, 20.0)  # avoid exp overflow before veRL's clamp
        return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)
    raise ValueError(f"kl type {kind!r}: allowed kl, k1, abs, mse, k2, low_var_kl, k3")


def kl_in_reward(
    rewards: Array, logp: Array, ref_logp: Array, mask: Array, coef: float, kind: str = "kl"
) -> tuple[Array, Array]:
    """rewards - coef * KL on model tokens -> (new rewards, mean per-sequence KL [B])."""
    m = mask.astype(jnp.float32)
    kld = kl_penalty(logp, ref_logp, kind) * m
    seq_kl = jnp.sum(kld, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    return rewards.astype(jnp.float32) - coef * kld, seq_kl


class FixedKLController:
    """Constant KL coefficient (host side). ``value`` is the coefficient; it is the whole state."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps


class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller, as veRL's ``AdaptiveKLController``."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError("kl_ctrl: target_kl and horizon must be > 0")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target_kl), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


def make_kl_controller(cfg: Any) -> FixedKLController | AdaptiveKLController:
    """The controller for an ``algorithm.kl_ctrl`` config (type, kl_coef, target_kl, horizon)."""
    kind = _cfg(cfg, "type", "fixed")
    if kind == "fixed":
        return FixedKLController(_cfg(cfg, "kl_coef", 0.001))
    if kind == "adaptive":
        return AdaptiveKLController(
            _cfg(cfg, "kl_coef", 0.001), _cfg(cfg, "target_kl", 0.1), _cfg(cfg, "horizon", 10000)
        )
    raise ValueError(f"algorithm.kl_ctrl.type={kind!r}: allowed ['adaptive', 'fixed']")


# --------------------------------------------------------------------------------------------
# registry


def _cfg(cfg: Any, key: str, default):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _scores(batch: Mapping[str, Array]) -> Array:
    if "scores" in batch:
        return jnp.asarray(batch["scores"], jnp.float32)
    return jnp.sum(jnp.asarray(batch["rewards"], jnp.float32), axis=-1)


def _adv_gae(batch, cfg):
    return gae(
        batch["rewards"],
        batch["values"],
        _row_mask(batch["loss_mask"], batch.get("valid")),
        _cfg(cfg, "gamma", 1.0),
        _cfg(cfg, "lam", 1.0),
    )


def _adv_grpo(batch, cfg):
    return grpo(
        _scores(batch),
        batch["group_ids"],
        batch["loss_mask"],
        norm_by_std=_cfg(cfg, "norm_adv_by_std_in_grpo", True),
        valid=batch.get("valid"),
    )


def _adv_drgrpo(batch, cfg):
    del cfg
    return grpo(
        _scores(batch),
        batch["group_ids"],
        batch["loss_mask"],
        norm_by_std=False,
        valid=batch.get("valid"),
    )


def _adv_rloo(batch, cfg):
    del cfg
    return rloo(_scores(batch), batch["group_ids"], batch["loss_mask"], batch.get("valid"))


def _adv_rpp(batch, cfg):
    return reinforce_pp(
        batch["rewards"], batch["loss_mask"], _cfg(cfg, "gamma", 1.0), batch.get("valid")
    )


def _adv_rpp_baseline(batch, cfg):
    del cfg
    return reinforce_pp_baseline(
        _scores(batch), batch["group_ids"], batch["loss_mask"], batch.get("valid")
    )


AdvFn = Callable[[Mapping[str, Array], Any], tuple[Array, Array]]

ADV_ESTIMATORS: dict[str, AdvFn] = {
    "gae": _adv_gae,
    "grpo": _adv_grpo,
    "drgrpo": _adv_drgrpo,
    "rloo": _adv_rloo,
    "reinforce_plus_plus": _adv_rpp,
    "reinforce_plus_plus_baseline": _adv_rpp_baseline,
}

# Keys each estimator reads (besides loss_mask and the optional per-episode `valid`); outcome
# ones use `scores` or sum(rewards).
REQUIRED_KEYS = {
    "gae": ("rewards", "values"),
    "grpo": ("group_ids",),
    "drgrpo": ("group_ids",),
    "rloo": ("group_ids",),
    "reinforce_plus_plus": ("rewards",),
    "reinforce_plus_plus_baseline": ("group_ids",),
}


def compute_advantages(
    name: str, batch: Mapping[str, Any], cfg: Any = None, kl_coef: Any = None
) -> dict[str, Array]:
    """Advantages and returns for ``batch`` with the estimator registered as ``name``.

    ``cfg`` is an ``AlgorithmConfig`` (or a mapping with its keys). With ``use_kl_in_reward`` the
    token-level KL penalty (sampler ``old_logprobs`` vs ``ref_logprobs``) is subtracted from
    ``rewards`` first, and its per-sequence sum from ``scores`` (outcome estimators). Returns
    ``{"advantages", "returns"}`` plus ``"kl_in_reward"`` (per-sequence KL [B]) when used.
    ``batch["valid"]`` ([B], optional, default all ones) marks env failures (0): they are left
    out of group statistics and whitening and get advantage 0 (see the module doc).
    ``kl_coef`` (a number or a traced scalar: the KL controller's current value) overrides
    ``cfg.kl_ctrl.kl_coef``.
    """
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"algorithm.adv_estimator={name!r}: allowed {sorted(ADV_ESTIMATORS)}")
    need = ("loss_mask",) + REQUIRED_KEYS[name]
    outcome = name not in ("gae", "reinforce_plus_plus")
    if outcome and "scores" not in batch and "rewards" not in batch:
        need += ("scores",)
    missing = [k for k in need if k not in batch]
    if missing:
        raise KeyError(f"compute_advantages({name!r}): batch lacks {missing}")
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    out: dict[str, Array] = {}
    if _cfg(cfg, "use_kl_in_reward", False):
        if "rewards" not in batch:
            batch["rewards"] = jnp.zeros(batch["loss_mask"].shape, jnp.float32)
        new_r, seq_kl = kl_in_reward(
            batch["rewards"],
            batch["old_logprobs"],
            batch["ref_logprobs"],
            batch["loss_mask"],
            _cfg(_cfg(cfg, "kl_ctrl", None), "kl_coef", 0.001) if kl_coef is None else kl_coef,
            _cfg(cfg, "kl_penalty", "kl"),
        )
        if "scores" in batch:
            batch["scores"] = batch["scores"] + jnp.sum(new_r - batch["rewards"], axis=-1)
        batch["rewards"] = new_r
        out["kl_in_reward"] = seq_kl
    adv, ret = ADV_ESTIMATORS[name](batch, cfg)
    out["advantages"], out["returns"] = adv, ret
    return out
