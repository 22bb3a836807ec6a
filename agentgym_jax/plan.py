"""``agentgym-jax plan``: will a run compile and fit on a TPU slice? Answered from a CPU host.

The real jitted functions of a training step (engine prefill / append / decode, the learner's
log-prob pass, the actor and critic updates) are lowered on abstract state built from the model
config alone (a ``config.json`` or a built-in table of public configs: no weights, no tokenizer)
and compiled ahead of time for a TPU topology (``libtpu`` compiles for TPUs without one). For
each function it reports the compiler's per-device memory (arguments / outputs / temporaries) and
the compile time, then whether the step fits: the state that lives across a step (actor and critic
train states, reference params, the engine's KV cache) plus the largest function's working set,
against the chip's memory. A program the compiler cannot fit is reported, not raised.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from agentgym_jax import sharding as shd
from agentgym_jax.config import TrainConfig
from agentgym_jax.models.config import ModelConfig
from agentgym_jax.models.decoder import Critic, Transformer

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice type: the topology libtpu compiles for, and each chip's memory."""

    topology: str
    chip_config: str
    hbm_gib: float
    wrap: tuple[bool, bool, bool] = (False, False, False)


# Accelerator type -> slice. v4 and v5p chips are "megacore": one device per chip.
SLICES: dict[str, Slice] = {
    "v5e-4": Slice("v5e:2x2", "default", 15.75),
    "v5e-8": Slice("v5e:2x4", "default", 15.75),
    "v5e-16": Slice("v5e:4x4", "default", 15.75),
    "v5e-32": Slice("v5e:4x8", "default", 15.75),
    "v5e-64": Slice("v5e:8x8", "default", 15.75),
    "v5e-256": Slice("v5e:16x16", "default", 15.75),
    "v4-8": Slice("v4:2x2x1", "megacore", 32),
    "v4-16": Slice("v4:2x2x2", "megacore", 32),
    "v4-32": Slice("v4:2x2x4", "megacore", 32, (False, False, True)),
    "v4-64": Slice("v4:2x4x4", "megacore", 32, (False, False, True)),
    "v5p-8": Slice("v5:2x2x1", "megacore", 95),
    "v5p-16": Slice("v5:2x2x2", "megacore", 95),
    "v5p-32": Slice("v5:2x2x4", "megacore", 95, (False, False, True)),
    "v6e-4": Slice("v6e:2x2", "default", 32),
    "v6e-8": Slice("v6e:2x4", "default", 32),
    "v6e-16": Slice("v6e:4x4", "default", 32),
}


def resolve_slice(name: str) -> tuple[str, Slice]:
    """``v5e-16`` or a topology name (``v5e:4x4``, ``v4:2x2x2``, ``v5p:2x2x1``) -> slice."""
    key = name.strip().lower()
    if key in SLICES:
        return key, SLICES[key]
    gen, _, shape = key.partition(":")
    gen = {"v5p": "v5", "v5litepod": "v5e"}.get(gen, gen)
    for k, s in SLICES.items():
        if s.topology == f"{gen}:{shape}":
            return k, s
    known = ", ".join(SLICES)
    raise ValueError(f"unknown TPU slice {name!r}; known: {known} (or their topology names)")


def tpu_devices(s: Slice, name: str = "v5e-4") -> list:
    """Device descriptions of a TPU slice, made by libtpu on a host without TPUs."""
    # libtpu reads these at load; unset, it warns that it cannot find a TPU host.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling needs no exclusive hold on TPU chips: let several plans run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name.replace("v5e-", "v5litepod-"))
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=s.topology,
            chip_config_name=s.chip_config,
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
            wrap=s.wrap,
        )
    except Exception as e:  # no libtpu, or it rejects the topology
        raise RuntimeError(
            f"cannot describe TPU topology {s.topology!r} ({type(e).__name__}: {e}); "
            "ahead-of-time TPU compiles need libtpu: pip install 'jax[tpu]'"
        ) from None
    return list(topo.devices)


# Public model shapes (config.json fields), so a plan needs no download.
PUBLIC_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "Qwen2.5-1.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "Qwen2.5-3B": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048,
                       intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "Qwen2.5-7B": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6),
    "Qwen3-4B": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560,
                     intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                     rope_theta=1e6),
    "Qwen3-8B": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                     rope_theta=1e6),
    "Llama-3.1-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False, rope_theta=5e5,
                         rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}  # fmt: skip


