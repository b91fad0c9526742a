"""Tier 1: the GPU (Triton-lowered Pallas) ragged paged attention against the dense reference.

On CPU the kernels run in Pallas interpret mode; on a GPU backend the same tests run the compiled kernels.
Inputs are fresh random ragged batches (make_batch: pages shuffled, unused pages and slots NaN, padding
tokens and padding sequence rows). The last test lowers every kernel variant to Triton IR for CUDA, which
catches lowering errors that interpret mode cannot see, still without a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention_gpu import op_reference, ragged_paged_attention_gpu
from test_attention import make_batch

INTERPRET = jax.default_backend() != "gpu"
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# Small blocks make short test sequences cross several query and kv blocks (masked and unmasked loops).
SMALL = dict(block_m=16, block_kv=16, decode_block_kv=16)


def _reference(args, sm_scale, kw):
    """The oracle's output for args, with the options in kw it shares with the kernel (the rest are knobs)."""
    extra = {k: kw[k] for k in ("sliding_window", "soft_cap", "k_scale", "v_scale") if k in kw}
    with jax.default_matmul_precision("highest"):  # on a GPU, XLA's default f32 dot is tf32
        return np.asarray(op_reference(*args, sm_scale=sm_scale, **extra), np.float32)


def _check(args, *, dtype, decode_only=False, sm_scale=None, **kw):
    H = args[0].shape[-1]
    sm_scale = sm_scale or H**-0.5
    want = _reference(args, sm_scale, kw)
    got = np.asarray(ragged_paged_attention_gpu(*args, sm_scale=sm_scale, decode_only=decode_only,
                                                interpret=INTERPRET, **kw), np.float32)
    assert np.all(np.isfinite(got))
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    live = int(np.asarray(args[5])[int(args[6])])
    assert np.all(got[live:] == 0)  # padding tokens


DECODE = ([1] * 5, [1, 17, 64, 200, 333])
PREFILL = ([40, 7, 64], [40, 7, 64])
MIXED = ([1, 13, 1, 30, 1, 5], [90, 13, 8, 50, 300, 21])  # incl. a prefill chunk on history


@pytest.mark.parametrize("splits,prefetch,xla_merge", [(None, False, False), (1, False, False), (3, False, False),
                                                       (3, True, False), (3, False, True), (None, False, True)])
def test_decode(splits, prefetch, xla_merge):
    rng = np.random.default_rng(0)
    args = make_batch(rng, *DECODE, N=8, K=2, H=64, S=16, pad_tokens=2, pad_seqs=3, dtype=jnp.float32)
    _check(args, dtype=jnp.float32, decode_only=True, num_kv_splits=splits, decode_prefetch_pages=prefetch,
           xla_merge=xla_merge, **SMALL)


def test_decode_fewer_tokens_than_rows_bf16_gqa8_page64():
    rng = np.random.default_rng(1)
    args = make_batch(rng, *DECODE, N=16, K=2, H=128, S=64, pad_tokens=0, pad_seqs=4, dtype=jnp.bfloat16)
    _check(args, dtype=jnp.bfloat16, decode_only=True)  # default knobs: 128-token iterations, auto splits


@pytest.mark.parametrize("case,N,K,H,S,kw", [
    ("prefill", 4, 4, 64, 16, {}),                                       # MHA
    ("mixed", 8, 2, 64, 16, {"prefetch_pages": False, "sliding_window": 24}),  # page ids loaded in the loop
    ("mixed", 8, 2, 64, 16, {"sliding_window": 24}),                     # GQA 4
    ("mixed", 8, 1, 128, 64, {"soft_cap": 5.0}),                         # GQA 8 (MQA), page 64
    ("mixed", 6, 2, 64, 16, {"sliding_window": 9, "soft_cap": 20.0}),    # G = 3: padded head rows
])
def test_ragged_f32(case, N, K, H, S, kw):
    rng = np.random.default_rng(2)
    args = make_batch(rng, *{"prefill": PREFILL, "mixed": MIXED}[case], N=N, K=K, H=H, S=S)
    _check(args, dtype=jnp.float32, **SMALL, **kw)


