"""Quantized-weight matmul on NVIDIA GPUs: a Pallas kernel lowered through Triton that reads each packed weight
byte once and dequantizes it in registers (Marlin's idea), for the few-token steps where a matmul is bound by
the weight bytes.

The op (`quant_matmul`, reference `op_reference`): y = (x * x_scale) @ W^T in float32, where the weight W [N, K]
is stored as the values q with per-group parameters, the form of `jaxinfer.quant.QuantizedWeight`:
    W[n, k] = scales[n, g] * (q[n, k] - zeros[n, g]) + mins[n, g]          g = k // group
Shapes:
  x        [M, K]      bf16 / f16 / f32 (the dtype the dots run in; the values of q are exact in it), or int8 /
                       float8_e4m3fn: quantized activations (W8A8), whose dots run in bf16
  q        [N, K / 2]  uint8, bits = 4: two values per byte, the low nibble the even k
           [N, K]      int8 / uint8 / float8_e4m3fn, bits = 8
  scales   [N, Q]      any float dtype, Q = K / group; zeros, mins: [N, Q] or None
  x_scale  [M] f32 or None: a per-row scale of x (W8A8: x holds the quantized activations)
  out      [M, N]      float32
Inside the kernel: a program owns a tile of bm rows of x and bn output channels, over one of `splits` equal
stretches of K (split-K: few-token steps have too few (bm, bn) tiles to fill the 132 SMs; the partial sums
[splits, M, N] are added by XLA). Each iteration loads bk inputs of the tile's weight rows, as sub-blocks of
kb = min(bk, group) inputs that share one scale: the integer values meet x in a tensor-core dot (the 4-bit
ones as two dots, the low nibbles against x's even columns and the high ones against its odd columns, so no
interleave is needed in registers; x is split into its even and odd columns once, outside), and the group's
scale multiplies the [bm, bn] partial sum. Zero points and minimums need only each group's sum of x:
    sum_k x[m, k] W[n, k] = s (x . q - z * xsum) + m_ * xsum            (per group)
With one group (per channel) the scale (and zero point) applies once after the loop.

Rows past M and channels past N are clamped to the last real one on load (the loads need no mask; their
results are never stored). Tensor-core dots need bm >= 16, so a 1-token step pads its tile to 16 rows: the
kernel is bound by weight bytes, not by those rows.
Constraints: K % (splits * bk) == 0, bk a multiple of kb, kb a power of two >= 16 (32 for 4-bit).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NUM_SMS = 132  # H100 SXM; only steers the split-K heuristic


def op_reference(x, q, scales, zeros=None, mins=None, x_scale=None, *, bits: int, group: int):
    """Plain jnp: dequantize W to float32, one matmul. Same arguments and result as `quant_matmul`."""
    if bits == 4:
        q = jnp.stack([q & 0xF, q >> 4], axis=-1).reshape(q.shape[0], -1)
    N, K = q.shape
    per_k = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=-1)  # [N, Q] -> [N, K]
    w = q.astype(jnp.float32)
    if zeros is not None:
        w = w - per_k(zeros)
    w = per_k(scales) * w
    if mins is not None:
        w = w + per_k(mins)
    y = jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)
    return y if x_scale is None else y * x_scale.astype(jnp.float32)[:, None]


def _iota(n):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _dot_t(a, b):
    """a [bm, k] . b [bn, k]^T -> [bm, bn] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


# 4-bit values as a float without an int -> float conversion (Marlin's trick): OR-ing the nibble into the mantissa
# of a power of two whose last mantissa bit is worth 1 gives bias + q exactly in one integer op; the bias joins the
# zero point. float32 (tests, f32 models) converts plainly: a bias of 2^23 would swamp its float32 sums.
_NIBBLE_FLOAT = {jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x4300, 128.0), jnp.dtype(jnp.float16): (jnp.uint16, 0x6400, 1024.0)}