def model_config_for(path: str) -> ModelConfig:
    """A public model's name (``Qwen2.5-7B``, with or without an ``org/`` prefix), or a local
    directory / ``config.json`` path."""
    # Instruct / chat variants share their base model's shapes.
    name = path.rstrip("/").split("/")[-1].lower().removesuffix("-instruct")
    table = {k.lower(): v for k, v in PUBLIC_CONFIGS.items()}
    if name in table and not os.path.exists(path):
        return ModelConfig.from_hf_dict(table[name])
    if path.startswith("builtin:"):
        from agentgym_jax.models import resolve_model_path

        path = resolve_model_path(path)
    if os.path.isfile(path):
        with open(path) as f:
            return ModelConfig.from_hf_dict(json.load(f))
    if os.path.isdir(path):
        return ModelConfig.from_pretrained(path)
    raise FileNotFoundError(
        f"model {path!r}: not a local directory or config.json, and not one of the built-in "
        f"shapes ({', '.join(PUBLIC_CONFIGS)})"
    )


@dataclasses.dataclass
class FnReport:
    name: str
    compile_s: float = 0.0
    args: int = 0
    outputs: int = 0
    temps: int = 0
    aliased: int = 0
    error: str | None = None
    pallas: bool = False
    """Whether the program calls a Pallas TPU kernel (splash attention)."""

    @property
    def total(self) -> int:
        """The compiler's peak for this program alone (donated inputs reuse their buffers)."""
        return self.args + self.outputs + self.temps - self.aliased


@dataclasses.dataclass
class PlanReport:
    target: str
    devices: int
    hbm: int
    mesh: dict[str, int]
    model: str
    params: int
    resident: dict[str, int]
    """Per-device bytes of the state that lives across a step."""
    fns: list[FnReport]
    suggested: bool = False
    changes: list[str] = dataclasses.field(default_factory=list)
    """Config changes the suggestion needed (micro-batches raised to the data-parallel ways)."""

    @property
    def resident_total(self) -> int:
        return sum(self.resident.values())

    def peak(self, f: FnReport) -> int:
        """Resident state plus what the function adds on top of its (resident) arguments."""
        return self.resident_total + f.temps + max(f.outputs - f.aliased, 0)

    @property
    def fits(self) -> bool:
        return all(f.error is None for f in self.fns) and all(
            self.peak(f) <= self.hbm for f in self.fns
        )

    def largest_term(self) -> str:
        terms = dict(self.resident)
        for f in self.fns:
            terms[f"{f.name} temporaries"] = f.temps
        name = max(terms, key=terms.get)
        return f"{name} ({terms[name] / GiB:.2f} GiB/device)"

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "devices": self.devices,
            "hbm_gib": self.hbm / GiB,
            "mesh": self.mesh,
            "config_changes": self.changes,
            "model": self.model,
            "params": self.params,
            "resident_gib": {k: v / GiB for k, v in self.resident.items()},
            "functions": {
                f.name: {
                    "compile_s": round(f.compile_s, 2),
                    "args_gib": f.args / GiB,
                    "outputs_gib": f.outputs / GiB,
                    "temps_gib": f.temps / GiB,
                    "peak_gib": self.peak(f) / GiB,
                    "pallas_kernel": f.pallas,
                    "error": f.error,
                }
                for f in self.fns
            },
            "fits": self.fits,
            "peak_gib": max((self.peak(f) for f in self.fns), default=0) / GiB,
            "largest_term": None if self.fits else self.largest_term(),
        }

    def format(self) -> str:
        g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"plan: {self.model} ({_count(self.params)} params) on {self.target} "
            f"({self.devices} devices, {self.hbm / GiB:.2f} GiB each), mesh {mesh}"
            + (" (suggested)" if self.suggested else "")
            + (f" with {' '.join(self.changes)}" if self.changes else ""),
            "resident per device: "
            + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in self.resident.items()),
            f"{'function':<16}{'args':>8}{'outputs':>8}{'temps':>8}{'peak':>8}  compile",
        ]
        for f in self.fns:
            if f.error:
                lines.append(f"{f.name:<16} does not compile: {f.error}")
                continue
            lines.append(
                f"{f.name:<16}{g(f.args)} {g(f.outputs)} {g(f.temps)} {g(self.peak(f))}"
                f"  {f.compile_s:6.1f} s"
            )
        peak = max((self.peak(f) for f in self.fns), default=0)
        if self.fits:
            lines.append(f"FITS: peak {peak / GiB:.2f} of {self.hbm / GiB:.2f} GiB per device")
        else:
            lines.append(
                f"DOES NOT FIT: peak {peak / GiB:.2f} of {self.hbm / GiB:.2f} GiB per device; "
                f"largest term: {self.largest_term()}"
            )
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _abstract_train_state(module, tx, mesh: Mesh):
    from agentgym_jax.rl import update as U

    graphdef, params = nnx.split(module)
    state = U.TrainState(
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        step=jax.ShapeDtypeStruct((), jnp.int32),
        graphdef=graphdef,
        tx=tx,
    )
    sh = U.train_state_shardings(state, mesh)
    return state.replace(
        params=_with_shardings(state.params, sh.params),
        opt_state=_with_shardings(state.opt_state, sh.opt_state),
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step),
    )


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _compile(name: str, lower, log=_progress) -> FnReport:
    """Lower and compile one function; an out-of-memory compile becomes a one-line error."""
    rep = FnReport(name)
    log(f"plan: compiling {name} ...")
    t0 = time.perf_counter()
    try:
        lowered = lower()
        rep.pallas = "tpu_custom_call" in lowered.as_text()
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED and friends
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rep.error = msg[:300]
        rep.compile_s = time.perf_counter() - t0
        return rep
    rep.compile_s = time.perf_counter() - t0
    log(f"plan: compiled {name} in {rep.compile_s:.1f} s")
    ma = compiled.memory_analysis()
    if ma is not None:
        rep.args = int(ma.argument_size_in_bytes)
        rep.outputs = int(ma.output_size_in_bytes)
        rep.temps = int(ma.temp_size_in_bytes)
        rep.aliased = int(ma.alias_size_in_bytes)
    return rep


