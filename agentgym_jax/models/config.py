"""Architecture config for the decoder family (Qwen2 / Qwen2.5 / Qwen3 / Llama 3.x).

Read from a HF ``config.json``. Both config dialects are understood: published checkpoints
(``rope_theta`` / ``rope_scaling``) and what transformers >= 5 writes (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """Llama-3 style rope scaling dict (``rope_type: llama3``), or None."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2 has it; Llama and Qwen3 do not)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """The rest of the original config.json, written back verbatim on export."""

    def __hash__(self) -> int:
        # Configs ride in jit static args (the NNX graphdef); list/dict fields need a stable hash.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        return hash(json.dumps(d, sort_keys=True, default=str))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {mt!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        n_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // n_heads
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        if scaling is None and rope.get("rope_type", "default") not in ("default", None):
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype in ("default", None):
                scaling = None
            elif rtype != "llama3":
                raise ValueError(
                    f"unsupported rope scaling type {rtype!r}; supported: 'llama3' (or none)"
                )
        if mt == "qwen2":
            attn_bias = True
        else:
            attn_bias = bool(d.get("attention_bias", False))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            model_type=mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attn_bias,
            qk_norm=(mt == "qwen3"),
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        cfg_path = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(
                f"no config.json in {path!r}: expected a local HF model directory"
            )
        with open(cfg_path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.hf_extra)
        arch = {
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "llama": "LlamaForCausalLM",
        }
        d.update(
            model_type=self.model_type,
            architectures=[arch[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        d.pop("rope_parameters", None)
        if self.model_type != "qwen2":
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        return d
