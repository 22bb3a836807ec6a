"""JetStream-style Engine interface (prefill / insert / generate) over the same slot code.

Duck-typed against ``jetstream.engine.engine_api.Engine``: google-jetstream pulls tensorflow, so
it is an optional extra and is imported only if present (then the adapter is registered as a
virtual subclass and returns jetstream's own ``ResultTokens``).

The decode state is the engine's ``SlotState`` plus per-slot activity, generated-token counts and
sampling settings. ``prefill`` encodes one padded prompt into a standalone cache (the prefix)
and samples its first token; ``insert`` copies the prefix into a slot; ``generate`` is
``core.decode_step``: one token for every inserted slot. Stopping (eos, length) is the
orchestrator's job, as in JetStream; ``free_resource`` deactivates a slot.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from agentgym_jax import sharding as shd
from agentgym_jax.engine import core
from agentgym_jax.engine.engine import EngineConfig
from agentgym_jax.engine.sampling import SamplingParams, sample, split_keys
from agentgym_jax.models.decoder import KVCache, Transformer


def _engine_api():
    try:
        from jetstream.engine import engine_api  # optional extra: agentgym-jax[jetstream]
    except ImportError:
        return None
    return engine_api


@flax.struct.dataclass
class ResultTokens:
    """Same layout as jetstream's: data [batch, 3] = (token, valid, length) columns."""

    data: Any
    tokens_idx: tuple = flax.struct.field(pytree_node=False, default=(0, 1))
    valid_idx: tuple = flax.struct.field(pytree_node=False, default=(1, 2))
    length_idx: tuple = flax.struct.field(pytree_node=False, default=(2, 3))
    samples_per_slot: int = flax.struct.field(pytree_node=False, default=1)

    def convert_to_numpy(self) -> ResultTokens:
        return self.replace(data=np.asarray(self.data))

    def copy_to_host_async(self):
        if not isinstance(self.data, np.ndarray):
            self.data.copy_to_host_async()

    def get_result_at_slot(self, slot: int):
        row = self.data[slot]
        return dict(tokens=row[None, 0:1], valid=row[None, 1:2], lengths=row[None, 2])


@flax.struct.dataclass
class Prefix:
    cache: KVCache  # [layers, 1, T, kv_heads, head_dim]
    length: jax.Array  # [] tokens encoded
    first_token: jax.Array  # [] sampled from the last prompt position (the slot's pending token)
    rng: jax.Array  # [2] uint32


@flax.struct.dataclass
class DecodeState:
    slots: core.SlotState
    active: jax.Array  # [S] bool
    generated: jax.Array  # [S] int32 tokens produced so far (first token included)
    sampling: SamplingParams


def _result(tokens, valid, lengths):
    data = jnp.stack(
        [tokens.astype(jnp.int32), valid.astype(jnp.int32), lengths.astype(jnp.int32)], -1
    )
    api = _engine_api()
    if api is not None:
        return api.ResultTokens(data, (0, 1), (1, 2), (2, 3), 1)
    return ResultTokens(data)


