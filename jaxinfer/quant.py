"""Quantized weights: one pytree type for every scheme, its plain-jnp dequantization (the reference), the matmul
that takes it, and the quantizers that make one from a dense weight at load time.

A `QuantizedWeight` stands in for one matmul leaf of `model.param_specs`. It stores that matrix output-major,
as checkpoints do: `[*out, I]`, where `out` are the dense leaf's output dims and I the product of its input
(contracted) dims, so groups of `group_size` consecutive input elements share a scale:

    w[..., i] = scales[..., g(i)] * (q[..., i] - zeros[..., g(i)]) + mins[..., g(i)]     (float32)

with g(i) = i // group_size, or `g_idx[i]` for act-order GPTQ. zeros and mins are optional; one scheme uses
zeros (GPTQ / AWQ / compressed-tensors zero points, GGUF's fixed offsets), the other mins (GGUF's Q4_1 / Q5_1
/ K-quant minimums), so that each format's own dequantization formula is reproduced bit for bit.

Storage of q: bits <= 4 packs two values per uint8 along I (low nibble = even i); 5-8 bit integers take a byte
each (int8 when signed, uint8 when not); fp8 is float8_e4m3fn. scales / zeros / mins are [*out, I / group_size]
in the checkpoint's own dtype (float16 GGUF and GPTQ scales stay float16: exact, and half the bytes).
Block-wise fp8 scales (128 x 128) are stored per output row ([*out, I / 128]).

`act` names the activation scheme of W8A8: None (weight-only: activations stay in the model dtype), "int8" or
"fp8" (each token's activations quantized dynamically with one scale per token, as vLLM's dynamic W8A8 does).

Shapes: T tokens, I input elements, O = prod(out); Q = I / group_size groups.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import ml_dtypes
import numpy as np

FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448



@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized matmul weight (see the module docstring). A pytree: the arrays are its leaves."""

    q: Any  # [*out, I] values; bits <= 4: uint8 [*out, I / 2]
    scales: Any  # [*out, Q]
    zeros: Any = None  # [*out, Q] or None
    mins: Any = None  # [*out, Q] or None
    g_idx: Any = None  # [I] int32 group of each input element (act-order), or None
    act_scale: Any = None  # [] float32 static activation scale (W8A8 static), or None: dynamic
    bits: int = 8
    group_size: int = 0  # 0: per channel (one group spans I)
    in_shape: tuple[int, ...] = ()  # the dense leaf's input dims (their product is I)
    act: str | None = None  # None | "int8" | "fp8": dynamic per-token activation quantization
    act_group: int = 0  # activation scale per token and group of this many inputs (0: per token)
    scheme: str = ""  # a name for logs and /v1/models, e.g. "gguf:Q4_1", "gptq:4bit-g128", "fp8"

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape[:-1])

    @property
    def group(self) -> int:
        return self.group_size or self.in_features

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.arrays())

    def arrays(self):
        return [a for a in (self.q, self.scales, self.zeros, self.mins, self.g_idx, self.act_scale) if a is not None]


jax.tree_util.register_dataclass(
    QuantizedWeight, data_fields=["q", "scales", "zeros", "mins", "g_idx", "act_scale"],
    meta_fields=["bits", "group_size", "in_shape", "act", "act_group", "scheme"])


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


# ---------------------------------------------------------------------------------------------------------
# The reference: dequantize, then a plain matmul


def unpack_values(w: QuantizedWeight):
    """q as float32 values [*out, I] (nibbles unpacked)."""
    q = w.q
    if w.packed:
        q = jnp.stack([q & 0xF, q >> 4], axis=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)
    return q.astype(jnp.float32)


