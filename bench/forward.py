"""Jitted forward of our model vs the transformers (torch) forward, same config and inputs.

Prints one JSON object; ``ratio`` = torch time / our time (>1 means we are faster).
Usage: python bench/forward.py [--batch 16 --seq 256]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import best_of, emit, make_bench_model_dir
from flax import nnx

from agentgym_jax.models import from_pretrained


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    path, hf = make_bench_model_dir()
    model = from_pretrained(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)

    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    fwd(state, jids, jmask).block_until_ready()  # compile
    ours = best_of(lambda: fwd(state, jids, jmask).block_until_ready(), args.repeats)

    tids, tmask = torch.tensor(ids).long(), torch.tensor(mask).long()

    def torch_fwd():
        with torch.no_grad():
            _ = hf(input_ids=tids, attention_mask=tmask).logits

    torch_fwd()
    ref = best_of(torch_fwd, args.repeats)
    tokens = args.batch * args.seq
    emit(
        "forward",
        dict(
            device=str(jax.devices()[0].platform),
            batch=args.batch,
            seq=args.seq,
            ours_s=round(ours, 4),
            torch_s=round(ref, 4),
            ours_tokens_per_s=round(tokens / ours, 1),
            torch_tokens_per_s=round(tokens / ref, 1),
            ratio=round(ref / ours, 3),
        ),
    )


if __name__ == "__main__":
    main()
