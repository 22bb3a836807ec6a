"""Jitted actor / critic updates and forward passes (old-policy / reference log-probs, values).

The NNX model is split once (``nnx.split``) into a graphdef and a params state; the jitted
functions take (params, opt_state, batch) pytrees, with explicit in/out shardings from
``agentgym_jax.sharding`` (params by logical axes, batch over ("data", "fsdp")), and donate the
train state they replace.

One ``actor_update`` call is one training step, all inside one jit: ``ppo_epochs`` passes, each
shuffling the batch (jax PRNG) into mini-batches of ``ppo_mini_batch_size`` sequences, one AdamW
step per mini-batch, gradients accumulated over micro-batches (``lax.scan``). Losses are reduced
with per-token weights from the whole mini-batch's token count and count of rows with a loss
token (``losses.agg_weights``), so micro-batching gives the same update as the full mini-batch.
With a ``pack`` from ``update.plan`` (host side: the shuffle, then each mini-batch packed into
rows, see ``rl.packing``) the micro-batches are packed rows instead of padded sequences; the
loss weights are the same per token, so the update is the same.
The lr follows the training step (``state.step``, one per call), as veRL steps its scheduler once
per training step.

Batch keys (numpy or jax, [B, T] right-padded, aligned to input_ids; see ``losses`` for the
shift): actor: input_ids, attention_mask, loss_mask, old_logprobs, advantages, and ref_logprobs
when ``use_kl_loss``; critic: input_ids, attention_mask, loss_mask, values, returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from agentgym_jax import sharding as shd
from agentgym_jax.rl import losses as L
from agentgym_jax.rl import packing as PK
from agentgym_jax.rl.advantages import kl_penalty
from agentgym_jax.rl.config import ActorConfig, CriticConfig, OptimConfig
from agentgym_jax.schedule import lr_schedule

ACTOR_KEYS = ("input_ids", "attention_mask", "loss_mask", "old_logprobs", "advantages")
CRITIC_KEYS = ("input_ids", "attention_mask", "loss_mask", "values", "returns")


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state and training-step counter; graphdef and tx ride along as static."""

    params: Any
    opt_state: Any
    step: jax.Array
    graphdef: Any = flax.struct.field(pytree_node=False)
    tx: Any = flax.struct.field(pytree_node=False)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with an injectable lr (set from the step schedule inside the update).

    Clipping is done in the update (the norm is also a metric), not chained here.
    """
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=cfg.lr,
        b1=cfg.betas[0],
        b2=cfg.betas[1],
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def train_state_shardings(state: TrainState, mesh: Mesh, rules=shd.DEFAULT_RULES) -> TrainState:
    """A TrainState of NamedShardings: params (and Adam moments) by logical axes, rest replicated."""
    p_sh = shd.state_shardings(state.params, mesh, rules)
    o_sh = optax.tree_map_params(
        state.tx,
        lambda _, s: s,
        state.opt_state,
        p_sh,
        transform_non_params=lambda _: shd.replicated(mesh),
        is_leaf=_is_var,
    )
    return state.replace(params=p_sh, opt_state=o_sh, step=shd.replicated(mesh))


def init_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, rules=shd.DEFAULT_RULES
) -> TrainState:
    """Split ``model`` once and place params and optimizer state on ``mesh`` by logical axes."""
    graphdef, params = nnx.split(model)
    abstract = TrainState(
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        step=jnp.zeros((), jnp.int32),
        graphdef=graphdef,
        tx=tx,
    )
    sh = train_state_shardings(abstract, mesh, rules)
    params = jax.device_put(params, sh.params)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return TrainState(params=params, opt_state=opt_state, step=step, graphdef=graphdef, tx=tx)


# --------------------------------------------------------------------------------------------
# forward passes


def _logprobs(graphdef, params, ids, mask, temperature, positions=None, segment_ids=None):
    """(log-probs, entropy) [B, T] of ``ids``; the LM head in chunks of the model's
    ``logits_chunk`` positions (0: all at once). Packed rows pass ``positions`` and
    ``segment_ids`` instead of ``mask``."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden_states(ids, mask, positions=positions, segment_ids=segment_ids)

    def head(h):
        logits = model.logits(h)
        return logits if temperature == 1.0 else logits / temperature

    return L.chunked_sequence_logprobs(head, hidden, ids, getattr(model, "logits_chunk", 0))


