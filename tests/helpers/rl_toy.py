"""Tiny model and synthetic multi-turn batches shared by the RL tests."""

from __future__ import annotations

import numpy as np
from flax import nnx

from agentgym_jax.models import Critic, ModelConfig, Transformer
from tests.helpers.hf import tiny_config_dict

TINY = ModelConfig(
    **tiny_config_dict(vocab=128, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8),
    model_type="qwen2",
    attention_bias=True,
)


def tiny_model(seed: int = 0, critic: bool = False):
    m = Transformer(TINY, rngs=nnx.Rngs(seed))
    return Critic(m, rngs=nnx.Rngs(seed + 1)) if critic else m


def multiturn_masks(rng: np.random.Generator, b: int, t: int):
    """attention_mask / loss_mask for right-padded episodes: prompt, then model and env turns."""
    attn = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    for i in range(b):
        length = int(rng.integers(t // 2, t + 1))
        attn[i, :length] = 1
        pos = int(rng.integers(2, 5))  # prompt
        model_turn = True
        while pos < length:
            n = int(rng.integers(1, 5))
            if model_turn:
                loss[i, pos : min(pos + n, length)] = 1
            pos += n
            model_turn = not model_turn
    return attn, loss


def make_batch(seed: int, b: int = 8, t: int = 24, n_groups: int = 2, vocab: int = TINY.vocab_size):
    rng = np.random.default_rng(seed)
    attn, loss = multiturn_masks(rng, b, t)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32) * attn
    scores = rng.normal(size=b).astype(np.float32)
    rewards = np.zeros((b, t), np.float32)
    last = attn.sum(1) - 1
    rewards[np.arange(b), last] = scores
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "old_logprobs": (rng.normal(size=(b, t)) * 0.1 - 4.8).astype(np.float32) * loss,
        "ref_logprobs": (rng.normal(size=(b, t)) * 0.1 - 4.8).astype(np.float32) * loss,
        "advantages": rng.normal(size=(b, t)).astype(np.float32) * loss,
        "values": rng.normal(size=(b, t)).astype(np.float32) * loss,
        "returns": rng.normal(size=(b, t)).astype(np.float32) * loss,
        "rewards": rewards,
        "scores": scores,
        "group_ids": np.repeat(np.arange(n_groups), b // n_groups).astype(np.int32),
    }