def test_ragged_bf16_default_blocks():
    rng = np.random.default_rng(3)
    args = make_batch(rng, *MIXED, N=8, K=2, H=128, S=16, dtype=jnp.bfloat16)
    _check(args, dtype=jnp.bfloat16)


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 24, "soft_cap": 20.0}])
def test_mixed_batch_split_decodes(splits, kw):
    """A mixed batch with its one-token sequences sent to the decode kernel and the rest to the ragged kernel,
    writing into one output: every row (decode, prefill chunk, padding) as the reference has it."""
    rng = np.random.default_rng(7)
    q_lens, kv_lens = [1, 13, 1, 30, 1, 1, 5], [90, 13, 8, 50, 300, 1, 21]
    args = make_batch(rng, q_lens, kv_lens, N=8, K=2, H=64, S=16, pad_tokens=3, pad_seqs=2, dtype=jnp.float32)
    _check(args, dtype=jnp.float32, split_decodes=True, num_kv_splits=splits, **SMALL, **kw)


@pytest.mark.parametrize("dtype,H", [(jnp.float32, 128), (jnp.bfloat16, 256)])
def test_default_knobs_where_shared_memory_is_tight(dtype, H):
    """Default knobs with an f32 cache or head dim 256: on a GPU the tiles must shrink to fit (see `_fit`)."""
    rng = np.random.default_rng(9)
    args = make_batch(rng, *MIXED, N=8, K=2, H=H, S=16, dtype=dtype)
    _check(args, dtype=dtype, split_decodes=True)


def test_mixed_batch_split_decodes_all_prefill_or_all_decode_bf16():
    rng = np.random.default_rng(8)
    for q_lens, kv_lens in (PREFILL, DECODE):
        args = make_batch(rng, q_lens, kv_lens, N=8, K=2, H=128, S=16, pad_tokens=4, dtype=jnp.bfloat16)
        _check(args, dtype=jnp.bfloat16, split_decodes=True)


def test_decode_window_softcap_bf16():
    rng = np.random.default_rng(4)
    args = make_batch(rng, *DECODE, N=8, K=2, H=64, S=16, dtype=jnp.bfloat16)
    _check(args, dtype=jnp.bfloat16, decode_only=True, num_kv_splits=2, sliding_window=40, soft_cap=10.0,
           **SMALL)


def test_random_ragged_batches_up_to_2k():
    rng = np.random.default_rng(5)
    for _ in range(2):
        B = int(rng.integers(2, 4))
        kv_lens = [2048] + rng.integers(1, 2048, B - 1).tolist()
        q_lens = [int(rng.integers(1, min(k, 48) + 1)) if rng.random() < 0.5 else 1 for k in kv_lens]
        args = make_batch(rng, q_lens, kv_lens, N=8, K=2, H=64, S=64)
        _check(args, dtype=jnp.float32, block_m=32, block_kv=64)
        dec = make_batch(rng, [1] * B, kv_lens, N=8, K=2, H=64, S=64)
        _check(dec, dtype=jnp.float32, decode_only=True, num_kv_splits=4)


def _quantize(args, dtype, rng):
    """Cache -> 8-bit with per-kv-head scales; unused slots keep garbage (int8 has no NaN; fp8 keeps NaN)."""
    q, k, v, *rest = args
    K = k.shape[1]
    out, scales = [], []
    for x in (k, v):
        x = np.asarray(x, np.float32)
        scale = rng.uniform(0.01, 0.05, K).astype(np.float32)
        y = x / scale[None, :, None, None]
        if dtype == jnp.int8:
            y = np.where(np.isnan(y), 127, np.clip(np.round(y), -127, 127))
        out.append(jnp.asarray(y).astype(dtype))
        scales.append(jnp.asarray(scale))
    return (q, *out, *rest), scales


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("decode_only,xla_merge", [(False, False), (True, False), (True, True)])
def test_8bit_cache_with_scales(dtype, decode_only, xla_merge):
    rng = np.random.default_rng(6)
    case = DECODE if decode_only else MIXED
    args, (ks, vs) = _quantize(make_batch(rng, *case, N=8, K=2, H=64, S=16), dtype, rng)
    q_dtype = jnp.float32 if dtype == jnp.int8 else jnp.bfloat16  # fp8 -> bf16 is exact
    args = (args[0].astype(q_dtype), *args[1:])
    extra = {"num_kv_splits": 2, "xla_merge": xla_merge} if decode_only else {}
    _check(args, dtype=q_dtype if q_dtype == jnp.bfloat16 else jnp.float32, decode_only=decode_only,
           k_scale=ks, v_scale=vs, **SMALL, **extra)


