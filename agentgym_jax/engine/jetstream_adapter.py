"""JetStream's Engine interface (prefill / insert / generate) as a thin layer over ``Engine``.

The ``Engine`` supplies everything device-side: the split model and its (mesh-sharded) params,
the slot-state layout and shardings, the compile counter and the pure slot functions of
``core``. The adapter only re-cuts them into JetStream's calls:

* ``prefill`` = ``core.extend`` of one prompt into a 1-slot state (the prefix): all but the last
  prompt token are encoded, the last stays pending, exactly as ``Engine.prefill`` does.
* ``insert`` copies the prefix into a slot of the decode state.
* ``generate`` = ``core.decode_step``: one token for every inserted slot, so the first token of
  a request comes from the first ``generate`` after its ``insert`` (JetStream 0.2.2's contract).

Stopping (eos, length) is the orchestrator's job, as in JetStream. google-jetstream imports
TensorFlow, so it is an optional extra and never imported here unless asked
(``register_with_jetstream``); ``jetstream_api`` holds the interface as typed Protocols.
"""

from __future__ import annotations

import sys
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from agentgym_jax.engine import core
from agentgym_jax.engine.engine import Engine, EngineConfig
from agentgym_jax.engine.jetstream_api import SlotData
from agentgym_jax.engine.sampling import SamplingParams
from agentgym_jax.models.decoder import Transformer
from agentgym_jax.seeding import mix_seed

Prefix = core.SlotState
"""A prefilled prompt: a 1-slot state whose cache is as long as the padded prompt."""


@flax.struct.dataclass
class ResultTokens:
    """Same layout as jetstream's: data [slots, 3] = (token, valid, length) columns."""

    data: Any
    tokens_idx: tuple = flax.struct.field(pytree_node=False, default=(0, 1))
    valid_idx: tuple = flax.struct.field(pytree_node=False, default=(1, 2))
    length_idx: tuple = flax.struct.field(pytree_node=False, default=(2, 3))
    samples_per_slot: int = flax.struct.field(pytree_node=False, default=1)

    def convert_to_numpy(self) -> ResultTokens:
        return self.replace(data=np.asarray(self.data))

    def copy_to_host_async(self) -> None:
        if not isinstance(self.data, np.ndarray):
            self.data.copy_to_host_async()

    def get_result_at_slot(self, slot: int) -> SlotData:
        rows = self.data[slot : slot + 1]
        return SlotData(tokens=rows[:, 0:1], valid=rows[:, 1:2], lengths=rows[:, 2])


@flax.struct.dataclass
class DecodeState:
    slots: core.SlotState
    active: jax.Array  # [S] bool
    generated: jax.Array  # [S] int32 tokens produced so far
    sampling: SamplingParams


class IdTokenizer:
    """JetStream's Tokenizer interface for token-id requests; text only via an HF tokenizer.

    JetStream's orchestrator prepends ``bos_id`` to requests without a history, and stops a
    request at any of ``stop_tokens`` (default: eos).
    """

    def __init__(self, hf_tokenizer=None, *, bos_id=None, eos_id=None, pad_id=0, stop_ids=None):
        self._hf = hf_tokenizer
        hf = hf_tokenizer
        self.bos_id = bos_id if bos_id is not None or hf is None else hf.bos_token_id
        self.eos_id = eos_id if eos_id is not None or hf is None else hf.eos_token_id
        self.pad_id = pad_id
        stop = {self.eos_id} if stop_ids is None else set(stop_ids)
        self.stop_tokens = {int(t) for t in stop if t is not None}

    def encode(self, s: str, *, is_bos=True, max_prefill_length=None, jax_padding=True, **_):
        if self._hf is None:
            raise ValueError("IdTokenizer.encode needs an HF tokenizer; send token ids instead")
        ids = list(self._hf.encode(s, add_special_tokens=False))
        if is_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        n, cap = len(ids), max_prefill_length or max(len(ids), 1)
        bucket = 16
        while bucket < min(n, cap):
            bucket *= 2
        bucket = min(bucket, cap)
        if n > bucket:
            raise ValueError(f"prompt of {n} tokens > max_prefill_length {bucket}")
        out = np.full((bucket,), self.pad_id, np.int32)
        out[:n] = ids
        return (jnp.asarray(out) if jax_padding else out), n

    def decode(self, token_ids, **_) -> str:
        ids = [int(t) for t in token_ids]
        return self._hf.decode(ids) if self._hf is not None else " ".join(map(str, ids))


