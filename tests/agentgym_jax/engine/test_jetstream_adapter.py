"""JetStream adapter: prefill -> insert -> generate equals Engine / HF, on one device and a mesh;
the adapter meets the JetStream Engine interface (our Protocol, and the real google-jetstream)."""

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from agentgym_jax.engine import Engine, EngineConfig, generate
from agentgym_jax.engine.jetstream_adapter import IdTokenizer, JetStreamAdapter
from agentgym_jax.engine.jetstream_api import JetStreamEngine, ResultTokensLike
from agentgym_jax.models import from_pretrained
from agentgym_jax.sharding import MeshConfig, make_mesh
from tests.helpers.hf import make_hf_model

CFG = EngineConfig(num_slots=2, max_len=64, prefill_buckets=(16, 32))
ROOT = Path(__file__).resolve().parents[3]


def _build(d):
    hf = make_hf_model("qwen2", d, initializer_range=0.1)
    return hf, from_pretrained(d)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(str(tmp_path_factory.mktemp("qwen_js")))


@pytest.fixture(scope="module")
def model(built):
    return built[1]


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, CFG)


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, n).tolist() for n in lengths]


def orchestrate(adapter, prompts, max_new, stop, seeds=None):
    """What JetStream's orchestrator does: fill free slots, step all, free a slot on stop."""
    params = adapter.load_params()
    state = adapter.init_decode_state()
    out = [[] for _ in prompts]
    queue, owner = list(range(len(prompts))), {}
    buckets = adapter.engine.config.buckets()
    while queue or owner:
        for slot in range(adapter.max_concurrent_decodes):
            if slot in owner or not queue:
                continue
            j = queue.pop(0)
            p = prompts[j]
            padded = np.zeros(next(b for b in buckets if b >= len(p)), np.int32)
            padded[: len(p)] = p
            rng = None if seeds is None else seeds[j]
            prefix = adapter.prefill(
                params=params, padded_tokens=padded, true_length=len(p), rng=rng
            )
            state = adapter.insert(prefix, state, slot)
            owner[slot] = j
        state, result = adapter.generate(params, state)
        result = result.convert_to_numpy()
        for slot, j in list(owner.items()):
            row = out[j]
            got = result.get_result_at_slot(slot)
            assert int(got.valid[0, 0]) == 1 and int(got.lengths[0]) == len(row) + 1
            row.append(int(got.tokens[0, 0]))
            if row[-1] in stop or len(row) >= max_new:
                state = adapter.free_resource(slot, state)
                del owner[slot]
    return out


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_orchestrated_adapter_matches_engine(built, model, engine, temperature):
    prompts = prompts_of((5, 20, 9, 14))
    ref = generate(model, prompts, 12, temperature=temperature, seed=0, engine=engine)
    stop = {ref[0][4]} if temperature == 0.0 else set()
    if stop:
        assert ref[:2] == [hf_greedy(built[0], p, 12) for p in prompts[:2]]
        ref = generate(model, prompts, 12, stop_token_ids=list(stop), engine=engine)
    adapter = JetStreamAdapter(model, CFG, temperature=temperature)
    assert adapter.max_concurrent_decodes == 2 and adapter.max_prefill_length == 32
    # Default seeds follow Engine.prefill's derivation (mix_seed(config.seed, n)), as generate's.
    assert orchestrate(adapter, prompts, 12, stop) == ref
    # prefill and insert per bucket, generate, free; nothing recompiles with more traffic.
    n = adapter.num_compiles
    assert orchestrate(adapter, prompts[::-1], 12, stop, seeds=[3, 2, 1, 0]) == ref[::-1]
    assert adapter.num_compiles == n <= 2 * len(CFG.buckets()) + 2


def test_adapter_on_mesh_matches_single_device(model):
    assert jax.device_count() == 8
    cfg = EngineConfig(num_slots=4, max_len=64, prefill_buckets=(16, 32))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    prompts = prompts_of((3, 14, 7, 22, 5, 30), seed=6)
    for temperature in (0.0, 1.0):
        ref = orchestrate(JetStreamAdapter(model, cfg, temperature=temperature), prompts, 8, set())
        sharded = JetStreamAdapter(model, cfg, mesh=mesh, temperature=temperature)
        state = sharded.init_decode_state()
        assert len(state.slots.cache.k[0].sharding.device_set) == 8
        assert state.slots.cache.k[0].sharding.spec[0] is not None  # slots really split
        assert orchestrate(sharded, prompts, 8, set()) == ref


def test_over_existing_engine_shares_params_and_counter(engine):
    adapter = JetStreamAdapter(engine)
    assert adapter.load_params() is engine.params and adapter.mesh is engine.mesh
    before = engine.num_compiles
    state = adapter.init_decode_state()
    prefix = adapter.prefill(params=engine.params, padded_tokens=np.ones(16), true_length=3)
    adapter.insert(prefix, state, 1)
    assert adapter.num_compiles == engine.num_compiles == before + 2
    with pytest.raises(ValueError, match="config"):
        JetStreamAdapter(engine, CFG)


# ---- interface conformance ----
def _members(cls):
    return [n for n in vars(cls) if not n.startswith("_")]


