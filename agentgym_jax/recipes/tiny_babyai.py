"""The tiny BabyAI base model: a ChatML tokenizer and a Qwen2-architecture LM pretrained on
transcripts of a *random* policy, so RL starts from a model that knows the format and the env's
language but not the solution.

    path = pretrain_tiny("/tmp/tiny", levels=DEFAULT_LEVELS, episodes=2000, steps=600, seed=0)
    model = agentgym_jax.models.from_pretrained(path)            # like any HF checkpoint
    tok = agentgym_jax.models.load_tokenizer(path)               # offline, local files only

The package ships one such checkpoint at ``DEFAULT_MODEL_DIR``
(``python -m agentgym_jax.recipes.tiny_babyai --output-dir DIR`` rebuilds it).

Transcripts follow AgentGym's prompt: [user: env instruction, assistant: ack, user: first
observation], then assistant turns "Thought:\\nMy goal is to <goal>. I will <a>.\\n\\nAction:\\n<a>"
with ``a`` drawn uniformly from the observation's "Available actions" list, each answered by the
env's next observation as a user message. The thought restates the goal so the tokens an RL
policy must condition on sit a few positions before the action (cheap for a 4-layer model); the
action itself is independent of the goal, so the model learns no solution.

Loss (documented choice): next-token cross-entropy on every token after the fixed preamble
(system + instruction + ack, identical in all episodes): assistant replies and observations.
Observations teach the object/label vocabulary and copying from the "Available actions" list,
which is the same skill a valid reply needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-babyai")
# GoTo levels: a single "go to <goal>" action solves them once the goal is in view.
DEFAULT_LEVELS = ("GoToRedBallNoDists", "GoToRedBall", "GoToObj", "GoToLocal")
SYSTEM_PROMPT = "You are a helpful assistant."
EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)  # ids 0, 1, 2

# Qwen2's ChatML template (shorter default system prompt).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Words, numbers and single punctuation marks (each with at most one leading space) and single
# whitespace characters: no pre-token spans a message boundary (those sit next to "\n" or a
# special token), so encoding per-message deltas and concatenating equals encoding the whole.
PRETOKEN_RE = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\s"
REPLY_RE = re.compile(r"\AThought:\n[^\n]+\n\nAction:\n([^\n]+)\Z")


def render_message(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def system_text() -> str:
    return render_message("system", SYSTEM_PROMPT)


def reply_text(goal: str, action: str) -> str:
    return f"Thought:\nMy goal is to {goal}. I will {action}.\n\nAction:\n{action}"


def offered_actions(observation: str) -> list[str]:
    """The quoted actions of the observation's last "Available actions: [...]" line."""
    if "Available actions:" not in observation:
        return []
    return re.findall(r'"([^"]+)"', observation.rsplit("Available actions:", 1)[-1])


def parse_goal(observation: str) -> str | None:
    m = re.search(r"Your goal: ([^\n]+)", observation)
    return m.group(1).strip() if m else None


# -- data ----------------------------------------------------------------------------------------
def _make_env(levels: Sequence[str]):
    import envs

    logging.getLogger("minigrid").setLevel(logging.ERROR)
    return envs.make("babyai", levels=list(levels))


def _safe_step(env, reply: str):
    """env.step, with an env exception ending the episode (reported, never fatal for pretraining)."""
    try:
        return env.step(reply)
    except Exception as e:  # noqa: BLE001  (an env bug must not stop data collection)
        log.debug("env.step raised %r on %r; ending the episode", e, reply)
        return None


