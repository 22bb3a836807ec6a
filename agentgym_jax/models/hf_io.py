"""HF checkpoint import / export (local directories only: no hub access at run time).

Import memory-maps each ``*.safetensors`` file and builds every parameter with
``jax.make_array_from_callback`` so each device reads only its own shard: no replicated full
copy is ever made per device. Export writes ``config.json`` + (index-sharded) safetensors that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from agentgym_jax import sharding as shd
from agentgym_jax.models.config import ModelConfig
from agentgym_jax.models.decoder import Critic, Transformer

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Zero-copy reader: tensors are views into one read-only memory map of the file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", head)
            try:
                self.header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
        self.header.pop("__metadata__", None)
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        self._base = 8 + n

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        meta = self.header[name]
        if meta["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        dt = np.dtype(_ST_DTYPES[meta["dtype"]])
        start, end = meta["data_offsets"]
        if self._base + end > self._mm.shape[0]:
            raise ValueError(
                f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)"
            )
        return self._mm[self._base + start : self._base + end].view(dt).reshape(meta["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


def _open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> reader, from a single file or a ``model.safetensors.index.json``."""
    index = os.path.join(path, "model.safetensors.index.json")
    files: dict[str, SafetensorsFile] = {}
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        readers = {
            fn: SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))
        }
        return {name: readers[fn] for name, fn in weight_map.items()}
    cands = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
    if not cands:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r}")
    for fn in cands:
        r = SafetensorsFile(os.path.join(path, fn))
        files.update({k: r for k in r.keys()})
    return files


def _hf_name(path: tuple, layer: int | None = None) -> tuple[str, bool]:
    """Our state path -> (HF tensor name, whether to transpose). Stacked-layer params
    (``layers.<module>...``) name the HF tensor of ``layer``."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    if parts[0] == "embed_tokens":
        return "model.embed_tokens.weight", False
    if parts[0] == "layers":
        if layer is None:
            raise ValueError(f"{'.'.join(parts)} is stacked over layers: a layer index is needed")
        parts = ["layers", str(layer), *parts[1:]]
    prefix = "model." + ".".join(parts[:-1])
    if leaf == "kernel":
        return prefix + ".weight", True
    if leaf == "scale":
        return prefix + ".weight", False
    if leaf == "bias":
        return prefix + ".bias", False
    raise KeyError(f"no HF name for parameter {'.'.join(parts)}")


def _hf_names(path: tuple, num_layers: int) -> tuple[list[str], bool]:
    """HF tensor names behind one of our params: one per layer for the stacked layers."""
    if str(path[0]) == "layers":
        names = [_hf_name(path, i)[0] for i in range(num_layers)]
        return names, _hf_name(path, 0)[1]
    name, transpose = _hf_name(path)
    return [name], transpose


class _LayerStack:
    """Reads slices of a [layers, ...] parameter from its per-layer HF tensors, lazily: a device
    reading its shard touches only the layers and rows it holds."""

    def __init__(self, sources: list, transpose: bool):
        self.sources, self.transpose = sources, transpose
        first = sources[0].T if transpose else sources[0]
        self.shape = (len(sources), *first.shape)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        layers = range(len(self.sources))[idx[0]] if idx else range(len(self.sources))
        rest = idx[1:]
        out = []
        for i in layers:
            src = self.sources[i].T if self.transpose else self.sources[i]
            out.append(np.asarray(src[rest]))
        return np.stack(out)


def _iter_params(state: nnx.State) -> Iterator[tuple[tuple, nnx.Variable]]:
    for path, var in nnx.to_flat_state(state):
        yield tuple(path), var


def from_pretrained(
    path: str | os.PathLike,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    *,
    param_dtype=None,
    rules=shd.DEFAULT_RULES,
    remat: bool | str = "none",
    attn_q_block: int = 128,
    attention: str = "auto",
    logits_chunk: int = 0,
) -> Transformer:
    """Load a local HF directory (config.json + safetensors) into a ``Transformer``.

    ``dtype`` is the compute dtype; parameters are stored in ``param_dtype`` (default: ``dtype``).
    With ``mesh``, each parameter is created directly with its logical-axis sharding.
    ``remat``, ``attn_q_block``, ``attention`` and ``logits_chunk`` are passed to
    ``Transformer`` (with the mesh, which the splash kernel is shard_mapped over).
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    param_dtype = param_dtype or dtype
    abstract = nnx.eval_shape(
        lambda: Transformer(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            attn_q_block=attn_q_block,
            attention=attention,
            mesh=mesh,
            logits_chunk=logits_chunk,
        )
    )
    graphdef, abs_state = nnx.split(abstract)
    tensors = _open_checkpoint(path)
    used = set()
    single = NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("x",)), P())
    flat = []
    for p, var in _iter_params(abs_state):
        names, transpose = _hf_names(p, cfg.num_hidden_layers)
        for name in names:
            if name not in tensors:
                raise KeyError(
                    f"{path}: checkpoint has no tensor {name!r} "
                    f"(needed for {'.'.join(map(str, p))})"
                )
        used.update(names)
        srcs = [tensors[n].get(n) for n in names]
        if str(p[0]) == "layers":
            shapes = {tuple(x.shape) for x in srcs}
            if len(shapes) > 1:
                raise ValueError(f"{path}: layers disagree on the shape of {names[0]!r}: {shapes}")
            src = _LayerStack(srcs, transpose)
        else:
            src = srcs[0].T if transpose else srcs[0]
        want = tuple(var.get_value().shape)
        if tuple(src.shape) != want:
            raise ValueError(
                f"{path}: tensor {names[0]!r} has shape {tuple(src.shape)}, model expects {want}"
            )
        axes = var.get_metadata().get("axes")
        sharding = shd.sharding_for(axes, want, mesh, rules) if mesh is not None else single
        np_dtype = np.dtype(var.get_value().dtype)
        arr = jax.make_array_from_callback(
            want, sharding, lambda idx, s=src, d=np_dtype: np.asarray(s[idx], dtype=d)
        )
        flat.append((p, var.replace(arr)))
    unused = sorted(set(tensors) - used - {"lm_head.weight"})
    if unused:
        log.warning("%s: %d checkpoint tensors unused, e.g. %s", path, len(unused), unused[:3])
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


def critic_from_pretrained(path, dtype=jnp.float32, mesh: Mesh | None = None, **kw) -> Critic:
    """A critic initialised from an actor checkpoint: same backbone, zero-initialised value head."""
    backbone = from_pretrained(path, dtype, mesh, **kw)
    critic = Critic(backbone, rngs=nnx.Rngs(0))
    if mesh is not None:
        shd.shard_module(critic, mesh)
    return critic


def _host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = 4 * 1024**3,
) -> None:
    """Write ``model`` as a HF directory (config.json + safetensors, index-sharded when large)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    tensors: dict[str, np.ndarray] = {}
    for p, var in _iter_params(nnx.state(model, nnx.Param)):
        names, transpose = _hf_names(p, cfg.num_hidden_layers)
        arr = _host(var.get_value())
        if dtype is not None:
            arr = arr.astype(np.dtype(dtype))
        per_layer = list(arr) if str(p[0]) == "layers" else [arr]
        for name, a in zip(names, per_layer, strict=True):
            tensors[name] = np.ascontiguousarray(a.T if transpose else a)
    out_dtype = next(iter(tensors.values())).dtype
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(out_dtype), "float32"
    )
    if jax.process_index() != 0:
        return
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, fn), shard)
        weight_map.update({k: fn for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