def affine(q, scales, zeros, mins, g_idx, xp=jnp):
    """The one dequantization formula, scales * (q - zeros) + mins in float32, each group's parameters [.., Q]
    spread over its inputs [.., I] (or picked by g_idx): numpy (loading, tests) or jax.numpy (the device)."""
    I, Q = q.shape[-1], scales.shape[-1]

    def per_element(a):
        a = a.astype(xp.float32)
        return xp.take(a, g_idx, axis=-1) if g_idx is not None else xp.repeat(a, I // Q, axis=-1)

    out = q.astype(xp.float32)
    if zeros is not None:
        out = out - per_element(zeros)
    out = per_element(scales) * out
    return out if mins is None else out + per_element(mins)


def dequantize(w: QuantizedWeight, dtype=jnp.float32):
    """[*out, I] dense weight, computed in float32 exactly as the checkpoint format defines it."""
    return affine(unpack_values(w), w.scales, w.zeros, w.mins, w.g_idx).astype(dtype)


def quantize_activation_groups(xg, act: str, scale=None):
    """The one activation quantizer (W8A8): xg [..., n] float32, each group of n inputs along the last axis -> (its
    int8 or float8_e4m3fn values, its scale [..., 1] float32), xg ~ values * scale; dynamic (the group's largest
    |x| maps to the type's largest value) or with a static `scale`."""
    top = 127.0 if act == "int8" else FP8_MAX
    if scale is None:
        amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
        scale = jnp.where(amax > 0, amax / top, 1.0)
    else:
        scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (*xg.shape[:-1], 1))
    xs = jnp.clip(xg / scale, -top, top)
    return (jnp.round(xs).astype(jnp.int8) if act == "int8" else xs.astype(FP8)), scale


