"""Ragged paged attention as a Pallas TPU kernel: the op of `pallas_kernels.ragged_paged_attention`.

Glossary, input shapes and semantics are those of `pallas_kernels.ragged_paged_attention` (T tokens, B rows,
N query heads, K kv heads, G = N // K, H head dim, P pages, S tokens per page, M pages per row). Here also:
  bq  query tokens per q block (`block_q`); R = G * bq rows of one q tile
  bp  pages per kv block (`pages_per_block`); bk = bp * S cache positions per kv block
  Q   q blocks, ceil(T / bq)

Grid (K, Q), both "arbitrary" (sequential: the DMA double buffer is carried from one step to the next).
Step (h, i) owns kv head h and tokens [i*bq, (i+1)*bq): a q tile [G, bq, H] -> [R, H] of the G query heads
that share kv head h (GQA packing: one kv tile feeds G heads' rows of one matmul; row r = g * bq + token).
q is transposed to [K, G, T, H] outside the kernel so this tile is one rectangular BlockSpec block, pipelined
by Pallas like the output block; the transpose costs O(T * N * H), small next to the cache reads.

Memory:
  SMEM (scalar prefetch): kv_lens [B], cu_q_lens [B + 1], page_tables flattened to [B * M] (1-D: a 2-D SMEM
    array pads to (8, 128) words), seq_lo / seq_hi [Q] (rows with tokens in q block i: seq_lo[i] <= b <
    seq_hi[i], computed in the wrapper, already clipped to num_seqs), scales [2, K] f32 (k_scale, v_scale; 1 if
    absent). Plus a 2-word SMEM scratch: DMA slot parity and "first item of this step already in flight".
  HBM (`memory_space=pl.ANY`): k_pages, v_pages [P, K, S, H], never blocked by Pallas.
  VMEM scratch: k / v double buffers [2, bp, S, H] (cache dtype), 2x2 DMA semaphores [k|v, slot], online
    softmax state m, l [R, 128] (lane-replicated: Mosaic dislikes [R, 1] stores) and acc [R, H] f32.

Work inside one step: a flat sequence of items (b, j) = (row b with tokens in the tile, kv block j of it),
rows in order, kv blocks from the first one a token of the tile can see (sliding window) to the block holding
the tile's last causal position (prefill chunks skip the upper triangle beyond it). Every item DMAs its live
pages one (page, kv head) [S, H] tile at a time (contiguous in HBM thanks to the head-major layout) into one
slot, while the previous item's slot is computed: item n+1 is started before item n is waited on, across row
boundaries, and the last item of a step prefetches the first item of the next grid step, so the DMA queue
only drains once per call. Pages outside [first visible, last causal] position, or past kv_len, are not
fetched; their stale buffer contents are masked (scores by `where`, v rows zeroed: 0 * NaN = NaN).

Decode and prefill rows share the kernel: a tile holds up to bq tokens of any mix of rows. An item updates
only the rows of its own sequence (the mask keeps the others at alpha = 1, p = 0), so a tile with many decode
rows repeats its [R, bk] score math once per row; that waste is VPU/MXU work while decode is bound by the
page DMAs. Small `block_q` suits decode-heavy batches, larger ones long prefills.

8-bit caches (int8, fp8 e4m3): tiles are converted to q's dtype in VMEM; the per-kv-head scale is a scalar in
a step, so k_scale is folded into the logit scale and v_scale into the final 1 / l: no per-element multiply.

Tuning knobs: `block_q` (power of two, a multiple of the sublane tile of q's dtype: 8 for f32, 16 for bf16),
`pages_per_block` (default: 256 cache positions per kv block, capped at M), `vmem_limit_bytes`.

TPU tiling: blocks' last two dims are (bq, H) for q / o and (S, H) for DMA'd pages; H is always the whole
last dim, so head dim 64 is legal (lanes padded to 128 in VMEM, the matmuls contract over 64). S >= 16 keeps
the [bp, S, H] -> [bk, H] merge sublane-aligned for f32 / bf16 tiles; int8 / fp8 are cast before merging.
VMEM use is about 4 * bk * H * itemsize (buffers) + R * H * (4 + 4 * itemsize(q)) + a few R * bk * 4
temporaries; SMEM holds B * M + 3B + 2Q + 2K words.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

op_reference = ragged_paged_attention_reference

_NEG_INF = -1e30  # finite: a fully masked row keeps m = -1e30, alpha = 1, p = 0
_LANES = 128


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref, cu_q_lens_ref, tables_ref, seq_lo_ref, seq_hi_ref, scales_ref,
    # inputs
    q_ref,  # [1, G, bq, H] VMEM block
    k_hbm, v_hbm,  # [P, K, S, H] HBM
    # output
    o_ref,  # [1, G, bq, H]
    # scratch
    k_buf, v_buf,  # [2, bp, S, H]
    sems,  # DMA [2, 2]: (k | v, slot)
    m_ref, l_ref,  # [R, 128] f32
    acc_ref,  # [R, H] f32
    state_ref,  # SMEM [2] int32: slot of the next item, first item of this step in flight
    *, sm_scale, sliding_window, soft_cap, block_q, pages_per_block, pages_per_row, compute_dtype,
):
    h, i = pl.program_id(0), pl.program_id(1)
    num_kv_heads, num_q_blocks = pl.num_programs(0), pl.num_programs(1)
    _, G, bq, H = q_ref.shape
    R = G * bq
    S = k_buf.shape[2]
    bp, M = pages_per_block, pages_per_row
    bk = bp * S
    s_hi = seq_hi_ref[i]

    def row_meta(qi, b):
        """Row b within q block qi: its token span there, and the cache span those tokens can see."""
        blk0 = qi * bq
        q_end, kv_len = cu_q_lens_ref[b + 1], kv_lens_ref[b]
        qs = jnp.maximum(cu_q_lens_ref[b], blk0)
        qe = jnp.minimum(q_end, blk0 + bq)
        shift = kv_len - q_end  # position of token t is t + shift
        last = qe - 1 + shift
        first = (qs + shift - sliding_window + 1) if sliding_window is not None else 0
        first = jnp.maximum(first, 0)
        j_lo = first // bk
        j_hi = jnp.maximum(jnp.maximum(last, 0) // bk + 1, j_lo + 1)  # >= 1 item, even for an empty span
        return qs, qe, shift, first, last, j_lo, j_hi

    def page_copies(kv_head, qi, b, j, slot, fn):
        """Apply fn (start or wait) to the DMAs of item (b, j): its live pages, one [S, H] tile each."""
        _, _, _, first, last, _, _ = row_meta(qi, b)

        def one(p, carry):
            idx = j * bp + p
            live = (idx * S <= last) & ((idx + 1) * S > first) & (idx < M)

            @pl.when(live)
            def _():
                page = tables_ref[b * M + jnp.minimum(idx, M - 1)]
                for n, (src, dst) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                    fn(pltpu.make_async_copy(src.at[page, kv_head], dst.at[slot, p], sems.at[n, slot]))

            return carry

        lax.fori_loop(0, bp, one, 0)

    start = lambda c: c.start()  # noqa: E731
    wait = lambda c: c.wait()  # noqa: E731

    @pl.when((h == 0) & (i == 0))
    def _():
        state_ref[0] = 0
        state_ref[1] = 0

    m_ref[...] = jnp.full(m_ref.shape, _NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    s0 = seq_lo_ref[i]

    @pl.when((s0 < s_hi) & (state_ref[1] == 0))
    def _():
        page_copies(h, i, s0, row_meta(i, s0)[5], state_ref[0], start)

    state_ref[1] = 0

    logit_scale = sm_scale * scales_ref[0, h]
    q = q_ref[0].reshape(R, H).astype(compute_dtype)  # [R, H], rows g-major: r = g * bq + token
    row_t = i * bq + (lax.broadcasted_iota(jnp.int32, (R, bk), 0) & (bq - 1))  # [R, bk] token of each row
    col = lax.broadcasted_iota(jnp.int32, (R, bk), 1)  # [R, bk]
    v_row = lax.broadcasted_iota(jnp.int32, (bk, H), 0)  # [bk, H]

    def compute(b, j, slot):
        qs, qe, shift, first, last, _, _ = row_meta(i, b)
        k = k_buf[slot].astype(compute_dtype).reshape(bk, H)  # [bk, H]
        v = v_buf[slot].astype(compute_dtype).reshape(bk, H)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [R, bk]
        s = s * logit_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = j * bk + col
        q_pos = row_t + shift
        mask = (row_t >= qs) & (row_t < qe) & (kv_pos <= q_pos)
        if sliding_window is not None:
            mask &= kv_pos > q_pos - sliding_window
        s = jnp.where(mask, s, _NEG_INF)  # also drops NaN logits of stale / unused pages
        # Rows of v outside the fetched span may be stale or NaN; p = 0 there is not enough.
        v_pos = j * bk + v_row
        v = jnp.where((v_pos >= first) & (v_pos <= last), v, jnp.zeros_like(v))

        m_prev, l_prev = m_ref[...], l_ref[...]  # [R, 128]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new[:, :1]), 0.0)  # [R, bk]
        alpha = jnp.exp(m_prev - m_new)  # [R, 128]
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        pv = jnp.dot(p.astype(compute_dtype), v, preferred_element_type=jnp.float32)  # [R, H]
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv

    def body(carry):
        b, j, slot = carry
        _, _, _, _, _, _, j_hi = row_meta(i, b)
        step_row = j + 1 >= j_hi
        b2 = jnp.where(step_row, b + 1, b)
        b2c = jnp.minimum(b2, s_hi - 1)  # keep SMEM reads in bounds past the last row
        j2 = jnp.where(step_row, row_meta(i, b2c)[5], j + 1)

        @pl.when(b2 < s_hi)
        def _():
            page_copies(h, i, b2c, j2, 1 - slot, start)

        page_copies(h, i, b, j, slot, wait)
        compute(b, j, slot)
        return b2, j2, 1 - slot

    b0 = jnp.maximum(jnp.minimum(s0, s_hi - 1), 0)  # in bounds even when the step has no rows
    _, _, slot_end = lax.while_loop(lambda c: c[0] < s_hi, body, (s0, row_meta(i, b0)[5], state_ref[0]))
    state_ref[0] = slot_end

    # Next grid step (row-major over (K, Q)): put its first item in flight before finishing this one.
    last_i = i + 1 == num_q_blocks
    h2 = jnp.where(last_i, h + 1, h)
    i2 = jnp.where(last_i, 0, i + 1)
    n0 = seq_lo_ref[i2]

    @pl.when((h2 < num_kv_heads) & (n0 < seq_hi_ref[i2]))
    def _():
        page_copies(h2, i2, n0, row_meta(i2, n0)[5], slot_end, start)
        state_ref[1] = 1

    l = l_ref[...][:, :1]
    inv = jnp.where(l > 0, scales_ref[1, h] / jnp.where(l > 0, l, 1.0), 0.0)  # padding rows: 0
    o_ref[0] = (acc_ref[...] * inv).astype(o_ref.dtype).reshape(G, bq, H)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "block_q", "pages_per_block",
                     "vmem_limit_bytes"),
)
def ragged_paged_attention_tpu(
    q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens, num_seqs,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    k_scale=None, v_scale=None, interpret=False,
    block_q: int = 32, pages_per_block: int | None = None, vmem_limit_bytes: int | None = None,
):
    """Ragged paged attention on TPU (Pallas); same contract as `ragged_paged_attention_reference`.

    Args:
      q            [T, N, H]   queries (f32 / bf16), sequence b owns rows cu_q_lens[b] : cu_q_lens[b + 1]
      k_pages      [P, K, S, H] keys incl. this step's (f32, bf16, or int8 / float8_e4m3fn with k_scale)
      v_pages      [P, K, S, H] values, same dtype as k_pages
      page_tables  [B, M] int32 page ids per sequence row
      kv_lens      [B] int32   cached tokens per row, this step's included
      cu_q_lens    [B + 1] int32 cumulative query lengths
      num_seqs     [] int32    live rows; later rows and tokens past cu_q_lens[num_seqs] give 0
      sm_scale     logit scale; sliding_window, soft_cap as in the reference
      k_scale, v_scale  [K] per-kv-head dequantisation scales, or None
      interpret    False on TPU. On CPU: True runs Pallas' generic interpreter (DMAs become array copies:
                   fast); a `pltpu.InterpretParams()` runs the TPU interpreter, which emulates the DMA engine
                   and semaphores, fills scratch with NaN, raises on out-of-bounds reads, can detect races
      block_q      tokens per q block (power of two; >= 8 for f32 q, >= 16 for bf16)
      pages_per_block  pages per kv block (default 256 // S, at least 1, at most M)
      vmem_limit_bytes  passed to Mosaic
    Returns:
      [T, N, H] in q's dtype.
    """
    T, N, H = q.shape
    P, K, S, _ = k_pages.shape
    B, M = page_tables.shape
    assert N % K == 0, (N, K)
    assert v_pages.shape == k_pages.shape and v_pages.dtype == k_pages.dtype
    G = N // K
    bq = block_q
    sublanes = 32 // jnp.dtype(q.dtype).itemsize
    assert bq >= sublanes and bq & (bq - 1) == 0, f"block_q={bq}: a power of two >= {sublanes}"
    bp = min(pages_per_block or max(1, 256 // S), M)
    Q = pl.cdiv(T, bq)
    Tp = Q * bq

    eight_bit = jnp.dtype(k_pages.dtype).itemsize == 1
    compute_dtype = q.dtype if eight_bit else jnp.promote_types(q.dtype, k_pages.dtype)

    qt = q.reshape(T, K, G, H).transpose(1, 2, 0, 3)  # [K, G, T, H]
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))

    # Rows with tokens in q block i: cu_q_lens[b + 1] > i * bq and cu_q_lens[b] < (i + 1) * bq.
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    cu = cu_q_lens.astype(jnp.int32)
    blk0 = jnp.arange(Q, dtype=jnp.int32) * bq
    seq_lo = jnp.minimum(jnp.searchsorted(cu[1:], blk0, side="right"), num_seqs).astype(jnp.int32)
    seq_hi = jnp.minimum(jnp.searchsorted(cu[:-1], blk0 + bq, side="left"), num_seqs).astype(jnp.int32)
    ones = jnp.ones((K,), jnp.float32)
    scales = jnp.stack([
        ones if k_scale is None else jnp.asarray(k_scale, jnp.float32).reshape(K),
        ones if v_scale is None else jnp.asarray(v_scale, jnp.float32).reshape(K),
    ])  # [2, K]

    R = G * bq
    block = pl.BlockSpec((1, G, bq, H), lambda h, i, *_: (h, 0, i, 0))
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, block_q=bq,
        pages_per_block=bp, pages_per_row=M, compute_dtype=compute_dtype,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(K, Q),
            in_specs=[block, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=block,
            scratch_shapes=[
                pltpu.VMEM((2, bp, S, H), k_pages.dtype),
                pltpu.VMEM((2, bp, S, H), v_pages.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((R, _LANES), jnp.float32),
                pltpu.VMEM((R, _LANES), jnp.float32),
                pltpu.VMEM((R, H), jnp.float32),
                pltpu.SMEM((2,), jnp.int32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((K, G, Tp, H), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes,
        ),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(kv_lens.astype(jnp.int32), cu, page_tables.astype(jnp.int32).reshape(B * M), seq_lo, seq_hi, scales,
      qt, k_pages, v_pages)
    return out[:, :, :T].transpose(2, 0, 1, 3).reshape(T, N, H)  # [T, N, H]