def _without_new_tokens(args):
    """The decode batch as a step has it before its K/V write: each live sequence's last position taken out of the
    pages (NaN left there; 127 in an int8 cache) into k_new / v_new [T, K, H] (in the cache's values; zero for
    padding tokens)."""
    q, kp, vp, tables, kv, cu, ns = args
    S, (T, K, H) = kp.shape[2], (q.shape[0], kp.shape[1], kp.shape[3])
    fill = 127 if kp.dtype == jnp.int8 else np.nan
    kp, vp = np.asarray(kp, np.float32).copy(), np.asarray(vp, np.float32).copy()
    k_new, v_new = np.zeros((T, K, H), np.float32), np.zeros((T, K, H), np.float32)
    for b in range(int(ns)):
        t, pos = int(cu[b]), int(kv[b]) - 1
        page, off = int(tables[b, pos // S]), pos % S
        k_new[t], v_new[t] = kp[page, :, off], vp[page, :, off]
        kp[page, :, off] = vp[page, :, off] = fill
    dt = args[1].dtype
    return (q, jnp.asarray(kp).astype(dt), jnp.asarray(vp).astype(dt), *args[3:]), k_new, v_new


def _fused(q, k, v):
    """The model's fused projection [T, K, G + 2, H] of q [T, N, H] and k, v [T, K, H]: per kv head its G query
    heads, then its key and value."""
    T, N, H = q.shape
    K = k.shape[1]
    return jnp.concatenate([q.reshape(T, K, N // K, H), jnp.asarray(k, q.dtype)[:, :, None],
                            jnp.asarray(v, q.dtype)[:, :, None]], axis=2)


def _check_fused_write(args, *, dtype, **kw):
    """The decode kernel writing the step's K/V itself: its output as the reference on the written pages, and its
    pages exactly the written ones (every other slot, NaN included, untouched)."""
    H = args[0].shape[-1]
    want = _reference(args, H**-0.5, kw)
    before, k_new, v_new = _without_new_tokens(args)
    assert not np.array_equal(np.asarray(before[1], np.float32), np.asarray(args[1], np.float32), equal_nan=True)
    got, kp, vp = ragged_paged_attention_gpu(_fused(before[0], k_new, v_new), *before[1:], sm_scale=H**-0.5, decode_only=True,
                                             interpret=INTERPRET, fused_qkv=True, **kw)
    got = np.asarray(got, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    for mine, theirs in ((kp, args[1]), (vp, args[2])):
        np.testing.assert_array_equal(np.asarray(mine, np.float32), np.asarray(theirs, np.float32))


@pytest.mark.parametrize("splits,xla_merge", [(1, False), (3, False), (3, True), (None, False)])
def test_decode_writes_the_new_kv(splits, xla_merge):
    rng = np.random.default_rng(10)
    args = make_batch(rng, *DECODE, N=8, K=2, H=64, S=16, pad_tokens=2, pad_seqs=3, dtype=jnp.float32)
    _check_fused_write(args, dtype=jnp.float32, num_kv_splits=splits, xla_merge=xla_merge, **SMALL)


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 40, "soft_cap": 10.0, "num_kv_splits": 2, **SMALL}])
def test_decode_writes_the_new_kv_bf16_gqa8_page64(kw):
    rng = np.random.default_rng(11)
    args = make_batch(rng, [1] * 6, [1, 64, 65, 128, 200, 333], N=16, K=2, H=128, S=64, pad_tokens=0,
                      pad_seqs=2, dtype=jnp.bfloat16)
    _check_fused_write(args, dtype=jnp.bfloat16, **kw)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_decode_writes_the_new_kv_8bit(dtype):
    rng = np.random.default_rng(12)
    args, (ks, vs) = _quantize(make_batch(rng, *DECODE, N=8, K=2, H=64, S=16), dtype, rng)
    q_dtype = jnp.float32 if dtype == jnp.int8 else jnp.bfloat16
    args = (args[0].astype(q_dtype), *args[1:])
    _check_fused_write(args, dtype=q_dtype, k_scale=ks, v_scale=vs, num_kv_splits=2, **SMALL)


@pytest.mark.parametrize("case,kw", [(MIXED, {"split_decodes": True, "num_kv_splits": 2}), (PREFILL, {}),
                                     (MIXED, {"sliding_window": 24, "soft_cap": 20.0})])
def test_fused_qkv_reads_the_queries_in_place(case, kw):
    """The ragged kernel (and a mixed step's decode part) on the fused projection: the same output as on q."""
    rng = np.random.default_rng(14)
    q, *rest = make_batch(rng, *case, N=8, K=2, H=64, S=16, pad_tokens=3, pad_seqs=2, dtype=jnp.float32)
    run = functools.partial(ragged_paged_attention_gpu, sm_scale=0.125, interpret=INTERPRET, **SMALL, **kw)
    want = np.asarray(run(q, *rest))
    k, v = rng.normal(size=(2, q.shape[0], 2, 64))
    np.testing.assert_array_equal(np.asarray(run(_fused(q, k, v), *rest, fused_qkv=True)), want)


def test_fused_qkv_is_checked():
    rng = np.random.default_rng(13)
    q, kp, vp, *rest = make_batch(rng, *DECODE, N=8, K=2, H=64, S=16)
    T = q.shape[0]
    with pytest.raises(ValueError, match="fused_qkv"):  # K = 4 kv heads in q, 2 in the pages
        ragged_paged_attention_gpu(q.reshape(T, 4, 2, 64), kp, vp, *rest, sm_scale=0.1, fused_qkv=True,
                                   decode_only=True, interpret=INTERPRET)
    with pytest.raises(ValueError, match="fused_qkv"):  # [T, N, H] is not the fused projection
        ragged_paged_attention_gpu(q, kp, vp, *rest, sm_scale=0.1, fused_qkv=True, decode_only=True,
                                   interpret=INTERPRET)


def test_every_variant_lowers_to_triton_for_cuda():
    """Pallas -> Triton IR on CPU (no GPU needed): the kernels use only what the Triton lowering supports."""
    from jax._src.pallas.triton import pallas_call_registration  # noqa: F401  registers the lowering

    T, N, K, H, P, S, B, M = 64, 32, 8, 128, 64, 16, 8, 16
    sd = jax.ShapeDtypeStruct

    def shapes(q_dtype, kv_dtype):
        return (sd((T, N, H), q_dtype), sd((P, K, S, H), kv_dtype), sd((P, K, S, H), kv_dtype),
                sd((B, M), jnp.int32), sd((B,), jnp.int32), sd((B + 1,), jnp.int32), sd((), jnp.int32))

    variants = [
        (jnp.bfloat16, {}), (jnp.bfloat16, {"decode_only": True}),
        (jnp.bfloat16, {"decode_only": True, "num_kv_splits": 1}),
        (jnp.bfloat16, {"split_decodes": True}), (jnp.bfloat16, {"split_decodes": True, "num_kv_splits": 2}),
        (jnp.bfloat16, {"sliding_window": 100, "soft_cap": 30.0}),
        (jnp.bfloat16, {"split_decodes": True, "prefetch_pages": True, "decode_prefetch_pages": True}),
        (jnp.int8, {"scales": True}), (jnp.float8_e4m3fn, {"scales": True, "decode_only": True}),
        (jnp.bfloat16, {"decode_only": True, "fused": True}),
        (jnp.bfloat16, {"decode_only": True, "fused": True, "num_kv_splits": 1}),
        (jnp.float8_e4m3fn, {"scales": True, "decode_only": True, "fused": True}),
        (jnp.bfloat16, {"split_decodes": True, "fused": True}),
    ]
    for kv_dtype, kw in variants:
        kw = dict(kw)
        if kw.pop("scales", False):
            kw.update(k_scale=jnp.ones(K), v_scale=jnp.ones(K))
        args = shapes(jnp.bfloat16, kv_dtype)
        if kw.pop("fused", False):
            kw.update(fused_qkv=True)
            args = (sd((T, K, N // K + 2, H), jnp.bfloat16), *args[1:])
        fn = jax.jit(lambda *a, kw=kw: ragged_paged_attention_gpu(*a, sm_scale=0.1, **kw))
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text, kw


@pytest.mark.parametrize("H,itemsize,q_itemsize,bk,stages,want", [
    (128, 2, 2, 128, 3, (128, 3)),  # the H100 presets: 192 KB of K/V + 32 KB of queries fit
    (128, 4, 4, 128, 3, (64, 2)),   # f32 cache: 64-token blocks, 2 stages
    (256, 2, 2, 128, 3, (64, 2)),   # head dim 256
    (128, 1, 2, 32, 3, (32, 3)),    # the decode kernel's default, 8-bit cache
])
def test_tiles_fit_in_shared_memory(H, itemsize, q_itemsize, bk, stages, want):
    """Shared memory the compiled kernel asks for is its pipelined K/V tiles plus the query tile (an H100 refused
    262,656 bytes for f32 / H=128 at 3 stages); the knobs shrink until that fits."""
    from pallas_kernels.ragged_paged_attention_gpu import _fit, _smem_bytes

    BM = 128 if bk >= 64 else 16
    got = _fit(bk, stages, H, itemsize, BM * H * q_itemsize)
    assert got == want
    assert got[1] * 2 * got[0] * H * max(itemsize, 2) + BM * H * q_itemsize <= _smem_bytes()