def random_episode(env, task_id: int, rng: random.Random, max_turns: int) -> dict[str, Any]:
    """One episode of the uniform-random policy as chat messages (the preamble is implicit)."""
    obs = env.reset(task_id)
    goal = parse_goal(obs) or "finish the task"
    msgs = [{"role": "user", "content": obs}]
    success, turns = False, 0
    for _ in range(max_turns):
        acts = offered_actions(obs)
        if not acts:
            break
        a = rng.choice(acts)
        reply = reply_text(goal, a)
        res = _safe_step(env, reply)
        if res is None:
            break
        turns += 1
        msgs.append({"role": "assistant", "content": reply})
        msgs.append({"role": "user", "content": res.observation})
        obs = res.observation
        if res.reward > 0:
            success = True
        if res.done:
            break
    # End on an assistant turn's answer: the final observation stays (it carries "completed").
    return {"task_id": task_id, "messages": msgs, "success": success, "turns": turns}


def collect_transcripts(levels, episodes: int, max_turns: int, seed: int, split: str = "train"):
    import envs

    env = _make_env(levels)
    ids = envs.task_ids("babyai", split, levels=list(levels))
    rng = random.Random(seed)
    out = [
        random_episode(env, ids[rng.randrange(len(ids))], rng, max_turns) for _ in range(episodes)
    ]
    env.close()
    return out


def random_baseline(levels, horizon: int, repeats: int = 5, seed: int = 1234) -> dict[str, Any]:
    """Success of the uniform-random policy within t turns (t = 1..horizon) on the test split."""
    import envs

    env = _make_env(levels)
    ids = envs.task_ids("babyai", "test", levels=list(levels))
    rng = random.Random(seed)
    per_level = {lv: [0] * horizon for lv in levels}
    n_level = {lv: 0 for lv in levels}
    for _ in range(repeats):
        for tid in ids:
            ep = random_episode(env, tid, rng, horizon)
            lv = levels[tid % len(levels)]
            n_level[lv] += 1
            if ep["success"]:
                for t in range(ep["turns"] - 1, horizon):
                    per_level[lv][t] += 1
    env.close()
    total = [sum(per_level[lv][t] for lv in levels) / sum(n_level.values()) for t in range(horizon)]
    return {
        "episodes": sum(n_level.values()),
        "success_by_turn": [round(x, 3) for x in total],
        "per_level": {lv: [round(c / n_level[lv], 3) for c in per_level[lv]] for lv in levels},
    }


# -- tokenizer -----------------------------------------------------------------------------------
def train_tokenizer(texts, vocab_size: int, out_dir: str | os.PathLike):
    """Byte-level BPE over whitespace/punctuation pre-tokens, ChatML specials; saved as an HF dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKEN_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Special tokens are literal text in the rendered chats; train on the text between them.
    pieces = (p for t in texts for p in re.split("|".join(map(re.escape, SPECIAL_TOKENS)), t) if p)
    tok.train_from_iterator(pieces, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike = DEFAULT_MODEL_DIR):
    from agentgym_jax.models import load_tokenizer as load

    return load(os.fspath(path))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def encode_episode(tok, instruction: str, ack: str, ep: dict):
    """(ids, pieces): the episode encoded message by message after the fixed preamble, and each
    message's (role, start, ids) within ``ids``."""
    pre = system_text() + render_message("user", instruction) + render_message("assistant", ack)
    ids = encode(tok, pre)
    pieces = []
    for m in ep["messages"]:
        piece = encode(tok, render_message(m["role"], m["content"]))
        pieces.append((m["role"], len(ids), piece))
        ids += piece
    return ids, pieces


def episode_tokens(tok, instruction: str, ack: str, ep: dict, obs_weight: float):
    """(ids, weights) for an episode, encoded message by message; weight 0 on the fixed preamble."""
    ids, pieces = encode_episode(tok, instruction, ack, ep)
    w = [0.0] * (len(ids) - sum(len(p) for _, _, p in pieces))
    for role, _, piece in pieces:
        w += [1.0 if role == "assistant" else obs_weight] * len(piece)
    return ids, w


# -- model and training --------------------------------------------------------------------------
def tiny_config(
    vocab_size: int,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    mlp_mult: int = 4,  # intermediate_size = mlp_mult * hidden
    max_len: int = 4096,
    eos=(2, 0),
    pad: int = 0,
):
    from agentgym_jax.models import ModelConfig

    return ModelConfig(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=mlp_mult * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=max_len,
        bos_token_id=None,
        eos_token_id=list(eos),
        pad_token_id=pad,
    )


