"""JetStream-style adapter driven by a minimal orchestrator (prefill -> insert -> generate loop)."""

import numpy as np
import pytest

from agentgym_jax.engine import Engine, EngineConfig, generate
from agentgym_jax.engine.jetstream_adapter import JetStreamAdapter
from agentgym_jax.models import from_pretrained
from tests.helpers.hf import make_hf_model

CFG = EngineConfig(num_slots=2, max_len=64, prefill_buckets=(16, 32))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen_js"))
    make_hf_model("qwen2", d, initializer_range=0.1)
    return from_pretrained(d)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, CFG)


def orchestrate(engine, prompts, max_new, stop):
    """What JetStream's orchestrator does: fill free slots, step all, detokenise, free on stop."""
    params = engine.load_params()
    state = engine.init_decode_state()
    out = [[] for _ in prompts]
    queue, owner = list(range(len(prompts))), {}
    while queue or owner:
        for slot in range(engine.max_concurrent_decodes):
            if slot in owner or not queue:
                continue
            j = queue.pop(0)
            p = prompts[j]
            bucket = next(b for b in CFG.buckets() if b >= len(p))
            padded = np.zeros(bucket, np.int32)
            padded[: len(p)] = p
            prefix, first = engine.prefill(
                params=params, padded_tokens=padded, true_length=len(p), rng=j
            )
            state = engine.insert(prefix, state, slot)
            out[j].append(int(np.asarray(first.data)[0, 0]))
            owner[slot] = j
        state, result = engine.generate(params, state)
        result = result.convert_to_numpy()
        for slot, j in list(owner.items()):
            row = out[j]
            if row[-1] in stop or len(row) >= max_new:
                state = engine.free_resource(slot, state)
                del owner[slot]
                continue
            got = result.get_result_at_slot(slot)
            assert int(got["valid"][0, 0]) == 1 and int(got["lengths"][0]) == len(row) + 1
            row.append(int(got["tokens"][0, 0]))
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_orchestrated_adapter_matches_engine(model, engine, temperature):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 256, n).tolist() for n in (5, 20, 9, 14)]
    ref = generate(model, prompts, 12, temperature=temperature, seed=0, engine=engine)
    stop = {ref[0][4]} if temperature == 0.0 else set()
    if stop:
        ref = generate(model, prompts, 12, stop_token_ids=list(stop), engine=engine)
    adapter = JetStreamAdapter(model, CFG, temperature=temperature)
    assert adapter.max_concurrent_decodes == 2 and adapter.max_prefill_length == 32
    assert orchestrate(adapter, prompts, 12, stop) == ref
    # prefill and insert per bucket, generate, free; nothing recompiles with more traffic.
    n = adapter.num_compiles
    orchestrate(adapter, prompts[::-1], 12, stop)
    assert adapter.num_compiles == n <= 2 * len(CFG.buckets()) + 2


def test_registered_with_real_jetstream(model):
    engine_api = pytest.importorskip("jetstream.engine.engine_api")
    assert isinstance(JetStreamAdapter(model, CFG), engine_api.Engine)