def _chunked(fn, batch, micro_batch_size):
    """fn over [mb, ...] chunks with lax.map (bounds the [mb, T, V] logits in memory)."""
    b = batch["input_ids"].shape[0]
    mb = micro_batch_size or b
    if b % mb:
        raise ValueError(f"micro_batch_size={mb} must divide the batch size {b}")
    chunks = jax.tree.map(lambda x: x.reshape((b // mb, mb) + x.shape[1:]), batch)
    out = jax.lax.map(fn, chunks)
    return jax.tree.map(lambda x: x.reshape((b,) + x.shape[2:]), out)


def _forward(fn, batch, micro_batch_size, packing):
    """``fn(ids, mask, positions, segment_ids)`` over the batch in micro-batches of rows: the
    padded rows, or with ``packing`` (``packing.pack`` of the whole batch, as device arrays
    src / pos / row / offset) the packed rows, unpacked back to [B, T]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if packing is None:
        return _chunked(
            lambda c: fn(c["input_ids"], c["attention_mask"], None, None),
            {"input_ids": ids, "attention_mask": mask},
            micro_batch_size,
        )
    src, pos = packing["src"], packing["pos"]
    rows = {"input_ids": PK.gather(ids, src, pos), "pos": pos, "seg": PK.segment_ids(src)}
    mb = PK.micro_rows(src.shape[0], micro_batch_size or src.shape[0])
    out = _chunked(lambda c: fn(c["input_ids"], None, c["pos"], c["seg"]), rows, mb)
    lengths = jnp.sum(mask, axis=-1)
    return jax.tree.map(
        lambda y: PK.unpack(y, packing["row"], packing["offset"], lengths, ids.shape[1]), out
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "micro_batch_size", "temperature"))
def compute_logprobs(
    graphdef,
    params,
    batch,
    micro_batch_size: int | None = None,
    temperature: float = 1.0,
    packing: dict | None = None,
):
    """(logprobs [B, T], entropy [B, T]) of input_ids under params, aligned to input_ids.

    For old-policy and reference log-probs: the reference is the same graphdef with frozen params.
    ``packing``: run the model on packed rows (see ``_forward``); the result is the same.
    """

    def one(ids, mask, pos, seg):
        return _logprobs(graphdef, params, ids, mask, temperature, pos, seg)

    return _forward(one, batch, micro_batch_size, packing)


def _values(graphdef, params, ids, mask, positions=None, segment_ids=None):
    out = nnx.merge(graphdef, params)(ids, mask, positions=positions, segment_ids=segment_ids)
    return L.shift_right(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "micro_batch_size"))
def compute_values(
    graphdef, params, batch, micro_batch_size: int | None = None, packing: dict | None = None
):
    """Critic values [B, T] aligned to input_ids (value of the state in which token t is chosen)."""
    return _forward(
        lambda ids, mask, pos, seg: _values(graphdef, params, ids, mask, pos, seg),
        batch,
        micro_batch_size,
        packing,
    )


# --------------------------------------------------------------------------------------------
# losses over one micro-batch; every aux value is a pre-weighted sum (summed over micro-batches)


def _rows_in(mb):
    """(ids, mask, positions, segment_ids) of a micro-batch, padded or packed."""
    if "segment_ids" in mb:
        return mb["input_ids"], None, mb["positions"], mb["segment_ids"]
    return mb["input_ids"], mb["attention_mask"], None, None


def actor_loss(params, graphdef, mb, n_tokens, n_seqs, cfg: ActorConfig):
    ids, mask, pos, seg = _rows_in(mb)
    logp, ent = _logprobs(graphdef, params, ids, mask, cfg.temperature, pos, seg)
    m = mb["loss_mask"].astype(jnp.float32)
    w = L.agg_weights(m, cfg.loss_agg_mode, n_tokens, n_seqs, mb.get("row_tokens"))
    wt = m / jnp.maximum(n_tokens, 1.0)  # token-mean weights for metrics
    pg, clipped, lower, neg_kl = L.policy_loss_terms(
        logp,
        mb["old_logprobs"],
        mb["advantages"],
        cfg.clip_ratio_low,
        cfg.clip_ratio_high,
        cfg.clip_ratio_c,
    )
    pg_loss = jnp.sum(pg * w)
    ent_agg = jnp.sum(ent * w)
    loss = pg_loss - cfg.entropy_coeff * ent_agg
    aux = {
        "actor/pg_loss": pg_loss,
        "actor/entropy": jnp.sum(ent * wt),
        "actor/pg_clipfrac": jnp.sum(clipped * wt),
        "actor/pg_clipfrac_lower": jnp.sum(lower * wt),
        "actor/ppo_kl": jnp.sum(-neg_kl * wt),
    }
    if cfg.use_kl_loss:
        kl = jnp.sum(kl_penalty(logp, mb["ref_logprobs"], cfg.kl_loss_type) * w)
        loss = loss + cfg.kl_loss_coef * kl
        aux["actor/kl_loss"] = kl
    return loss, aux


def critic_loss(params, graphdef, mb, n_tokens, n_seqs, cfg: CriticConfig):
    vpred = _values(graphdef, params, *_rows_in(mb))
    m = mb["loss_mask"].astype(jnp.float32)
    w = L.agg_weights(m, cfg.loss_agg_mode, n_tokens, n_seqs, mb.get("row_tokens"))
    wt = m / jnp.maximum(n_tokens, 1.0)
    per_tok, clipped = L.value_loss_terms(vpred, mb["values"], mb["returns"], cfg.cliprange_value)
    loss = jnp.sum(per_tok * w)
    r, d = mb["returns"], mb["returns"] - vpred
    # Moments for the mini-batch explained variance, assembled after accumulation.
    aux = {
        "critic/vf_loss": loss,
        "critic/vf_clipfrac": jnp.sum(clipped * wt),
        "critic/vpred_mean": jnp.sum(vpred * wt),
        "_r": jnp.sum(r * wt),
        "_r2": jnp.sum(r * r * wt),
        "_d": jnp.sum(d * wt),
        "_d2": jnp.sum(d * d * wt),
    }
    return loss, aux


def _finish_critic_aux(aux):
    var_r = aux.pop("_r2") - jnp.square(aux.pop("_r"))
    var_d = aux.pop("_d2") - jnp.square(aux.pop("_d"))
    aux["critic/vf_explained_var"] = jnp.where(
        var_r > 0, 1.0 - var_d / jnp.where(var_r > 0, var_r, 1), 0.0
    )
    return aux


# --------------------------------------------------------------------------------------------
# the update


def _make_update(
    loss_fn: Callable,
    prefix: str,
    keys: tuple[str, ...],
    cfg: OptimConfig,
    mesh: Mesh,
    state: TrainState,
    finish_aux: Callable = lambda a: a,
):
    """Jitted (state, batch, rng) -> (state, metrics) for one training step (see module doc)."""
    graphdef, tx = state.graphdef, state.tx
    st_sh = train_state_shardings(state, mesh)
    n_dp = shd.data_parallel_ways(mesh)
    micro = cfg.micro_batch_size
    if micro % n_dp:
        raise ValueError(
            f"{prefix}.ppo_micro_batch_size={micro}: must be a multiple of the "
            f"data-parallel ways ({n_dp} = data x fsdp)"
        )
    sched = lr_schedule(
        cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.total_steps, cfg.min_lr_ratio
    )
    batch_sh = shd.batch_sharding(mesh)
    micro_sh = NamedSharding(mesh, P(None, *batch_sh.spec))  # [n_micro, micro, ...]
    rep = shd.replicated(mesh)

    def minibatch(batch: dict, xs):
        """(micro-batches [n_micro, micro, ...], mini-batch loss tokens, sequences)."""
        if isinstance(xs, dict):  # packed: xs = one mini-batch's packing (``plan``)
            src, pos = xs["src"], xs["pos"]
            tok = jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1)  # [B]
            mb = {k: PK.gather(v, src, pos) for k, v in batch.items() if k != "attention_mask"}
            mb["positions"], mb["segment_ids"] = pos, PK.segment_ids(src)
            mb["row_tokens"] = jnp.where(src >= 0, tok[jnp.maximum(src, 0)], 0.0)
            r = src.shape[0]
            m = PK.micro_rows(r, micro)
            mb = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x.reshape((r // m, m) + x.shape[1:]), micro_sh
                ),
                mb,
            )
            mine = tok[xs["members"]]
            return mb, jnp.sum(mine), jnp.sum((mine > 0).astype(jnp.float32))
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x[xs], micro_sh), batch)
        # Mini-batch totals (the loss weights' normalisers).
        return mb, jnp.sum(mb["loss_mask"].astype(jnp.float32)), L.seq_count(mb["loss_mask"])

    def step_fn(state: TrainState, batch: dict, rng: jax.Array, pack: dict | None = None):
        b = batch["input_ids"].shape[0]
        mini = cfg.ppo_mini_batch_size
        n_mini, n_micro = b // mini, mini // micro
        if pack is not None:
            xs = pack  # the host's shuffle and packing (``plan``)
        else:
            if cfg.shuffle:
                perms = jax.vmap(lambda k: jax.random.permutation(k, b))(
                    jax.random.split(rng, cfg.ppo_epochs)
                )
            else:
                perms = jnp.tile(jnp.arange(b), (cfg.ppo_epochs, 1))
            xs = perms.reshape(cfg.ppo_epochs * n_mini, n_micro, micro)
        lr = jnp.asarray(sched(state.step), jnp.float32)

        def mini_step(carry, x):
            params, opt_state = carry
            mb, n_tok, n_seq = minibatch(batch, x)

            def micro_step(g_acc, mc):
                (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
                    params, graphdef, mc, n_tok, n_seq, cfg
                )
                return jax.tree.map(jnp.add, g_acc, g), aux

            zeros = jax.lax.with_sharding_constraint(
                jax.tree.map(jnp.zeros_like, params), st_sh.params
            )
            grads, aux = jax.lax.scan(micro_step, zeros, mb)
            aux = finish_aux(jax.tree.map(lambda x: jnp.sum(x, 0), aux))
            gnorm = optax.tree.norm(grads)
            scale = jnp.minimum(1.0, cfg.grad_clip / (gnorm + 1e-6))
            grads = jax.tree.map(lambda g: g * scale, grads)
            opt_state = opt_state._replace(
                hyperparams={**opt_state.hyperparams, "learning_rate": lr}
            )
            updates, new_opt = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            ok = jnp.isfinite(gnorm)  # a non-finite gradient skips the step, as veRL
            new_params, new_opt = jax.tree.map(
                lambda n, o: jnp.where(ok, n, o), (new_params, new_opt), (params, opt_state)
            )
            aux[f"{prefix}/grad_norm"] = gnorm
            return (new_params, new_opt), aux

        (params, opt_state), aux = jax.lax.scan(mini_step, (state.params, state.opt_state), xs)
        metrics = jax.tree.map(jnp.mean, aux)
        metrics[f"{prefix}/lr"] = lr
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    jitted = jax.jit(
        step_fn,
        in_shardings=(st_sh, batch_sh, rep, rep),
        out_shardings=(st_sh, rep),
        donate_argnums=(0,),
    )

    def plan(lengths, row_len: int, seed) -> dict:
        """Host side of a packed update: the epochs' shuffles (numpy, from ``seed``) and each
        mini-batch's packing into rows of ``row_len``, as stacked arrays ``src`` / ``pos``
        [n_mini * epochs, R, row_len] and ``members`` [n_mini * epochs, mini]. R is the same for
        every mini-batch (a scan) and at most the mini-batch: one micro-batch of R rows when R is
        below the micro-batch size, else whole micro-batches (``packing.rows_for``)."""
        b, mini = len(lengths), cfg.ppo_mini_batch_size
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(b) if cfg.shuffle else np.arange(b) for _ in range(cfg.ppo_epochs)]
        members = np.concatenate(perms).reshape(-1, mini)
        packs = [PK.pack(lengths, row_len, m) for m in members]
        rows = min(PK.rows_for(max(p.n_rows for p in packs), micro, n_dp), mini)
        packs = [p.with_rows(rows) for p in packs]
        return {
            "src": np.stack([p.src for p in packs]),
            "pos": np.stack([p.pos for p in packs]),
            "members": members.astype(np.int32),
        }

    def update(state: TrainState, batch: dict, rng: jax.Array, pack: dict | None = None):
        """One step; ``pack`` (from ``plan``) runs it on packed rows, else on padded ones."""
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"{prefix} update: batch lacks {missing}")
        b = batch["input_ids"].shape[0]
        if b % cfg.ppo_mini_batch_size:
            raise ValueError(
                f"{prefix}.ppo_mini_batch_size={cfg.ppo_mini_batch_size} must divide "
                f"the batch size {b}"
            )
        return jitted(state, {k: batch[k] for k in keys}, rng, pack)

    update.jitted = jitted  # for .lower(...).compile() memory reports
    update.plan = plan
    return update


def make_actor_update(cfg: ActorConfig, mesh: Mesh, state: TrainState):
    """``actor_update(state, batch, rng) -> (state, metrics)`` for states shaped like ``state``.

    Metrics (means over mini-batches): actor/pg_loss, actor/entropy, actor/pg_clipfrac,
    actor/pg_clipfrac_lower, actor/ppo_kl, actor/kl_loss (with use_kl_loss), actor/grad_norm
    (before clipping), actor/lr.
    """
    keys = ACTOR_KEYS + (("ref_logprobs",) if cfg.use_kl_loss else ())
    return _make_update(actor_loss, "actor", keys, cfg, mesh, state)


def make_critic_update(cfg: CriticConfig, mesh: Mesh, state: TrainState):
    """``critic_update(state, batch, rng) -> (state, metrics)``: critic/vf_loss, vf_clipfrac,
    vpred_mean, vf_explained_var (of the pre-step predictions), grad_norm, lr."""
    return _make_update(critic_loss, "critic", CRITIC_KEYS, cfg, mesh, state, _finish_critic_aux)