def _batches(rows, batch: int, seq_len: int, pad_id: int, rng: np.random.Generator):
    """Endless random batches [B, seq_len + 1] (ids) and [B, seq_len] (target weights)."""
    n = len(rows)
    while True:
        idx = rng.choice(n, size=batch, replace=n < batch)
        ids = np.full((batch, seq_len + 1), pad_id, np.int32)
        w = np.zeros((batch, seq_len), np.float32)
        for b, i in enumerate(idx):
            r_ids, r_w = rows[i]
            k = min(len(r_ids), seq_len + 1)
            ids[b, :k] = r_ids[:k]
            w[b, : k - 1] = r_w[1:k]  # weight of predicting token t+1
        yield ids, w


# The copy warm-up's batches: random token segments repeated between random filler.
COPY_WARMUP = {
    "batch": 32,
    "seq_len": 256,
    "lr": 3e-3,
    "min_segment": 8,
    "max_segment": 64,
    "max_gap": 64,  # filler between repeats: 0 .. max_gap - 1 ids
}
COPY_FIRST_ID = 10  # sampled ids start above the special tokens (0-2 here), with a margin


def _copy_batches(batch: int, seq_len: int, vocab: int, rng: np.random.Generator):
    """Endless batches in ``_batches``' layout, where every target is a copy of the context.

    Each row is one random segment (8-63 ids) repeated to the end of the row, the repeats
    separated by random-length prefixes of one random filler. Only the repeats' tokens after
    their first are weighted: each follows a token whose earlier occurrence says what comes
    next, which is what an induction head learns (a token read back by position, not meaning).
    """
    lo, hi = COPY_FIRST_ID, vocab
    if hi - lo < 16:
        raise ValueError(f"vocabulary of {vocab} ids is too small for the copy warm-up")
    while True:
        ids = np.zeros((batch, seq_len + 1), np.int32)
        w = np.zeros((batch, seq_len), np.float32)
        for b in range(batch):
            seg = rng.integers(
                lo, hi, rng.integers(COPY_WARMUP["min_segment"], COPY_WARMUP["max_segment"])
            )
            filler = rng.integers(lo, hi, seq_len + 1)
            row: list[int] = []
            wt: list[float] = []
            while len(row) < seq_len + 1:
                row += list(seg)
                wt += [0.0] * len(seg) if not wt else [0.0] + [1.0] * (len(seg) - 1)
                k = rng.integers(0, COPY_WARMUP["max_gap"])
                row += list(filler[:k])
                wt += [0.0] * k
            ids[b] = row[: seq_len + 1]
            w[b] = wt[1 : seq_len + 1]
        yield ids, w


