"""Real-size figures on a GPU (or TPU): decode tokens/s against the HBM roofline, update MFU,
and the cuDNN attention path against XLA. A Qwen2.5-0.5B-shaped model with random weights.

    python bench/accelerator.py [--slots 64] [--prompt 1024] [--out result.json]

On a CPU it runs a scaled-down shape and says so (the figures are then not meaningful).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agentgym_jax.engine import Engine, EngineConfig
from agentgym_jax.models import attention as attn
from agentgym_jax.models.decoder import Transformer
from agentgym_jax.plan import PUBLIC_CONFIGS, ModelConfig

# Peak dense bf16 matmul rate and HBM bandwidth by device kind (datasheets).
PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "TPU v5 lite": (197e12, 0.82e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5": (459e12, 2.76e12),
}


def peaks(kind: str):
    for k, v in PEAKS.items():
        if k.lower() in kind.lower():
            return v
    return (None, None)


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def bench_decode(cfg: ModelConfig, slots: int, prompt: int, new: int, res: dict):
    model = Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    max_len = prompt + new + 8
    eng = Engine(
        model,
        EngineConfig(num_slots=slots, max_len=max_len, decode_chunk=new, attend_buckets=(max_len,)),
    )
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, cfg.vocab_size, prompt)) for _ in range(slots)]
    t0 = time.perf_counter()
    eng.prefill(list(range(slots)), prompts, temperature=1.0, seeds=list(range(slots)))
    jax.block_until_ready(eng.state)
    res["decode_first_prefill_s"] = time.perf_counter() - t0

    def run():
        eng.release(range(slots))
        eng.prefill(list(range(slots)), prompts, temperature=1.0, seeds=list(range(slots)))
        jax.block_until_ready(eng.state)
        t = time.perf_counter()
        eng.begin_turn(list(range(slots)), new, ())
        while any(s.active for s in eng._slots):
            eng.step(return_on_first=False)
        jax.block_until_ready(eng.state)
        return time.perf_counter() - t

    run()  # compile
    dt = min(run() for _ in range(3))
    toks = slots * new
    pbytes = n_params(nnx.state(model)) * 2
    kv_per_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    # Each step reads the weights once and, per slot, the attended cache (here: all of max_len).
    step_bytes = pbytes + slots * max_len * kv_per_tok
    live_bytes = pbytes + slots * (prompt + new / 2) * kv_per_tok
    _, bw = peaks(jax.devices()[0].device_kind)
    res.update(
        decode_slots=slots,
        decode_prompt=prompt,
        decode_new=new,
        decode_tokens_per_s=toks / dt,
        decode_step_ms=1e3 * dt / new,
        decode_bytes_per_step_gb=step_bytes / 1e9,
    )
    if bw:
        res["decode_roofline_tokens_per_s"] = slots * bw / step_bytes
        res["decode_frac_of_roofline"] = (toks / dt) / (slots * bw / step_bytes)
        res["decode_frac_of_live_cache_roofline"] = (toks / dt) / (slots * bw / live_bytes)


def bench_update(cfg: ModelConfig, batch: int, seq: int, micro: int, res: dict, impl: str):
    from agentgym_jax import sharding as shd
    from agentgym_jax.rl import update as U
    from agentgym_jax.rl.config import ActorConfig

    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1, devices=1))
    model = Transformer(
        cfg,
        rngs=nnx.Rngs(0),
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        remat="dots",
        attention=impl,
    )
    acfg = ActorConfig(
        ppo_mini_batch_size=batch,
        ppo_micro_batch_size=micro,
        lr=1e-6,
        ppo_epochs=1,
        use_kl_loss=False,
    )
    state = U.init_train_state(model, U.make_optimizer(acfg), mesh)
    upd = U.make_actor_update(acfg, mesh, state)
    rng = np.random.default_rng(0)
    b = {
        "input_ids": rng.integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.int32),
        "old_logprobs": np.full((batch, seq), -2.0, np.float32),
        "advantages": rng.standard_normal((batch, seq)).astype(np.float32),
    }
    t0 = time.perf_counter()
    state, m = upd(state, b, jax.random.key(0))
    jax.block_until_ready(m)
    res[f"update_{impl}_first_call_s"] = time.perf_counter() - t0
    times = []
    for i in range(3):
        t = time.perf_counter()
        state, m = upd(state, b, jax.random.key(i + 1))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    dt = min(times)
    n = n_params(state.params)
    tokens = batch * seq
    # 6 N per token for the matmuls (embedding lookup excluded, tied head included), plus
    # causal attention: 2 (QK^T, PV) x 2 flop x T^2 / 2 x heads x head_dim per layer, x3 fwd+bwd.
    emb = cfg.vocab_size * cfg.hidden_size
    n_mm = n - emb + (emb if cfg.tie_word_embeddings else 0)
    att = 3 * 2 * 2 * (seq * seq / 2) * cfg.num_attention_heads * cfg.head_dim
    flops = 6 * n_mm * tokens + att * cfg.num_hidden_layers * batch
    peak, _ = peaks(jax.devices()[0].device_kind)
    res[f"update_{impl}_s"] = dt
    res[f"update_{impl}_tokens_per_s"] = tokens / dt
    res[f"update_{impl}_tflops"] = flops / dt / 1e12
    if peak:
        res[f"update_{impl}_mfu"] = flops / dt / peak
    res["update_batch"], res["update_seq"], res["update_micro"] = batch, seq, micro
    res["update_grad_norm_finite"] = bool(np.isfinite(float(m["actor/grad_norm"])))


def check_cudnn(res: dict):
    """cuDNN attention against the XLA path (forward and gradients), bf16."""
    ks = jax.random.split(jax.random.key(0), 3)
    b, t, h, kv, d = 2, 1024, 14, 2, 64
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kv, d), jnp.bfloat16)
    seg = np.ones((b, t), np.int32)
    seg[0, :100] = 0  # left padding
    seg[1, 900:] = 0  # right padding
    seg = jnp.asarray(seg)
    w = (seg > 0)[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(w, fn(q, k, v), 0).astype(jnp.float32) ** 2)

    xla = jax.jit(lambda q, k, v: attn.xla_causal(q, k, v, seg, 128))
    cud = jax.jit(lambda q, k, v: attn.cudnn_causal(q, k, v, seg))
    a = np.asarray(jnp.where(w, xla(q, k, v), 0), np.float32)
    c = np.asarray(jnp.where(w, cud(q, k, v), 0), np.float32)
    res["cudnn_fwd_max_abs_err"] = float(np.max(np.abs(a - c)))
    ga = jax.grad(lambda *x: loss(xla, *x), argnums=(0, 1, 2))(q, k, v)
    gc = jax.grad(lambda *x: loss(cud, *x), argnums=(0, 1, 2))(q, k, v)
    res["cudnn_grad_max_rel_err"] = float(
        max(
            np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))
            / (np.max(np.abs(np.asarray(y, np.float32))) + 1e-6)
            for x, y in zip(gc, ga)
        )
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--out")
    ap.add_argument("--skip", default="", help="comma list of: decode,update,cudnn")
    a = ap.parse_args()
    dev = jax.devices()[0]
    cfg = ModelConfig.from_hf_dict(PUBLIC_CONFIGS["Qwen2.5-0.5B"])
    res = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__}
    if jax.default_backend() == "cpu":  # a smoke run only
        d = dict(PUBLIC_CONFIGS["Qwen2.5-0.5B"], num_hidden_layers=2, vocab_size=4096)
        cfg = ModelConfig.from_hf_dict(d)
        a.slots, a.prompt, a.new, a.batch, a.seq, a.micro = 4, 64, 16, 4, 128, 2
        res["note"] = "CPU smoke run at a reduced shape: not a measurement"
    res["model"] = "Qwen2.5-0.5B shape, random weights"
    skip = set(a.skip.split(",")) if a.skip else set()
    sections = [
        ("cudnn", lambda: check_cudnn(res), jax.default_backend() == "gpu"),
        ("decode", lambda: bench_decode(cfg, a.slots, a.prompt, a.new, res), True),
        ("update", lambda: bench_update(cfg, a.batch, a.seq, a.micro, res, "xla"), True),
        (
            "update",
            lambda: bench_update(cfg, a.batch, a.seq, a.micro, res, "cudnn"),
            jax.default_backend() == "gpu",
        ),
    ]
    for name, fn, on in sections:
        if not on or name in skip:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        print(f"[{name}] {time.perf_counter() - t:.1f} s", flush=True)
        print(json.dumps(res), flush=True)
    print(json.dumps(res, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