def plan_on_devices(
    cfg: TrainConfig,
    devices: list,
    *,
    model_config: ModelConfig,
    hbm_bytes: int,
    target: str,
    platform: str = "tpu",
    only: tuple[str, ...] | None = None,
    precheck: bool = False,
) -> PlanReport:
    """Compile the step's functions for ``devices`` (TPU descriptions or real devices).
    ``precheck``: skip the compiles when the resident state alone overflows ``hbm_bytes``."""
    from agentgym_jax.context import engine_slots
    from agentgym_jax.engine import Engine, EngineConfig
    from agentgym_jax.learner import BATCH_KEYS, Learner
    from agentgym_jax.models import attention as attn
    from agentgym_jax.models import dtype_from_name
    from agentgym_jax.rl import update as U

    mesh = shd.make_mesh(cfg.mesh, devices=devices)
    m = cfg.model
    kw = dict(
        dtype=dtype_from_name(m.dtype),
        param_dtype=dtype_from_name(m.param_dtype),
        remat=m.remat,
        attn_q_block=m.attn_q_block,
        attention=attn.resolve(m.attention, platform),
        mesh=mesh,
        logits_chunk=m.logits_chunk,
    )
    actor = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0), **kw))
    actor_state = _abstract_train_state(actor, U.make_optimizer(cfg.actor), mesh)
    critic_state = None
    if cfg.uses_critic:
        critic = nnx.eval_shape(
            lambda: Critic(Transformer(model_config, rngs=nnx.Rngs(0), **kw), rngs=nnx.Rngs(1))
        )
        critic_state = _abstract_train_state(critic, U.make_optimizer(cfg.critic), mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(actor_state.params))

    b = cfg.data.train_batch_size * cfg.rollout.n
    t = cfg.data.max_prompt_length + cfg.data.max_response_length
    batch_sh = shd.batch_sharding(mesh)
    dtypes = {"rollout_logprobs": jnp.float32, "rewards": jnp.float32, "scores": jnp.float32}
    batch = {
        k: jax.ShapeDtypeStruct(
            (b,) if k in ("scores", "group_ids", "valid") else (b, t),
            dtypes.get(k, jnp.int32),
            sharding=batch_sh,
        )
        for k in BATCH_KEYS
    }
    rep = shd.replicated(mesh)
    learner = Learner(cfg, mesh, actor_state, critic_state)
    ref = actor_state.params if cfg.ref.enable else None
    critic_p = critic_state.params if critic_state is not None else None
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)

    def prepare():
        return learner._prepare.lower(actor_state.params, ref, critic_p, batch, kl, None)

    def update_batch():
        # The updates read the prepared batch: the prepare pass's output shapes.
        out = jax.eval_shape(learner._prepare, actor_state.params, ref, critic_p, batch, kl, None)[
            0
        ]
        return _with_shardings(out, jax.tree.map(lambda _: batch_sh, out))

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    engine = Engine(
        actor,
        EngineConfig(num_slots=engine_slots(cfg, mesh), max_len=t),
        mesh=mesh,
        abstract=True,
    )
    steps = {}

    def engine_step(name):
        def lower():
            if not steps:
                steps.update(engine.lower_steps())
            return steps[name]

        return lower

    jobs = [
        ("prefill", engine_step("prefill")),
        ("append", engine_step("append")),
        ("decode", engine_step("decode")),
        ("logprob_pass", prepare),
        (
            "actor_update",
            lambda: learner.actor_update.jitted.lower(actor_state, update_batch(), key, None),
        ),
    ]
    if learner.critic_update is not None:
        jobs.append(
            (
                "critic_update",
                lambda: learner.critic_update.jitted.lower(critic_state, update_batch(), key, None),
            )
        )
    resident = {
        "actor params+optimizer": per_device_bytes((actor_state.params, actor_state.opt_state)),
        "kv cache": per_device_bytes(engine.state),
    }
    if ref is not None:
        resident["reference params"] = per_device_bytes(ref)
    if critic_state is not None:
        resident["critic params+optimizer"] = per_device_bytes(
            (critic_state.params, critic_state.opt_state)
        )
    jobs = [(name, lower) for name, lower in jobs if only is None or name in only]
    resident_total = sum(resident.values())
    if precheck and resident_total > hbm_bytes:
        # The state that lives across a step already overflows: no compile can change that.
        fns = [
            FnReport(name, error="not compiled: the resident state alone overflows")
            for name, _ in jobs
        ]
    else:
        fns = []
        # The updates first: they are the likeliest not to fit, and a precheck stops there.
        for name, lower in sorted(jobs, key=lambda j: "update" not in j[0]):
            f = _compile(name, lower)
            fns.append(f)
            if precheck and resident_total + f.temps + max(f.outputs - f.aliased, 0) > hbm_bytes:
                break
        order = [name for name, _ in jobs]
        fns.sort(key=lambda f: order.index(f.name))
    return PlanReport(
        target=target,
        devices=len(devices),
        hbm=hbm_bytes,
        mesh=dict(mesh.shape),
        model=model_config_name(model_config),
        params=n_params,
        resident=resident,
        fns=fns,
    )


