"""The shipped tiny BabyAI model and tokenizer, and a miniature `pretrain_tiny` run."""

from __future__ import annotations

import json
import os
import random

import jax
import numpy as np
import pytest
from flax import nnx

from agentgym_jax.recipes import tiny_babyai as tiny

SHIPPED = tiny.DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def tok():
    return tiny.load_tokenizer(SHIPPED)


@pytest.fixture(scope="module")
def transcripts():
    env = tiny._make_env(tiny.DEFAULT_LEVELS)
    rng = random.Random(0)
    eps = [tiny.random_episode(env, tid, rng, 5) for tid in (0, 1, 2, 3, 41, 46)]
    msgs = [
        [{"role": "user", "content": env.instruction()}, {"role": "assistant", "content": env.ack}]
        + e["messages"]
        for e in eps
    ]
    env.close()
    return msgs


def test_shipped_files_and_size():
    names = set(os.listdir(SHIPPED))
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "pretrain_info.json",
    ):
        assert f in names, f"{f} missing from {SHIPPED}"
    total = sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in names)
    assert total < 8 * 1024**2, f"assets are {total / 2**20:.1f} MiB; keep them under 8 MiB"


def test_chat_template_renders_chatml(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "go"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        "<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = tok.apply_chat_template(
        [{"role": "system", "content": "S"}] + msgs[:1], tokenize=False
    )
    assert custom == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ids == tok.encode(text, add_special_tokens=False)
    # Specials are single, atomic ids; eos is the end-of-turn token, pad is <|endoftext|>.
    for t in tiny.SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert tok.eos_token == tiny.IM_END and tok.pad_token == tiny.EOT
    assert ids.count(tok.convert_tokens_to_ids(tiny.IM_START)) == 5


def test_tokenizer_round_trips_transcripts(tok, transcripts):
    for msgs in transcripts:
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        # Env text is mostly whole-word tokens (the point of training on it).
        assert len(ids) < 0.4 * len(text)
    odd = "Thought:\nünïcode ✓ 12345  tabs\tand\n\nAction:\ngo to red ball 1"
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


