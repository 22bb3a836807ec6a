"""A tiny random Qwen2 + locally built ChatML tokenizer in one HF directory (no hub)."""

from __future__ import annotations

import importlib.util
import os

_here = os.path.dirname(__file__)


def _chat_fixtures():
  spec = importlib.util.spec_from_file_location("chat_fixtures", os.path.join(_here, "engine", "chat_fixtures.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def make_agent_dir(path: str, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
  """Random tiny Qwen2 whose vocab matches a local ChatML tokenizer; both saved to ``path``."""
  import torch
  import transformers

  tok = _chat_fixtures().make_tokenizer("qwen")
  torch.manual_seed(seed)
  cfg = transformers.Qwen2Config(
      vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
      tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
      pad_token_id=tok.pad_token_id,
  )
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
  tok.save_pretrained(path)
  return path
