"""The slot engine: host-side bookkeeping around the jitted prefill / append / decode functions.

``Engine(model, EngineConfig(...), mesh=None)`` splits the NNX model once; every jitted function
takes (graphdef, params, state, ...) and returns the new ``SlotState``, donating the old one so
the KV cache is updated in place. Host work happens per call (per turn or per decode chunk),
never per token: decoding runs in a ``lax.while_loop`` on the device between host syncs.

Compiles: one per prefill bucket used, one for the decode loop, one for ``next_logits``.
``engine.num_compiles`` counts traces (a trace precedes every compile).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from agentgym_jax import sharding as shd
from agentgym_jax.engine import core
from agentgym_jax.engine.sampling import SamplingParams
from agentgym_jax.models.decoder import KVCache, Transformer
from agentgym_jax.seeding import mix_seed


def _ceil_bucket(buckets: Sequence[int], n: int) -> int:
    """The smallest of the sorted ``buckets`` that is >= n (the last one if none is)."""
    return buckets[min(bisect.bisect_left(buckets, n), len(buckets) - 1)]


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != first[i] for x in seqs[1:]):
            return i
    return n


class SlotFullError(ValueError):
    """Writing these tokens would pass the slot's ``max_len``; nothing was written."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_slots: int
    """Fixed number of concurrent sequences (the decode batch)."""
    max_len: int
    """Tokens per slot (whole multi-turn episode: prompt, model turns, env replies)."""
    prefill_buckets: tuple[int, ...] | None = None
    """Write lengths are padded up to one of these (one compile each); longer writes are split
  into chunks of the largest. Default: powers of two from 16 to min(max_len, 1024)."""
    prefill_tokens_per_call: int = 4096
    """Rows per prefill/append call: this // bucket rounded down to a power of two, at most
  num_slots (short appends batch many slots, long prompts fewer)."""
    decode_chunk: int = 128
    """Most decode steps per device call before the host looks at the results."""
    max_stop_ids: int = 8
    """Most stop token ids per slot (fixed shape)."""
    cache_dtype: Any = None
    """KV cache dtype; default: the model's compute dtype."""
    seed: int = 0
    """Base seed; each prefilled episode gets its own stream (see ``Engine.prefill``)."""
    share_prefix_min: int = 32
    """Prompts of one ``prefill`` call that share at least this many leading tokens (a GRPO
  group's identical prompts, an env's instruction) encode the shared part once and copy its cache
  into the other slots (a fork). 0 = encode every prompt in full."""
    attend_buckets: tuple[int, ...] | None = None
    """Cache lengths attention may read (one compile of decode / each prefill bucket per length
  used): a call reads only the smallest one that covers its slots' positions, so short
  episodes in a long cache do not pay for ``max_len``. Default: 256, 384, 512, 768, ... (2^k and
  1.5 * 2^k) up to ``max_len``. ``(max_len,)`` always reads the whole cache."""

    def buckets(self) -> tuple[int, ...]:
        if self.prefill_buckets is not None:
            return tuple(sorted(set(int(b) for b in self.prefill_buckets)))
        out, b = [], 16
        while b < min(self.max_len, 1024):
            out.append(b)
            b *= 2
        out.append(min(self.max_len, 1024))
        return tuple(out)

    def attend_lengths(self) -> tuple[int, ...]:
        if self.attend_buckets is not None:
            return tuple(
                sorted(set(min(int(b), self.max_len) for b in self.attend_buckets) | {self.max_len})
            )
        out, b = [], 256
        while b < self.max_len:
            out += [b, b * 3 // 2] if b * 3 // 2 < self.max_len else [b]
            b *= 2
        return tuple(out) + (self.max_len,)

    def validate(self):
        if self.num_slots < 1:
            raise ValueError(f"EngineConfig.num_slots must be >= 1, got {self.num_slots}")
        if self.max_len < 2:
            raise ValueError(f"EngineConfig.max_len must be >= 2, got {self.max_len}")
        b = self.buckets()
        if not b or b[0] < 1 or b[-1] > self.max_len:
            raise ValueError(
                f"EngineConfig.prefill_buckets must lie in [1, max_len={self.max_len}], got {b}"
            )
        if self.decode_chunk < 1 or self.max_stop_ids < 1 or self.prefill_tokens_per_call < 1:
            raise ValueError(
                "EngineConfig.decode_chunk, max_stop_ids, prefill_tokens_per_call must be >= 1"
            )
        if self.attend_buckets is not None and min(self.attend_buckets, default=0) < 1:
            raise ValueError(f"EngineConfig.attend_buckets must be >= 1, got {self.attend_buckets}")


@dataclasses.dataclass
class TurnResult:
    tokens: list[int]
    """New tokens of this turn; a stop token, when hit, is included (as HF ``generate``)."""
    logprobs: np.ndarray
    """log softmax(logits / T) of each token over the full vocabulary (T = 1 when greedy)."""
    sampler_logprobs: np.ndarray
    """Log-prob under the top-k / top-p filtered distribution actually sampled (0 when greedy)."""
    finish_reason: str
    """"stop" (stop token), "length" (max_new_tokens), "max_len" (the slot is full)."""


@dataclasses.dataclass
class _Slot:
    seq_len: int = 0  # tokens in the sequence incl. the pending one; 0 = free
    pending: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    active: bool = False
    budget: int = 0
    stop_ids: tuple[int, ...] = ()
    turn: TurnResult | None = None


class Engine:
    """Fixed-shape slot batch with per-slot KV cache, sampling settings and RNG."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig,
        mesh: Mesh | None = None,
        rules=shd.DEFAULT_RULES,
        *,
        abstract: bool = False,
    ):
        """``abstract``: ``model`` is abstract (``nnx.eval_shape``) and nothing is allocated; params
        and slot state are shape/sharding stand-ins for lowering the jitted steps ahead of time
        (``agentgym-jax plan``). Needs a mesh."""
        config.validate()
        self.config, self.mesh, self._rules = config, mesh, rules
        self.graphdef, params = nnx.split(model)
        if abstract:
            if mesh is None:
                raise ValueError("Engine(abstract=True) needs a mesh")
            shardings = shd.state_shardings(params, mesh, rules)
            params = jax.tree.map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                params,
                shardings,
            )
        elif mesh is not None:
            params = jax.device_put(params, shd.state_shardings(params, mesh, rules))
        self.params = params
        self.num_compiles = 0
        self._episodes = 0
        self._slots = [_Slot() for _ in range(config.num_slots)]
        self._finished: dict[int, TurnResult] = {}
        self._cache_cfg = (model.config, config.cache_dtype or model.dtype)
        self._state_sharding = self.slot_state_sharding(config.num_slots, config.max_len)
        if abstract:
            self.state = jax.tree.map(
                lambda sh, sub: jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub
                ),
                self._state_sharding,
                jax.eval_shape(self.new_slot_state),
            )
        else:
            self.state = jax.device_put(self.new_slot_state(), self._state_sharding)
        self._build_jits()

    # ---- slot-state layout (also used by the JetStream adapter) ----
    @property
    def state_sharding(self) -> core.SlotState:
        """Shardings of ``self.state`` (every jitted step returns its state with these)."""
        return self._state_sharding

    def new_slot_state(self, num_slots: int | None = None, max_len: int | None = None):
        """A zeroed ``SlotState`` (default: the engine's shape); traceable inside a jit."""
        mcfg, dtype = self._cache_cfg
        s, t = num_slots or self.config.num_slots, max_len or self.config.max_len
        return core.init_state(KVCache.zeros(mcfg, s, t, dtype))

    def slot_state_sharding(self, num_slots: int, max_len: int) -> core.SlotState:
        """Shardings for a ``SlotState`` of that shape on this engine's mesh or device."""
        mcfg = self._cache_cfg[0]
        if self.mesh is not None:
            mesh, rules = self.mesh, self._rules
            k_shape, v_shape = KVCache.shapes(mcfg, num_slots, max_len)
            k = shd.sharding_for(KVCache.K_AXES, k_shape, mesh, rules)
            v = shd.sharding_for(KVCache.V_AXES, v_shape, mesh, rules)
            per_slot = shd.sharding_for(("slots",), (num_slots,), mesh, rules)
            rng = NamedSharding(mesh, P(*per_slot.spec, None))
        else:
            # Pin the state to the params' device with an explicit sharding, so the first call's
            # (uncommitted) state and later (committed) states hit the same compiled function.
            dev = sorted(jax.tree.leaves(self.params)[0].devices(), key=lambda d: d.id)[:1]
            k = v = per_slot = rng = NamedSharding(Mesh(np.asarray(dev), ("x",)), P())
        return core.SlotState(KVCache(k, v), per_slot, per_slot, rng)

    def count_compiles(self, fn):
        """Wrap a function about to be jitted so each trace adds one to ``num_compiles``."""

        @functools.wraps(fn)
        def wrapper(*a, **k):
            self.num_compiles += 1
            return fn(*a, **k)

        return wrapper

    # ---- jitted functions (traced once per shape; the counter runs at trace time) ----
    def _build_jits(self):
        out_state = self._state_sharding
        counted = self.count_compiles

        @counted
        def extend(graphdef, params, state, attend_len, *args):
            return core.extend(nnx.merge(graphdef, params), state, *args, attend_len=attend_len)

        @counted
        def decode(graphdef, params, state, ctrl, chunk, attend_len):
            return core.decode_loop(nnx.merge(graphdef, params), state, ctrl, chunk, attend_len)

        @counted
        def fork(state, copy_len, src, dst, seeds):
            return core.fork(state, src, dst, seeds, copy_len=copy_len)

        @counted
        def peek(graphdef, params, state):
            active = jnp.ones_like(state.length, bool)
            return core.forward_pending(nnx.merge(graphdef, params), state, active)[0]

        # The graphdef is closed over rather than passed as a static argument: a config holding a
        # dict (Llama rope_scaling) makes it unhashable.
        g, so = self.graphdef, out_state
        self._extend = jax.jit(
            functools.partial(extend, g), static_argnums=2, donate_argnums=1, out_shardings=so
        )
        self._decode = jax.jit(
            functools.partial(decode, g),
            static_argnums=(3, 4),
            donate_argnums=1,
            out_shardings=(so, None),
        )
        self._peek = jax.jit(functools.partial(peek, g))
        self._fork = jax.jit(fork, static_argnums=1, donate_argnums=0, out_shardings=so)

    def lower_steps(self, append_len: int = 128) -> dict[str, Any]:
        """The jitted prefill / append / decode, lowered (not compiled) at their worst-case
        shapes: the largest prefill bucket, an ``append_len``-token env reply, one decode chunk,
        each reading the whole cache. For ahead-of-time compiles and memory reports."""
        cfg, s = self.config, self.num_slots
        rep = NamedSharding(self.mesh, P()) if self.mesh is not None else None

        def arr(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

        def write_args(t):
            r = self._rows(t)
            i32 = functools.partial(arr, dtype=jnp.int32)
            return (i32((r,)), i32((r, t)), i32((r,)), i32((r,)), i32((r,)),
                    arr((r,), jnp.uint32), arr((r,), jnp.bool_))  # fmt: skip

        ctrl = core.DecodeControl(
            active=arr((s,), jnp.bool_),
            budget=arr((s,), jnp.int32),
            stop_ids=arr((s, cfg.max_stop_ids), jnp.int32),
            sampling=SamplingParams(
                temperature=arr((s,), jnp.float32),
                top_p=arr((s,), jnp.float32),
                top_k=arr((s,), jnp.int32),
            ),
            watch=arr((s,), jnp.bool_),
            return_on_first=arr((), jnp.bool_),
        )
        full, p, st = cfg.max_len, self.params, self.state
        return {
            "prefill": self._extend.lower(p, st, full, *write_args(self._bucket(cfg.max_len))),
            "append": self._extend.lower(p, st, full, *write_args(self._bucket(append_len))),
            "decode": self._decode.lower(p, st, ctrl, cfg.decode_chunk, full),
        }

    # ---- slot queries ----
    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    def slot_length(self, slot: int) -> int:
        """Tokens in the slot's sequence (prompt + all turns so far)."""
        return self._slots[slot].seq_len

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s.seq_len == 0]

    def room(self, slot: int) -> int:
        """How many more tokens the slot can take (append or generate)."""
        return self.config.max_len - self._slots[slot].seq_len

    def release(self, slot_ids: Iterable[int]):
        """Free slots for new episodes (the cache rows are simply overwritten later)."""
        for i in slot_ids:
            self._slots[i] = _Slot()
            self._finished.pop(i, None)

    def set_params(self, model_or_params):
        """Swap in new policy weights (same structure), e.g. after a training step."""
        params = model_or_params
        if isinstance(model_or_params, nnx.Module):
            params = nnx.state(model_or_params)
        if self.mesh is not None:
            params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, self.params))
        self.params = params

    # ---- prefill / append ----
    def prefill(
        self,
        slot_ids: Sequence[int],
        token_lists: Sequence[Sequence[int]],
        *,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seeds: Sequence[int] | None = None,
    ):
        """Start new episodes: encode each prompt into its (free) slot, batched over slots.

        Sampling settings are per slot (scalars apply to all). Each episode gets RNG stream
        ``fold_in(key(0), seed)``; default seed = ``mix_seed(config.seed, episode counter)``.
        """
        slot_ids = list(slot_ids)
        for i in slot_ids:
            if self._slots[i].seq_len:
                raise ValueError(
                    f"prefill: slot {i} is in use ({self._slots[i].seq_len} tokens); release it first"
                )
        n = len(slot_ids)
        bcast = lambda x: list(x) if isinstance(x, (list, tuple, np.ndarray)) else [x] * n
        temps, tps, tks = bcast(temperature), bcast(top_p), bcast(top_k)
        if seeds is None:
            seeds = [mix_seed(self.config.seed, self._episodes + j) for j in range(n)]
        self._episodes += n
        for j, i in enumerate(slot_ids):
            if not 0.0 < float(tps[j]) <= 1.0:
                raise ValueError(f"prefill: top_p must be in (0, 1], got {tps[j]} for slot {i}")
            sl = self._slots[i]
            sl.temperature, sl.top_p, sl.top_k = float(temps[j]), float(tps[j]), int(tks[j])
        token_lists = [[int(t) for t in toks] for toks in token_lists]
        if self.config.share_prefix_min and n > 1:
            self._prefill_shared(slot_ids, token_lists, list(seeds))
        else:
            self._write(slot_ids, token_lists, new_episode=True, seeds=list(seeds))

    def _prefill_shared(self, slot_ids, token_lists, seeds):
        """Prefill encoding shared prompt prefixes once (see ``EngineConfig.share_prefix_min``).

        Level 1: the distinct prompts' common prefix is written into one slot and forked to one
        slot per distinct prompt, which then appends its own remainder. Level 2: each distinct
        prompt is forked to the slots whose prompt is identical (a GRPO group). The caches equal
        full prefills': keys and values of a prefix do not depend on what follows it.
        """
        leaders: dict[tuple[int, ...], int] = {}
        for j, toks in enumerate(token_lists):
            if not toks:
                raise ValueError(f"slot {slot_ids[j]}: empty token list")
            leaders.setdefault(tuple(toks), j)
        lead = list(leaders.values())
        common = _common_prefix_len([token_lists[j] for j in lead])
        if len(lead) > 1 and common >= self.config.share_prefix_min:
            first, others = lead[0], lead[1:]
            self._write([slot_ids[first]], [token_lists[first][:common]], True, [seeds[first]])
            self.fork(slot_ids[first], [slot_ids[j] for j in others], [seeds[j] for j in others])
            rest = [j for j in lead if len(token_lists[j]) > common]
            if rest:
                self._write(
                    [slot_ids[j] for j in rest],
                    [token_lists[j][common:] for j in rest],
                    False,
                    [0] * len(rest),
                )
        else:
            self._write(
                [slot_ids[j] for j in lead],
                [token_lists[j] for j in lead],
                True,
                [seeds[j] for j in lead],
            )
        copies = [
            (slot_ids[leaders[tuple(toks)]], slot_ids[k], seeds[k])
            for k, toks in enumerate(token_lists)
            if leaders[tuple(toks)] != k
        ]
        if copies:
            self._fork_rows(*map(list, zip(*copies)))

    def fork(self, src: int, dst_ids: Sequence[int], seeds: Sequence[int]):
        """Start episodes in free slots ``dst_ids`` as copies of slot ``src``'s sequence (cache,
        length, pending token); each gets RNG stream ``fold_in(key(0), seed)``. Sampling
        settings stay the destinations' own."""
        dst_ids = list(dst_ids)
        self._fork_rows([src] * len(dst_ids), dst_ids, list(seeds))

    def _fork_rows(self, srcs: list[int], dsts: list[int], seeds: list[int]):
        """Copy slot ``srcs[r]`` into slot ``dsts[r]`` for every r, in one device call per
        ``num_slots`` rows."""
        for i in set(srcs):
            if self._slots[i].seq_len == 0:
                raise ValueError(f"fork: slot {i} is free")
            if self._slots[i].active:
                raise ValueError(f"fork: slot {i} is still decoding")
        if len(set(dsts)) != len(dsts) or any(self._slots[i].seq_len for i in dsts):
            raise ValueError(f"fork: destination slots {dsts} must be distinct and free")
        s = self.num_slots
        rows = min(s, 1 << max(len(dsts) - 1, 0).bit_length())
        copy_len = self._attend_len(max(self._slots[i].seq_len for i in srcs))
        for k in range(0, len(dsts), rows):
            part = slice(k, k + rows)
            n = len(dsts[part])
            src = np.zeros((rows,), np.int32)
            dst = np.full((rows,), s, np.int32)  # id s = padding row (dropped)
            sd = np.zeros((rows,), np.uint32)
            src[:n], dst[:n] = srcs[part], dsts[part]
            sd[:n] = [x & 0xFFFFFFFF for x in seeds[part]]
            self.state = self._fork(self.state, copy_len, src, dst, sd)
        for i, d in zip(srcs, dsts):
            self._slots[d].seq_len, self._slots[d].pending = (
                self._slots[i].seq_len,
                self._slots[i].pending,
            )

    def append(self, slot_ids: Sequence[int], token_lists: Sequence[Sequence[int]]):
        """Write new tokens (an env reply + generation prompt) after each slot's sequence.

        Raises ``SlotFullError`` (writing nothing) if any slot would pass ``max_len``.
        """
        for i in slot_ids:
            if self._slots[i].seq_len == 0:
                raise ValueError(f"append: slot {i} is free; prefill it first")
            if self._slots[i].active:
                raise ValueError(f"append: slot {i} is still decoding")
        self._write(list(slot_ids), token_lists, new_episode=False, seeds=[0] * len(slot_ids))

    def _write(self, slot_ids, token_lists, new_episode, seeds):
        if len(slot_ids) != len(token_lists) or len(set(slot_ids)) != len(slot_ids):
            raise ValueError("slot_ids and token_lists must have equal length and distinct slots")
        cfg = self.config
        reqs = []  # (slot, start position, tokens to encode, new pending token, seed)
        for i, toks, seed in zip(slot_ids, token_lists, seeds):
            toks = [int(t) for t in toks]
            if not toks:
                raise ValueError(f"slot {i}: empty token list")
            sl = self._slots[i]
            if sl.seq_len + len(toks) > cfg.max_len:
                raise SlotFullError(
                    f"slot {i}: {sl.seq_len} tokens + {len(toks)} new > max_len {cfg.max_len}; "
                    "nothing was written (truncate or end the episode)"
                )
            seq = ([sl.pending] if sl.seq_len else []) + toks
            reqs.append((i, max(sl.seq_len - 1, 0), seq[:-1], seq[-1], seed))
        big = cfg.buckets()[-1]
        # Chunked prefill: round r writes the r-th chunk of every request (a slot's chunks in order).
        r = 0
        while True:
            chunks = [
                (i, st + r * big, w[r * big : (r + 1) * big], p, sd)
                for i, st, w, p, sd in reqs
                if r == 0 or len(w) > r * big
            ]
            if not chunks:
                break
            by_bucket: dict[int, list] = {}
            for c in chunks:
                by_bucket.setdefault(self._bucket(len(c[2])), []).append(c)
            for t, group in sorted(by_bucket.items()):
                most = self._rows(t)
                for k in range(0, len(group), most):
                    part = group[k : k + most]
                    rows = self._rows(t, len(part))
                    self._extend_call(t, rows, part, new_episode and r == 0)
            r += 1
        for i, _, w, p, _ in reqs:
            sl = self._slots[i]
            sl.seq_len = sl.seq_len + len(w) + 1 - (1 if sl.seq_len else 0)
            sl.pending = p

    def _bucket(self, n: int) -> int:
        """The prefill bucket a write of ``n`` tokens is padded to (``_write`` splits longer ones)."""
        return _ceil_bucket(self.config.buckets(), n)

    def _attend_len(self, need: int) -> int:
        """The smallest attend bucket covering cache positions ``0 .. need - 1``."""
        return _ceil_bucket(self.config.attend_lengths(), need)

    def _rows(self, t: int, n: int | None = None) -> int:
        """Rows of a write call at bucket ``t``: at most ``prefill_tokens_per_call // t`` (a power
        of two, at most the slot count); for ``n`` writes, the power of two covering them, so
        an env reply to a few slots does not compute a full call of padding rows (one compile
        per bucket and row count)."""
        rows = max(1, self.config.prefill_tokens_per_call // t)
        most = min(self.num_slots, 1 << (rows.bit_length() - 1))
        return most if n is None else min(most, 1 << max(n - 1, 0).bit_length())

    def _extend_call(self, t, rows, group, new_rng):
        s = self.num_slots
        ids = np.full((rows,), s, np.int32)  # id s = padding row (dropped)
        toks = np.zeros((rows, t), np.int32)
        start = np.zeros((rows,), np.int32)
        count = np.zeros((rows,), np.int32)
        pend = np.zeros((rows,), np.int32)
        seeds = np.zeros((rows,), np.uint32)
        for j, (i, st, w, p, sd) in enumerate(group):
            ids[j], start[j], count[j], pend[j], seeds[j] = i, st, len(w), p, sd & 0xFFFFFFFF
            toks[j, : len(w)] = w
        new = np.full((rows,), new_rng, bool)
        attend = self._attend_len(int(np.max(start + count)))
        self.state = self._extend(
            self.params, self.state, attend, ids, toks, start, count, pend, seeds, new
        )

    # ---- decoding ----
    def begin_turn(
        self,
        slot_ids: Sequence[int],
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        *,
        temperature=None,
        top_p=None,
        top_k=None,
    ):
        """Mark slots as decoding a new turn (settings given here override the episode's)."""
        stop = tuple(int(t) for t in stop_token_ids)
        if len(stop) > self.config.max_stop_ids:
            raise ValueError(
                f"{len(stop)} stop ids > EngineConfig.max_stop_ids={self.config.max_stop_ids}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i in slot_ids:
            sl = self._slots[i]
            if sl.seq_len == 0:
                raise ValueError(f"begin_turn: slot {i} is free; prefill it first")
            if sl.active:
                raise ValueError(f"begin_turn: slot {i} is already decoding")
            sl.active, sl.budget, sl.stop_ids = True, int(max_new_tokens), stop
            sl.turn = TurnResult([], np.zeros(0, np.float32), np.zeros(0, np.float32), "")
            sl.temperature = sl.temperature if temperature is None else float(temperature)
            sl.top_p = sl.top_p if top_p is None else float(top_p)
            sl.top_k = sl.top_k if top_k is None else int(top_k)
            if sl.seq_len >= self.config.max_len:
                self._finish(i, "max_len")

    def _finish(self, i, reason):
        sl = self._slots[i]
        sl.active = False
        sl.turn.finish_reason = reason
        self._finished[i] = sl.turn
        sl.turn = None

    def step(self, return_on_first: bool = True) -> dict[int, TurnResult]:
        """Run one device decode call (<= decode_chunk steps); return turns finished so far.

        With ``return_on_first`` the device loop exits as soon as any slot finishes, so the
        caller can refill or append to it while the other slots keep decoding (continuous batching).
        """
        active = [i for i, s in enumerate(self._slots) if s.active]
        if active:
            self._run_decode(active, return_on_first)
        done, self._finished = self._finished, {}
        return done

    def _run_decode(self, watch, return_on_first):
        s, m = self.num_slots, self.config.max_stop_ids
        sl = self._slots
        stop = np.full((s, m), -1, np.int32)
        for i, x in enumerate(sl):
            stop[i, : len(x.stop_ids)] = x.stop_ids
        ctrl = core.DecodeControl(
            active=np.array([x.active for x in sl]),
            budget=np.array([x.budget for x in sl], np.int32),
            stop_ids=stop,
            sampling=SamplingParams(
                temperature=np.array([x.temperature for x in sl], np.float32),
                top_p=np.array([x.top_p for x in sl], np.float32),
                top_k=np.array([x.top_k for x in sl], np.int32),
            ),
            watch=np.isin(np.arange(s), list(watch)),
            return_on_first=np.array(return_on_first),
        )
        chunk = self.config.decode_chunk
        # A decode step feeds the pending token at position seq_len - 1; a call takes <= chunk steps.
        need = max(x.seq_len - 1 + min(chunk, x.budget) for x in sl if x.active)
        attend = self._attend_len(need)
        self.state, out = self._decode(self.params, self.state, ctrl, chunk, attend)
        out = jax.device_get(out)
        for i, x in enumerate(sl):
            n = int(out.n_new[i])
            if not x.active or n == 0:
                continue
            toks = out.tokens[i, :n]
            t = x.turn
            t.tokens.extend(int(v) for v in toks)
            t.logprobs = np.concatenate([t.logprobs, out.logprobs[i, :n]])
            t.sampler_logprobs = np.concatenate([t.sampler_logprobs, out.sampler_logprobs[i, :n]])
            x.seq_len += n
            x.budget -= n
            x.pending = int(toks[-1])
            code = int(out.finish[i])
            if code != core.RUNNING:
                self._finish(i, core.FINISH_NAMES[code])

    def generate_turn(
        self,
        slot_ids: Sequence[int],
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        **sampling,
    ) -> dict[int, TurnResult]:
        """Decode the listed slots until each stops; returns {slot: TurnResult}.

        Turns of other slots that finish meanwhile stay queued for the next ``step()``.
        """
        self.begin_turn(slot_ids, max_new_tokens, stop_token_ids, **sampling)
        want = set(slot_ids)
        got: dict[int, TurnResult] = {}
        while True:
            for i in list(self._finished):
                if i in want:
                    got[i] = self._finished.pop(i)
            if len(got) == len(want):
                return got
            self._run_decode([i for i in want if i not in got], return_on_first=False)

    def next_logits(self) -> np.ndarray:
        """Logits [S, V] each slot would sample its next token from (debug / tests; no state change)."""
        return np.asarray(self._peek(self.params, self.state))