def train_lm(
    model,
    rows,
    *,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float,
    seed: int,
    pad_id: int,
    log_every: int = 10,
    ckpt_dir: str | os.PathLike | None = None,
    save_every: int = 50,
    data=None,
    name: str = "pretrain",
):
    """AdamW next-token training in one jitted step; returns the per-step loss history.

    Batches come from ``rows`` (token ids and target weights per transcript) or, when given,
    from ``data``: an endless iterator of ``(ids [B, seq_len + 1], weights [B, seq_len])``.

    With ``ckpt_dir``, params, optimizer state, step and losses are saved there every
    ``save_every`` steps (atomically), and a call that finds them resumes: the data stream is
    replayed to the saved step, so a resumed run trains on the same batches as an unbroken one.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params = nnx.split(model)
    warmup = max(1, min(30, steps // 10))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.01)
    )
    opt_state = opt.init(params)

    def loss_fn(p, ids, w):
        logits = nnx.merge(graphdef, p)(ids[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

    def step(p, s, ids, w):
        loss, g = jax.value_and_grad(loss_fn)(p, ids, w)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    # Params and optimizer state are replaced every step: donate them.
    step = jax.jit(step, donate_argnums=(0, 1))
    if data is None:
        data = _batches(rows, batch, seq_len, pad_id, np.random.default_rng(seed))
    losses = []
    start = 0
    if ckpt_dir is not None:
        restored = _load_pretrain_ckpt(ckpt_dir, params, opt_state, steps)
        if restored is not None:
            params, opt_state, start, losses = restored
            for _ in range(start):  # replay the data stream to where the run stopped
                next(data)
            log.info("%s: resumed at step %d from %s", name, start, ckpt_dir)
    t0 = time.time()
    for i in range(start, steps):
        ids, w = next(data)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(ids), jnp.asarray(w))
        if i % log_every == 0 or i == steps - 1:
            losses_val = float(loss)
            log.info(
                "%s step %d/%d loss %.4f (%.1fs)",
                name,
                i + 1,
                steps,
                losses_val,
                time.time() - t0,
            )
        losses.append(loss)
        if ckpt_dir is not None and ((i + 1) % save_every == 0 or i + 1 == steps):
            _save_pretrain_ckpt(ckpt_dir, params, opt_state, i + 1, losses, steps)
    nnx.update(model, params)
    return [float(x) for x in losses]


_CKPT = "pretrain_state.msgpack"


def _save_pretrain_ckpt(ckpt_dir, params, opt_state, step: int, losses, steps: int) -> None:
    import jax
    from flax import serialization

    hist = np.zeros((steps,), np.float32)
    hist[: len(losses)] = [float(x) for x in losses]
    leaves = [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
    blob = serialization.msgpack_serialize(
        {"leaves": dict(enumerate(leaves)), "step": np.int64(step), "losses": hist}
    )
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, _CKPT + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, os.path.join(ckpt_dir, _CKPT))  # a kill mid-write keeps the previous one


def _load_pretrain_ckpt(ckpt_dir, params, opt_state, steps: int):
    """(params, opt_state, step, losses) from ``ckpt_dir``, or None when there is none."""
    import jax
    from flax import serialization

    path = os.path.join(ckpt_dir, _CKPT)
    if not os.path.exists(path):
        return None
    want, treedef = jax.tree.flatten((params, opt_state))
    with open(path, "rb") as f:
        got = serialization.msgpack_restore(f.read())
    leaves = [got["leaves"][i] for i in range(len(got["leaves"]))]
    shapes = [(x.shape, x.dtype) for x in leaves]
    if shapes != [(x.shape, x.dtype) for x in want] or got["losses"].shape != (steps,):
        raise ValueError(
            f"{path} holds another run's state (model shape or step count differ); "
            "delete it to start over"
        )
    params, opt_state = jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])
    step = int(got["step"])
    return params, opt_state, step, [float(x) for x in got["losses"][:step]]


_NOT_SETTINGS = ("out_dir", "levels", "baseline_horizon", "baseline_repeats", "save_every")


def pretrain_tiny(
    out_dir: str | os.PathLike,
    *,
    levels: Sequence[str] = DEFAULT_LEVELS,
    episodes: int = 2000,
    steps: int = 600,
    seed: int = 0,
    max_turns: int = 6,
    vocab_size: int = 1024,
    hidden: int = 128,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    batch: int = 8,
    seq_len: int = 1024,
    lr: float = 3e-3,
    obs_weight: float = 1.0,
    init_from: str | None = None,
    copy_warmup_steps: int = 0,
    save_every: int = 50,
    baseline_horizon: int = 8,
    baseline_repeats: int = 5,
) -> str:
    """Collect random-policy transcripts, train the tokenizer and the model, save everything.

    Returns ``out_dir``: an HF directory (config.json, model.safetensors, tokenizer files) plus
    ``pretrain_info.json`` with the settings, losses and the random-policy baseline.
    ``init_from``: continue training that model (and keep its tokenizer; the architecture
    arguments are then ignored). ``copy_warmup_steps``: first train that many steps on
    ``_copy_batches`` (random segments repeated: an induction warm-up), so the model can copy a
    word from its context by position before it sees a transcript. The tiny models otherwise
    guess the colours they should copy from the observation. Measured on the long levels (README,
    "Horizon study"): 1,500 warm-up steps learn copying, but the transcript steps after them
    lose it again at this size (the copy check ends where it does without the warm-up).
    Training state is saved in ``out_dir/checkpoint`` (and ``checkpoint_copy``) every
    ``save_every`` steps: the same call after an interruption resumes, and a finished run
    removes it.
    """
    # Recorded in pretrain_info.json: the arguments but out_dir, levels (kept apart) and the
    # baseline's, in signature order.
    settings = {k: v for k, v in locals().items() if k not in _NOT_SETTINGS}
    import jax
    from flax import nnx

    import envs
    from agentgym_jax.models import Transformer, save_pretrained

    if episodes < 1 or steps < 1 or copy_warmup_steps < 0:
        raise ValueError(
            f"episodes and steps must be >= 1 and copy_warmup_steps >= 0, got "
            f"episodes={episodes}, steps={steps}, copy_warmup_steps={copy_warmup_steps}"
        )
    levels = tuple(levels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = _make_env(levels)
    instruction, ack = env.instruction(), env.ack
    env.close()
    eps = collect_transcripts(levels, episodes, max_turns, seed)
    t_collect = time.time() - t0
    log.info("collected %d random episodes in %.1fs", len(eps), t_collect)

    chats = [
        system_text()
        + render_message("user", instruction)
        + render_message("assistant", ack)
        + "".join(render_message(m["role"], m["content"]) for m in ep["messages"])
        for ep in eps
    ]
    ckpt_dir, copy_ckpt_dir = out / "checkpoint", out / "checkpoint_copy"
    if init_from is not None:
        tok = load_tokenizer(init_from)
        tok.save_pretrained(os.fspath(out))
    elif (out / "tokenizer.json").exists() and any(
        (d / _CKPT).exists() for d in (ckpt_dir, copy_ckpt_dir)
    ):
        tok = load_tokenizer(out)  # resuming: the ids the saved state was trained on
    else:
        tok = train_tokenizer(chats, vocab_size, out)
    rows = [episode_tokens(tok, instruction, ack, ep, obs_weight) for ep in eps]
    n_pre = rows[0][1].index(1.0) if 1.0 in rows[0][1] else len(rows[0][1])
    if seq_len <= n_pre + 16:
        raise ValueError(
            f"seq_len={seq_len} leaves nothing to learn: the fixed preamble alone is "
            f"{n_pre} tokens; use seq_len >= {n_pre + 256}"
        )
    lens = np.array([len(r[0]) for r in rows])

    if init_from is not None:
        from agentgym_jax.models import from_pretrained

        model = from_pretrained(init_from)
    else:
        cfg = tiny_config(
            len(tok),
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            eos=(tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOT)),
            pad=tok.pad_token_id,
        )
        model = Transformer(cfg, rngs=nnx.Rngs(seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    warmup_info = None
    if copy_warmup_steps:
        t1 = time.time()
        wl = train_lm(
            model,
            None,
            steps=copy_warmup_steps,
            batch=COPY_WARMUP["batch"],
            seq_len=COPY_WARMUP["seq_len"],
            lr=COPY_WARMUP["lr"],
            seed=seed,
            pad_id=tok.pad_token_id,
            ckpt_dir=copy_ckpt_dir,
            save_every=save_every,
            data=_copy_batches(
                COPY_WARMUP["batch"], COPY_WARMUP["seq_len"], len(tok), np.random.default_rng(seed)
            ),
            name="copy warm-up",
        )
        warmup_info = {
            **COPY_WARMUP,
            "steps": copy_warmup_steps,
            # The loss on repeats stays near log(vocab) until the induction heads form, then drops.
            "loss_per_50_steps": [
                round(float(np.mean(wl[i : i + 50])), 4) for i in range(0, len(wl), 50)
            ],
            "loss_last10": float(np.mean(wl[-10:])),
            "seconds": round(time.time() - t1, 1),
        }
    t1 = time.time()
    losses = train_lm(
        model,
        rows,
        steps=steps,
        batch=batch,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        pad_id=tok.pad_token_id,
        ckpt_dir=ckpt_dir,
        save_every=save_every,
    )
    t_train = time.time() - t1
    save_pretrained(model, out)

    baseline = random_baseline(levels, baseline_horizon, baseline_repeats, seed=seed + 1)
    preamble_ids = encode(
        tok, system_text() + render_message("user", instruction) + render_message("assistant", ack)
    )
    info = {
        "levels": list(levels),
        "settings": settings,
        "reply_format": reply_text("<goal>", "<action>"),
        "loss": "next-token CE on all tokens after the fixed system+instruction+ack preamble "
        f"(assistant weight 1, observation weight {obs_weight})",
        "vocab_size": len(tok),
        "n_params": n_params,
        "instruction_tokens": len(encode(tok, instruction)),
        "preamble_tokens": len(preamble_ids),
        "episode_tokens": {
            "mean": float(lens.mean()),
            "p90": float(np.percentile(lens, 90)),
            "max": int(lens.max()),
        },
        "train_random_success": float(np.mean([e["success"] for e in eps])),
        "loss_first": losses[0],
        "loss_last10": float(np.mean(losses[-10:])),
        "random_baseline_test": baseline,
        **({"copy_warmup": warmup_info} if warmup_info else {}),
        "stop_token_id": tok.convert_tokens_to_ids(IM_END),
        "seconds": {
            "collect": round(t_collect, 1),
            "train": round(t_train, 1),
            "total": round(time.time() - t0, 1),
        },
        "env_package": getattr(envs, "__name__", "envs"),
    }
    with open(out / "pretrain_info.json", "w") as f:
        json.dump(info, f, indent=2)
    # Finished: the HF files are the result.
    for d in (ckpt_dir, copy_ckpt_dir):
        shutil.rmtree(d, ignore_errors=True)
    log.info(
        "saved tiny model to %s (loss %.3f -> %.3f, %d params)",
        out,
        losses[0],
        info["loss_last10"],
        n_params,
    )
    return os.fspath(out)


# -- evaluation ----------------------------------------------------------------------------------
def evaluate_model(
    model_dir: str | os.PathLike = DEFAULT_MODEL_DIR,
    *,
    levels=DEFAULT_LEVELS,
    horizon: int = 8,
    repeats: int = 2,
    num_tasks: int | None = None,
    max_new: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    max_len: int = 2048,
    num_slots: int | None = None,
) -> dict[str, Any]:
    """Play the test split (its first ``num_tasks`` ids, each ``repeats`` times) with the model
    sampled at ``temperature`` through the library's Engine and Rollout; format validity + success.

    A reply is well formed when it is exactly "Thought:\\n<line>\\n\\nAction:\\n<line>" ended by
    <|im_end|> within ``max_new`` tokens, and valid when its action is one the observation offers.
    """
    import envs
    from agentgym_jax.data import expand_groups
    from agentgym_jax.engine import Engine, EngineConfig
    from agentgym_jax.engine.chat import ChatDeltas
    from agentgym_jax.envs_driver import EnvDriver
    from agentgym_jax.models import from_pretrained
    from agentgym_jax.rollout import Rollout, RolloutSettings

    levels = tuple(levels)
    logging.getLogger("minigrid").setLevel(logging.ERROR)
    tok = load_tokenizer(model_dir)
    model = from_pretrained(model_dir)
    chat = ChatDeltas(tok)
    stop = chat.end_of_turn_id
    ids = envs.task_ids("babyai", "test", levels=list(levels))[:num_tasks]
    tasks = expand_groups(ids, repeats)
    engine = Engine(
        model, EngineConfig(num_slots=num_slots or len(tasks), max_len=max_len, seed=seed)
    )
    driver = EnvDriver("babyai", {"levels": list(levels)}, num_workers=0)
    settings = RolloutSettings(
        max_turns=horizon,
        max_tokens_per_turn=max_new,
        max_prompt_length=max_len - max_new,
        temperature=temperature,
        seed=seed,
    )
    t0 = time.time()
    try:
        rollout = Rollout(engine, driver, chat, stop_token_ids=model.config.eos_token_ids)
        episodes = rollout.run(tasks, settings).episodes
    finally:
        driver.close()
    seconds = time.time() - t0
    n_replies = n_format = n_valid = n_truncated = 0
    for e in episodes:
        n_truncated += e.turns - e.turns_stopped  # cut at max_new, not at a stop token
        for k in range(e.turns):
            # messages: [instruction, ack, obs_0, reply_1, obs_1, reply_2, ...]
            obs, text = e.messages[2 + 2 * k]["content"], e.messages[3 + 2 * k]["content"]
            last = e.tokens[e.turn_ends[k]] if k < len(e.turn_ends) else None
            ended = last == stop
            m = REPLY_RE.match(text)
            n_replies += 1
            n_format += bool(m and ended)
            n_valid += bool(m and ended and m.group(1).strip() in offered_actions(obs))
    n = max(len(episodes), 1)
    by_turn = [
        round(sum(e.success and e.turns <= t for e in episodes) / n, 3)
        for t in range(1, horizon + 1)
    ]
    return {
        "episodes": len(episodes),
        "horizon": horizon,
        "temperature": temperature,
        "success_by_turn": by_turn,
        "replies": n_replies,
        "well_formed": round(n_format / max(n_replies, 1), 3),
        "valid_action": round(n_valid / max(n_replies, 1), 3),
        "truncated": round(n_truncated / max(n_replies, 1), 3),
        "env_errors": sum(e.error is not None and e.truncated is None for e in episodes),
        "prompt_tokens": episodes[0].prompt_len if episodes else 0,
        "seconds": round(seconds, 1),
        "examples": [e.messages[3]["content"] for e in episodes[::7] if e.turns][:3],
    }


def _token_offsets(tok, ids: list[int]) -> np.ndarray | None:
    """Start offset (in the decoded text) of each token, or None when decoding token by token
    does not rebuild the text (then spans cannot be located by characters)."""
    pieces = [tok.decode([t]) for t in ids]
    if "".join(pieces) != tok.decode(ids):
        return None
    return np.cumsum([0] + [len(x) for x in pieces])


def copy_spans(tok, reply_ids: list[int]) -> dict[str, tuple[int, int]]:
    """Token spans [i0, i1) of a reply's copied parts: ``goal`` (the goal restated in the
    thought, a copy of the first observation's) and ``action_line`` (a copy of the action the
    thought names). Only whole tokens inside the span's characters are included."""
    offs = _token_offsets(tok, reply_ids)
    if offs is None:
        return {}
    text = tok.decode(reply_ids)
    out = {}
    marks = {
        "goal": ("My goal is to", ". I will"),  # the goal's first token carries its space
        "action_line": ("\n\nAction:\n", None),
    }
    for key, (start, end) in marks.items():
        c0 = text.find(start)
        c1 = len(text) if end is None else text.find(end, c0 + 1)
        if c0 < 0 or c1 < 0:
            continue
        c0 += len(start)
        i0 = int(np.searchsorted(offs, c0, side="left"))  # first token starting in the span
        if end is None:  # up to the end-of-turn marker that closes the reply
            body = text[c0:].split(IM_END)[0].rstrip("\n")
            c1 = c0 + len(body)
        i1 = int(np.searchsorted(offs, c1, side="right")) - 1  # tokens ending inside it
        if i1 > i0:
            out[key] = (i0, i1)
    return out