class JetStreamAdapter:
    """``prefill`` / ``insert`` / ``generate`` with ``max_concurrent_decodes`` = num_slots."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig,
        mesh: Mesh | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ):
        config.validate()
        self.config, self._mesh = config, mesh
        self.graphdef, self.params = nnx.split(model)
        self._cfg, self._dtype = model.config, config.cache_dtype or model.dtype
        self._sampling = (temperature, top_p, top_k)
        self.num_compiles = 0
        g = self.graphdef

        def counted(fn):
            @functools.wraps(fn)
            def wrapper(*a):
                self.num_compiles += 1
                return fn(*a)

            return wrapper

        @counted
        def prefill(params, tokens, true_length, seed):
            model = nnx.merge(g, params)
            t = tokens.shape[0]
            cache = KVCache.zeros(self._cfg, 1, t, self._dtype)
            logits, cache = model(tokens[None], cache=cache, cache_index=jnp.zeros((1,), jnp.int32))
            raw = jax.random.key_data(jax.random.fold_in(jax.random.key(0), seed))[None]
            raw, keys = split_keys(raw)
            temp, tp, tk = self._sampling
            tok, _, _ = sample(
                logits[:, true_length - 1], keys, SamplingParams.full(1, temp, tp, tk)
            )
            prefix = Prefix(cache, true_length, tok[0], raw[0])
            return prefix, _result(tok, jnp.ones((1,), bool), jnp.ones((1,), jnp.int32))

        @counted
        def insert(prefix, state, slot):
            s = state.slots
            z = jnp.int32(0)
            cache = jax.tree.map(
                lambda c, p: jax.lax.dynamic_update_slice(c, p.astype(c.dtype), (slot, z, z, z)),
                s.cache,
                prefix.cache,
            )
            slots = core.SlotState(
                cache=cache,
                length=s.length.at[slot].set(prefix.length),
                pending=s.pending.at[slot].set(prefix.first_token),
                rng=s.rng.at[slot].set(prefix.rng),
            )
            return state.replace(
                slots=slots,
                active=state.active.at[slot].set(True),
                generated=state.generated.at[slot].set(1),
            )

        @counted
        def generate(params, state):
            model = nnx.merge(g, params)
            slots, tok, _, _ = core.decode_step(model, state.slots, state.active, state.sampling)
            generated = state.generated + state.active.astype(jnp.int32)
            result = _result(tok, state.active, generated)
            # A full slot stops producing (its next token would not fit).
            active = state.active & (slots.length + 1 < slots.cache.max_len)
            return state.replace(slots=slots, active=active, generated=generated), result

        @counted
        def free(state, slot):
            return state.replace(active=state.active.at[slot].set(False))

        # Explicit state shardings: the first (uncommitted) state and later ones share one compile.
        so = self._state_shardings()
        self._prefill = jax.jit(prefill)
        self._insert = jax.jit(insert, donate_argnums=1, out_shardings=so)
        self._generate = jax.jit(generate, donate_argnums=1, out_shardings=(so, None))
        self._free = jax.jit(free, donate_argnums=0, out_shardings=so)
        self._seed = 0

    def _state_shardings(self):
        abstract = jax.eval_shape(self._new_state)
        if self._mesh is None:
            dev = sorted(jax.tree.leaves(self.params)[0].devices(), key=lambda d: d.id)[:1]
            rep = NamedSharding(Mesh(np.asarray(dev), ("x",)), P())
            return jax.tree.map(lambda _: rep, abstract)
        rep = NamedSharding(self._mesh, P())
        kv = shd.sharding_for(
            ("slots", "length", "kv_heads", "head_dim"), abstract.slots.cache.k[0].shape, self._mesh
        )
        out = jax.tree.map(lambda _: rep, abstract)
        return out.replace(slots=out.slots.replace(cache=abstract.slots.cache.map(lambda _: kv)))

    # ---- JetStream Engine API ----
    def load_params(self, *args, **kwargs):
        return self.params

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        return jax.device_put(self._new_state(), self._state_shardings())

    def _new_state(self) -> DecodeState:
        s = self.config.num_slots
        cache = KVCache.zeros(self._cfg, s, self.config.max_len, self._dtype)
        return DecodeState(
            slots=core.init_state(cache),
            active=jnp.zeros((s,), bool),
            generated=jnp.zeros((s,), jnp.int32),
            sampling=SamplingParams.full(s, *self._sampling),
        )

    def prefill(
        self,
        *,
        params,
        existing_prefix=None,
        padded_tokens,
        true_length: int,
        sampler=None,
        rng=None,
    ):
        if existing_prefix is not None:
            raise NotImplementedError(
                "prefill with existing_prefix: use Engine.append for multi-turn"
            )
        if sampler is not None:
            raise NotImplementedError(
                "custom sampler callables: set temperature/top_p/top_k instead"
            )
        tokens = jnp.asarray(padded_tokens, jnp.int32).reshape(-1)
        if not 0 < true_length <= tokens.shape[0] <= self.config.max_len:
            raise ValueError(
                f"prefill: need 0 < true_length={true_length} <= padded length "
                f"{tokens.shape[0]} <= max_len {self.config.max_len}"
            )
        seed = self._seed if rng is None else int(rng)
        self._seed += 1
        return self._prefill(params, tokens, jnp.int32(true_length), jnp.uint32(seed))

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        return self._insert(prefix, decode_state, jnp.int32(slot))

    def generate(self, params, decode_state: DecodeState, sampler=None):
        if sampler is not None:
            raise NotImplementedError(
                "custom sampler callables: set temperature/top_p/top_k instead"
            )
        return self._generate(params, decode_state)

    def free_resource(self, slot: int, decode_state: DecodeState | None = None):
        """Deactivates ``slot``; returns the new decode state when one is given."""
        return None if decode_state is None else self._free(decode_state, jnp.int32(slot))

    def get_prefix_destination_sharding(self) -> Any:
        return None

    def get_tokenizer(self):
        raise NotImplementedError("the adapter works on token ids; tokenise with the HF tokenizer")

    @property
    def max_concurrent_decodes(self) -> int:
        return self.config.num_slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self.config.buckets()[-1]

    @property
    def mesh(self):
        return self._mesh

    @property
    def colocated_cpus(self):
        return None


_api = _engine_api()
if _api is not None:
    _api.Engine.register(JetStreamAdapter)
