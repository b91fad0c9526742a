"""Tier 1: ragged paged attention implementations against the dense reference (random ragged batches)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
    write_kv,
)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_batch(rng, q_lens, kv_lens, *, N, K, H, S=8, pad_tokens=3, pad_seqs=2, dtype=jnp.float32):
    """Random ragged batch; pages shuffled, unused pages (and slots past each kv_len) NaN."""
    B = len(q_lens)
    M = max(-(-k // S) for k in kv_lens) + 1
    P = sum(-(-k // S) for k in kv_lens) + 4
    k_pages = np.full((P, K, S, H), np.nan, np.float32)
    v_pages = np.full((P, K, S, H), np.nan, np.float32)
    perm = rng.permutation(P)
    tables = np.zeros((B + pad_seqs, M), np.int32)
    used = 0
    for b, kl in enumerate(kv_lens):
        n = -(-kl // S)
        tables[b, :n] = perm[used: used + n]
        used += n
        for pos in range(kl):
            k_pages[tables[b, pos // S], :, pos % S] = rng.standard_normal((K, H))
            v_pages[tables[b, pos // S], :, pos % S] = rng.standard_normal((K, H))
    T = sum(q_lens) + pad_tokens
    q = rng.standard_normal((T, N, H)).astype(np.float32)
    cu = np.zeros(B + pad_seqs + 1, np.int32)
    cu[1: B + 1] = np.cumsum(q_lens)
    cu[B + 1:] = cu[B]
    kv = np.zeros(B + pad_seqs, np.int32)
    kv[:B] = kv_lens
    return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(tables),
            jnp.asarray(kv), jnp.asarray(cu), jnp.asarray(B, jnp.int32))


def dense_attention(q, k, v, q_pos, sm_scale, window=None, soft_cap=None):
    """Per-sequence numpy attention: q [n, N, H], k/v [L, K, H], q_pos [n]."""
    N, K = q.shape[1], k.shape[1]
    G = N // K
    k = np.repeat(k, G, axis=1)
    v = np.repeat(v, G, axis=1)
    s = np.einsum("qnh,lnh->nql", q, k) * sm_scale
    if soft_cap:
        s = soft_cap * np.tanh(s / soft_cap)
    j = np.arange(k.shape[0])
    m = j[None, :] <= q_pos[:, None]
    if window:
        m &= j[None, :] > q_pos[:, None] - window
    s = np.where(m[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nql,lnh->qnh", p, v)


CASES = {
    "decode": ([1] * 6, [5, 17, 64, 1, 33, 200]),
    "prefill": ([40, 7, 64], [40, 7, 64]),
    "mixed": ([1, 13, 1, 30, 1], [90, 13, 8, 50, 300]),
    "prefill_chunk_on_history": ([16, 5], [80, 21]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("N,K", [(4, 4), (8, 2), (8, 1)])
def test_reference_matches_dense_numpy(case, N, K):
    rng = np.random.default_rng(0)
    q_lens, kv_lens = CASES[case]
    H = 32
    args = make_batch(rng, q_lens, kv_lens, N=N, K=K, H=H)
    out = np.asarray(ragged_paged_attention_reference(*args, sm_scale=H**-0.5))
    q, k_pages, v_pages, tables = (np.asarray(a) for a in args[:4])
    S = k_pages.shape[2]
    t = 0
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        pos = np.arange(kl)
        k = k_pages[tables[b, pos // S], :, pos % S]  # [L, K, H]
        v = v_pages[tables[b, pos // S], :, pos % S]
        want = dense_attention(q[t: t + ql], k, v, np.arange(kl - ql, kl), H**-0.5)
        np.testing.assert_allclose(out[t: t + ql], want, atol=2e-5, rtol=2e-5)
        t += ql
    assert np.all(out[t:] == 0) and np.all(np.isfinite(out))  # padding tokens


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("N,K,H,extra", [
    (4, 4, 64, {}),                              # MHA
    (8, 2, 32, {"sliding_window": 24}),          # GQA 4
    (16, 2, 128, {"soft_cap": 5.0}),             # GQA 8, head dim 128
    (8, 1, 64, {"sliding_window": 9, "soft_cap": 20.0}),  # MQA
])
def test_xla_matches_reference(case, N, K, H, extra):
    rng = np.random.default_rng(1)
    args = make_batch(rng, *CASES[case], N=N, K=K, H=H)
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=H**-0.5, **extra))
    for bp in (1, 8):
        got = np.asarray(ragged_paged_attention_xla(*args, sm_scale=H**-0.5, block_pages=bp, **extra))
        np.testing.assert_allclose(got, ref, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])


def test_xla_matches_reference_bf16():
    rng = np.random.default_rng(2)
    args = make_batch(rng, *CASES["mixed"], N=8, K=2, H=64, dtype=jnp.bfloat16)
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.125), np.float32)
    got = np.asarray(ragged_paged_attention_xla(*args, sm_scale=0.125), np.float32)
    np.testing.assert_allclose(got, ref, atol=TOL[jnp.bfloat16], rtol=TOL[jnp.bfloat16])


def test_random_ragged_batches_up_to_2k():
    rng = np.random.default_rng(3)
    for _ in range(3):
        B = int(rng.integers(1, 6))
        kv_lens = rng.integers(1, 2048, B).tolist()
        q_lens = [int(rng.integers(1, min(k, 64) + 1)) if rng.random() < 0.5 else 1 for k in kv_lens]
        args = make_batch(rng, q_lens, kv_lens, N=8, K=2, H=64, S=16)
        ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.125))
        got = np.asarray(ragged_paged_attention_xla(*args, sm_scale=0.125))
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


def test_write_kv_scatters_and_drops_padding():
    P, K, S, H = 3, 2, 4, 8
    k = jnp.zeros((P, K, S, H))
    v = jnp.zeros((P, K, S, H))
    new = jnp.arange(3 * K * H, dtype=jnp.float32).reshape(3, K, H) + 1
    slots = jnp.array([5, 0, P * S], jnp.int32)  # page 1 offset 1; page 0 offset 0; padding
    k2, v2 = (np.asarray(x) for x in write_kv(k, v, new, -new, slots))
    np.testing.assert_array_equal(k2[1, :, 1], new[0])
    np.testing.assert_array_equal(k2[0, :, 0], new[1])
    np.testing.assert_array_equal(v2[1, :, 1], -new[0])
    assert np.count_nonzero(k2) == 2 * K * H and np.count_nonzero(v2) == 2 * K * H


@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, 77), (40, 40), (16, 130)])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 24, "soft_cap": 5.0}])
def test_xla_single_row_matches_reference(q_len, kv_len, extra):
    """B == 1 (a lone prefill chunk or decode) takes the shared-gather path."""
    rng = np.random.default_rng(4)
    args = make_batch(rng, [q_len], [kv_len], N=8, K=2, H=32, pad_seqs=0)
    assert args[3].shape[0] == 1
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.2, **extra))
    for bp in (1, 4):
        got = np.asarray(ragged_paged_attention_xla(*args, sm_scale=0.2, block_pages=bp, **extra))
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("q_lens, kv_lens", [
    ([1, 13, 1, 30, 1], [90, 13, 8, 50, 300]),   # decodes around two chunks
    ([1, 1, 256, 1], [40, 7, 4200, 300]),        # a long prompt's chunk admitted beside running decodes
    ([40, 7, 64], [40, 7, 64]),                  # three chunks, no decode
    ([1, 1, 1], [5, 70, 33]),                    # decodes only
])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 24, "soft_cap": 5.0}])
def test_xla_each_read_strategy_matches_reference(decode_only, q_lens, kv_lens, extra):
    """Mixed steps: decodes batched by row and each chunk row's blocks gathered once for all queries; and the
    per-token gather of decode steps (which also holds for any batch): both give the reference's output."""
    rng = np.random.default_rng(5)
    args = make_batch(rng, q_lens, kv_lens, N=8, K=2, H=32, S=16)
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.2, **extra))
    got = np.asarray(ragged_paged_attention_xla(*args, sm_scale=0.2, decode_only=decode_only, **extra))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
    assert np.all(got[sum(q_lens):] == 0)