def _compute_dtype(x_dtype):
    """The dots' dtype: x's, or bfloat16 for quantized activations (int8 / e4m3 values, exact in it). Quantized
    activations arrive in their own 8-bit type, not as bf16 values: XLA may fold a round trip f32 -> e4m3 -> bf16
    into one convert and drop the rounding (seen on an H100)."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(x_dtype).itemsize == 1 else jnp.dtype(x_dtype)


def _nibble_bias(cdt) -> float:
    return _NIBBLE_FLOAT[jnp.dtype(cdt)][2] if jnp.dtype(cdt) in _NIBBLE_FLOAT else 0.0


def _nibbles(n, cdt):
    """uint8 values < 16 -> bias + n in cdt."""
    if jnp.dtype(cdt) not in _NIBBLE_FLOAT:
        return n.astype(cdt)
    ut, bits, _ = _NIBBLE_FLOAT[jnp.dtype(cdt)]
    return lax.bitcast_convert_type(n.astype(ut) | ut(bits), cdt)


def _bytes_as_float(w, cdt):
    """int8 / uint8 values [bn, k] -> cdt without an int -> float conversion instruction (those run at a sixteenth of
    the FMA rate, and a tile converts every weight byte): OR-ing the byte (int8 with its top bit flipped: + 128) into
    the mantissa of 2^23 gives 2^23 + u exactly in float32; subtracting 2^23 (+ 128) leaves the value, exact in bf16
    and f16 (|v| <= 255), and float32 -> bf16 / f16 packs two values per instruction."""
    signed = w.dtype == jnp.int8
    u = (lax.bitcast_convert_type(w, jnp.uint8) ^ jnp.uint8(0x80)) if signed else w
    f = lax.bitcast_convert_type(u.astype(jnp.uint32) | jnp.uint32(0x4B000000), jnp.float32)
    return (f - (float(1 << 23) + (128.0 if signed else 0.0))).astype(cdt)


def _kernel(x_ref, q_ref, s_ref, *refs, bits, group, bm, bn, bk, kb, k_iters, M, N, has_zeros, has_mins,
            has_xsum, has_x_scale, weights_first, bytes_via_f32):
    it = iter(refs)
    z_ref = next(it) if has_zeros else None
    m_ref = next(it) if has_mins else None
    xsum_ref = next(it) if has_xsum else None  # [M, K / kb] f32: x's sum over each sub-block
    xs_ref = next(it) if has_x_scale else None
    o_ref = refs[-1]
    mi, ni, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rm = mi * bm + _iota(bm)
    rn = ni * bn + _iota(bn)
    rm_c, rn_c = jnp.minimum(rm, M - 1), jnp.minimum(rn, N - 1)
    cdt = _compute_dtype(x_ref.dtype)
    packed = bits == 4
    bias = _nibble_bias(cdt) if packed else 0.0  # the dots see bias + q
    Q = s_ref.shape[1]
    # the accumulator is [bm, bn], or [bn, bm] with the weights as the dots' left operand (weights_first)
    chan = (lambda v: v[:, None]) if weights_first else (lambda v: v[None, :])  # per output channel [bn]
    tok = (lambda v: v[None, :]) if weights_first else (lambda v: v[:, None])  # per row of x [bm]
    dot = (lambda xv, wv: _dot_t(wv, xv)) if weights_first else _dot_t

    def group_params(g):
        s = pltriton.load(s_ref.at[rn_c, g]).astype(jnp.float32)
        z = pltriton.load(z_ref.at[rn_c, g]).astype(jnp.float32) + bias if has_zeros else None
        if z is None and bias:
            z = jnp.full((bn,), bias, jnp.float32)
        mn = pltriton.load(m_ref.at[rn_c, g]).astype(jnp.float32) if has_mins else None
        return s, z, mn

    def sub_block(k0):
        """The dot of the inputs [k0, k0 + kb) of the tile, and x's sum over them: [bm, bn] (or [bn, bm]), [bm]."""
        if packed:
            kk = k0 // 2 + _iota(kb // 2)
            w = pltriton.load(q_ref.at[rn_c[:, None], kk[None, :]])  # [bn, kb / 2] uint8
            xe = pltriton.load(x_ref.at[0, rm_c[:, None], kk[None, :]]).astype(cdt)  # [bm, kb / 2]
            xo = pltriton.load(x_ref.at[1, rm_c[:, None], kk[None, :]]).astype(cdt)
            part = dot(xe, _nibbles(w & 0xF, cdt)) + dot(xo, _nibbles(w >> 4, cdt))
        else:
            kk = k0 + _iota(kb)
            w = pltriton.load(q_ref.at[rn_c[:, None], kk[None, :]])  # [bn, kb]
            xb = pltriton.load(x_ref.at[rm_c[:, None], kk[None, :]]).astype(cdt)  # [bm, kb]
            integer = w.dtype in (jnp.int8, jnp.uint8)
            part = dot(xb, _bytes_as_float(w, cdt) if bytes_via_f32 and integer else w.astype(cdt))
        xsum = pltriton.load(xsum_ref.at[rm_c, k0 // kb]) if has_xsum else None
        return part, xsum

    def apply(acc, part, xsum, params):
        s, z, mn = params
        acc = acc + part * chan(s)
        if z is not None:
            acc = acc - tok(xsum) * chan(s * z)
        if mn is not None:
            acc = acc + tok(xsum) * chan(mn)
        return acc

    acc0 = jnp.zeros((bn, bm) if weights_first else (bm, bn), jnp.float32)
    if Q == 1:  # per channel: accumulate the dots (and x's sum), apply the scale once
        def body(i, carry):
            acc, xs_acc = carry
            k0 = (sp * k_iters + i) * bk
            for j in range(bk // kb):
                part, xsum = sub_block(k0 + j * kb)
                acc = acc + part
                if has_xsum:
                    xs_acc = xs_acc + xsum
            return acc, xs_acc

        acc, xs_acc = lax.fori_loop(0, k_iters, body, (acc0, jnp.zeros((bm,), jnp.float32)))
        acc = apply(jnp.zeros_like(acc), acc, xs_acc, group_params(0))
    else:
        def body(i, acc):
            k0 = (sp * k_iters + i) * bk
            for j in range(bk // kb):
                part, xsum = sub_block(k0 + j * kb)
                acc = apply(acc, part, xsum, group_params((k0 + j * kb) // group))
            return acc

        acc = lax.fori_loop(0, k_iters, body, acc0)
    if has_x_scale:
        acc = acc * tok(pltriton.load(xs_ref.at[rm_c]).astype(jnp.float32))
    ok = tok(rm < M) & chan(rn < N)
    pltriton.store(o_ref.at[sp, tok(jnp.where(rm < M, rm, M)), chan(rn)], acc.astype(o_ref.dtype), mask=ok)


def default_config(M: int, N: int, K: int, bits: int, group: int) -> dict:
    """Tile sizes for a shape: bm rows (>= 16), bn channels, bk inputs per iteration, and enough split-K that the
    grid has about two programs per SM. From tile sweeps on an H100 (benchmarks/quant_gemm_gpu.py)."""
    bm = min(64, max(16, 1 << (max(1, M) - 1).bit_length()))
    if M <= 16:
        bn = 64 if bits == 4 or N < 16384 else 128
        bk = 512 if bits == 4 else 256
    else:
        bn, bk = 128, 128
    bk = max(min(bk, K), min(group, 128))
    while K % bk:
        bk //= 2
    tiles = pl.cdiv(M, bm) * pl.cdiv(N, bn)
    splits = 1
    while tiles * splits * 2 <= 2 * _NUM_SMS and K % (bk * splits * 2) == 0 and K // (bk * splits * 2) >= 2:
        splits *= 2
    return dict(block_m=bm, block_n=bn, block_k=bk, splits=splits, num_warps=4, num_stages=4)


@functools.partial(jax.jit, static_argnames=("bits", "group", "interpret", "block_m", "block_n", "block_k", "splits",
                                             "num_warps", "num_stages", "out_dtype", "weights_first",
                                             "bytes_via_f32"))
def quant_matmul(x, q, scales, zeros=None, mins=None, x_scale=None, *, bits: int, group: int,
                 interpret: bool = False, block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None, splits: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, out_dtype=None, weights_first: bool = False,
                 bytes_via_f32: bool = False):
    """x [M, K] times the quantized W [N, K] (the module docstring has every shape) -> [M, N] float32, or
    `out_dtype`. Tile knobs left None take `default_config`; interpret=True runs the Pallas interpreter (CPU).
    weights_first: the dequantized weight tile is the dots' left operand ([bn, kb] x [kb, bm]), the form tensor-core
    instructions can take from registers, which may spare a shared-memory pass over the dequantized values (swept
    on an H100: slower on gate_up at M = 1 and 256, within 10% on o; off by default). bytes_via_f32: int8 / uint8 weights become floats through float32's
    mantissa (`_bytes_as_float`) instead of a conversion instruction (measured on an H100: slower or equal at every M,
    benchmarks/RESULTS.md; kept for the sweep)."""
    M, K = x.shape
    N = q.shape[0]
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if q.shape[1] * (2 if bits == 4 else 1) != K:
        raise ValueError(f"q {q.shape} does not hold {K} inputs at {bits} bits")
    if K % group or scales.shape != (N, K // group):
        raise ValueError(f"scales {scales.shape} do not match W [{N}, {K}] in groups of {group}")
    cfg = default_config(M, N, K, bits, group)
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k, splits=splits, num_warps=num_warps,
                 num_stages=num_stages)
    cfg.update({k: v for k, v in given.items() if v is not None})
    bm, bn, bk, S = cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["splits"]
    while block_k is None and K % (S * bk) and bk > min(group, 128):  # a given split count shrinks the default bk
        bk //= 2
    kb = min(bk, group)
    if bk % kb or K % (S * bk) or kb & (kb - 1) or kb < (32 if bits == 4 else 16):
        raise ValueError(f"block_k {bk} / splits {S} do not fit K {K} in groups of {group}")
    has_xsum = zeros is not None or mins is not None or (bits == 4 and _nibble_bias(_compute_dtype(x.dtype)) != 0)
    args = [a for a in (zeros, mins) if a is not None]
    if has_xsum:  # the zero points' (and minimums') share needs x's sum over each sub-block
        args.append(x.astype(jnp.float32).reshape(M, K // kb, kb).sum(-1))
    if x_scale is not None:
        args.append(x_scale.astype(jnp.float32))
    if bits == 4:  # even and odd columns of x: the low and high nibbles' inputs
        x = jnp.stack([x[:, 0::2], x[:, 1::2]])  # [2, M, K / 2]
    args = [x, q, scales, *args]
    out_dtype = out_dtype or jnp.float32
    kernel = functools.partial(_kernel, bits=bits, group=group, bm=bm, bn=bn, bk=bk, kb=kb, k_iters=K // (S * bk),
                               M=M, N=N, has_zeros=zeros is not None, has_mins=mins is not None, has_xsum=has_xsum,
                               has_x_scale=x_scale is not None, weights_first=weights_first,
                               bytes_via_f32=bytes_via_f32)
    part_dtype = out_dtype if S == 1 else jnp.float32
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(M, bm), pl.cdiv(N, bn), S),
        out_shape=jax.ShapeDtypeStruct((S, M, N), part_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
        interpret=interpret,
        name=f"quant_matmul_w{bits}",
    )(*args)
    return (out[0] if S == 1 else out.sum(0)).astype(out_dtype)
