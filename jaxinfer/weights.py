"""Loading weights: one declarative table maps checkpoint keys to pytree paths, with a transform each.

Sources: an HF checkpoint directory (config.json + *.safetensors, sharded or not), a GGUF file (tensors
dequantized through the `gguf` package), or `dummy` (random weights of any config's shape). Every tensor is
shape-checked against `model.param_specs` and placed straight into its (logical-axis) sharding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
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

from jaxinfer import quant
from jaxinfer.config import ModelConfig
from jaxinfer.model import SHARDING_RULES, ParamSpec, Params, is_spec, logical_sharding, param_specs
from jaxinfer.quant import HostQuant, QuantizedWeight
from pallas_kernels import cpu_qmatmul


# ---------------------------------------------------------------------------------------------------------
# From checkpoint layout to ours. Every tensor is read in the checkpoint's own orientation, output rows first
# ([out, in] weights, [out] biases). Each table entry's `rows` transform fuses and reorders those output rows
# into the leaf's output dims ([*out, in]); `to_dense` then moves the input dims to where the dense leaf has
# them. A quantized tensor takes the same `rows` transform on each of its per-row parts (values, scales, zeros),
# so one table serves dense and quantized checkpoints alike.


def _same(w):
    return w


def _unpermute_gguf(n: int):
    """llama.cpp interleaves the rotary halves of Q/K rows for its rope; undo it (back to HF's rotate-half)."""

    def f(w):
        rows = w.shape[0]
        return w.reshape(n, rows // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return f


@dataclass(frozen=True)
class WeightEntry:
    keys: tuple[str, ...]  # checkpoint tensor name(s)
    path: str  # pytree path, e.g. "layers.3.wqkv"
    rows: Callable[..., np.ndarray]  # one [out, ...] array per key -> [*out dims, ...]


def to_dense(arr: np.ndarray, spec: ParamSpec) -> np.ndarray:
    """[*out, I] (rows transformed) -> the dense leaf's layout: its input dims put back where the spec has them."""
    if not spec.contract:
        return arr
    out = [spec.shape[i] for i in spec.out_axes]
    arr = arr.reshape(*out, *(spec.shape[i] for i in spec.contract))
    where = {a: k for k, a in enumerate(spec.out_axes)} | {a: len(out) + k for k, a in enumerate(spec.contract)}
    return arr.transpose([where[a] for a in range(len(spec.shape))])


def weight_table(cfg: ModelConfig, fmt: str) -> list[WeightEntry]:
    """The declarative table for `fmt` in {"hf", "gguf"}."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    r = cfg.kv_replicas  # each checkpoint kv head stored r times (of K), with G of its query heads each
    gguf = fmt == "gguf"
    # llama.cpp permutes Q/K only for the archs it runs with interleaved rope.
    permuted = gguf and cfg.arch in ("llama", "mistral")

    def heads(n: int, unpermute: bool):  # [n * H, ...] -> [n, H, ...]
        return lambda w: (_unpermute_gguf(n)(w) if unpermute else w).reshape(n, H, *w.shape[1:])

    q_rows, k_rows, v_rows = heads(N, permuted), heads(K // r, permuted), heads(K // r, False)

    def qkv(q, k, v):
        """q [N*H, ...], k and v [K/r*H, ...] -> [K, G + 2, H, ...]: per kv head, its G query heads, k, v (a
        checkpoint head's copy j takes its query heads j * G ... (j + 1) * G - 1: query head n stays n)."""
        q = q_rows(q).reshape(K, G, H, *q.shape[1:])
        k, v = (np.repeat(x, r, axis=0) if r > 1 else x for x in (k_rows(k), v_rows(v)))
        return np.concatenate([q, k[:, None], v[:, None]], axis=1)

    if gguf:
        top = [("token_embd.weight", "embed"), ("output_norm.weight", "final_norm")]
        if not cfg.tie_word_embeddings:
            top.append(("output.weight", "lm_head"))
        names = {
            "attn_norm": "attn_norm.weight", "wqkv": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
            "wo": "attn_output.weight", "bqkv": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
            "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight", "mlp_norm": "ffn_norm.weight",
            "w_gate_up": ("ffn_gate.weight", "ffn_up.weight"), "w_down": "ffn_down.weight",
        }
        prefix = "blk.{i}."
    else:
        top = [("model.embed_tokens.weight", "embed"), ("model.norm.weight", "final_norm")]
        if not cfg.tie_word_embeddings:
            top.append(("lm_head.weight", "lm_head"))
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
    if cfg.arch == "gemma3":  # its four norms per layer (GGUF names above, HF's below)
        names = names | ({"post_attn_norm": "post_attention_norm.weight", "post_mlp_norm": "post_ffw_norm.weight"}
                         if gguf else {"post_attn_norm": "post_attention_layernorm.weight",
                                       "mlp_norm": "pre_feedforward_layernorm.weight",
                                       "post_mlp_norm": "post_feedforward_layernorm.weight"})
    rows = {"wqkv": qkv, "bqkv": qkv, "w_gate_up": lambda g, u: np.stack([g, u]),
            # the experts' [Fe, D] gate and up matrices, expert by expert -> [E, 2, Fe, D]; their [D, Fe] downs -> [E, D, Fe]
            "experts_gate_up": lambda *gu: np.stack([np.stack(gu[j:j + 2]) for j in range(0, len(gu), 2)]),
            "experts_down": lambda *d: np.stack(d)}
    if cfg.num_experts:
        if gguf:
            raise ValueError("mixture-of-experts GGUF files are not supported yet; use the HF checkpoint")
        # Mixtral's experts: w1 gate, w3 up, w2 down; Qwen3-MoE's: gate_proj, up_proj, down_proj
        block, (g, u, d) = (("block_sparse_moe.", ("w1", "w3", "w2")) if cfg.arch == "mixtral"
                            else ("mlp.", ("gate_proj", "up_proj", "down_proj")))
        experts = range(cfg.num_experts)
        moe_names = {"router": block + "gate.weight",
                     "experts_gate_up": tuple(f"{block}experts.{e}.{n}.weight" for e in experts for n in (g, u)),
                     "experts_down": tuple(f"{block}experts.{e}.{d}.weight" for e in experts)}
    if cfg.arch == "gemma3" and not gguf:
        # Gemma's norms multiply by 1 + w; we store 1 + w (a GGUF already does, llama.cpp adds the 1 at conversion)
        plus_one = lambda w: w.astype(np.float32) + 1.0  # noqa: E731
        rows |= {k: plus_one for k in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q_norm", "k_norm",
                                       "final_norm")}
    table = [WeightEntry((k,), p, rows.get(p, _same)) for k, p in top]
    for i in range(cfg.num_layers):
        layer_names = names
        if cfg.is_moe_layer(i):
            layer_names = {k: v for k, v in names.items() if k not in ("w_gate_up", "w_down")} | moe_names
        for leaf, name in layer_names.items():
            if leaf == "bqkv" and not cfg.attention_bias:
                continue
            if leaf in ("q_norm", "k_norm") and not cfg.qk_norm:
                continue
            keys = tuple(prefix.format(i=i) + n for n in (name if isinstance(name, tuple) else (name,)))
            table.append(WeightEntry(keys, f"layers.{i}.{leaf}", rows.get(leaf, _same)))
    return table


# ---------------------------------------------------------------------------------------------------------
# Tensor sources

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _check_tensor_entry(key, info, data_bytes: int) -> None:
    """One safetensors header entry: a known dtype, a shape of non-negative ints, offsets inside the data whose
    span is the shape's byte size (Python ints: no overflow)."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise ValueError(f"tensor {key!r}: not a tensor entry")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape)):
        raise ValueError(f"tensor {key!r}: bad shape {shape!r}"[:200])
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ValueError(f"tensor {key!r}: data offsets {offsets!r} outside the file's {data_bytes} data bytes"[:200])
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is not None and offsets[1] - offsets[0] != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ValueError(f"tensor {key!r} is truncated or its offsets are corrupt")


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
        """The file's tensor table and where its data starts; every size in it checked against the file before
        anything is read or mapped (a corrupt or hostile header is a ValueError naming the file)."""
        if not path.is_file():
            raise FileNotFoundError(f"safetensors file {path} (named in the index) is missing")
        size = path.stat().st_size
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > min(100_000_000, size - 8):
                    raise ValueError(f"a header of {n} bytes in a file of {size}")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            for key, info in header.items():
                _check_tensor_entry(key, info, size - 8 - n)
        except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
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
        start, end = info["data_offsets"]  # checked against the file's size with the header
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return mm.view(dtype).reshape(info["shape"])


class GGUFSource:
    """Tensors of a GGUF file: float tensors as float32, quantized ones (the types in `GGUF_KEPT`) as `HostQuant`
    in their own numbers, any other type dequantized to float32 by the `gguf` package."""

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
        size = self.path.stat().st_size
        for t in self.reader.tensors:  # sizes from the header, against the file, before anything is read
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"{self.path}: tensor {t.name!r} ({t.n_bytes} bytes at {t.data_offset}) lies past "
                                 f"the end of the file ({size} bytes): truncated or corrupt")
        self._dequantize = gguf.quants.dequantize

    def keys(self):
        return self.tensors.keys()

    def get(self, key: str) -> np.ndarray | HostQuant:
        t = self.tensors[key]
        if t.tensor_type.name in GGUF_KEPT:
            return gguf_host_quant(np.asarray(t.data), t.tensor_type)
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


# GGUF's quantized blocks kept in their numbers. The `gguf` package dequantizes blocks but does not hand out their
# integer values, so they are read through it all the same: the same blocks with every scale set to 1 and every
# minimum to 0 dequantize to the values themselves (minus the type's fixed offset). The scales come from the block
# bytes (float16 d, dmin) and `Q4_K.get_scale_min` (the K-quants' 6-bit sub-block scales). Each type's own formula
# then holds bit for bit (tests/test_quant.py compares with `gguf.quants.dequantize`):
#   Q4_0  d * (q - 8)          -> values q - 8 are not nibbles: kept as q with mins -8d (d*q - 8d is exact in float32)
#   Q4_1  d * q + m            Q5_0  d * (q - 16) (signed values)   Q5_1  d * q + m   Q8_0  d * q (signed)
#   Q4_K, Q5_K  (d*sc) * q - dmin*m   (mins = -(dmin*m))           Q6_K  (d*sc) * (q - 32) (signed values)
GGUF_KEPT = {  # type -> (bits, group, signed values)
    "Q4_0": (4, 32, False), "Q4_1": (4, 32, False), "Q5_0": (5, 32, True), "Q5_1": (5, 32, False),
    "Q8_0": (8, 32, True), "Q4_K": (4, 32, False), "Q5_K": (5, 32, False), "Q6_K": (6, 16, True),
}
_F16_ONE = np.array([1.0], np.float16).view(np.uint8)  # the two bytes of float16 1.0


def gguf_host_quant(data: np.ndarray, qtype) -> HostQuant:
    """data [rows, row bytes] of one quantized GGUF tensor -> HostQuant q [rows, I], scales (and mins) [rows, I/g]."""
    import gguf

    name = qtype.name
    bits, group, signed = GGUF_KEPT[name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = data.shape[0]
    blocks = data.reshape(-1, type_size)
    unit = blocks.copy()  # the same blocks with unit scales and no minimums
    f16 = lambda b, at: b[:, at:at + 2].copy().view(np.float16).astype(np.float32)  # noqa: E731
    mins = None
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        scales = f16(blocks, 0)[:, :, None]  # [n, 1, 1]: one group per block
        unit[:, 0:2] = _F16_ONE
        if name.endswith("_1"):
            mins = f16(blocks, 2)[:, :, None]
            unit[:, 2:4] = 0
    elif name in ("Q4_K", "Q5_K"):
        d, dmin = f16(blocks, 0), f16(blocks, 2)
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        scales = (d * sc.astype(np.float32))[:, :, None]  # [n, 8, 1]
        mins = -(dmin * m.astype(np.float32))[:, :, None]
        unit[:, 0:2], unit[:, 2:4] = _F16_ONE, 0
        unit[:, 4:8], unit[:, 8:12], unit[:, 12:16] = 1, 0, 1  # every 6-bit sub-block scale 1, every minimum 0
    else:  # Q6_K: ql, qh, 16 int8 sub-block scales, then d
        at = block // 2 + block // 4
        d = f16(blocks, type_size - 2)
        scales = (d * blocks[:, at:at + 16].view(np.int8).astype(np.float32))[:, :, None]  # [n, 16, 1]
        unit[:, at:at + 16] = 1
        unit[:, type_size - 2:] = _F16_ONE
    values = gguf.quants.dequantize(unit.reshape(data.shape), qtype).reshape(rows, -1)  # small integers, as float32
    if name == "Q4_0":
        values, mins = values + 8, -8 * scales
    q = values.astype(np.int8 if signed else np.uint8)
    per_row = lambda a: None if a is None else a.reshape(rows, -1)  # noqa: E731
    return HostQuant(q, per_row(scales), mins=per_row(mins), bits=bits, group_size=group, scheme=f"gguf:{name}")


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
        if isinstance(arr, QuantizedWeight):  # each part in the sharding of its rows (g_idx: whole everywhere)
            axes = spec.quantized_axes()
            arr = jax.tree_util.tree_map(
                lambda a: jax.device_put(a, _divisible(axes, a.shape, mesh) if a.ndim > 1 else None), arr)
        elif isinstance(arr, np.ndarray):
            arr = jax.device_put(arr, logical_sharding(spec.axes, mesh))
        leaves.append(arr)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _divisible(axes, shape, mesh: Mesh | None):
    """The sharding of these logical axes, with a dim left whole where its mesh axis does not divide it (a
    per-channel scale's one group of a row-parallel weight)."""
    if mesh is None:
        return None
    sizes = dict(mesh.shape)
    keep = [a if a and SHARDING_RULES.get(a) and n % sizes.get(SHARDING_RULES[a], 1) == 0 else None
            for a, n in zip(axes, shape)]
    return logical_sharding(tuple(keep), mesh)


def quantizes(path: str, spec: ParamSpec) -> bool:
    """Whether on-the-fly quantization takes this leaf: the layers' matmul weights (as vLLM, not the embedding,
    the lm_head or a mixture-of-experts router)."""
    return path.startswith("layers.") and bool(spec.contract) and not path.endswith(".router")


def load_params(cfg: ModelConfig, source, fmt: str, dtype, mesh: Mesh | None = None, show_progress: bool = True,
                quantization: str | None = None, specs=None, table: list[WeightEntry] | None = None,
                portable: bool = False) -> Params:
    """Read every tensor named by `weight_table` from `source`, check its shape, cast, place.

    Quantized tensors of the source (`HostQuant`) stay quantized in matmul leaves; `quantization` "none"
    dequantizes them to `dtype`, and "int8" / "int4" / "fp8" quantize the layers' dense matmul weights.
    specs / table: another pytree's (an EAGLE head's, eagle.py) instead of the decoder's. portable: quantized weights in
    the form every backend reads, not the CPU kernel's (a converted model's saved form; convert.py)."""
    specs = param_specs(cfg) if specs is None else specs
    by_path = {e.path: e for e in (weight_table(cfg, fmt) if table is None else table)}
    where = getattr(source, "path", None) or getattr(source, "dir", "")
    np_dtype = np.dtype(jnp.dtype(dtype))
    missing = [k for e in by_path.values() for k in e.keys if k not in source.keys()]
    if missing:
        raise ValueError(f"{where}: checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    quantizer = quant.QUANTIZERS.get(quantization)
    cpu_kernel = not portable and _cpu_kernel_here(mesh)
    warned = []

    def slow_cpu(h: HostQuant) -> None:
        if jax.default_backend() == "cpu" and not cpu_kernel and not warned:
            warned.append(True)
            print(f"warning: quantized weights ({h.scheme}) run through the jnp reference on this CPU, several times "
                  f"slower than float32: {cpu_qmatmul.build_error or 'the native kernel does not run on a mesh'}",
                  file=sys.stderr, flush=True)

    def leaf(path: str, spec: ParamSpec):
        entry = by_path[path]
        parts = [source.get(k) for k in entry.keys]
        if quantizer and quantizes(path, spec):
            parts = [quantizer(p) if isinstance(p, np.ndarray) else p for p in parts]
        if quantization == "none" or not spec.contract or not all(isinstance(p, HostQuant) for p in parts):
            parts = [p.dequantize() if isinstance(p, HostQuant) else p for p in parts]
        name = entry.keys[0] if len(entry.keys) == 1 else entry.keys
        if isinstance(parts[0], HostQuant):
            h = quant.apply_rows(entry.rows, quant.unify(parts))
            if cpu_kernel:
                h = quant.cpu_kernel_form(h)
            elif not portable:
                slow_cpu(h)
            if tuple(h.q.shape) != spec.quantized_shape:
                raise ValueError(f"{where}: quantized tensor {name!r} has shape {tuple(h.q.shape)} after layout "
                                 f"change, expected {spec.quantized_shape}")
            return quant.to_device_form(h, tuple(spec.shape[i] for i in spec.contract))
        arr = entry.rows(*parts)
        want = spec.quantized_shape if spec.contract else spec.shape  # [*out, I] before the dense layout
        if tuple(arr.shape) != want:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(arr.shape)} after layout change, expected {want}")
        return np.ascontiguousarray(to_dense(arr, spec).astype(np_dtype))

    return _place(specs, leaf, mesh, f"loading weights ({Path(str(where)).name})", show_progress)


@partial(jax.jit, static_argnames=("shape", "dtype", "init"))
def _random_leaf(key, shape, dtype, init):
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _cpu_kernel_here(mesh) -> bool:
    """Quantized weights made or loaded here take the native CPU kernel's form (quant.cpu_kernel_form): one CPU
    device with the kernel built."""
    return jax.default_backend() == "cpu" and mesh is None and cpu_qmatmul.available()


@partial(jax.jit, static_argnames=("shape", "in_shape", "scheme", "cpu_kernel"))
def _random_quantized(key, shape, in_shape, scheme, cpu_kernel: bool = False):
    """A random [*out, I] weight quantized on the device with an on-the-fly scheme (cpu_kernel: in the CPU kernel's
    form, as a loaded checkpoint's weight is on a CPU)."""
    w = 0.02 * jax.random.normal(key, (math.prod(shape[:-1]), shape[-1]), jnp.float32)
    h = quant.QUANTIZERS[scheme](w, xp=jnp)
    if cpu_kernel:
        h = quant.cpu_kernel_form(h)
    h = dataclasses.replace(h, **{k: getattr(h, k).reshape(*shape[:-1], -1) for k in ("q", "scales", "zeros", "mins")
                                  if getattr(h, k) is not None})
    return quant.to_device_form(h, in_shape)


def dummy_params(cfg: ModelConfig, dtype, seed: int = 0, mesh: Mesh | None = None, show_progress: bool = True,
                 quantization: str | None = None) -> Params:
    """Random weights of the config's shape, made on device (benchmarks: no checkpoint has to travel); with an
    on-the-fly `quantization`, the layers' matmul weights are quantized there too."""
    key = jax.random.key(seed)
    counter = iter(range(1 << 30))
    cpu_kernel = quantization in quant.QUANTIZERS and _cpu_kernel_here(mesh)

    def leaf(path, spec: ParamSpec):
        k = jax.random.fold_in(key, next(counter))
        if quantization in quant.QUANTIZERS and quantizes(path, spec):
            # placed in its sharding by _place, as a loaded quantized leaf is
            return _random_quantized(k, spec.quantized_shape, tuple(spec.shape[i] for i in spec.contract),
                                     quantization, cpu_kernel)
        arr = _random_leaf(k, spec.shape, jnp.dtype(dtype), spec.init)
        sharding = logical_sharding(spec.axes, mesh)
        return jax.device_put(arr, sharding) if sharding is not None else arr

    return _place(param_specs(cfg), leaf, mesh, "making dummy weights", show_progress)
