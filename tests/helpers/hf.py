"""Tiny random HF models built locally with transformers (torch CPU): no hub access."""

from __future__ import annotations

import numpy as np

# The llama3 rope scaling of Llama 3.1, with a small original context so it matters at test lengths.
LLAMA3_SCALING = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def tiny_config_dict(
    *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int | None = None, **extra
):
    """HF config keys (also ``ModelConfig`` fields) of a tiny model with a 2 x hidden MLP.

    ``kv_heads=None`` leaves ``num_key_value_heads`` out (the model's default: ``heads``).
    """
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    if kv_heads is not None:
        cfg["num_key_value_heads"] = kv_heads
    return dict(cfg, **extra)


TINY = dict(
    tiny_config_dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2),
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def make_hf_model(kind: str, path: str, *, tie: bool = False, seed: int = 0, **overrides):
    """Create and save a tiny random ``qwen2`` / ``qwen3`` / ``llama`` model; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(TINY, tie_word_embeddings=tie, **overrides)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=10000.0, **kw)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=32, rope_theta=1000000.0, **kw)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), **kw)
    else:
        raise ValueError(kind)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # Random init of norms/biases is ones/zeros; perturb so parity really checks them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def left_padded_batch(vocab: int, lengths, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = rng.integers(1, vocab, n)
        mask[i, t - n :] = 1
    return ids, mask
