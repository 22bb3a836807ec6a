"""Sampler benchmark (CPU): prints one JSON object.

* vs_hf_generate: our greedy new tokens/s / transformers ``generate`` (use_cache, greedy) at
  batch 16, prompt 64, 128 new tokens, same weights.
* append_vs_reprefill: 10-turn episodes (200-token observations, 32-token actions, batch 16):
  wall time when the whole history is re-prefilled every turn / time with ``append``.
* roofline_fraction: decode FLOP/s (weight matmuls + attention over the live context) / the
  FLOP/s of a dense f32 matmul measured in the same run.

Compiles are warmed up before timing. Model: Qwen2, hidden 256, 4 layers, 4 heads, 2 kv heads,
vocab 8192, mlp 1024, random weights, created locally.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import BENCH_QWEN2, make_bench_model_dir  # noqa: E402

from agentgym_jax.engine import Engine, EngineConfig  # noqa: E402
from agentgym_jax.models import from_pretrained  # noqa: E402

BATCH, PROMPT, NEW = 16, 64, 128
TURNS, OBS, ACT = 10, 200, 32


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_hf(hf, prompts):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    gen = lambda x, n: hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, **kw
    )
    with torch.no_grad():
        gen(ids[:2], 4)  # warm-up
        t = timed(lambda: gen(ids, NEW))
    return BATCH * NEW / t


def bench_ours(model, prompts):
    eng = Engine(
        model,
        EngineConfig(
            num_slots=BATCH, max_len=PROMPT + NEW, prefill_buckets=(PROMPT,), decode_chunk=NEW
        ),
    )
    slots = list(range(BATCH))

    def run():
        eng.prefill(slots, prompts, temperature=0.0)
        out = eng.generate_turn(slots, NEW)
        assert all(len(out[s].tokens) == NEW for s in slots)
        eng.release(slots)

    run()  # compile
    t_prefill = timed(lambda: (eng.prefill(slots, prompts, temperature=0.0), eng.release(slots)))
    t = timed(run)
    return BATCH * NEW / t, t - t_prefill


def episodes(model, use_append, rng):
    max_len = TURNS * (OBS + ACT) + 64
    eng = Engine(
        model,
        EngineConfig(
            num_slots=BATCH, max_len=max_len, prefill_buckets=(256, 1024), decode_chunk=ACT
        ),
    )
    slots = list(range(BATCH))
    # Warm every shape used below: both buckets (a chunked write) and the decode loop.
    eng.prefill([0], [[1] * 1100])
    eng.generate_turn([0], 2)
    eng.release([0])
    obs = [[rng.integers(1, 8192, OBS).tolist() for _ in slots] for _ in range(TURNS)]

    def run():
        hist = [list(o) for o in obs[0]]
        eng.prefill(slots, hist, temperature=1.0)
        for turn in range(TURNS):
            res = eng.generate_turn(slots, ACT)
            for s in slots:
                hist[s] += res[s].tokens
            if turn + 1 == TURNS:
                break
            nxt = obs[turn + 1]
            if use_append:
                eng.append(slots, nxt)
            else:
                eng.release(slots)
                eng.prefill(slots, [h + o for h, o in zip(hist, nxt)], temperature=1.0)
            for s in slots:
                hist[s] += nxt[s]
        eng.release(slots)

    return timed(run), eng.num_compiles


def matmul_flops():
    n = 1024
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps = 20
    t = timed(lambda: [f(a) for _ in range(reps)][-1].block_until_ready())
    return 2 * n**3 * reps / t


def decode_flops_per_token(ctx):
    c = BENCH_QWEN2
    h, m, layers, v = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["vocab_size"],
    )
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    weights = layers * (2 * h * h + 2 * h * kv + 3 * h * m) + h * v
    attention = layers * 2 * 2 * ctx * h  # q.k and p.v over the live context
    return 2 * weights + attention


def main():
    with tempfile.TemporaryDirectory() as d:
        _, hf = make_bench_model_dir(d)
        model = from_pretrained(d)
        rng = np.random.default_rng(0)
        prompts = rng.integers(1, BENCH_QWEN2["vocab_size"], (BATCH, PROMPT)).tolist()
        hf_tps = bench_hf(hf, prompts)
        ours_tps, t_decode = bench_ours(model, prompts)
        t_append, compiles_append = episodes(model, True, np.random.default_rng(1))
        t_reprefill, compiles_re = episodes(model, False, np.random.default_rng(1))
        peak = matmul_flops()
        mean_ctx = PROMPT + NEW / 2
        achieved = BATCH * NEW * decode_flops_per_token(mean_ctx) / t_decode
    print(
        json.dumps(
            dict(
                device=str(jax.devices()[0].platform),
                cpu_count=os.cpu_count(),
                hf_new_tokens_per_s=round(hf_tps, 1),
                ours_new_tokens_per_s=round(ours_tps, 1),
                vs_hf_generate=round(ours_tps / hf_tps, 2),
                append_episode_s=round(t_append, 2),
                reprefill_episode_s=round(t_reprefill, 2),
                append_vs_reprefill=round(t_reprefill / t_append, 2),
                compiles_append=compiles_append,
                compiles_reprefill=compiles_re,
                decode_gflops=round(achieved / 1e9, 2),
                matmul_gflops=round(peak / 1e9, 2),
                roofline_fraction=round(achieved / peak, 3),
            )
        )
    )


if __name__ == "__main__":
    main()