def register_with_jetstream():
    """Make the adapter and its ResultTokens instances of jetstream's ABCs (its orchestrator
    routes results by ``isinstance(x, ResultTokens)``). Imports jetstream, hence TensorFlow."""
    from jetstream.engine import engine_api  # optional extra: agentgym-jax[jetstream]

    engine_api.Engine.register(JetStreamAdapter)
    engine_api.ResultTokens.register(ResultTokens)
    return engine_api


def _register_if_loaded():
    if "jetstream.engine.engine_api" in sys.modules:
        register_with_jetstream()


class JetStreamAdapter:
    """``prefill`` / ``insert`` / ``generate`` with ``max_concurrent_decodes`` = num_slots.

    ``JetStreamAdapter(model, config, mesh)`` builds a private ``Engine`` (whose own slot state
    is dropped: the decode state lives with the caller); ``JetStreamAdapter(engine)`` shares an
    existing engine's params, layout and compile counter. Sampling settings apply to all slots.
    """

    def __init__(
        self,
        model_or_engine: Transformer | Engine,
        config: EngineConfig | None = None,
        mesh: Mesh | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        tokenizer: IdTokenizer | None = None,
    ):
        if isinstance(model_or_engine, Engine):
            if config is not None or mesh is not None:
                raise ValueError("JetStreamAdapter(engine): config and mesh come from the engine")
            engine = model_or_engine
        else:
            if config is None:
                raise ValueError("JetStreamAdapter(model, config): config is required")
            engine = Engine(model_or_engine, config, mesh)
            engine.state = None  # free its slot cache: unused here
        self.engine = engine
        self.tokenizer = tokenizer or IdTokenizer()
        self._sampling = (float(temperature), float(top_p), int(top_k))
        self._prefills = 0
        self._build_jits()
        _register_if_loaded()

    def _build_jits(self):
        e, g, counted = self.engine, self.engine.graphdef, self.engine.count_compiles

        @counted
        def prefill(params, tokens, true_length, seed):
            model = nnx.merge(g, params)
            one = lambda x, dtype=jnp.int32: jnp.reshape(x, (1,)).astype(dtype)
            last = true_length - 1
            return core.extend(
                model,
                e.new_slot_state(1, tokens.shape[0]),
                slot_ids=one(0),
                tokens=tokens[None],
                start=one(0),
                count=one(last),
                pending=one(tokens[last]),
                seeds=one(seed, jnp.uint32),
                new_rng=one(True, bool),
            )

        @counted
        def insert(prefix, state, slot):
            s, z = state.slots, jnp.int32(0)
            cache = jax.tree.map(
                lambda c, p: jax.lax.dynamic_update_slice(c, p.astype(c.dtype), (z, slot, z, z, z)),
                s.cache,
                prefix.cache,
            )
            slots = core.SlotState(
                cache=cache,
                length=s.length.at[slot].set(prefix.length[0]),
                pending=s.pending.at[slot].set(prefix.pending[0]),
                rng=s.rng.at[slot].set(prefix.rng[0]),
            )
            return state.replace(
                slots=slots,
                active=state.active.at[slot].set(True),
                generated=state.generated.at[slot].set(0),
            )

        @counted
        def generate(params, state):
            model = nnx.merge(g, params)
            slots, tok, _, _ = core.decode_step(model, state.slots, state.active, state.sampling)
            generated = state.generated + state.active.astype(jnp.int32)
            cols = (tok, state.active, generated)
            result = ResultTokens(jnp.stack([c.astype(jnp.int32) for c in cols], -1))
            # A full slot stops producing (its next token would not fit).
            active = state.active & (slots.length + 1 < slots.cache.max_len)
            return state.replace(slots=slots, active=active, generated=generated), result

        @counted
        def free(state, slot):
            return state.replace(active=state.active.at[slot].set(False))

        per_slot = e.state_sharding.length
        so = DecodeState(
            slots=e.state_sharding,
            active=per_slot,
            generated=per_slot,
            sampling=SamplingParams(per_slot, per_slot, per_slot),
        )
        self._decode_sharding = so
        # The sharding specs do not depend on the prompt length, so one serves every bucket.
        self._prefix_sharding = e.slot_state_sharding(1, self.max_prefill_length)
        self._prefill = jax.jit(prefill, out_shardings=self._prefix_sharding)
        self._insert = jax.jit(insert, donate_argnums=1, out_shardings=so)
        self._generate = jax.jit(generate, donate_argnums=1, out_shardings=(so, None))
        self._free = jax.jit(free, donate_argnums=0, out_shardings=so)

    @property
    def num_compiles(self) -> int:
        """Traces so far (the engine's counter: shared when built over an existing engine)."""
        return self.engine.num_compiles

    # ---- JetStream Engine API ----
    def load_params(self, *args, **kwargs):
        return self.engine.params

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        _register_if_loaded()
        s = self.engine.config.num_slots
        state = DecodeState(
            slots=self.engine.new_slot_state(),
            active=jnp.zeros((s,), bool),
            generated=jnp.zeros((s,), jnp.int32),
            sampling=SamplingParams.full(s, *self._sampling),
        )
        return jax.device_put(state, self._decode_sharding)

    def prefill(
        self,
        *,
        params,
        existing_prefix: Prefix | None = None,
        padded_tokens,
        true_length: int,
        rng: int | None = None,
    ) -> Prefix:
        """Encode one padded prompt. ``rng``: the request's seed (default: the engine's
        ``mix_seed(config.seed, n)`` for the n-th prefill, as ``Engine.prefill`` derives it)."""
        if existing_prefix is not None:
            raise NotImplementedError("prefill with existing_prefix: use Engine.append")
        tokens = jnp.asarray(padded_tokens, jnp.int32).reshape(-1)
        if not 0 < true_length <= tokens.shape[0] <= self.engine.config.max_len:
            raise ValueError(
                f"prefill: need 0 < true_length={true_length} <= padded length "
                f"{tokens.shape[0]} <= max_len {self.engine.config.max_len}"
            )
        seed = mix_seed(self.engine.config.seed, self._prefills) if rng is None else int(rng)
        self._prefills += 1
        return self._prefill(params, tokens, jnp.int32(true_length), jnp.uint32(seed & 0xFFFFFFFF))

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        return self._insert(prefix, decode_state, jnp.int32(slot))

    def generate(self, params, decode_state: DecodeState) -> tuple[DecodeState, ResultTokens]:
        return self._generate(params, decode_state)

    def free_resource(self, slot: int, decode_state: DecodeState | None = None):
        """Deactivates ``slot``; returns the new decode state when one is given."""
        return None if decode_state is None else self._free(decode_state, jnp.int32(slot))

    def get_prefix_destination_sharding(self) -> Any:
        return self._prefix_sharding

    def get_tokenizer(self) -> IdTokenizer:
        return self.tokenizer

    def build_tokenizer(self, metadata) -> IdTokenizer:
        return metadata if isinstance(metadata, IdTokenizer) else self.tokenizer

    @property
    def max_concurrent_decodes(self) -> int:
        return self.engine.config.num_slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self.engine.config.buckets()[-1]

    @property
    def mesh(self):
        return self.engine.mesh

    @property
    def colocated_cpus(self):
        return None