def quantize_activations(x, act: str, group: int = 0, scale=None):
    """Activation quantization (W8A8), x [T, I] -> the values the quantized GEMM sees: with a static `scale`,
    or dynamic with one scale per token (or per token and group of `group` inputs)."""
    T, I = x.shape
    v, s = quantize_activation_groups(x.astype(jnp.float32).reshape(T, I // group if group else 1, group or I), act,
                                      scale)
    return (v.astype(jnp.float32) * s).reshape(T, I)


def quantize_activations_rows(x, act: str, scale=None):
    """W8A8 with one scale per token (dynamic) or a static `scale`: x [T, I] -> (the quantized values, int8 or
    float8_e4m3fn, and the scale per token [T] float32); x ~ values * scale."""
    v, s = quantize_activation_groups(x.astype(jnp.float32), act, scale)
    return v, s[:, 0]


def _cpu_kernel(w: QuantizedWeight) -> bool:
    """Whether this matmul runs the native CPU kernel (pallas_kernels/cpu_qmatmul): on a CPU backend, weight-only,
    in its form (4-bit packed or one int8 per value, scale * q + min: `cpu_kernel_form`). At every step size: for
    many tokens it dequantizes each weight tile once into a cache-resident buffer and runs an FMA micro-kernel,
    about the f32 dot's speed, where XLA's dequantize-then-dot costs several times that."""
    if jax.default_backend() != "cpu" or w.act or w.g_idx is not None:
        return False
    if w.zeros is not None or w.q.dtype != (np.uint8 if w.packed else np.int8):
        return False
    from pallas_kernels import cpu_qmatmul

    return cpu_qmatmul.available()


def scaled_after_dot(xf, w: QuantizedWeight):
    """Weight-only integer weights without act-order, as accelerators take them: the integer values (exact in
    bf16) meet x in one dot per group, and the scales (and zero points, minimums) apply to its [T, Q, O] partial
    sums, so no dequantized copy of the weight is written. Per channel (Q = 1) that is a plain dot with the
    convert of the values in its operand, which XLA:GPU fuses into its GEMM. xf [T, I] -> [T, O] float32."""
    T, I = xf.shape
    O, Q = math.prod(w.out_shape), w.scales.shape[-1]
    q = unpack_values(w).reshape(O, Q, I // Q).astype(xf.dtype)
    xg = xf.reshape(T, Q, I // Q)
    part = jnp.einsum("tqi,oqi->tqo", xg, q, preferred_element_type=jnp.float32)  # [T, Q, O]
    s = w.scales.reshape(O, Q).astype(jnp.float32)
    y = jnp.einsum("tqo,oq->to", part, s)
    offset = None if w.mins is None else w.mins.reshape(O, Q).astype(jnp.float32)
    if w.zeros is not None:  # s * (q - z) = s * q - s * z: the zero points' share is s * z times the group's sum of x
        sz = s * w.zeros.reshape(O, Q).astype(jnp.float32)
        offset = -sz if offset is None else offset - sz
    if offset is not None:
        y = y + jnp.einsum("tq,oq->to", xg.astype(jnp.float32).sum(-1), offset)
    return y


def dequantized_dot(xf, w: QuantizedWeight):
    """Weight-only integers on many-token steps: the weight dequantized in x's dtype by XLA (4-bit values through its
    uint4 type, whose elements are the low nibble first, as ours), then one dot, into whose operand XLA:GPU may fuse
    the dequantization. xf [T, I] -> [T, O] float32."""
    O, I, Q = math.prod(w.out_shape), w.in_features, w.scales.shape[-1]
    dt = xf.dtype
    v = lax.bitcast_convert_type(w.q, jnp.uint4) if w.packed else w.q
    v = v.reshape(O, Q, I // Q).astype(dt)
    if w.zeros is not None:
        v = v - w.zeros.reshape(O, Q, 1).astype(dt)
    v = v * w.scales.reshape(O, Q, 1).astype(dt)
    if w.mins is not None:
        v = v + w.mins.reshape(O, Q, 1).astype(dt)
    return jnp.einsum("ti,oi->to", xf, v.reshape(O, I), preferred_element_type=jnp.float32)


def fp8_dot(xf, w: QuantizedWeight):
    """W8A8 fp8 as accelerators take it: the activations quantized to e4m3 (a scale per token, or per token and
    group), one fp8 x fp8 dot per weight group accumulated in float32 (per channel: one dot, which XLA:GPU gives
    to cuBLASLt's fp8 GEMM, the weight stored [O, I] as it wants), then both scales. xf [T, I] -> [T, O] float32."""
    T, I = xf.shape
    O, Q = math.prod(w.out_shape), w.scales.shape[-1]
    A = I // w.act_group if w.act_group else 1  # activation groups
    G = max(Q, A)  # the finer of the two groupings (both divide I)
    xq, xs = quantize_activation_groups(xf.astype(jnp.float32).reshape(T, A, I // A), "fp8", w.act_scale)  # xs [T, A, 1]
    xq = xq.reshape(T, G, I // G)
    part = jnp.einsum("tgi,ogi->tgo", xq, w.q.reshape(O, G, I // G), preferred_element_type=jnp.float32)
    x_scale = jnp.repeat(xs[..., 0], G // A, axis=-1)  # [T, G]
    w_scale = jnp.repeat(w.scales.reshape(O, Q).astype(jnp.float32), G // Q, axis=-1)  # [O, G]
    return jnp.einsum("tgo,tg,og->to", part, x_scale, w_scale)


# Steps of up to this many tokens take the GPU kernel (pallas_kernels/quant_matmul_gpu); larger ones XLA's forms.
# Measured per GEMM shape of an 8B Llama on an H100 (benchmarks/quant_gemm_gpu.py, benchmarks/RESULTS.md): the
# kernel reads each weight byte once; XLA's integer forms write a dequantized copy, and cuBLASLt's fp8 GEMM leads
# from a few dozen tokens up.
GPU_KERNEL_MAX_TOKENS = {"int": 64, "fp8": 0}
GPU_KERNEL_MIN_TOKENS_4BIT = 1  # end to end at batch 1 the kernel at every step beat XLA's 1-token reduction (121 vs 65-68 tok/s)
# Per-channel int8 steps of more tokens than the Pallas kernel takes, on a Hopper GPU: jax's Mosaic GPU mixed-type
# matmul (pallas_kernels/int8_matmul_hopper), instead of XLA's form, which writes a dequantized copy of the weight.
HOPPER_INT8_MIN_TOKENS = GPU_KERNEL_MAX_TOKENS["int"] + 1
HOPPER_INT8_MAX_TOKENS = 512  # above: XLA's form (at 2048 tokens the Mosaic kernel took 1.1-1.6x its time)


@functools.cache
def _hopper_available() -> bool:
    from pallas_kernels import int8_matmul_hopper

    return int8_matmul_hopper.available()


def _hopper_int8(w: QuantizedWeight, T: int, backend: str, hopper: bool | None = None) -> bool:
    """Whether this matmul runs the Hopper int8 kernel: a GPU with it (`hopper`, default: probed once), a step of
    at least HOPPER_INT8_MIN_TOKENS tokens, int8 values with per-channel scales only, weight-only, evenly tiled."""
    if backend != "gpu" or not HOPPER_INT8_MIN_TOKENS <= T <= HOPPER_INT8_MAX_TOKENS or w.q.dtype != np.int8 or \
            w.packed or w.act is not None:
        return False
    from pallas_kernels import int8_matmul_hopper

    if w.zeros is not None or w.mins is not None or w.g_idx is not None or w.scales.shape[-1] != 1:
        return False
    if not int8_matmul_hopper.fits(math.prod(w.out_shape), w.in_features):
        return False
    return _hopper_available() if hopper is None else hopper


def _gpu_kernel(w: QuantizedWeight, T: int, backend: str) -> bool:
    """Whether this matmul runs the Pallas GPU kernel: a GPU, a T-token step within GPU_KERNEL_MAX_TOKENS, and a
    form it takes (4-bit packed or one byte per value, groups a power of two >= 32 or per channel, activations
    weight-only or quantized per token)."""
    if backend != "gpu" or w.g_idx is not None or w.act_group or w.act not in (None, "int8", "fp8"):
        return False
    if w.q.dtype not in ((np.uint8,) if w.packed else (np.int8, np.uint8, FP8)):
        return False
    g = w.group
    if g != w.in_features and (g < 32 or g & (g - 1)):
        return False
    if w.packed and w.scales.shape[-1] > 1 and T < GPU_KERNEL_MIN_TOKENS_4BIT:
        return False
    return T <= GPU_KERNEL_MAX_TOKENS["fp8" if w.q.dtype == FP8 else "int"]


def qmatmul(x, w: QuantizedWeight, *, backend: str | None = None, interpret: bool = False):
    """x [T, *in_shape] -> [T, *out]: x times the dequantized weight, accumulated in float32, cast to x.dtype.

    The one place that decides how. On a GPU, steps of a few tokens -> the Pallas kernel that reads each packed byte
    once (`_gpu_kernel`); on an accelerator otherwise, weight-only integers -> `scaled_after_dot` (per channel) or
    `dequantized_dot` (groups), W8A8 fp8 -> `fp8_dot`; on a CPU, weight-only -> the native kernel
    (pallas_kernels/cpu_qmatmul); everything else (W8A8 int8 on large steps, act-order, no kernel) -> the
    reference: dequantize, then one matmul. `backend` (default: jax's) and `interpret` let tests run the GPU
    kernel's path through the Pallas interpreter."""
    T = x.shape[0]
    xf = x.reshape(T, w.in_features)
    backend = backend or jax.default_backend()
    O = math.prod(w.out_shape)
    if _gpu_kernel(w, T, backend):
        from pallas_kernels.quant_matmul_gpu import quant_matmul

        xs = None
        if w.act is not None:
            xf, xs = quantize_activations_rows(xf, w.act, w.act_scale)
        y = quant_matmul(xf, w.q.reshape(O, -1), w.scales.reshape(O, -1),
                         *(None if a is None else a.reshape(O, -1) for a in (w.zeros, w.mins)), xs, bits=w.bits,
                         group=w.group, interpret=interpret, out_dtype=x.dtype)
        return y.reshape(T, *w.out_shape)
    if _hopper_int8(w, T, backend):
        from pallas_kernels.int8_matmul_hopper import int8_matmul

        y = int8_matmul(xf, w.q.reshape(O, -1), w.scales.reshape(O, 1))
        return y.astype(x.dtype).reshape(T, *w.out_shape)
    if backend != "cpu" and w.g_idx is None:
        if w.act is None and w.q.dtype != FP8:
            # per channel: one dot with the values' convert in its operand; grouped: XLA's group dots cost 5-10x
            # the bf16 GEMM from 16 tokens up, a dequantized copy about one more pass over the weight's bytes; at
            # one token the group dots are a reduction reading each byte once (H100, 4-bit at batch 1 with the
            # kernel off: 131.8 tok/s, as the kernel's 131.7; 65.4 with the dequantized copy)
            form = scaled_after_dot if w.scales.shape[-1] == 1 or T == 1 else dequantized_dot
            return form(xf, w).astype(x.dtype).reshape(T, *w.out_shape)
        if w.act == "fp8":
            return fp8_dot(xf, w).astype(x.dtype).reshape(T, *w.out_shape)
    if backend == "cpu" and _cpu_kernel(w):
        from pallas_kernels import cpu_qmatmul

        y = cpu_qmatmul.qmatmul(xf, w.q.reshape(O, -1), w.scales.reshape(O, -1).astype(jnp.float32),
                                None if w.mins is None else w.mins.reshape(O, -1).astype(jnp.float32),
                                bits=4 if w.packed else 8, group_size=w.group)
        return y.astype(x.dtype).reshape(T, *w.out_shape)
    if w.act is not None:
        xf = quantize_activations(xf, w.act, w.act_group, w.act_scale)
    wd = dequantize(w, jnp.float32 if w.act is not None else x.dtype)
    wd = wd.reshape(-1, w.in_features)  # [O, I]
    y = jnp.einsum("ti,oi->to", xf.astype(wd.dtype), wd, preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(T, *w.out_shape)


def embedding_rows(w: QuantizedWeight, ids, dtype):
    """Rows `ids` [T] of a quantized embedding [V, D] (out = V, in = D), dequantized: [T, D]."""
    rows = QuantizedWeight(*(None if a is None else jnp.take(a, ids, axis=0) for a in (w.q, w.scales, w.zeros, w.mins)),
                           g_idx=w.g_idx, **_meta(w))
    return dequantize(rows, dtype)


def _meta(w: QuantizedWeight) -> dict:
    return dict(bits=w.bits, group_size=w.group_size, in_shape=w.in_shape, act=w.act, act_group=w.act_group,
                scheme=w.scheme)


# ---------------------------------------------------------------------------------------------------------
# Host-side form while loading: numpy components in the checkpoint's orientation [out, I], before the weight
# table's output transforms (qkv fusion, gate/up stacking, llama.cpp's row permutation) apply to each of them.


@dataclass
class HostQuant:
    """A quantized tensor on the host, unpacked: q [rows, I] integer values (or fp8), scales / zeros / mins
    [rows, Q], g_idx [I]."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = None
    mins: np.ndarray | None = None
    g_idx: np.ndarray | None = None
    act_scale: np.ndarray | None = None
    bits: int = 8
    group_size: int = 0
    act: str | None = None
    act_group: int = 0
    scheme: str = ""

    def same_kind(self, other: "HostQuant") -> bool:
        return ((self.bits, self.group_size, self.act, self.act_group, self.q.dtype, self.scales.dtype, self.zeros is None,
                 self.mins is None) == (other.bits, other.group_size, other.act, other.act_group, other.q.dtype,
                                        other.scales.dtype, other.zeros is None, other.mins is None)
                and (self.g_idx is None) == (other.g_idx is None)
                and (self.g_idx is None or np.array_equal(self.g_idx, other.g_idx))
                and (self.act_scale is None) == (other.act_scale is None))

    def dequantize(self) -> np.ndarray:
        """float32 [rows, I], the same formula as `dequantize` (numpy: for the "none" path and tests)."""
        return affine(self.q, self.scales, self.zeros, self.mins, self.g_idx, xp=np)


def apply_rows(rows, parts: list[HostQuant]) -> HostQuant:
    """The weight table's row transform (q/k/v fusion, gate/up stacking, llama.cpp's permutation), applied to each
    per-row part of tensors quantized alike (`unify` first)."""
    first = parts[0]
    # static activation scales of layers fused on one input: the largest (as vLLM), so none of them clips
    act_scale = None if first.act_scale is None else max(np.float32(np.max(p.act_scale)) for p in parts)
    return dataclasses.replace(first, act_scale=act_scale, **{
        k: None if getattr(first, k) is None else rows(*(getattr(p, k) for p in parts))
        for k in ("q", "scales", "zeros", "mins")})


def unify(parts: list[HostQuant]) -> list[HostQuant]:
    """Tensors fused into one weight (q/k/v, gate/up), brought to one form without changing a value: GGUF's mixed
    files (Q4_K_M: attn_v in Q6_K beside Q4_K) meet at the smallest group and float32 scales,
    zero zeros / mins where a part has none (s * (q - 0) + 0 is s * q exactly)."""
    first = parts[0]
    if all(first.same_kind(p) for p in parts[1:]):
        return parts
    if any(p.act or p.g_idx is not None or p.q.dtype == FP8 for p in parts):
        raise ValueError("tensors fused into one weight (q/k/v or gate/up) are quantized differently "
                         f"({', '.join(p.scheme for p in parts)}); not supported for fp8, W8A8 or act-order")
    if any(p.q.dtype == np.uint8 and p.bits > 7 for p in parts) and any(p.q.dtype == np.int8 for p in parts):
        raise ValueError(f"fused tensors mix signed and unsigned 8-bit values ({', '.join(p.scheme for p in parts)})")
    I = first.q.shape[-1]
    g = math.gcd(*(p.group_size or I for p in parts))
    signed = any(p.q.dtype == np.int8 for p in parts)
    with_zeros, with_mins = any(p.zeros is not None for p in parts), any(p.mins is not None for p in parts)

    def regroup(p: HostQuant, a):
        return None if a is None else np.repeat(a.astype(np.float32), (p.group_size or I) // g, axis=-1)

    out = []
    for p in parts:
        scales = regroup(p, p.scales)
        zeros = regroup(p, p.zeros) if p.zeros is not None else (np.zeros_like(scales) if with_zeros else None)
        mins = regroup(p, p.mins) if p.mins is not None else (np.zeros_like(scales) if with_mins else None)
        out.append(dataclasses.replace(p, q=p.q.astype(np.int8 if signed else np.uint8), scales=scales, zeros=zeros,
                                       mins=mins, bits=max(x.bits for x in parts), group_size=0 if g == I else g,
                                       scheme="+".join(dict.fromkeys(x.scheme for x in parts))))
    return out


def to_device_form(h: HostQuant, in_shape: tuple[int, ...]) -> QuantizedWeight:
    """Pack (bits <= 4) and wrap as numpy leaves of a QuantizedWeight (placed on devices by the loader)."""
    q = h.q
    if h.bits <= 4:
        if q.shape[-1] % 2:
            raise ValueError(f"a {h.bits}-bit weight needs an even number of input elements, got {q.shape[-1]}")
        q = q.astype(np.uint8)
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantizedWeight(q, h.scales, h.zeros, h.mins, None if h.g_idx is None else h.g_idx.astype(np.int32),
                           None if h.act_scale is None else np.float32(np.asarray(h.act_scale).reshape(())),
                           bits=h.bits, group_size=h.group_size, in_shape=tuple(in_shape), act=h.act,
                           act_group=h.act_group, scheme=h.scheme)


def cpu_kernel_form(h: HostQuant) -> HostQuant:
    """The same weight as `scale * q + min` with float32 scales and signed bytes above 4 bits, the form the CPU
    kernel reads (zero points folded into the minimums: equal up to float32 rounding, not bit for bit)."""
    if h.act or h.g_idx is not None or h.q.dtype == FP8:
        return h
    scales = h.scales.astype(np.float32)
    mins = None if h.mins is None else h.mins.astype(np.float32)
    q = h.q
    if h.bits > 4 and q.dtype == np.uint8:  # unsigned bytes -> signed: s * q + m = s * (q - 128) + (m + 128 s)
        q = (q.astype(np.int16) - 128).astype(np.int8)
        mins = (0 if mins is None else mins) + 128 * scales
    if h.zeros is not None:
        mins = (0 if mins is None else mins) - scales * h.zeros.astype(np.float32)
    return dataclasses.replace(h, q=q, scales=scales, zeros=None, mins=mins)


# ---------------------------------------------------------------------------------------------------------
# On-the-fly quantizers (vLLM's names), from a dense float weight [rows, I]; `xp` is numpy (loading a checkpoint)
# or jax.numpy (random weights made on the device)


def _group_for(I: int, want: int) -> int:
    """`want` if it divides I, else the largest power of two >= 32 below it that does, else per channel (0)."""
    g = want
    while g >= 32:
        if I % g == 0:
            return g
        g //= 2
    return 0


def quantize_int8(w, xp=np) -> HostQuant:
    """W8A16: symmetric int8, one float32 scale per output row (round to nearest)."""
    w = w.astype(xp.float32)
    amax = xp.max(xp.abs(w), axis=-1, keepdims=True)
    s = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.rint(w / s), -127, 127).astype(xp.int8)
    return HostQuant(q, s, bits=8, group_size=0, scheme="int8")


def quantize_int4(w, xp=np, group_size: int = 128) -> HostQuant:
    """W4A16: asymmetric 4-bit with zero points, groups of 128 input elements (or the largest power of two that
    divides I), round to nearest, as GPTQ's and AWQ's asymmetric layouts hold it. Scales and zero points stay
    float32: with bfloat16 scales and byte zero points (3 bytes per group, not 8) XLA's 1-token form of the matmul
    ran an 8B model at 68 tok/s on an H100 against 157 (benchmarks/RESULTS.md)."""
    w = w.astype(xp.float32)
    rows, I = w.shape
    g = _group_for(I, group_size) or I
    wg = w.reshape(rows, I // g, g)
    lo, hi = xp.minimum(xp.min(wg, axis=-1), 0), xp.maximum(xp.max(wg, axis=-1), 0)
    s = xp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(xp.float32)
    z = xp.clip(xp.rint(-lo / s), 0, 15).astype(xp.float32)
    q = xp.clip(xp.rint(wg / s[..., None]) + z[..., None], 0, 15).astype(xp.uint8).reshape(rows, I)
    return HostQuant(q, s, zeros=z, bits=4, group_size=0 if g == I else g, scheme=f"int4-g{g}")


def quantize_fp8(w, xp=np) -> HostQuant:
    """W8A8 fp8 (e4m3): one float32 scale per output row; activations get a dynamic scale per token."""
    w = w.astype(xp.float32)
    amax = xp.max(xp.abs(w), axis=-1, keepdims=True)
    s = xp.where(amax > 0, amax / FP8_MAX, 1.0).astype(xp.float32)
    return HostQuant((w / s).astype(FP8), s, bits=8, group_size=0, act="fp8", scheme="fp8")


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}