def copy_nll(logits_fn, tok, instruction: str, ack: str, episodes, max_tokens: int = 3072):
    """Teacher-forced loss, in nats per token, on the parts of each reply that copy the context
    (``copy_spans``), over random-policy ``episodes``; ``logits_fn(ids [T]) -> [T, V]``.

    In these transcripts both parts are exact copies, so a model that reads its context scores
    near 0, while one that only learned the reply template pays about log(choices) on every
    colour and object word (log 6 = 1.8 for the colours) and names actions that are not offered.
    """
    import jax

    sums = {"goal": [], "action_line": []}
    for ep in episodes:
        ids, pieces = encode_episode(tok, instruction, ack, ep)
        ids = ids[:max_tokens]
        logp = np.asarray(jax.nn.log_softmax(np.asarray(logits_fn(ids[:-1]), np.float32), -1))
        tok_lp = logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]  # tok_lp[t-1]: log p(ids[t])
        for role, start, piece in pieces:
            if start + len(piece) > len(ids):
                break
            if role != "assistant":
                continue
            for key, (i0, i1) in copy_spans(tok, piece).items():
                sums[key].extend(-tok_lp[start + i0 - 1 : start + i1 - 1])
    return {k: (round(float(np.mean(v)), 3) if v else None) for k, v in sums.items()} | {
        "tokens": {k: len(v) for k, v in sums.items()}
    }


