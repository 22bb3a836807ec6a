"""Sampler engine: slot KV cache, batched prefill / append (multi-turn), jitted decode loop,
per-slot sampling, chat-template deltas and a JetStream-style adapter."""

from agentgym_jax.engine.chat import ChatDeltas
from agentgym_jax.engine.engine import Engine, EngineConfig, SlotFullError, TurnResult
from agentgym_jax.engine.generate import generate
from agentgym_jax.engine.jetstream_adapter import JetStreamAdapter
from agentgym_jax.engine.jetstream_api import JetStreamEngine
from agentgym_jax.engine.sampling import SamplingParams, sample

__all__ = [
    "ChatDeltas",
    "JetStreamAdapter",
    "JetStreamEngine",
    "Engine",
    "EngineConfig",
    "SamplingParams",
    "SlotFullError",
    "TurnResult",
    "generate",
    "sample",
]
