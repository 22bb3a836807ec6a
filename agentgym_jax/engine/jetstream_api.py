"""The JetStream Engine interface (google-jetstream 0.2.2 ``engine_api``) as typed Protocols.

google-jetstream imports TensorFlow, so it is an optional extra; these Protocols let our code and
tests name and check the interface without it. They mirror ``jetstream.engine.engine_api.Engine``
(plus ``free_resource`` from later JetStream releases) and its ``ResultTokens`` / ``SlotData``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

Params = Any
Prefix = Any
DecodeState = Any


class SlotData(NamedTuple):
    """One slot's share of a ``ResultTokens``."""

    tokens: Any
    """[samples_per_slot, 1] token ids."""
    valid: Any
    """[samples_per_slot, 1] 1 where the token is real (the slot was decoding)."""
    lengths: Any
    """[samples_per_slot] tokens generated so far, this one included."""


@runtime_checkable
class ResultTokensLike(Protocol):
    """What an orchestrator reads from ``generate``: all slots' tokens in one array."""

    def copy_to_host_async(self) -> None: ...

    def convert_to_numpy(self) -> ResultTokensLike: ...

    def get_result_at_slot(self, slot: int) -> SlotData: ...


@runtime_checkable
class JetStreamEngine(Protocol):
    """prefill -> insert into a decode slot -> generate one token for every slot, repeatedly."""

    def prefill(
        self,
        *,
        params: Params,
        existing_prefix: Prefix | None = None,
        padded_tokens: Any,
        true_length: int,
    ) -> Prefix: ...

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState: ...

    def generate(
        self, params: Params, decode_state: DecodeState
    ) -> tuple[DecodeState, ResultTokensLike]: ...

    def load_params(self, *args, **kwargs) -> Params: ...

    def init_decode_state(self, *args, **kwargs) -> DecodeState: ...

    def free_resource(self, slot: int) -> Any: ...

    def get_prefix_destination_sharding(self) -> Any: ...

    def get_tokenizer(self) -> Any: ...

    @property
    def max_concurrent_decodes(self) -> int: ...

    @property
    def samples_per_slot(self) -> int: ...

    @property
    def max_prefill_length(self) -> int: ...

    @property
    def mesh(self) -> Any: ...

    @property
    def colocated_cpus(self) -> Any: ...