def model_config_name(c: ModelConfig) -> str:
    for name, d in PUBLIC_CONFIGS.items():
        if ModelConfig.from_hf_dict(d) == c:
            return name
    return f"{c.model_type} {c.num_hidden_layers}L h{c.hidden_size}"


def candidate_meshes(n: int, model_config: ModelConfig) -> list[shd.MeshConfig]:
    """Meshes to try, in order, when the config names none: FSDP over every device first (the
    cheapest in communication for models this size), then tensor parallelism of 2, 4, 8."""
    out = [shd.MeshConfig(data=1, fsdp=n, tensor=1)]
    for tp in (2, 4, 8):
        if n % tp == 0 and model_config.num_key_value_heads % tp == 0 and n > tp:
            out.append(shd.MeshConfig(data=1, fsdp=n // tp, tensor=tp))
    return out


def plan(
    cfg: TrainConfig,
    slice_name: str,
    *,
    model_config: ModelConfig | None = None,
    suggest_mesh: bool = False,
    only: tuple[str, ...] | None = None,
) -> PlanReport:
    """Plan ``cfg`` on a TPU slice (``v5e-16``, ``v5e:4x4``, ...). With ``suggest_mesh``, try
    ``candidate_meshes`` and return the first that fits (or the last tried)."""
    key, s = resolve_slice(slice_name)
    devices = tpu_devices(s, key)
    mc = model_config or model_config_for(cfg.model.path)
    meshes = candidate_meshes(len(devices), mc) if suggest_mesh else [cfg.mesh]
    report = None
    for k, mesh_cfg in enumerate(meshes):
        c = dataclasses.replace(cfg, mesh=dataclasses.replace(mesh_cfg, devices=0))
        changes = []
        if suggest_mesh:
            c, changes = fit_micro_batches(c, mesh_cfg.data * mesh_cfg.fsdp)
            if c is None:
                continue
        report = plan_on_devices(
            c,
            devices,
            model_config=mc,
            hbm_bytes=int(s.hbm_gib * GiB),
            target=f"{key} ({s.topology})",
            only=only,
            precheck=k < len(meshes) - 1,  # the last candidate is compiled whatever it holds
        )
        report.suggested = suggest_mesh
        report.changes = changes
        if report.fits:
            break
        _progress(f"plan: mesh {report.mesh} does not fit: {report.format().splitlines()[-1]}")
    if report is None:
        raise ValueError(
            f"no mesh of {len(devices)} devices divides the step's batch "
            f"({cfg.data.train_batch_size * cfg.rollout.n} episodes)"
        )
    return report


def fit_micro_batches(cfg: TrainConfig, dp: int) -> tuple[TrainConfig | None, list[str]]:
    """One sequence per device per micro-batch (micro-batch size = the data-parallel ways
    ``dp``): the least activation memory a mesh allows; the update's result does not depend on it
    (gradients accumulate exactly). None when the step's batch or a mini-batch cannot be split
    ``dp`` ways."""
    b = cfg.data.train_batch_size * cfg.rollout.n
    if b % dp:
        return None, []
    changes, sections = [], {}
    for name in ("actor", "critic") if cfg.uses_critic else ("actor",):
        sec = getattr(cfg, name)
        if sec.ppo_mini_batch_size % dp:
            return None, []
        if sec.micro_batch_size != dp:
            sections[name] = dataclasses.replace(sec, ppo_micro_batch_size=dp)
            changes.append(f"{name}.ppo_micro_batch_size={dp}")
    return dataclasses.replace(cfg, **sections), changes
