"""Decoder models (Qwen2 / Qwen2.5 / Qwen3 / Llama 3.x), value-head critic, HF import / export."""

from agentgym_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from agentgym_jax.models.decoder import Critic, KVCache, Transformer, positions_from_mask
from agentgym_jax.models.hf_io import critic_from_pretrained, from_pretrained, save_pretrained
from agentgym_jax.models.loading import DTYPES, dtype_from_name, load_tokenizer, resolve_model_path

__all__ = [
    "DTYPES",
    "Critic",
    "KVCache",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "Transformer",
    "critic_from_pretrained",
    "dtype_from_name",
    "from_pretrained",
    "load_tokenizer",
    "positions_from_mask",
    "resolve_model_path",
    "save_pretrained",
]