def test_encoding_is_stable_under_concatenation_at_message_boundaries(tok, transcripts):
    """What the rollout relies on: per-message token deltas concatenate to the full encoding."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    for msgs in transcripts:
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        # Deltas between consecutive rendered prefixes (with and without generation prompt).
        prev_text, pieces = "", []
        for k in range(1, len(msgs) + 1):
            gen = msgs[k - 1]["role"] == "user" and k < len(msgs)
            text = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=gen)
            assert text.startswith(prev_text)
            pieces.append(enc(text[len(prev_text) :]))
            prev_text = text
        assert sum(pieces, []) == full
        # The split a sampler makes: model reply up to <|im_end|>, then "\n<|im_start|>user\n...".
        text = tok.apply_chat_template(msgs, tokenize=False)
        cuts = [i + len(tiny.IM_END) for i in range(len(text)) if text.startswith(tiny.IM_END, i)]
        cuts += [
            i + len("<|im_start|>assistant\n")
            for i in range(len(text))
            if text.startswith("<|im_start|>assistant\n", i)
        ]
        for c in cuts:
            assert enc(text[:c]) + enc(text[c:]) == full


def test_shipped_model_loads_and_matches_tokenizer(tok):
    import jax.numpy as jnp

    from agentgym_jax.models import ModelConfig, from_pretrained

    with open(os.path.join(SHIPPED, "pretrain_info.json")) as f:
        info = json.load(f)
    model = from_pretrained(SHIPPED)
    cfg = model.config
    assert cfg == ModelConfig.from_pretrained(SHIPPED)
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok) == info["vocab_size"]
    assert cfg.hidden_size == info["settings"]["hidden"]
    assert cfg.num_hidden_layers == info["settings"]["layers"]
    assert cfg.eos_token_ids[0] == tok.convert_tokens_to_ids(tiny.IM_END) == info["stop_token_id"]
    assert cfg.pad_token_id == tok.pad_token_id
    import envs

    env = tiny._make_env(tiny.DEFAULT_LEVELS)
    msgs = envs.initial_messages(env, env.reset(0))
    env.close()
    ids = tok.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    logits = model(jnp.asarray([ids]))
    assert logits.shape == (1, len(ids), cfg.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Trained, not random: after the generation prompt it starts its reply with "Thought".
    assert tok.decode([int(jnp.argmax(logits[0, -1]))]) == "Thought"


def test_evaluate_model_runs_through_engine_and_rollout(tok, monkeypatch):
    """A short eval on the shipped model: episodes come from Rollout.run (Engine inside), the
    metrics agree with them, and the first replies are well formed with valid actions."""
    import envs
    from agentgym_jax.data import expand_groups
    from agentgym_jax.engine import Engine
    from agentgym_jax.rollout import Rollout, RolloutResult

    runs = []
    real_run = Rollout.run

    def spy(self, tasks, settings):
        res = real_run(self, tasks, settings)
        runs.append((self, list(tasks), settings, res))
        return res

    monkeypatch.setattr(Rollout, "run", spy)
    res = tiny.evaluate_model(num_tasks=4, repeats=2, horizon=2, max_len=1024, seed=0)
    assert len(runs) == 1
    ro, tasks, settings, result = runs[0]
    assert isinstance(result, RolloutResult)
    assert isinstance(ro.engine, Engine) and ro.engine.config.max_len == 1024
    assert settings.max_turns == 2 and settings.max_tokens_per_turn == 48
    ids = envs.task_ids("babyai", "test", levels=list(tiny.DEFAULT_LEVELS))[:4]
    assert tasks == expand_groups(ids, 2)
    eps = result.episodes
    assert res["episodes"] == len(eps) == 8 and res["horizon"] == 2
    assert res["replies"] == sum(e.turns for e in eps) >= len(eps)
    for k in ("well_formed", "valid_action", "truncated"):
        assert 0.0 <= res[k] <= 1.0, (k, res)
    assert res["valid_action"] <= res["well_formed"]
    by_turn = res["success_by_turn"]
    assert len(by_turn) == 2 and 0.0 <= by_turn[0] <= by_turn[1] <= 1.0
    assert by_turn[-1] == round(sum(e.success for e in eps) / len(eps), 3)
    assert res["prompt_tokens"] == eps[0].prompt_len > 0
    assert res["env_errors"] == 0 and all(e.error is None for e in eps)
    # Trained, not random: nearly all first replies are well formed with an offered action.
    valid = 0
    for e in eps:
        m = tiny.REPLY_RE.match(e.messages[3]["content"])
        ended = e.tokens[e.turn_ends[0]] == tok.convert_tokens_to_ids(tiny.IM_END)
        valid += bool(ended and m and m.group(1) in tiny.offered_actions(e.messages[2]["content"]))
    assert valid >= 6, [e.messages[3]["content"] for e in eps]


MINI = dict(
    levels=["GoToRedBallNoDists"],
    episodes=6,
    max_turns=2,
    baseline_horizon=2,
    baseline_repeats=1,
    vocab_size=600,
    hidden=32,
    layers=1,
    heads=2,
    kv_heads=1,
    seed=0,
    batch=2,
    seq_len=640,
    lr=1e-2,
)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    return tiny.pretrain_tiny(tmp_path_factory.mktemp("mini") / "m", steps=12, **MINI)


def test_pretrain_tiny_miniature(miniature):
    from agentgym_jax.models import from_pretrained, load_tokenizer

    out = miniature
    assert not os.path.exists(os.path.join(out, "checkpoint"))  # removed once finished
    with open(os.path.join(out, "pretrain_info.json")) as f:
        info = json.load(f)
    assert info["loss_last10"] < info["loss_first"] - 0.5, info
    assert info["levels"] == ["GoToRedBallNoDists"]
    assert len(info["random_baseline_test"]["success_by_turn"]) == 2
    tok = load_tokenizer(out)
    _assert_encodes_as_trained(out)
    model = from_pretrained(out)
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 32
    assert tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")
    assert np.isfinite(info["loss_last10"])


def test_pretraining_resumes_where_it_was_interrupted(miniature, tmp_path, monkeypatch):
    """A run killed after its step-4 checkpoint, rerun, ends with the params of an unbroken run."""
    from agentgym_jax.models import from_pretrained

    def params(path):
        return jax.tree.map(np.asarray, nnx.state(from_pretrained(path), nnx.Param))

    kw = dict(MINI, steps=6, save_every=2, init_from=miniature)
    whole = tiny.pretrain_tiny(tmp_path / "whole", **kw)
    real = tiny._save_pretrain_ckpt

    def save_then_die(ckpt_dir, params, opt_state, step, losses, steps):
        real(ckpt_dir, params, opt_state, step, losses, steps)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_save_pretrain_ckpt", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tiny.pretrain_tiny(tmp_path / "broken", **kw)
    assert os.path.exists(tmp_path / "broken" / "checkpoint" / tiny._CKPT)
    monkeypatch.setattr(tiny, "_save_pretrain_ckpt", real)
    resumed = tiny.pretrain_tiny(tmp_path / "broken", **kw)
    jax.tree.map(np.testing.assert_array_equal, params(resumed), params(whole))
    with open(os.path.join(resumed, "pretrain_info.json")) as f:
        info = json.load(f)
    with open(os.path.join(whole, "pretrain_info.json")) as f:
        assert info["loss_last10"] == json.load(f)["loss_last10"]
    # init_from keeps the tokenizer and starts from the trained weights, not from scratch.
    assert info["settings"]["init_from"] == miniature
    with (
        open(os.path.join(miniature, "tokenizer.json")) as f,
        open(resumed + "/tokenizer.json") as g,
    ):
        assert json.load(f)["model"] == json.load(g)["model"]
    with open(os.path.join(miniature, "pretrain_info.json")) as f:
        assert info["loss_first"] < json.load(f)["loss_first"] - 0.5


def test_copy_batches_weight_exactly_the_copied_tokens():
    """Every weighted target repeats an earlier bigram's second token (an induction head can
    predict it), and the first token of each repeat, which follows filler, is not weighted."""
    vocab, seq = 591, 256
    ids, w = next(tiny._copy_batches(8, seq, vocab, np.random.default_rng(0)))
    assert ids.shape == (8, seq + 1) and w.shape == (8, seq)
    assert ids.min() >= tiny.COPY_FIRST_ID and ids.max() < vocab
    for row, wt in zip(ids, w):
        for t in np.flatnonzero(wt):  # w[t] weights predicting row[t + 1] from row[: t + 1]
            earlier = set(zip(row[: t - 1].tolist(), row[1:t].tolist()))
            assert (int(row[t]), int(row[t + 1])) in earlier, t
        assert wt[:7].sum() == 0  # the first occurrence (>= 8 ids) is not a copy
    assert 0.3 < w.mean() < 0.95, w.mean()  # mostly repeats, some filler
    # Another generator seed gives other rows; the same seed the same rows (resume replays it).
    again, _ = next(tiny._copy_batches(8, seq, vocab, np.random.default_rng(0)))
    other, _ = next(tiny._copy_batches(8, seq, vocab, np.random.default_rng(1)))
    assert np.array_equal(again, ids) and not np.array_equal(other, ids)


def test_copy_warmup_runs_first_and_resumes(miniature, tmp_path, monkeypatch):
    """With copy_warmup_steps, pretraining first trains on copy batches; a run killed inside the
    warm-up resumes to the params of an unbroken run, and the info records the warm-up."""
    from agentgym_jax.models import from_pretrained

    def params(path):
        return jax.tree.map(np.asarray, nnx.state(from_pretrained(path), nnx.Param))

    kw = dict(MINI, steps=2, save_every=2, copy_warmup_steps=4)
    whole = tiny.pretrain_tiny(tmp_path / "whole", **kw)
    real = tiny._save_pretrain_ckpt

    def save_then_die(ckpt_dir, params, opt_state, step, losses, steps):
        real(ckpt_dir, params, opt_state, step, losses, steps)
        if str(ckpt_dir).endswith("checkpoint_copy") and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_save_pretrain_ckpt", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tiny.pretrain_tiny(tmp_path / "broken", **kw)
    assert not os.path.exists(tmp_path / "broken" / "checkpoint")
    monkeypatch.setattr(tiny, "_save_pretrain_ckpt", real)
    resumed = tiny.pretrain_tiny(tmp_path / "broken", **kw)
    jax.tree.map(np.testing.assert_array_equal, params(resumed), params(whole))
    assert not os.path.exists(tmp_path / "broken" / "checkpoint_copy")  # removed once finished
    with open(os.path.join(resumed, "pretrain_info.json")) as f:
        info = json.load(f)
    assert info["copy_warmup"]["steps"] == 4 and len(info["copy_warmup"]["loss_per_50_steps"]) == 1
    assert info["settings"]["copy_warmup_steps"] == 4
    # The warm-up changed the weights the transcript phase started from.
    plain = tiny.pretrain_tiny(tmp_path / "plain", **dict(kw, copy_warmup_steps=0))
    with open(os.path.join(plain, "pretrain_info.json")) as f:
        assert json.load(f)["loss_first"] != info["loss_first"]


def test_pretrain_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="episodes"):
        tiny.pretrain_tiny(tmp_path, episodes=0, steps=1)
    with pytest.raises(ValueError, match="copy_warmup_steps"):
        tiny.pretrain_tiny(tmp_path, steps=1, copy_warmup_steps=-1)
    with pytest.raises(ValueError, match="preamble"):
        tiny.pretrain_tiny(tmp_path, levels=["GoToRedBallNoDists"], episodes=2, steps=1, seq_len=64)


def test_cli_passes_options_to_pretrain_tiny(capsys):
    from agentgym_jax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain-tiny", "--help"])
    assert e.value.code == 0
    assert "--output-dir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # the script's own parser sees (and rejects) the options
        cli.main(["pretrain-tiny", "--steps", "3"])
    assert e.value.code == 2
    assert "--output-dir" in capsys.readouterr().err


def _assert_encodes_as_trained(model_dir):
    """The tokenizer the trainer loads encodes a transcript exactly as the model's own
    ``tokenizer.json`` pipeline (what pretraining used), with ``config.json`` present."""
    from tokenizers import Tokenizer

    from agentgym_jax.models import load_tokenizer

    levels = ["GoToLocal", "Unlock"]
    ep = tiny.collect_transcripts(levels, 1, 4, seed=3)[0]
    text = "".join(tiny.render_message(m["role"], m["content"]) for m in ep["messages"])
    raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    assert tiny.encode(load_tokenizer(model_dir), text) == raw.encode(text).ids


@pytest.mark.parametrize("name", ["tiny-babyai", "tiny-babyai-long"])
def test_builtin_tokenizers_encode_as_trained(name):
    # transformers 5's AutoTokenizer would load these as Qwen2Tokenizer (from config.json),
    # which splits runs of spaces differently: 1,223 tokens instead of 1,125 on one transcript.
    _assert_encodes_as_trained(os.path.join(tiny.DEFAULT_MODEL_DIR, "..", name))


def test_copy_nll_scores_exactly_the_copied_words(tok):
    """``copy_spans`` finds the goal and the action line of every reply (checked by decoding
    them), an oracle that knows the next token scores 0 there, and a uniform model log(V)."""
    env = tiny._make_env(tiny.DEFAULT_LEVELS)
    ins, ack = env.instruction(), env.ack
    env.close()
    eps = tiny.collect_transcripts(tiny.DEFAULT_LEVELS, 3, 4, seed=5)
    n_replies = 0
    for ep in eps:
        for m in ep["messages"]:
            if m["role"] != "assistant":
                continue
            n_replies += 1
            piece = tiny.encode(tok, tiny.render_message("assistant", m["content"]))
            spans = tiny.copy_spans(tok, piece)
            goal = tiny.REPLY_RE.match(m["content"]) and m["content"].split("My goal is to ")[1]
            action = tiny.REPLY_RE.match(m["content"]).group(1)
            assert tok.decode(piece[slice(*spans["action_line"])]).strip() == action
            assert tok.decode(piece[slice(*spans["goal"])]).strip() == goal.split(". I will")[0]
    assert n_replies >= 3

    full = [tiny.episode_tokens(tok, ins, ack, ep, 1.0)[0] for ep in eps]
    vocab = len(tok)

    def oracle(ids):  # one-hot on the true next token of whichever episode this is
        row = next(f for f in full if f[: len(ids)] == list(ids))
        logits = np.full((len(ids), vocab), -1e4, np.float32)
        logits[np.arange(len(ids)), row[1 : len(ids) + 1]] = 0.0
        return logits

    got = tiny.copy_nll(oracle, tok, ins, ack, eps)
    assert got["goal"] < 1e-3 and got["action_line"] < 1e-3
    assert got["tokens"]["goal"] > 0 and got["tokens"]["action_line"] >= n_replies
    flat = tiny.copy_nll(lambda ids: np.zeros((len(ids), vocab)), tok, ins, ack, eps)
    assert flat["goal"] == flat["action_line"] == round(float(np.log(vocab)), 3)
    # A budget that cuts the episodes keeps only the replies that fit.
    short = tiny.copy_nll(oracle, tok, ins, ack, eps, max_tokens=600)
    assert 0 < short["tokens"]["action_line"] < got["tokens"]["action_line"]


def test_copy_check_of_the_shipped_model():
    # The demo model restates its goal from the first observation (0.15 nats per token on 16
    # episodes); the action line it copies less well (0.4), as measured when this was added.
    res = tiny.copy_check(SHIPPED, tiny.DEFAULT_LEVELS, episodes=4, max_turns=3)
    assert res["tokens"]["goal"] > 20 and res["tokens"]["action_line"] > 8
    assert res["goal"] < 0.5 < np.log(6)
    assert 0 < res["action_line"] < np.log(len(tiny.load_tokenizer(SHIPPED)))
