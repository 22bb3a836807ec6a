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
    """Put a host batch dict on ``mesh``, dim 0 split by ``batch_sharding``."""
    sh = batch_sharding(mesh, rules=rules)
    return {k: jax.device_put(np.asarray(v), sh) for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