def _signature_problems(impl, spec) -> list[str]:
    """Every public member of ``spec`` exists on ``impl`` with a call-compatible signature."""
    problems = []
    for name in _members(spec):
        want, have = inspect.getattr_static(spec, name), inspect.getattr_static(impl, name, None)
        if have is None:
            problems.append(f"{name}: missing")
        elif isinstance(want, property) != isinstance(have, property):
            problems.append(f"{name}: property mismatch")
        elif not isinstance(want, property):
            ps = list(inspect.signature(want).parameters.values())[1:]
            hs = list(inspect.signature(have).parameters.values())[1:]
            by_name = {h.name: h for h in hs}
            pos = lambda xs: [x.name for x in xs if x.kind == x.POSITIONAL_OR_KEYWORD]
            if pos(hs)[: len(pos(ps))] != pos(ps):
                problems.append(f"{name}: positional parameters {pos(hs)} != {pos(ps)}")
            for p in ps:
                if p.name not in by_name or by_name[p.name].kind != p.kind:
                    problems.append(f"{name}: parameter {p.name} ({p.kind}) missing or differs")
            for h in hs:
                extra = h.name not in {p.name for p in ps} and h.kind not in (
                    h.VAR_POSITIONAL,
                    h.VAR_KEYWORD,
                )
                if extra and h.default is h.empty:
                    problems.append(f"{name}: extra parameter {h.name} has no default")
    return problems


def test_adapter_satisfies_the_protocol(engine):
    adapter = JetStreamAdapter(engine)
    assert isinstance(adapter, JetStreamEngine)
    assert _signature_problems(JetStreamAdapter, JetStreamEngine) == []
    state = adapter.init_decode_state()
    _, result = adapter.generate(adapter.load_params(), state)
    assert isinstance(result, ResultTokensLike)
    tokens, valid, lengths = result.convert_to_numpy().get_result_at_slot(1)
    assert tokens.shape == valid.shape == (1, 1) and lengths.shape == (1,) and valid[0, 0] == 0


def _has_google_jetstream() -> bool:
    try:
        importlib.metadata.version("google-jetstream")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_google_jetstream(), reason="needs agentgym-jax[jetstream]")
def test_real_jetstream_driver():
    # A subprocess: jetstream imports TensorFlow, and its driver threads SIGKILL the process on
    # any error.
    proc = subprocess.run(
        [sys.executable, "-c", f"import {__name__} as t; t.real_jetstream_main()"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    got = json.loads(line[len("RESULT ") :])
    assert got["driver"] == got["ref"] and got["abc_problems"] == [], tail


def real_jetstream_main():
    """Run inside a subprocess with google-jetstream installed; prints one RESULT json line."""
    import asyncio
    import tempfile

    if not hasattr(jax, "tree_map"):  # jetstream 0.2.2's driver calls it; jax removed it
        jax.tree_map = jax.tree.map
    from jetstream.core import orchestrator
    from jetstream.core.utils import async_multifuture
    from jetstream.engine import engine_api

    _, model = _build(tempfile.mkdtemp())
    bos, max_tokens = 7, 10
    prompts = [[bos] + p for p in prompts_of((5, 20, 9, 14, 3))]
    free_run = generate(model, prompts, max_tokens)
    eos = free_run[0][3]
    ref = []
    for row in generate(model, prompts, max_tokens, stop_token_ids=[eos, 0]):
        ref.append(row[:-1] if row[-1] in (eos, 0) else row)  # jetstream drops the stop token

    tok = IdTokenizer(bos_id=bos, eos_id=eos, pad_id=0, stop_ids=[eos, 0])
    adapter = JetStreamAdapter(model, CFG, tokenizer=tok)
    problems = [] if isinstance(adapter, engine_api.Engine) else ["not an engine_api.Engine"]
    problems += _signature_problems(JetStreamAdapter, engine_api.Engine)
    data = np.arange(12, dtype=np.int32).reshape(4, 3)
    theirs = engine_api.ResultTokens(data, (0, 1), (1, 2), (2, 3), 1).get_result_at_slot(2)
    ours = adapter.generate(adapter.load_params(), adapter.init_decode_state())[1]
    ours = ours.replace(data=data).get_result_at_slot(2)
    for f in ("tokens", "valid", "lengths"):
        if not np.array_equal(getattr(theirs, f), getattr(ours, f)):
            problems.append(f"ResultTokens.get_result_at_slot: {f} differs")

    async def drive():
        params = adapter.load_params()
        driver = orchestrator.Driver([adapter], [adapter], [params], [params])
        try:
            channels = []
            for p in prompts:
                ch = async_multifuture.AsyncMultifuture()
                driver.place_request_on_prefill_queue(
                    orchestrator.ActiveRequest(
                        max_tokens=max_tokens,
                        return_channel=ch,
                        prefill_content=p[1:],  # the driver prepends bos
                        is_client_side_tokenization=True,
                    )
                )
                channels.append(ch)
            out = []
            for ch in channels:
                toks = []
                async for samples in ch:
                    toks += samples[0].token_ids
                out.append(toks)
            return out
        finally:
            driver.stop()

    got = asyncio.run(asyncio.wait_for(drive(), 300))
    print("RESULT " + json.dumps(dict(driver=got, ref=ref, abc_problems=problems)), flush=True)
