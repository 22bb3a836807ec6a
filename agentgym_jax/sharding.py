"""Device mesh and the one table mapping logical tensor axes to mesh axes (MaxText style).

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded params and
optimizer state), ``tensor`` (Megatron-style model parallel over heads / mlp / vocab).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("slots", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass
class MeshConfig:
    data: int = 1
    """Data-parallel ways. -1 = whatever devices are left after fsdp and tensor."""
    fsdp: int = -1
    """FSDP ways (params and optimizer state sharded, gathered per layer). -1 = the rest."""
    tensor: int = 1
    """Tensor-parallel ways (heads, mlp, vocab split). Must divide the kv-head count."""
    devices: int = 0
    """Use the first N devices (0 = all of them)."""


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all). One ``-1`` axis takes the rest."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    if cfg.devices:
        if cfg.devices > len(devices):
            raise ValueError(
                f"mesh.devices={cfg.devices} but only {len(devices)} devices are available"
            )
        devices = devices[: cfg.devices]
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data/fsdp/tensor={sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"mesh: {n} devices are not divisible by the fixed axes product {known}"
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {n} devices are available "
            f"(data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]})"
        )
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None] | None, rules=DEFAULT_RULES, mesh: Mesh | None = None
) -> P:
    """PartitionSpec for logical axes. A mesh axis is used at most once; size-1 axes are dropped."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape[t] > 1))
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide a dimension (e.g. a 2-row bias on a 4-way axis)."""
    out = []
    for dim, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if s is None:
            out.append(None)
            continue
        names = (s,) if isinstance(s, str) else tuple(s)
        ways = math.prod(mesh.shape[a] for a in names)
        out.append(s if dim % ways == 0 else None)
    return P(*out)


def sharding_for(axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, _fit(logical_to_spec(axes, rules, mesh), tuple(shape), mesh))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedShardings matching ``state`` (from each variable's ``axes`` metadata)."""

    def one(v):
        if _is_var(v):
            axes = v.get_metadata().get("axes")
            return v.replace(sharding_for(axes, v.get_value().shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Move a module's variables onto ``mesh`` following their logical axes (in place)."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return module


def batch_sharding(mesh: Mesh, ndim: int = 1, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding for a [batch, ...] array: batch over (data, fsdp), the rest replicated.

    Trailing dims are replicated whatever ``ndim`` says, so one sharding serves a whole batch
    dict of [B] and [B, T] arrays.
    """
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def data_parallel_ways(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many shards the batch dim is split into (data x fsdp by the default rules)."""
    spec = logical_to_spec(("batch",), rules, mesh)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[a] for a in names)


def shard_batch(batch: dict, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Put a host batch dict on ``mesh``, dim 0 split by ``batch_sharding``.

    With several processes each passes its own rows (its share of the step's episodes, all
    shares the same shape) and the result is the global batch: process p's rows sit on its
    own devices, in process order when the mesh lists devices by process (``make_mesh``
    does, as ``jax.devices()``). No rows cross hosts.
    """
    sh = batch_sharding(mesh, rules=rules)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sh) for k, v in batch.items()}
    n = jax.process_count()
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sh, v, (v.shape[0] * n, *v.shape[1:]))
    return out


def rollout_mesh(cfg: MeshConfig, train_mesh: Mesh) -> Mesh:
    """The mesh of this process's rollout engine.

    One process: the training mesh itself (the engine shares the update's devices). Several:
    this process's own devices of the training mesh, ``tensor`` ways as in training and the
    rest over the slots, so no engine call waits on another host.
    """
    if jax.process_count() == 1:
        return train_mesh
    me = jax.process_index()
    local = [d for d in train_mesh.devices.flat if d.process_index == me]
    if not local:
        raise ValueError(
            f"mesh: process {me} has none of the training mesh's devices (mesh.devices="
            f"{cfg.devices} keeps only the first devices); every process needs a share"
        )
    if len(local) % cfg.tensor:
        raise ValueError(
            f"mesh.tensor={cfg.tensor} does not divide this process's {len(local)} devices: "
            "the rollout engine runs on one process's devices"
        )
    return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=cfg.tensor), local)


def _local_grid(train_mesh: Mesh, process: int, tensor: int) -> np.ndarray:
    """``process``'s devices of the training mesh as its rollout engine lays them out."""
    local = [d for d in train_mesh.devices.flat if d.process_index == process]
    return np.asarray(local, dtype=object).reshape(len(local) // tensor, tensor)


def to_local(tree, train_mesh: Mesh, engine_mesh: Mesh, rules=DEFAULT_RULES):
    """The weight sync of multi-host RL: a params state laid out on ``train_mesh`` (FSDP across
    every host) -> the same params in each process's engine layout on ``engine_mesh`` (its own
    devices; see ``rollout_mesh``).

    One jitted collective moves the weights on device, into the engine's sharding repeated on
    every host (a mesh whose ``data`` axis is the hosts); each process then wraps its own shards
    as arrays of its engine mesh, without a copy. No device ever holds more than its engine
    shard of a weight beyond its training shard. One process: ``tree`` itself, unchanged.
    """
    if jax.process_count() == 1:
        return tree
    tensor = engine_mesh.shape["tensor"]
    grids = [_local_grid(train_mesh, p, tensor) for p in range(jax.process_count())]
    hosts = Mesh(np.stack(grids), MESH_AXES)
    gathered = jax.jit(lambda x: x, out_shardings=state_shardings(tree, hosts, rules))(tree)
    return jax.tree.map(_rewrap, gathered, state_shardings(tree, engine_mesh, rules))


def _rewrap(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    by_device = {s.device: s.data for s in x.addressable_shards}
    shards = [by_device[d] for d in sharding.addressable_devices_indices_map(x.shape)]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def process_allgather_np(x: np.ndarray) -> np.ndarray:
    """``[process_count, *x.shape]``: every process's ``x`` (same shape and dtype everywhere).

    Sent as raw 32-bit words: jax without x64 would round float64 / int64 values, and the
    gathered metrics must be the ones each host computed. One process: ``x[None]``.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(x.tobytes(), np.uint8)
    words = np.zeros(max(4, -(-raw.size // 4) * 4), np.uint8)
    words[: raw.size] = raw
    got = np.asarray(multihost_utils.process_allgather(words.view(np.uint32)))
    rows = [np.frombuffer(r.tobytes()[: raw.size], x.dtype).reshape(x.shape) for r in got]
    return np.stack(rows)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
