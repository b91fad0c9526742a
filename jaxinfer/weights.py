"""Loading weights: one declarative table maps checkpoint keys to pytree paths, with a transform each.

Sources: an HF checkpoint directory (config.json + *.safetensors, sharded or not), a GGUF file (tensors
dequantized through the `gguf` package), or `dummy` (random weights of any config's shape). Every tensor is
shape-checked against `model.param_specs` and placed straight into its (logical-axis) sharding.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.model import ParamSpec, Params, is_spec, logical_sharding, param_specs


# ---------------------------------------------------------------------------------------------------------
# Transforms from checkpoint layout to ours


def _proj_in(n: int, h: int):
    """HF [n*H, D] (out, in) -> ours [D, n, H]."""
    return lambda w: w.T.reshape(w.shape[1], n, h)


def _proj_out(n: int, h: int):
    """HF o_proj [D, N*H] -> ours [N, H, D]."""
    return lambda w: w.T.reshape(n, h, w.shape[0])


def _heads(n: int, h: int):
    return lambda b: b.reshape(n, h)


def _t(w):
    return w.T


def _same(w):
    return w


def _unpermute_gguf(n: int):
    """llama.cpp interleaves the rotary halves of Q/K rows for its rope; undo it (back to HF's rotate-half)."""

    def f(w):
        rows = w.shape[0]
        return w.reshape(n, rows // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return f


def _then(f, g):
    return lambda w: g(f(w))


@dataclass(frozen=True)
class WeightEntry:
    keys: tuple[str, ...]  # checkpoint tensor name(s)
    path: str  # pytree path, e.g. "layers.3.wqkv"
    transform: Callable[..., np.ndarray]  # one array per key -> the leaf


def _fuse_qkv(K: int):
    """q [D, N, H] (or [N, H]), k and v [D, K, H] -> [D, K, G + 2, H]: per kv head, its G query heads, k, v."""

    def f(q, k, v):
        q = q.reshape(*q.shape[:-2], K, q.shape[-2] // K, q.shape[-1])
        return np.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)

    return f


def weight_table(cfg: ModelConfig, fmt: str) -> list[WeightEntry]:
    """The declarative table for `fmt` in {"hf", "gguf"}."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    gguf = fmt == "gguf"
    # llama.cpp permutes Q/K only for the archs it runs with interleaved rope.
    permuted = gguf and cfg.arch in ("llama", "mistral")
    q_in, k_in = _proj_in(N, H), _proj_in(K, H)
    if permuted:
        q_in, k_in = _then(_unpermute_gguf(N), q_in), _then(_unpermute_gguf(K), k_in)
    if gguf:
        top = [("token_embd.weight", "embed", _same), ("output_norm.weight", "final_norm", _same)]
        if not cfg.tie_word_embeddings:
            top.append(("output.weight", "lm_head", _t))
        names = {
            "attn_norm": "attn_norm.weight", "wqkv": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
            "wo": "attn_output.weight", "bqkv": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
            "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight", "mlp_norm": "ffn_norm.weight",
            "w_gate_up": ("ffn_gate.weight", "ffn_up.weight"), "w_down": "ffn_down.weight",
        }
        prefix = "blk.{i}."
    else:
        top = [("model.embed_tokens.weight", "embed", _same), ("model.norm.weight", "final_norm", _same)]
        if not cfg.tie_word_embeddings:
            top.append(("lm_head.weight", "lm_head", _t))
        names = {
            "attn_norm": "input_layernorm.weight",
            "wqkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "wo": "self_attn.o_proj.weight",
            "bqkv": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            "q_norm": "self_attn.q_norm.weight",
            "k_norm": "self_attn.k_norm.weight", "mlp_norm": "post_attention_layernorm.weight",
            "w_gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "w_down": "mlp.down_proj.weight",
        }
        prefix = "model.layers.{i}."
    bq_in, bk_in = _heads(N, H), _heads(K, H)
    if permuted:  # biases of permuted projections (none in llama, kept for completeness)
        bq_in, bk_in = _then(_unpermute_gguf(N), bq_in), _then(_unpermute_gguf(K), bk_in)
    fuse, v_in, bv_in = _fuse_qkv(K), _proj_in(K, H), _heads(K, H)
    transforms = {
        "attn_norm": _same, "wqkv": lambda q, k, v: fuse(q_in(q), k_in(k), v_in(v)), "wo": _proj_out(N, H),
        "bqkv": lambda q, k, v: fuse(bq_in(q), bk_in(k), bv_in(v)), "q_norm": _same, "k_norm": _same,
        "mlp_norm": _same, "w_gate_up": lambda g, u: np.stack([g.T, u.T], axis=1), "w_down": _t,
    }
    table = [WeightEntry((k,), p, f) for k, p, f in top]
    for i in range(cfg.num_layers):
        for leaf, name in names.items():
            if leaf == "bqkv" and not cfg.attention_bias:
                continue
            if leaf in ("q_norm", "k_norm") and not cfg.qk_norm:
                continue
            keys = tuple(prefix.format(i=i) + n for n in (name if isinstance(name, tuple) else (name,)))
            table.append(WeightEntry(keys, f"layers.{i}.{leaf}", transforms[leaf]))
    return table


# ---------------------------------------------------------------------------------------------------------
# Tensor sources

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsSource:
    """Reads tensors from *.safetensors files (memory-mapped), following model.safetensors.index.json if present."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            for key, fname in weight_map.items():
                self.files[key] = self.dir / fname
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"no *.safetensors files in {self.dir}")
            for f in shards:
                for key in self._header(f)[0]:
                    self.files[key] = f
        self._headers: dict[Path, tuple[dict, int]] = {}

    @staticmethod
    def _header(path: Path) -> tuple[dict, int]:
        if not path.is_file():
            raise FileNotFoundError(f"safetensors file {path} (named in the index) is missing")
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(fh.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        return header, 8 + n

    def keys(self):
        return self.files.keys()

    def get(self, key: str) -> np.ndarray:
        if key not in self.files:
            raise KeyError(key)
        path = self.files[key]
        if path not in self._headers:
            self._headers[path] = self._header(path)
        header, base = self._headers[path]
        if key not in header:
            raise ValueError(f"{path}: tensor {key!r} is listed in the index but not in the file")
        info = header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - start != count * np.dtype(dtype).itemsize or base + end > path.stat().st_size:
            raise ValueError(f"{path}: tensor {key!r} is truncated or its offsets are corrupt")
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return mm.view(dtype).reshape(info["shape"])


class GGUFSource:
    """Tensors of a GGUF file, dequantized to float32 by the `gguf` package."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the gguf package raises assorted errors on bad files
            raise ValueError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._dequantize = gguf.quants.dequantize

    def keys(self):
        return self.tensors.keys()

    def get(self, key: str) -> np.ndarray:
        t = self.tensors[key]
        return np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)

    def metadata(self) -> dict:
        out = {}
        for name, field in self.reader.fields.items():
            if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "merges", "token_type", "scores")):
                if name == "tokenizer.ggml.tokens":
                    out[name] = range(len(field.data))  # only its length is needed here
                continue
            try:
                out[name] = field.contents()
            except Exception:  # older gguf versions: leave undecodable fields out
                continue
        return out


# ---------------------------------------------------------------------------------------------------------
# Building the parameter pytree


def _spec_paths(specs: Params) -> dict[str, ParamSpec]:
    flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    return {_path_str(p): s for p, s in flat}


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k)))))
    return ".".join(parts)


def _place(specs: Params, leaf_fn, mesh: Mesh | None, desc: str, show_progress: bool) -> Params:
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    leaves = []
    for path, spec in tqdm(flat, desc=desc, unit="tensor", disable=not show_progress, leave=False):
        arr = leaf_fn(_path_str(path), spec)
        leaves.append(jax.device_put(arr, logical_sharding(spec.axes, mesh)) if isinstance(arr, np.ndarray) else arr)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_params(cfg: ModelConfig, source, fmt: str, dtype, mesh: Mesh | None = None, show_progress: bool = True) -> Params:
    """Read every tensor named by `weight_table` from `source`, check its shape, cast, place."""
    specs = param_specs(cfg)
    by_path = {e.path: e for e in weight_table(cfg, fmt)}
    where = getattr(source, "path", None) or getattr(source, "dir", "")
    np_dtype = np.dtype(jnp.dtype(dtype))
    missing = [k for e in by_path.values() for k in e.keys if k not in source.keys()]
    if missing:
        raise ValueError(f"{where}: checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def leaf(path: str, spec: ParamSpec):
        entry = by_path[path]
        arr = entry.transform(*(source.get(k) for k in entry.keys))
        if tuple(arr.shape) != spec.shape:
            name = entry.keys[0] if len(entry.keys) == 1 else entry.keys
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(arr.shape)} after layout change, expected {spec.shape}")
        return np.ascontiguousarray(arr.astype(np_dtype))

    return _place(specs, leaf, mesh, f"loading weights ({Path(str(where)).name})", show_progress)


@partial(jax.jit, static_argnames=("shape", "dtype", "init"))
def _random_leaf(key, shape, dtype, init):
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def dummy_params(cfg: ModelConfig, dtype, seed: int = 0, mesh: Mesh | None = None, show_progress: bool = True) -> Params:
    """Random weights of the config's shape, made on device (benchmarks: no checkpoint has to travel)."""
    key = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def leaf(path, spec: ParamSpec):
        arr = _random_leaf(jax.random.fold_in(key, next(counter)), spec.shape, jnp.dtype(dtype), spec.init)
        sharding = logical_sharding(spec.axes, mesh)
        return jax.device_put(arr, sharding) if sharding is not None else arr

    return _place(param_specs(cfg), leaf, mesh, "making dummy weights", show_progress)
