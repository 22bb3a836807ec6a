"""One-call generation over the slot engine (continuous batching when prompts > slots)."""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh

from agentgym_jax.engine.engine import Engine, EngineConfig
from agentgym_jax.models.decoder import Transformer
from agentgym_jax.seeding import mix_seed


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    *,
    num_slots: int | None = None,
    mesh: Mesh | None = None,
    return_logprobs: bool = False,
    engine: Engine | None = None,
):
    """New tokens per prompt (a stop token, when hit, is included and ends the row, as HF
    ``generate`` does with eos). temperature 0 = greedy.

    Prompt j samples from stream ``mix_seed(seed, j)`` whatever slot it lands in, so the output
    does not depend on ``num_slots``. With ``return_logprobs`` returns (tokens, logprobs) lists.
    ``engine``: reuse an engine (its compiled functions) instead of building one; at most
    ``num_slots`` of its free slots are used at a time.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        return ([], []) if return_logprobs else []
    if any(not p for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if engine is None:
        slots = num_slots or min(len(prompts), 64)
        need = max(len(p) for p in prompts) + max_new_tokens
        max_len = -(-need // 64) * 64  # round up so nearby calls share shapes
        engine = Engine(model, EngineConfig(num_slots=slots, max_len=max_len, seed=seed), mesh=mesh)
    else:
        slots = min(num_slots or engine.num_slots, len(engine.free_slots()))
        if slots < 1:
            raise ValueError("generate: the engine has no free slot")
    out: list = [None] * len(prompts)
    lps: list = [None] * len(prompts)
    owner: dict[int, int] = {}
    queue = list(range(len(prompts)))
    while queue or owner:
        free = engine.free_slots()[: slots - len(owner)]
        take = queue[: len(free)]
        queue = queue[len(take) :]
        if take:
            ids = free[: len(take)]
            engine.prefill(
                ids,
                [prompts[j] for j in take],
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seeds=[mix_seed(seed, j) for j in take],
            )
            engine.begin_turn(ids, max_new_tokens, stop_token_ids)
            owner.update(zip(ids, take))
        for slot, res in engine.step(return_on_first=bool(queue)).items():
            j = owner.pop(slot)
            out[j], lps[j] = res.tokens, res.logprobs
            engine.release([slot])
    return (out, lps) if return_logprobs else out