def copy_check(model_dir, levels, episodes: int = 16, max_turns: int = 15, seed: int = 321):
    """``copy_nll`` of a saved model on random-policy episodes of the test split."""
    import jax.numpy as jnp

    from agentgym_jax.models import from_pretrained

    levels = tuple(levels)
    tok = load_tokenizer(model_dir)
    model = from_pretrained(model_dir)
    env = _make_env(levels)
    instruction, ack = env.instruction(), env.ack
    env.close()
    eps = collect_transcripts(levels, episodes, max_turns, seed, split="test")
    max_len = model.config.max_position_embeddings
    res = copy_nll(
        lambda ids: model(jnp.asarray([ids]))[0], tok, instruction, ack, eps, max_tokens=max_len
    )
    return {"episodes": episodes, "max_turns": max_turns, **res}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agentgym-jax pretrain-tiny", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--output-dir", required=True, help="directory to write the HF model + tokenizer"
    )
    p.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS), help="BabyAI levels")
    p.add_argument("--episodes", type=int, default=2000, help="random-policy episodes to collect")
    p.add_argument("--steps", type=int, default=600, help="AdamW steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=6, help="turn limit of collected episodes")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--obs-weight", type=float, default=1.0, help="loss weight of observation tokens"
    )
    p.add_argument(
        "--init-from", default=None, help="continue training this model (keeps its tokenizer)"
    )
    p.add_argument(
        "--copy-warmup-steps",
        type=int,
        default=0,
        help="first train this many steps on repeated random segments (teaches copying)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=50,
        help="checkpoint period in steps; rerun the same command to resume",
    )
    p.add_argument("--eval", action="store_true", help="also sample the model on the test split")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = pretrain_tiny(
        a.output_dir,
        levels=a.levels,
        episodes=a.episodes,
        steps=a.steps,
        seed=a.seed,
        max_turns=a.max_turns,
        vocab_size=a.vocab_size,
        hidden=a.hidden,
        layers=a.layers,
        heads=a.heads,
        kv_heads=a.kv_heads,
        batch=a.batch,
        seq_len=a.seq_len,
        lr=a.lr,
        obs_weight=a.obs_weight,
        init_from=a.init_from,
        copy_warmup_steps=a.copy_warmup_steps,
        save_every=a.save_every,
    )
    if a.eval:
        res = evaluate_model(path, levels=a.levels)
        with open(os.path.join(path, "pretrain_info.json")) as f:
            info = json.load(f)
        info["base_model_eval"] = res
        info["copy_check"] = copy_check(path, a.levels)
        with open(os.path.join(path, "pretrain_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        shown = {k: v for k, v in res.items() if k != "examples"}
        print(json.dumps({**shown, "copy_check": info["copy_check"]}, indent=2))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
