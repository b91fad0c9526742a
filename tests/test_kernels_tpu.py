"""Tier 1: the Pallas TPU ragged paged attention kernel against the reference, in interpret mode on CPU.

Each config compiles once: batches are padded to fixed buckets (T tokens, B rows, M pages per row, P pages),
as the engine does, and several fresh random ragged batches run through the same executable. Most cases use
Pallas' generic interpreter (fast); `test_tpu_interpreter` runs the TPU interpreter, which emulates the DMA
engine and semaphores, fills scratch with NaN, raises on out-of-bounds reads and detects races.
"""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention_tpu import op_reference, ragged_paged_attention_tpu

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_case(rng, q_lens, kv_lens, *, N, K, H, S, T, B, M, dtype=jnp.float32, cache_dtype=None):
    """A ragged batch padded to buckets: pages shuffled, unused pages and slots past kv_len hold garbage
    (NaN for float caches, extreme values for int8), page-table tails and padding rows point at garbage."""
    nb = len(q_lens)
    assert nb <= B and sum(q_lens) <= T and all(q <= k <= M * S for q, k in zip(q_lens, kv_lens))
    P = B * M + 3
    cache_dtype = cache_dtype or dtype
    n_pages = [-(-k // S) for k in kv_lens]
    assert sum(n_pages) <= P
    perm = rng.permutation(P)
    tables = rng.integers(0, P, (B, M)).astype(np.int32)  # tails: stray page ids, never to be read
    starts = np.cumsum([0] + n_pages)
    for b in range(nb):
        tables[b, : n_pages[b]] = perm[starts[b]: starts[b + 1]]
    seq = np.repeat(np.arange(nb), kv_lens)  # every live cache slot
    pos = np.concatenate([np.arange(k) for k in kv_lens]) if nb else np.zeros(0, int)
    page, off = tables[seq, pos // S], pos % S
    int8 = np.dtype(cache_dtype) == np.int8
    pages = []
    for _ in range(2):
        x = np.full((P, K, S, H), 127 if int8 else np.nan, np.float32)
        vals = rng.standard_normal((len(pos), K, H)) * (40 if int8 else 1)
        x[page, :, off] = np.clip(np.round(vals), -127, 127) if int8 else vals
        pages.append(jnp.asarray(x.astype(np.dtype(cache_dtype))))
    cu = np.zeros(B + 1, np.int32)
    cu[1: nb + 1] = np.cumsum(q_lens)
    cu[nb + 1:] = cu[nb]
    kv = rng.integers(0, M * S, B).astype(np.int32)  # padding rows: junk lengths, to be ignored
    kv[:nb] = kv_lens
    q = rng.standard_normal((T, N, H)).astype(np.float32)
    return (jnp.asarray(q, dtype), pages[0], pages[1], jnp.asarray(tables), jnp.asarray(kv), jnp.asarray(cu),
            jnp.asarray(nb, jnp.int32))


def draw_lengths(rng, kind, *, T, B, max_len):
    """Random (q_lens, kv_lens) of one batch kind that fits T tokens and B rows."""
    nb = int(rng.integers(1, B + 1))
    if kind == "decode":
        return [1] * nb, rng.integers(1, max_len + 1, nb).tolist()
    if kind == "prefill":
        q = rng.integers(1, min(max_len, T // nb) + 1, nb).tolist()
        return q, q
    q_lens, kv_lens, left = [], [], T
    for _ in range(nb):  # mixed: decode rows, chunks on history, whole prompts, the odd empty row
        kv = int(rng.integers(1, max_len + 1))
        r = rng.random()
        q = 1 if r < 0.4 else 0 if r < 0.5 else int(rng.integers(1, min(kv, max(left, 1), T // 2) + 1))
        q = min(q, left)
        q_lens.append(q)
        kv_lens.append(kv)
        left -= q
    return q_lens, kv_lens


def check(args, *, H, dtype, tol=None, scales=None, **kw):
    extra = {k: v for k, v in kw.items() if k in ("sliding_window", "soft_cap")}
    knobs = {k: v for k, v in kw.items() if k not in extra}
    scales = scales or {}
    ref = np.asarray(op_reference(*args, sm_scale=H**-0.5, **extra, **scales), np.float32)
    got = np.asarray(ragged_paged_attention_tpu(*args, sm_scale=H**-0.5, **extra, **scales, **knobs), np.float32)
    tol = tol or TOL[dtype]
    np.testing.assert_allclose(got, ref, atol=tol, rtol=tol)
    n_live = int(args[5][int(args[6])])
    assert np.all(got[n_live:] == 0) and np.all(np.isfinite(got))  # padding tokens


def seeded(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


CONFIGS = {  # name: (N, K, H, S, q dtype, cache dtype, op kwargs)
    "mha_f32": (4, 4, 128, 16, jnp.float32, None, {}),
    "gqa4_f32_window": (8, 2, 64, 64, jnp.float32, None, {"sliding_window": 40}),
    "mqa8_bf16_softcap": (8, 1, 128, 16, jnp.bfloat16, None, {"soft_cap": 30.0}),
    "gqa8_bf16_window_softcap": (16, 2, 64, 64, jnp.bfloat16, None, {"sliding_window": 70, "soft_cap": 20.0}),
    "int8_gqa4_f32": (8, 2, 128, 16, jnp.float32, jnp.int8, {}),
    "fp8_mqa_bf16_window": (8, 1, 64, 64, jnp.bfloat16, jnp.float8_e4m3fn, {"sliding_window": 100}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name):
    N, K, H, S, dtype, cache_dtype, kw = CONFIGS[name]
    T, B, M = 64, 6, 320 // S + 1
    rng = seeded(name)
    scales = {}
    if cache_dtype is not None:
        scales = {"k_scale": jnp.asarray(rng.uniform(0.01, 0.05, K), jnp.float32),
                  "v_scale": jnp.asarray(rng.uniform(0.01, 0.05, K), jnp.float32)}
        if cache_dtype == jnp.float8_e4m3fn:
            scales = {k: v * 40 for k, v in scales.items()}
    for kind in ("decode", "prefill", "mixed", "mixed"):
        q_lens, kv_lens = draw_lengths(rng, kind, T=T, B=B, max_len=320)
        args = make_case(rng, q_lens, kv_lens, N=N, K=K, H=H, S=S, T=T, B=B, M=M, dtype=dtype,
                         cache_dtype=cache_dtype)
        check(args, H=H, dtype=dtype, scales=scales, interpret=True, block_q=16, **kw)


def test_long_contexts_up_to_2k():
    N, K, H, S, T, B = 8, 2, 64, 16, 32, 4
    M = 2048 // S
    rng = seeded("long")
    for kind in ("decode", "mixed", "mixed"):
        q_lens, kv_lens = draw_lengths(rng, kind, T=T, B=B, max_len=2048)
        kv_lens[0] = 2048 if kind == "decode" else kv_lens[0]
        args = make_case(rng, q_lens, kv_lens, N=N, K=K, H=H, S=S, T=T, B=B, M=M)
        check(args, H=H, dtype=jnp.float32, interpret=True, sliding_window=None if kind == "decode" else 700)


@pytest.mark.parametrize("block_q,pages_per_block", [(8, 1), (64, 64)])
def test_tuning_knobs(block_q, pages_per_block):
    """One page per kv block (most DMA hand-offs) and one q block / kv block covering everything."""
    N, K, H, S, T, B, M = 8, 2, 64, 16, 48, 5, 9
    rng = seeded("knobs", block_q)
    for kind in ("decode", "prefill", "mixed"):
        q_lens, kv_lens = draw_lengths(rng, kind, T=T, B=B, max_len=M * S)
        args = make_case(rng, q_lens, kv_lens, N=N, K=K, H=H, S=S, T=T, B=B, M=M)
        check(args, H=H, dtype=jnp.float32, interpret=True, block_q=block_q, pages_per_block=pages_per_block,
              sliding_window=50)


def test_empty_batch_and_unaligned_tokens():
    """num_seqs = 0 gives zeros; T not a multiple of block_q."""
    N, K, H, S, T, B, M = 4, 2, 64, 16, 21, 4, 4
    rng = seeded("edge")
    for q_lens, kv_lens in [([], []), ([1, 9, 0, 11], [40, 9, 7, 60])]:
        args = make_case(rng, q_lens, kv_lens, N=N, K=K, H=H, S=S, T=T, B=B, M=M)
        check(args, H=H, dtype=jnp.float32, interpret=True, block_q=8)


@pytest.mark.parametrize("cache_dtype,dma_mode", [(None, "on_wait"), (jnp.int8, "eager")])
def test_tpu_interpreter(cache_dtype, dma_mode, capfd):
    """The TPU interpreter: DMA / semaphore semantics, NaN scratch, bounds checks, races, balanced semaphores.

    "eager" runs each DMA at its start, so a DMA started but never waited leaves a semaphore count at exit;
    "on_wait" runs it as late as possible, so a read before the wait sees NaN scratch.
    """
    N, K, H, S, T, B, M = 8, 2, 64, 16, 32, 4, 6
    rng = seeded("tpu-interpret", cache_dtype)
    scales = {}
    if cache_dtype is not None:
        scales = {"k_scale": jnp.asarray([0.02, 0.03]), "v_scale": jnp.asarray([0.04, 0.01])}
    args = make_case(rng, [1, 17, 1, 9], [70, 30, 1, 90], N=N, K=K, H=H, S=S, T=T, B=B, M=M,
                     cache_dtype=cache_dtype)
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode=dma_mode)
    check(args, H=H, dtype=jnp.float32, scales=scales, interpret=params, block_q=8, pages_per_block=2,
          sliding_window=45)
    args = args[:-1] + (jnp.asarray(0, jnp.int32),)  # no live rows: zeros, no DMA left in flight
    check(args, H=H, dtype=jnp.float32, scales=scales, interpret=params, block_q=8, pages_per_block=2,
          sliding_window=45)
    out = capfd.readouterr().out  # the interpreter reports races and unbalanced DMA semaphores by printing
    assert "RACE DETECTED" not in out and "non-zero count" not in out, out


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn])
def test_make_case_hides_garbage(cache_dtype):
    """The harness itself: every unused slot really holds NaN, so a stray read would show."""
    rng = seeded("harness")
    args = make_case(rng, [2, 1], [5, 20], N=2, K=1, H=8, S=8, T=4, B=3, M=4, cache_dtype=cache_dtype)
    k = np.asarray(args[1]).astype(np.float32)
    assert np.isnan(k).sum() == k.size - (5 + 20) * 8
