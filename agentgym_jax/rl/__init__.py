"""RL core: advantage estimators, PPO-family losses, jitted actor / critic updates, configs."""

from agentgym_jax.rl.advantages import (
    ADV_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    discounted_returns,
    gae,
    grpo,
    kl_in_reward,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from agentgym_jax.rl.config import (
    ActorConfig,
    AlgorithmConfig,
    CriticConfig,
    KLCtrlConfig,
    OptimConfig,
)
from agentgym_jax.rl.losses import (
    LOSS_AGG_MODES,
    agg_loss,
    agg_weights,
    entropy_from_logits,
    explained_variance,
    kl_loss,
    policy_loss,
    policy_loss_terms,
    sequence_logprobs,
    shift_right,
    token_logprobs,
    value_loss,
)
from agentgym_jax.rl.update import (
    TrainState,
    compute_logprobs,
    compute_values,
    init_train_state,
    make_actor_update,
    make_critic_update,
    make_optimizer,
    train_state_shardings,
)

__all__ = [n for n in dir() if not n.startswith("_")]
