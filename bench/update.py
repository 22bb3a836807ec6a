"""Actor update step time and tokens/s on the tiny benchmark config, vs a torch reference step.

Config: Qwen2, hidden 256, 4 layers, 4 heads (2 kv), vocab 8192, mlp 1024; batch 16 x 512 tokens,
one PPO epoch, one mini-batch of 16, micro-batches of 4; the loss is the paper's (PPO clip 0.2,
dual clip 3, entropy 0.001, low_var_kl 0.001, token-mean) + AdamW + global-norm clip. The torch
reference runs the same loss and optimizer on HF ``Qwen2ForCausalLM`` (float32, same threads).
Prints one JSON object; ``speedup_vs_torch`` = torch step time / jax step time.

  .venv/bin/python bench/update.py [--steps 3] [--no-torch] [--micro 4]

``--packed-vs-padded``: instead, one demo rollout (``--config``, at the horizon of training step
``--at-step``, default the last) and the learner's whole step on its batch (log-prob passes and
the update), with ``model.use_remove_padding`` on vs off, alternating after a warm-up of each;
prints ``packed_vs_padded`` = padded step time / packed step time, and tokens/s of both. The
override ``trainer.output_dir=COPY_OF_A_RUN`` rolls out that run's trained policy instead of
the base model.

  .venv/bin/python bench/update.py --packed-vs-padded [--config configs/demo.yaml] [--steps 3]
      [trainer.output_dir=/tmp/copy_of_runs_demo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import BENCH_QWEN2  # noqa: E402
from flax import nnx  # noqa: E402

from agentgym_jax import sharding as sh  # noqa: E402
from agentgym_jax.models import ModelConfig, Transformer  # noqa: E402
from agentgym_jax.rl import (
    ActorConfig,
    compute_logprobs,
    init_train_state,  # noqa: E402
    make_actor_update,
    make_optimizer,
)

HF_CFG = dict(BENCH_QWEN2, model_type="qwen2", max_position_embeddings=2048, rms_norm_eps=1e-6)


def make_batch(b, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    attn = np.ones((b, t), np.int32)
    lengths = rng.integers(t * 3 // 4, t + 1, b)
    for i, n in enumerate(lengths):
        attn[i, n:] = 0
    loss = attn.copy()
    loss[:, :64] = 0  # prompt
    for start in range(128, t, 128):  # env turns between model turns
        loss[:, start : start + 32] = 0
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32) * attn
    adv = np.repeat(rng.normal(size=(b, 1)), t, 1).astype(np.float32) * loss
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "advantages": adv}


def bench_jax(cfg: ActorConfig, batch, steps):
    mcfg = ModelConfig.from_hf_dict(HF_CFG)
    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=-1, tensor=1))
    state = init_train_state(Transformer(mcfg, rngs=nnx.Rngs(0)), make_optimizer(cfg), mesh)
    lp, _ = compute_logprobs(
        state.graphdef, state.params, batch, micro_batch_size=cfg.micro_batch_size
    )
    lp = np.asarray(lp)
    batch = dict(batch, old_logprobs=lp * batch["loss_mask"], ref_logprobs=lp * batch["loss_mask"])
    upd = make_actor_update(cfg, mesh, state)
    t0 = time.perf_counter()
    state, m = upd(state, batch, jax.random.key(0))
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = upd(state, batch, jax.random.key(i + 1))
        jax.block_until_ready((state.params, m))
        times.append(time.perf_counter() - t0)
    return first, times, {k: float(v) for k, v in m.items()}, batch


def bench_torch(cfg: ActorConfig, batch, steps):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in HF_CFG.items() if k != "model_type"}))
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    tb = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    n_tok = tb["loss_mask"].float().sum()
    mb = cfg.micro_batch_size

    def step():
        opt.zero_grad(set_to_none=True)
        for s in range(0, tb["input_ids"].shape[0], mb):
            x = {k: v[s : s + mb] for k, v in tb.items()}
            logits = model(
                input_ids=x["input_ids"], attention_mask=x["attention_mask"]
            ).logits.float()
            logits = logits[:, :-1]
            logp_all = torch.log_softmax(logits, -1)
            logp = torch.gather(logp_all, -1, x["input_ids"][:, 1:, None].long())[..., 0]
            ent = -(logp_all.exp() * logp_all).sum(-1)
            m = x["loss_mask"][:, 1:].float()
            old, ref, adv = (
                x["old_logprobs"][:, 1:],
                x["ref_logprobs"][:, 1:],
                x["advantages"][:, 1:],
            )
            ratio = torch.exp(torch.clamp(logp - old, -20, 20))
            l1, l2 = (
                -adv * ratio,
                -adv * torch.clamp(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high),
            )
            c1 = torch.maximum(l1, l2)
            pg = torch.where(adv < 0, torch.minimum(-adv * cfg.clip_ratio_c, c1), c1)
            kl = torch.clamp(torch.exp(ref - logp) - (ref - logp) - 1, -10, 10)
            per_tok = pg - cfg.entropy_coeff * ent + cfg.kl_loss_coef * kl
            ((per_tok * m).sum() / n_tok).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def packed_vs_padded(args):
    from types import SimpleNamespace

    from common import bench_trainer

    from agentgym_jax.rl import packing as PK
    from agentgym_jax.rollout import to_batch
    from agentgym_jax.trainer import pad_bucket, rollout_settings

    cfg, trainer = bench_trainer(
        SimpleNamespace(config=args.config, overrides=args.overrides), "bench_update_"
    )
    ctx = trainer.ctx
    try:
        # With trainer.output_dir=RUN_DIR (a copy: the bench may write there) the rollout uses
        # that run's newest checkpoint: a trained policy's episode lengths.
        resumed = trainer.maybe_resume()
        at = args.at_step or cfg.trainer.total_training_steps
        settings = rollout_settings(cfg, ctx.horizon, at, eval_mode=False)
        episodes = ctx.rollout.run(list(next(ctx.sampler)), settings).episodes
        max_len = ctx.engine.config.max_len
        seq_len = pad_bucket(max(len(e.tokens) for e in episodes), max_len)
        batch = to_batch(episodes, pad_multiple=seq_len, max_len=max_len)
        state, times = trainer.state, {False: [], True: []}
        for rep in range(args.steps + 1):
            for packed in (False, True):
                ctx.learner.packed = packed
                t0 = time.perf_counter()
                state, _ = ctx.learner.step(state, batch, 1)  # metrics come back: synced
                if rep:  # the first round compiles
                    times[packed].append(time.perf_counter() - t0)
    finally:
        trainer.close()
    lengths = batch["attention_mask"].sum(-1)
    b, t = batch["input_ids"].shape
    packing = PK.pack(lengths, t)
    padded_s, packed_s = (statistics.median(times[k]) for k in (False, True))
    tokens = int(lengths.sum())
    print(
        json.dumps(
            {
                "bench": "update_packed_vs_padded",
                "config": args.config,
                "horizon": settings.max_turns,
                "policy_step": resumed,
                "episodes": b,
                "seq_len": t,
                "tokens": tokens,
                "padded_fill": round(tokens / (b * t), 3),
                "packed_rows": packing.n_rows,
                # Below a quarter fewer rows the learner runs the pass padded (packing.worth_it).
                "packing_applies": PK.worth_it(packing.n_rows, b),
                "packed_fill": round(packing.fill(), 3),
                "step_s_padded": round(padded_s, 3),
                "step_s_packed": round(packed_s, 3),
                "tokens_per_s_padded": round(tokens / padded_s, 1),
                "tokens_per_s_packed": round(tokens / packed_s, 1),
                "packed_vs_padded": round(padded_s / packed_s, 3),
            }
        )
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packed-vs-padded", action="store_true")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--at-step", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if args.packed_vs_padded:
        return packed_vs_padded(args)
    cfg = ActorConfig(
        lr=1e-6, ppo_mini_batch_size=args.batch, ppo_micro_batch_size=args.micro, ppo_epochs=1
    )
    batch = make_batch(args.batch, args.seq, HF_CFG["vocab_size"])
    tokens = args.batch * args.seq
    first, times, metrics, full_batch = bench_jax(cfg, batch, args.steps)
    jt = statistics.median(times)
    out = {
        "bench": "actor_update",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "config": {
            k: HF_CFG[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "intermediate_size",
            )
        },
        "batch": args.batch,
        "seq_len": args.seq,
        "micro_batch": args.micro,
        "jax_first_call_s": round(first, 3),
        "jax_step_s": round(jt, 4),
        "jax_tokens_per_s": round(tokens / jt, 1),
        "jax_grad_norm": round(metrics["actor/grad_norm"], 5),
    }
    if not args.no_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        tt = statistics.median(bench_torch(cfg, full_batch, args.steps))
        out.update(
            torch_step_s=round(tt, 4),
            torch_tokens_per_s=round(tokens / tt, 1),
            speedup_vs_torch=round(tt / jt, 3),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
