"""A tiny random Qwen2 + locally built ChatML tokenizer in one HF directory (no hub)."""

from __future__ import annotations

from tests.helpers.chat import make_tokenizer


def make_agent_dir(path: str, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    """Random tiny Qwen2 whose vocab matches a local ChatML tokenizer; both saved to ``path``."""
    import torch
    import transformers

    tok = make_tokenizer("qwen")
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
