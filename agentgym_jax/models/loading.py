"""Where model weights come from and in what dtype: ``builtin:`` names, local directories, and
the dtype names used in configs. Nothing here downloads: weights load from local paths only."""

from __future__ import annotations

import os

import jax.numpy as jnp

BUILTIN_PREFIX = "builtin:"
ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_from_name(name: str):
    """``"float32"`` / ``"bfloat16"`` -> the jnp dtype (config values are names)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: allowed {sorted(DTYPES)}") from None


def builtin_models() -> list[str]:
    return sorted(os.listdir(ASSETS_DIR)) if os.path.isdir(ASSETS_DIR) else []


# Tokenizers saved as a plain ``tokenizer.json`` pipeline (no model-specific class).
_GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str):
    """The tokenizer of a local directory, as the model was trained with it.

    ``AutoTokenizer`` in transformers 5 picks the class of ``config.json``'s model type (a
    ``qwen2`` model gets ``Qwen2Tokenizer``) even when ``tokenizer_config.json`` names the
    generic fast tokenizer, and that class rebuilds the pipeline with its own pre-tokenizer:
    the same text then encodes to other ids than the model saw in training. A generic
    ``tokenizer_class`` therefore loads as itself; anything else goes through AutoTokenizer.
    """
    import json

    import transformers

    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            cls = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        cls = None
    if cls in _GENERIC_TOKENIZERS:
        return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve_model_path(path: str) -> str:
    """``builtin:NAME`` -> the embedded model directory; anything else must be a local dir."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        d = os.path.join(ASSETS_DIR, name)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"no embedded model {name!r}; available: {builtin_models()}")
        return d
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model.path={path!r} is not a local directory (weights load from local paths only; "
            "download a checkpoint first, e.g. with huggingface-cli, then point model.path at it)"
        )
    return path
