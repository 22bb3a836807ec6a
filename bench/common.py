"""Shared bench helpers: the tiny benchmark Qwen2 config, timing, JSON output."""

from __future__ import annotations

import json
import os
import tempfile
import time

BENCH_QWEN2 = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def make_bench_model_dir(path: str | None = None, seed: int = 0):
    """Save a random benchmark Qwen2 with transformers; returns (dir, torch model)."""
    import torch
    import transformers

    path = path or tempfile.mkdtemp(prefix="agentgym_bench_")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2Config(**BENCH_QWEN2)
    ).eval()
    model.save_pretrained(path)
    return path, model


def best_of(fn, repeats: int = 3) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs (fn must block until done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def emit(name: str, result: dict) -> None:
    result = {"bench": name, "threads": os.cpu_count(), **result}
    print(json.dumps(result, indent=2))


def bench_args(doc: str, *, steps: bool = False):
    """The shared command line of the training benches: --config, [--steps | --repeats], overrides."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--config", default="configs/demo.yaml")
    if steps:
        ap.add_argument("--steps", type=int, default=3)
    else:
        ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args()


def bench_trainer(args, prefix: str):
    """A ``Trainer`` for ``args.config`` writing into a fresh temporary run directory."""
    from agentgym_jax.config import load_config
    from agentgym_jax.trainer import Trainer

    out = tempfile.mkdtemp(prefix=prefix)
    cfg = load_config(
        args.config, [f"trainer.output_dir={out}", "trainer.logger=[jsonl]", *args.overrides]
    )
    return cfg, Trainer.from_config(cfg)
