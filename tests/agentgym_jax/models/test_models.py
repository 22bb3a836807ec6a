"""Model parity against transformers (torch CPU) and HF round trips."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agentgym_jax.models import (
    ModelConfig,
    critic_from_pretrained,
    from_pretrained,
    positions_from_mask,
    save_pretrained,
)
from tests.helpers.hf import LLAMA3_SCALING, left_padded_batch, make_hf_model, tiny_config_dict

KINDS = [("qwen2", False), ("qwen2", True), ("qwen3", True), ("llama", False)]


def hf_logits(hf, ids, mask):
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids).long(),
            attention_mask=torch.tensor(mask).long(),
            position_ids=torch.tensor(pos).long(),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=KINDS, ids=lambda k: f"{k[0]}-tie{int(k[1])}")
def hf_dir(request, tmp_path_factory):
    kind, tie = request.param
    d = str(tmp_path_factory.mktemp(f"{kind}{int(tie)}"))
    hf = make_hf_model(kind, d, tie=tie)
    return kind, d, hf


def test_logits_match_transformers_left_padded(hf_dir):
    kind, d, hf = hf_dir
    model = from_pretrained(d)
    ids, mask = left_padded_batch(model.config.vocab_size, [3, 11, 16, 7])
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_blocked_causal_attention_matches_transformers(hf_dir):
    """Query-blocked attention (blocks of 8, a short last block) equals HF's full attention."""
    kind, d, hf = hf_dir
    model = from_pretrained(d, attn_q_block=8)
    ids, mask = left_padded_batch(model.config.vocab_size, [5, 21, 13])
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)
    one_block = np.asarray(
        from_pretrained(d, attn_q_block=0)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    )
    np.testing.assert_allclose(ours[valid], one_block[valid], atol=1e-5)


def test_padding_does_not_change_logits(hf_dir):
    _, d, _ = hf_dir
    model = from_pretrained(d)
    ids, mask = left_padded_batch(model.config.vocab_size, [6, 12])
    padded = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    alone = np.asarray(model(jnp.asarray(ids[:1, -6:])))
    np.testing.assert_allclose(padded[0, -6:], alone[0], atol=1e-5)


def test_round_trip_export_loads_in_transformers(hf_dir, tmp_path):
    import transformers

    _, d, hf = hf_dir
    model = from_pretrained(d)
    out = str(tmp_path / "export")
    save_pretrained(model, out)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = left_padded_batch(model.config.vocab_size, [5, 9], seed=3)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        hf_logits(hf2, ids, mask)[valid], hf_logits(hf, ids, mask)[valid], atol=1e-5
    )
    # And back into ours.
    again = from_pretrained(out)
    np.testing.assert_allclose(
        np.asarray(again(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))[valid],
        np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))[valid],
        atol=1e-6,
    )


def test_bf16_close_to_float32(hf_dir):
    _, d, _ = hf_dir
    m32 = from_pretrained(d)
    m16 = from_pretrained(d, dtype=jnp.bfloat16)
    assert m16.embed_tokens[...].dtype == jnp.bfloat16
    ids, mask = left_padded_batch(m32.config.vocab_size, [8, 12], seed=1)
    a = np.asarray(m32(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    b = np.asarray(m16(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), dtype=np.float32)
    valid = mask.astype(bool)
    assert np.isfinite(b).all()
    assert np.abs(a - b)[valid].max() < 0.05 * np.abs(a).max() + 0.05
    # Greedy choices agree on most positions even in bf16.
    assert (a.argmax(-1) == b.argmax(-1))[valid].mean() > 0.8


def test_sharded_index_checkpoint(tmp_path):
    d = str(tmp_path / "src")
    make_hf_model("qwen2", d)
    model = from_pretrained(d)
    out = str(tmp_path / "sharded")
    save_pretrained(model, out, max_shard_bytes=50_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    again = from_pretrained(out)
    ids = jnp.arange(10)[None] % model.config.vocab_size
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_rope_parameters_config_form(tmp_path):
    """transformers>=5 writes rope_parameters; published checkpoints rope_theta/rope_scaling."""
    base = tiny_config_dict(vocab=10, hidden=8, layers=1, heads=2, model_type="llama")
    scaling = LLAMA3_SCALING
    a = ModelConfig.from_hf_dict(dict(base, rope_theta=5e5, rope_scaling=scaling))
    b = ModelConfig.from_hf_dict(dict(base, rope_parameters=dict(scaling, rope_theta=5e5)))
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 8.0
    c = ModelConfig.from_hf_dict(
        dict(base, rope_parameters=dict(rope_type="default", rope_theta=1e4))
    )
    assert c.rope_scaling is None and c.rope_theta == 1e4


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*qwen2"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path))
    d = str(tmp_path / "m")
    make_hf_model("qwen2", d)
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:  # truncate the data: loading must fail loudly
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="truncated|past the end"):
        from_pretrained(d)


def test_critic_from_actor(tmp_path):
    d = str(tmp_path / "m")
    make_hf_model("qwen2", d)
    critic = critic_from_pretrained(d)
    actor = from_pretrained(d)
    ids, mask = left_padded_batch(actor.config.vocab_size, [4, 7])
    v = critic(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert v.shape == ids.shape
    np.testing.assert_array_equal(np.asarray(v), 0.0)  # zero-init head
    h_actor, _ = actor.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    h_critic, _ = critic.backbone.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(h_actor), np.asarray(h_critic), atol=1e-6)


def test_remat_matches_plain_forward_and_grads(tmp_path):
    """model.remat (set by every paper recipe) trades memory for compute: the training forward
    gives the same logits and gradients; the cached (decode) path skips it (see test_engine)."""
    import jax
    from flax import nnx

    from agentgym_jax.rl.update import compute_logprobs

    d = str(tmp_path)
    make_hf_model("qwen2", d)
    ids, mask = left_padded_batch(from_pretrained(d).config.vocab_size, [5, 12])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(m):
        return jnp.mean(m(ids, attention_mask=mask) ** 2)

    out = {}
    for remat in ("none", "full", "dots", True):
        model = from_pretrained(d, remat=remat)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        # Chunked log-probs merge the model inside lax.map, under the jit's trace: nnx.remat
        # failed there with TraceContextError.
        graphdef, params = nnx.split(model)
        lp, _ = compute_logprobs(graphdef, params, {"input_ids": ids, "attention_mask": mask}, 1)
        out[remat] = (float(value), jax.tree.leaves(grads) + [lp])
    for policy in ("full", "dots", True):
        np.testing.assert_allclose(out[policy][0], out["none"][0], rtol=1e-6)
        assert len(out[policy][1]) == len(out["none"][1]) > 0
        for a, b in zip(out[policy][1], out["none"][1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_logits_chunk_gives_the_same_logprobs(tmp_path):
    """model.logits_chunk only changes how the LM head is computed, not the log-probs."""
    from flax import nnx

    from agentgym_jax.rl.update import compute_logprobs

    d = str(tmp_path)
    make_hf_model("qwen2", d)
    ids, mask = left_padded_batch(from_pretrained(d).config.vocab_size, [5, 12, 9])
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    out = []
    for chunk in (0, 5):
        graphdef, params = nnx.split(from_pretrained(d, logits_chunk=chunk))
        out.append(compute_logprobs(graphdef, params, batch, None, 0.8))
    for a, b in zip(out[0], out[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
