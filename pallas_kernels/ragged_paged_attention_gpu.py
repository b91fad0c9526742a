"""Ragged paged attention on NVIDIA GPUs: Pallas kernels lowered through Triton.

The op is the one defined in `ragged_paged_attention.py` (same glossary, inputs and semantics; its
`ragged_paged_attention_reference` is `op_reference` here). Shapes, with G = N // K query heads per kv head:
  q            [T, N, H]     bf16 / f16 / f32
  k_pages      [P, K, S, H]  same dtype as q, or int8 / float8_e4m3fn with k_scale
  v_pages      [P, K, S, H]
  page_tables  [B, M] int32  kv_lens [B] int32   cu_q_lens [B + 1] int32   num_seqs [] int32
  k_scale, v_scale  [K] f32, optional (8-bit cache: value = stored * scale)
  out          [T, N, H]     q.dtype; padding tokens (t >= cu_q_lens[num_seqs]) are 0
Inside the kernels (the names used below):
  Gp   G rounded up to a power of two (Triton tensors have power-of-two sides); heads g >= G are padding
  BQ   query tokens per block; BM = BQ * Gp rows of a block: row r is token r // Gp, query head r % Gp of
       the program's kv head, so the G heads sharing a kv head share every K/V tile loaded (GQA packing)
  bk   kv tokens per inner iteration (any power of two, independent of S: a token's page id comes from
       the page table, so one iteration may span several pages, or part of one)
  partials (decode, when split): o [B, K, splits, Gp, H] f32 unnormalised, m / l [B, K, splits, Gp] f32 (the
       G heads of the sequence's one query token; the block's other rows only pad the dot to 16 rows)

Two kernels, chosen statically by `decode_only` (a `lax.cond` would copy its predicate to the host on
XLA:GPU, a sync per step):
  * ragged (default): grid (cdiv(T, BQ) + B, K). A program takes one block of up to BQ query tokens of ONE
    sequence. Its sequence comes from cu_q_lens on the device: sequence b owns block ids
    [cu[b] // BQ + b, cu[b+1] // BQ + b + 1), enough for cdiv(q_len, BQ) blocks (some end up empty), so
    block i belongs to the number of b in [1, num_seqs] with cu[b] // BQ + b <= i; the static bound
    cdiv(T, BQ) + B covers every batch. Programs past the live blocks write the zeros of padding tokens.
    The kv loop runs only over the blocks this query block can see: from the window's start (or 0) to
    its last token's position. Blocks wholly visible to every row skip the mask (a plain loop); only the
    diagonal and window-edge blocks pay for it.
  * decode (every live sequence has one query token): grid (rows, K, splits). One program is one
    (sequence, kv head, kv split); its BM = max(16, Gp) rows are the G heads (tensor-core dots need
    M >= 16, so small G is padded: the kernel is bound by K/V bytes, not by those wasted rows). When
    B * K programs cannot fill the 132 SMs several times over, the context is split flash-decoding style:
    each split writes (acc, m, l) and a second small kernel merges them and scatters the rows. With one
    split the first kernel writes the final rows itself (one launch). Given the model's fused projection
    (`fused_qkv`: the queries with the step's own keys and values, what the engine's decode buckets pass), it
    also writes the new K/V: the program owning a sequence's last position adds that token from registers and
    stores it into its page slot (the pages aliased in place), so the step needs no scatter before it and no
    copy of q, k or v out of the projection (an 8B Llama at batch 1 on an H100: 174.1 -> 175.1 tok/s for the
    write, then 173.3-175.0 -> 176.6-176.7 for reading the projection in place, three per-layer copies fewer).
Both: online softmax in f32 in the exp2 domain (log2 e folded into the scale); masked logits are -inf and
a row that has seen nothing keeps m = -inf but exponentiates against 0, so it yields 0, never NaN; K/V
loads past kv_len are masked to 0, so NaN in unused page slots never reaches a dot (0 * NaN = NaN).
8-bit caches are converted to q's dtype in registers; k_scale folds into the logit scale, v_scale into
the final normalisation.

Why this backend. Triton-lowered Pallas (`pallas_call` with `pltriton.CompilerParams`): a gather of paged
K/V rows is one pointer tensor (`ref[page_ids[:, None], kv_head, offsets[:, None], h[None, :]]`), masked
loads and stores are first class, and the same kernel runs on CPU under `interpret=True`, which is how it
is tested in CI. JAX deprecates this path in favour of Mosaic GPU, but it still lowers in jax 0.10 and 0.11.
Mosaic GPU (`plgpu.kernel`: TMA, wgmma, warp specialisation) can go further on prefill, but its paged
gathers need per-page TMA copies, and its interpret mode is private and partial: in jax 0.10.2 it runs
per-page copies into shared memory (page ids read from the page table in global memory), barriers and
wgmma, but not a transposed shared-memory operand (`plgpu.transpose_ref`, which Q K^T needs) nor
`pl.run_state` (jax's own `attention_mgpu` fails there), so such a kernel could not be tested in CI on CPU.
jax-triton runs real Triton kernels but has no CPU path at all.

Mixed batches (`split_decodes=True`, what the engine's mixed buckets run): the one-token sequences go to
the decode kernel (its grid over the B rows, other rows skipped) and the ragged kernel skips them, writing
the remaining rows into the decode kernel's output in place (`input_output_aliases`). Without it the ragged
kernel gives each decode sequence a whole BM-row block (4 of 128 rows live at G = 4) and 128-token kv steps.

Decode knobs. 32-token kv iterations with 2 warps keep the pipelined K/V tiles at 48 KB (several programs per
SM) and waste little on a context's last, partial iteration; 128-token iterations (196 KB, one program per
SM) lost a third of the bandwidth on contexts of a few hundred tokens. H100, B=256 x 400 tokens: 63% -> 89%
of 2.94 TB/s; B=64 x 400: 46% -> 67%; B=256 x 2048: 91% -> 99%; B=16 x 2048: 58% -> 70%
(`benchmarks/attention_gpu.py --decode-cases ... --sweep`; the full grid is in benchmarks/RESULTS.md).
Prefill (ragged kernel): each kv iteration loads the next iteration's page ids (`prefetch_pages`), so with 3
pipeline stages its K/V loads never wait on a page-table load: 31% -> 34% of the bf16 matmul peak at a
4k-token chunk on an H100. jax's own dense kernels on the same prompt (contiguous K/V, no page table) reach
44% (Triton `mha`) and 42% (Mosaic GPU `attention_mgpu`, float16) in the same run; the rest of our gap is
the paged gather, and the path beyond ~45% is TMA / warp specialisation (Mosaic GPU) with per-page copies.

Constraints: H a power of two >= 16; BQ, bk powers of two, bk >= 16; the decode kernel assumes each live
sequence has exactly one query token (decode buckets; the one-token sequences of a mixed batch).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

op_reference = ragged_paged_attention_reference

_LOG2E = math.log2(math.e)
_NUM_SMS = 132  # H100 SXM; only steers the static split heuristic


def _compiler_params(num_warps, num_stages):
    # jax 0.10 / 0.11 name it CompilerParams; older releases TritonCompilerParams. Passing it is also what
    # selects the Triton backend (without it, a CUDA pallas_call may go to Mosaic GPU).
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _iota(n):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _cdiv(a, b):
    return lax.div(a + (b - 1), b)


def _rows(BQ, Gp, G, kh, t0):
    """Row r of a block -> (token, query head, head is real). Heads past G are clamped to stay in bounds."""
    r = _iota(BQ * Gp)
    g = lax.rem(r, Gp)
    t = t0 + lax.div(r, Gp)
    head = kh * G + jnp.minimum(g, G - 1)
    return t, head, g < G


def _store_rows(o_ref, val, t, head, ok, H):
    """o_ref [T, N, H] <- val [BM, H] at rows (t, head) where ok.

    Rows not stored point past the end (token T): a masked Triton store never touches them, and the
    interpreter's scatter drops them instead of racing a real row that shares a clamped index.
    """
    h = _iota(H)
    t = jnp.where(ok, t, o_ref.shape[0])
    pltriton.store(o_ref.at[t[:, None], head[:, None], h[None, :]], val.astype(o_ref.dtype),
                   mask=ok[:, None])


def _load_q(q_ref, t, head, kh, ok, G, Gs, H):
    """q [BM, H] of rows (t, head); q_ref has Gs heads per kv head: G ([T, N, H] queries) or G + 2 (the fused
    projection [T, K * (G + 2), H], whose kv head kh's queries start at row kh * (G + 2))."""
    q_head = head + kh * (Gs - G)
    return pltriton.load(q_ref.at[jnp.minimum(t, q_ref.shape[0] - 1)[:, None], q_head[:, None], _iota(H)[None, :]],
                         mask=ok[:, None], other=0)


def _logits(s, scale, soft_cap):
    """Dot products q . k -> logits in the exp2 domain: the scale (log2 e folded in), and the soft cap if any."""
    if soft_cap is None:
        return s * (scale * _LOG2E)
    return jnp.tanh(s * (scale / soft_cap)) * (soft_cap * _LOG2E)


def _online_softmax(m_i, l_i, s, masked):
    """One online-softmax step over logits s [BM, n]: (m, l, p [BM, n], alpha [BM]); the caller's accumulator
    becomes acc * alpha + p @ v. masked: a row may have seen nothing yet (m = -inf) and exponentiates against 0."""
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m_i - m_use)
    p = jnp.exp2(s - m_use[:, None])
    return m_new, l_i * alpha + jnp.sum(p, axis=1), p, alpha


def _attend(q, pos, blk_lo, blk_hi, min_pos, max_pos, kv_len, b, kh, tables_ref, k_ref, v_ref, scale, *,
            S, bk, window, soft_cap, prefetch_pages=False):
    """Online softmax of q [BM, H] over kv blocks [blk_lo, blk_hi) of sequence b, kv head kh.

    pos [BM] is each row's position; min_pos / max_pos bound the live rows'. Returns (m, l, acc) in the
    exp2 domain: m, l [BM] f32, acc [BM, H] f32 (unnormalised).
    """
    BM, H = q.shape
    cdt = q.dtype
    # Triton's DEFAULT precision runs f32 dots as tf32 (~1e-3); an f32 cache asks for exact products.
    prec = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    h = _iota(H)
    M = tables_ref.shape[1]

    def pages(j):  # page id of each kv position of block j (clamped into the table: past kv_len it is unused)
        return tables_ref[b, jnp.minimum(lax.div(j * bk + _iota(bk), S), M - 1)]

    def body(j, carry, masked):
        m_i, l_i, acc, *pg_pre = carry
        kv = j * bk + _iota(bk)  # [bk] positions
        pidx = lax.div(kv, S)
        off = lax.rem(kv, S)
        if prefetch_pages:  # this block's page ids came with the carry; fetch the next block's now
            pg_next = pages(j + 1)
        if masked:  # the last block may run past kv_len, into pages that may hold NaN (or past the table)
            ok = kv < kv_len
            pg = pg_pre[0] if prefetch_pages else pltriton.load(
                tables_ref.at[b, jnp.minimum(pidx, M - 1)], mask=ok, other=0)
            idx = (pg[:, None], kh, off[:, None], h[None, :])
            # Zeroed after the cast rather than through `other=`: Triton cannot splat a constant into fp8.
            k = jnp.where(ok[:, None], pltriton.load(k_ref.at[idx], mask=ok[:, None]).astype(cdt), 0)
            v = jnp.where(ok[:, None], pltriton.load(v_ref.at[idx], mask=ok[:, None]).astype(cdt), 0)
        else:
            pg = pg_pre[0] if prefetch_pages else tables_ref[b, pidx]
            idx = (pg[:, None], kh, off[:, None], h[None, :])
            k = k_ref[idx].astype(cdt)  # [bk, H]; 8-bit caches dequantise here, the scale is in `scale`
            v = v_ref[idx].astype(cdt)
        s = _logits(lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                                    preferred_element_type=jnp.float32), scale, soft_cap)  # [BM, bk]
        if masked:
            vis = (kv[None, :] <= pos[:, None]) & ok[None, :]  # ok: a decode writing its own token reads less
            if window is not None:
                vis &= kv[None, :] > pos[:, None] - window
            s = jnp.where(vis, s, -jnp.inf)
        m_new, l_new, p, alpha = _online_softmax(m_i, l_i, s, masked)
        pv = lax.dot_general(p.astype(cdt), v, (((1,), (0,)), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32)
        return (m_new, l_new, acc * alpha[:, None] + pv, *([pg_next] if prefetch_pages else []))

    # Blocks every live row sees whole: j * bk > max_pos - window and (j + 1) * bk - 1 <= min_pos.
    full_lo = blk_lo
    if window is not None:
        full_lo = jnp.maximum(blk_lo, _cdiv(jnp.maximum(max_pos - window + 1, 0), bk))
    x1 = jnp.minimum(full_lo, blk_hi)
    x2 = jnp.clip(lax.div(min_pos + 1, bk), x1, blk_hi)
    carry = (jnp.full((BM,), -jnp.inf, jnp.float32), jnp.zeros((BM,), jnp.float32),
             jnp.zeros((BM, H), jnp.float32))

    def loop(lo, hi, carry, masked):
        if prefetch_pages:
            carry = (*carry, pages(lo))
        carry = lax.fori_loop(lo, hi, functools.partial(body, masked=masked), carry)
        return carry[:3]

    if window is not None:
        carry = loop(blk_lo, x1, carry, True)
    carry = loop(x1, x2, carry, False)
    return loop(x2, blk_hi, carry, True)


def _kv_range(kv_len, min_pos, max_pos, bk, window):
    lo = 0 if window is None else jnp.maximum(min_pos - window + 1, 0)
    return lax.div(lo, bk), _cdiv(jnp.minimum(max_pos + 1, kv_len), bk)


def _scales(scale_refs, kh, sm_scale, has_k_scale, has_v_scale):
    refs = list(scale_refs)
    k_s = refs.pop(0)[kh] if has_k_scale else None
    v_s = refs.pop(0)[kh] if has_v_scale else None
    return (sm_scale if k_s is None else sm_scale * k_s), v_s


def _finish(acc, l_i, v_s):
    """acc [..., H] / l_i [...], times the v scale (broadcasting against l_i) if any."""
    inv = jnp.where(l_i > 0, 1.0 / l_i, 0.0)  # padding rows: l = 0 -> 0
    if v_s is not None:
        inv = inv * v_s
    return acc * inv[..., None]


def _ragged_kernel(q_ref, k_ref, v_ref, tables_ref, kv_lens_ref, cu_ref, ns_ref, *refs, BQ, G, Gs, Gp, bk,
                   sm_scale, window, soft_cap, has_k_scale, has_v_scale, skip_single, prefetch_pages):
    *scale_refs, o_ref = refs
    if skip_single:  # the last input is the decode kernel's output, aliased to o_ref: its rows stay
        scale_refs = scale_refs[:-1]
    T, _, H = q_ref.shape
    B = kv_lens_ref.shape[0]
    # Block ids run backwards in launch order: a sequence's last (causally heaviest) query blocks start
    # first and its light ones fill the tail; the spare padding programs launch first and end at once.
    i = pl.num_programs(0) - 1 - pl.program_id(0)
    kh = pl.program_id(1)
    ns = ns_ref[0]
    # Sequence of block i: sequence b owns block ids [cu[b] // BQ + b, cu[b+1] // BQ + b + 1).
    idx = _iota(_next_pow2(B + 1))
    cu_v = cu_ref[jnp.minimum(idx, B)]
    starts = lax.div(cu_v, BQ) + idx
    b = jnp.sum(jnp.where((idx >= 1) & (idx <= ns) & (starts <= i), 1, 0))
    cu_ns = cu_ref[ns]
    live_blocks = lax.div(cu_ns, BQ) + ns

    @pl.when(i < live_blocks)
    def _attention():
        q_start = cu_ref[b]
        q_end = cu_ref[b + 1]
        q0 = q_start + (i - lax.div(q_start, BQ) - b) * BQ  # first token of this block
        live = q0 < q_end
        if skip_single:  # one-token sequences were done by the decode kernel
            live &= q_end - q_start > 1

        @pl.when(live)
        def _():
            kv_len = kv_lens_ref[b]
            t, head, head_ok = _rows(BQ, Gp, G, kh, q0)
            ok = head_ok & (t < q_end)
            q = _load_q(q_ref, t, head, kh, ok, G, Gs, H)
            pos = kv_len - (q_end - t)  # [BM]
            min_pos = kv_len - (q_end - q0)
            max_pos = kv_len - (q_end - jnp.minimum(q0 + BQ, q_end)) - 1
            scale, v_s = _scales(scale_refs, kh, sm_scale, has_k_scale, has_v_scale)
            blk_lo, blk_hi = _kv_range(kv_len, min_pos, max_pos, bk, window)
            _, l_i, acc = _attend(q, pos, blk_lo, blk_hi, min_pos, max_pos, kv_len, b, kh, tables_ref,
                                  k_ref, v_ref, scale, S=k_ref.shape[2], bk=bk, window=window,
                                  soft_cap=soft_cap, prefetch_pages=prefetch_pages)
            _store_rows(o_ref, _finish(acc, l_i, v_s), t, head, ok, H)

    @pl.when(i >= live_blocks)
    def _padding():  # zero the padding tokens, one BQ-aligned block per spare program
        t, head, head_ok = _rows(BQ, Gp, G, kh, (lax.div(cu_ns, BQ) + i - live_blocks) * BQ)
        ok = head_ok & (t >= cu_ns) & (t < T)
        _store_rows(o_ref, jnp.zeros((BQ * Gp, H), jnp.float32), t, head, ok, H)


def _with_new_token(q, m_i, l_i, acc, kn, vn, scale, soft_cap, own):
    """Fold one more kv position, the step's own token (kn, vn [H], from registers), into (m, l, acc) where
    `own` (a scalar: this program owns the sequence's last position); every row sees it (it is its position)."""
    s = jnp.sum(q.astype(jnp.float32) * kn.astype(jnp.float32)[None, :], axis=1)[:, None]  # [BM, 1]
    s = jnp.where(own, _logits(s, scale, soft_cap), -jnp.inf)
    m_new, l_new, p, alpha = _online_softmax(m_i, l_i, s, masked=True)
    return m_new, l_new, acc * alpha[:, None] + p * vn.astype(jnp.float32)[None, :]


def _decode_kernel(q_ref, k_ref, v_ref, tables_ref, kv_lens_ref, cu_ref, ns_ref, *refs, BQ, G, Gs, Gp, bk,
                   splits, sm_scale, window, soft_cap, has_k_scale, has_v_scale, only_single, prefetch_pages,
                   write_new=False):
    n_scales = int(has_k_scale) + int(has_v_scale)
    scale_refs, out_refs = refs[:n_scales], refs[n_scales:]
    # write_new: q_ref is the fused projection (Gs = G + 2: kv head kh's G query heads, then its new key and value);
    # the pages go out too (aliased to k_ref / v_ref), one slot per sequence written.
    if write_new:
        *out_refs, k_out, v_out = out_refs
    T, _, H = q_ref.shape
    BM = BQ * Gp
    i = pl.program_id(0)  # sequence row (and, with one split, also a token row to zero)
    kh = pl.program_id(1)
    sp = pl.program_id(2)
    ns = ns_ref[0]

    @pl.when(_decode_row(i, ns, cu_ref, only_single))
    def _attention():
        q_start = cu_ref[i]
        q_end = cu_ref[i + 1]
        kv_len = kv_lens_ref[i]
        t, head, head_ok = _rows(BQ, Gp, G, kh, q_start)
        ok = head_ok & (t < q_end)
        h = _iota(H)
        q = _load_q(q_ref, t, head, kh, ok, G, Gs, H)
        pos = kv_len - (q_end - t)
        min_pos = kv_len - (q_end - q_start)
        max_pos = kv_len - 1
        scale, v_s = _scales(scale_refs, kh, sm_scale, has_k_scale, has_v_scale)
        blk_lo, blk_hi = _kv_range(kv_len, min_pos, max_pos, bk, window)
        last_blk = blk_hi - 1  # holds position kv_len - 1, the query token's own
        if splits > 1:  # this split's share of the sequence's kv blocks
            per = _cdiv(blk_hi - blk_lo, splits)
            blk_lo = jnp.minimum(blk_lo + sp * per, blk_hi)
            blk_hi = jnp.minimum(blk_lo + per, blk_hi)
        S = k_ref.shape[2]
        # write_new: the pages do not hold position kv_len - 1 yet, so reads stop before it (the block holding it
        # takes the masked path) and the one program owning it adds the token from registers and writes it.
        new = int(write_new)
        m_i, l_i, acc = _attend(q, pos, blk_lo, blk_hi, min_pos - new, max_pos, kv_len - new, i, kh, tables_ref,
                                k_ref, v_ref, scale, S=S, bk=bk, window=window, soft_cap=soft_cap,
                                prefetch_pages=prefetch_pages)
        if write_new:
            own = (blk_lo <= last_blk) & (last_blk < blk_hi)
            kq = q_ref[q_start, kh * Gs + G, h].astype(k_out.dtype)  # as stored: an 8-bit cache rounds it first
            vq = q_ref[q_start, kh * Gs + G + 1, h].astype(v_out.dtype)
            m_i, l_i, acc = _with_new_token(q, m_i, l_i, acc, kq.astype(q.dtype), vq.astype(q.dtype), scale,
                                            soft_cap, own)

            @pl.when(own)
            def _write():
                page = tables_ref[i, lax.div(kv_len - 1, S)]
                off = lax.rem(kv_len - 1, S)
                pltriton.store(k_out.at[page, kh, off, h], kq)
                pltriton.store(v_out.at[page, kh, off, h], vq)
        if splits == 1:
            _store_rows(out_refs[0], _finish(acc, l_i, v_s), t, head, ok, H)
        else:
            # Only the rows of the sequence's one query token (its G heads) are kept: the other BM - Gp rows
            # exist for the tensor-core dot. Rows not stored point past the end (masked / dropped).
            o_part, m_part, l_part = out_refs
            r = _iota(BM)
            keep = r < Gp
            r = jnp.where(keep, r, Gp)
            pltriton.store(o_part.at[i, kh, sp, r[:, None], h[None, :]], acc, mask=keep[:, None])
            pltriton.store(m_part.at[i, kh, sp, r], m_i, mask=keep)
            pltriton.store(l_part.at[i, kh, sp, r], l_i, mask=keep)

    if splits == 1 and not only_single:
        _zero_padding_token(out_refs[0], cu_ref, ns, i, kh, G, Gp, T, H)


def _decode_row(i, ns, cu_ref, only_single):
    """Program row i holds a live sequence the decode kernel handles (with only_single: a one-token one)."""
    ok = i < ns
    if only_single:
        i = jnp.minimum(i, cu_ref.shape[0] - 2)
        ok &= cu_ref[i + 1] - cu_ref[i] == 1
    return ok


def _zero_padding_token(o_ref, cu_ref, ns, i, kh, G, Gp, T, H):
    """Decode: program row i zeroes token i if it is padding (live tokens are 0 .. cu[ns] - 1)."""
    @pl.when((i >= cu_ref[ns]) & (i < T))
    def _():
        t, head, head_ok = _rows(1, Gp, G, kh, i)
        _store_rows(o_ref, jnp.zeros((Gp, H), jnp.float32), t, head, head_ok, H)


def _combine_kernel(o_part, m_part, l_part, cu_ref, ns_ref, *refs, G, Gp, splits, has_v_scale, only_single):
    """Merge the decode splits of (sequence i, kv head kh) and write its Gp rows; zero padding tokens."""
    *scale_refs, o_ref = refs
    T, _, H = o_ref.shape
    BM = Gp  # one query token: its heads
    i = pl.program_id(0)
    kh = pl.program_id(1)
    ns = ns_ref[0]

    @pl.when(_decode_row(i, ns, cu_ref, only_single))
    def _merge():
        r = _iota(BM)
        h = _iota(H)
        ms = [m_part[i, kh, s, r] for s in range(splits)]
        m_max = functools.reduce(jnp.maximum, ms)
        m_use = jnp.where(m_max == -jnp.inf, 0.0, m_max)
        l_i = jnp.zeros((BM,), jnp.float32)
        acc = jnp.zeros((BM, H), jnp.float32)
        for s in range(splits):
            w = jnp.exp2(ms[s] - m_use)  # empty split: m = -inf -> 0
            l_i += w * l_part[i, kh, s, r]
            acc += w[:, None] * o_part[i, kh, s, r[:, None], h[None, :]]
        v_s = scale_refs[0][kh] if has_v_scale else None
        q_start = cu_ref[i]
        t, head, head_ok = _rows(1, Gp, G, kh, q_start)
        _store_rows(o_ref, _finish(acc, l_i, v_s), t, head, head_ok & (t < cu_ref[i + 1]), H)

    if not only_single:
        _zero_padding_token(o_ref, cu_ref, ns, i, kh, G, Gp, T, H)


def _merge_xla(o_part, m_part, l_part, num_seqs, v_scale, G, out_shape):
    """The merge of a decode-only step's splits as plain jnp, for XLA to fuse (token row i is sequence i there):
    the same math as `_combine_kernel`, without a second Pallas launch."""
    B, K, _, Gp, H = o_part.shape
    T = out_shape.shape[0]
    m_max = jnp.max(m_part, axis=2, keepdims=True)
    w = jnp.exp2(m_part - jnp.where(m_max == -jnp.inf, 0.0, m_max))  # empty split: m = -inf -> 0
    l_i = jnp.sum(w * l_part, axis=2)  # [B, K, Gp]
    acc = jnp.sum(w[..., None] * o_part, axis=2)  # [B, K, Gp, H]
    out = _finish(acc, l_i, None if v_scale is None else v_scale[None, :, None])[:, :, :G].reshape(B, K * G, H)
    live = (jnp.arange(B) < num_seqs[0])[:, None, None]  # rows past num_seqs hold no partials: zeros
    out = jnp.where(live, out, 0.0).astype(out_shape.dtype)
    return out[:T] if T <= B else jnp.pad(out, ((0, T - B), (0, 0), (0, 0)))


def _smem_bytes() -> int:
    """Shared memory one program may use on this GPU (by compute capability; H100 when unknown, e.g. on CPU)."""
    try:
        cc = float(getattr(jax.devices()[0], "compute_capability", "9.0"))
    except (TypeError, ValueError, RuntimeError):
        cc = 9.0
    kib = 227 if cc >= 9.0 else 163 if cc == 8.0 else 99
    return kib * 1024 - 2048  # minus Triton's own scratch (barriers, reduction buffers)


def _fit(bk, num_stages, H, kv_itemsize, q_tile_bytes):
    """(bk, stages): the largest power-of-two kv block <= bk, then fewer stages (down to 2), whose pipelined K and
    V tiles plus the query tile fit in shared memory."""
    bk, stages = _next_pow2(max(16, bk)), max(num_stages, 1)

    def need(bk, stages):
        return stages * 2 * bk * H * max(kv_itemsize, 2) + q_tile_bytes

    limit = _smem_bytes()
    while bk > 64 and need(bk, stages) > limit:
        bk //= 2
    while stages > 2 and need(bk, stages) > limit:
        stages -= 1
    while bk > 16 and need(bk, stages) > limit:
        bk //= 2
    return bk, stages


def default_num_kv_splits(B, K, max_kv_len, bk):
    """Enough (sequence, kv head, split) programs for ~4 per SM, each with >= 2 kv blocks to stream."""
    want = max(1, (4 * _NUM_SMS) // max(1, B * K))
    return max(1, min(want, max_kv_len // (2 * bk), 16))


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "decode_only", "split_decodes", "interpret", "block_m", "block_kv",
    "num_warps", "num_stages", "decode_block_kv", "num_kv_splits", "decode_num_warps", "decode_num_stages",
    "prefetch_pages", "decode_prefetch_pages", "xla_merge", "fused_qkv"))
def ragged_paged_attention_gpu(
    q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens, num_seqs,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    k_scale=None, v_scale=None, decode_only: bool = False, split_decodes: bool = False, interpret: bool = False,
    block_m: int = 128, block_kv: int = 128, num_warps: int = 8, num_stages: int = 3,
    decode_block_kv: int = 32, num_kv_splits: int | None = None, decode_num_warps: int = 2,
    decode_num_stages: int = 3, prefetch_pages: bool = True, decode_prefetch_pages: bool = False,
    xla_merge: bool = False, fused_qkv: bool = False,
):
    """Ragged paged attention (see the module docstring for shapes); returns [T, N, H] in q.dtype.

    fused_qkv: q is the model's fused projection [T, K, G + 2, H], each kv head's G query heads followed by the
    step's own key and value (rope applied as to the queries); the kernels read the queries out of it in place.
    With decode_only the decode kernel also writes each new K/V into its sequence's slot kv_len - 1 (the pages are
    updated in place: donate them) and attends to it from registers, so the pages need not hold it yet; it then
    returns (out, k_pages, v_pages), as `write_kv` followed by the op would. Otherwise (mixed batches) the pages
    must already hold the step's K/V, as without it. Either way no copy of q, k or v out of the projection.

    decode_only: every live sequence has exactly one query token -> the split-KV decode kernel.
    split_decodes: a mixed batch; its one-token sequences go to the decode kernel, the others to the ragged
      kernel, which writes their rows into the decode kernel's output in place.
    Ragged kernel knobs: block_m rows per query block (BQ = block_m // Gp tokens), block_kv kv tokens per
    iteration, num_warps / num_stages. Decode knobs: decode_block_kv, num_kv_splits (None: by
    `default_num_kv_splits`), decode_num_warps / decode_num_stages. prefetch_pages / decode_prefetch_pages:
    each kv iteration loads the next one's page ids, so its K/V loads need not wait for a page-table load.
    Where the pipelined K/V tiles and the query tile would not fit in shared memory (f32 caches, head dim 256,
    smaller GPUs), kv blocks shrink and stages drop until they do (`_fit`).
    """
    P, K, S, H_k = k_pages.shape
    if fused_qkv:
        if q.ndim != 4 or q.shape[1] != K or q.shape[2] < 3:
            raise ValueError(f"fused_qkv: q must be [T, K, G + 2, H] with K = {K}, got {q.shape}")
        T, _, G2, H = q.shape
        N, q = K * (G2 - 2), q.reshape(T, K * G2, H)  # a view: the kernels index kv head kh's rows themselves
    else:
        T, N, H = q.shape
    B, M = page_tables.shape
    if N % K or H_k != H or v_pages.shape != k_pages.shape:
        raise ValueError(f"bad shapes: q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    if H < 16 or H & (H - 1):
        raise ValueError(f"head dim {H} must be a power of two >= 16 (Triton tensor shapes)")
    G = N // K
    Gp = _next_pow2(G)
    num_seqs = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
    page_tables = page_tables.astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    scales = [s.astype(jnp.float32).reshape(K) for s in (k_scale, v_scale) if s is not None]
    flags = dict(G=G, Gs=G + 2 if fused_qkv else G, Gp=Gp, sm_scale=float(sm_scale), window=sliding_window,
                 soft_cap=soft_cap, has_k_scale=k_scale is not None, has_v_scale=v_scale is not None)
    args = (q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens, num_seqs, *scales)
    out_shape = jax.ShapeDtypeStruct((T, N, H), q.dtype)

    out = None
    split_decodes = split_decodes and not decode_only
    if decode_only or split_decodes:
        out = _decode_call(args, out_shape, flags, B, M * S, k_pages.dtype.itemsize, rows=B if split_decodes else max(B, T),
                           only_single=split_decodes, interpret=interpret, block_kv=decode_block_kv,
                           num_kv_splits=num_kv_splits, num_warps=decode_num_warps, num_stages=decode_num_stages,
                           prefetch_pages=decode_prefetch_pages, xla_merge=xla_merge and decode_only,
                           write_new=fused_qkv and decode_only)
        if decode_only:
            return out
    BQ = _next_pow2(max(1, block_m // Gp))
    bk, num_stages = _fit(block_kv, num_stages, H, k_pages.dtype.itemsize, BQ * Gp * H * q.dtype.itemsize)
    aliases = {}
    if split_decodes:  # fill in the other rows of the decode kernel's output, in place
        args, aliases = (*args, out), {len(args): 0}
    return pl.pallas_call(
        functools.partial(_ragged_kernel, BQ=BQ, bk=bk, skip_single=split_decodes, prefetch_pages=prefetch_pages,
                          **flags),
        grid=(pl.cdiv(T, BQ) + B, K),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(*args)


def _decode_call(args, out_shape, flags, B, max_kv, itemsize, *, rows, only_single, interpret, block_kv,
                 num_kv_splits, num_warps, num_stages, prefetch_pages, xla_merge=False, write_new=False):
    """The split-KV decode kernel (+ the merge of its splits) over program rows [0, rows). write_new: q is the fused
    projection [T, K * (G + 2), H], whose new K/V the kernel writes into their pages; returns (out, k_pages,
    v_pages)."""
    q, k_pages, v_pages, _, _, cu_q_lens, num_seqs = args[:7]  # then the optional k / v scales
    H, K, Gp = out_shape.shape[2], k_pages.shape[1], flags["Gp"]
    BQ = max(1, 16 // Gp)  # BQ * Gp >= 16 rows for the tensor-core dot; only token 0's Gp rows are live
    bk, num_stages = _fit(block_kv, num_stages, H, itemsize, BQ * Gp * H * q.dtype.itemsize)
    splits = num_kv_splits or default_num_kv_splits(B, K, max_kv, bk)
    params = _compiler_params(num_warps, num_stages)
    kernel = functools.partial(_decode_kernel, BQ=BQ, bk=bk, splits=splits, only_single=only_single,
                               prefetch_pages=prefetch_pages, write_new=write_new, **flags)
    has_v_scale = flags["has_v_scale"]
    v_scales = [args[-1]] if has_v_scale else []
    pages_out = ()
    if write_new:  # the pages are outputs too, in place: inputs 1 and 2 alias the last two outputs
        pages_out = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k_pages, v_pages))

    def call(grid, main_out, name):
        n = len(main_out)
        return pl.pallas_call(kernel, grid=grid, out_shape=(*main_out, *pages_out), compiler_params=params,
                              input_output_aliases={1: n, 2: n + 1} if pages_out else {}, interpret=interpret,
                              name=name)(*args)

    if splits == 1:
        out, *pages = call((rows, K, 1), (out_shape,), "paged_decode_attention")
    else:
        o_part, m_part, l_part, *pages = call(
            (B, K, splits), (jax.ShapeDtypeStruct((B, K, splits, Gp, H), jnp.float32),
                             jax.ShapeDtypeStruct((B, K, splits, Gp), jnp.float32),
                             jax.ShapeDtypeStruct((B, K, splits, Gp), jnp.float32)), "paged_decode_attention_split")
        if xla_merge:
            out = _merge_xla(o_part, m_part, l_part, num_seqs, v_scales[0] if has_v_scale else None, flags["G"],
                             out_shape)
        else:
            out = pl.pallas_call(
                functools.partial(_combine_kernel, G=flags["G"], Gp=Gp, splits=splits, has_v_scale=has_v_scale,
                                  only_single=only_single),
                grid=(rows, K),
                out_shape=out_shape,
                compiler_params=_compiler_params(4, 1),
                interpret=interpret,
                name="paged_decode_combine",
            )(o_part, m_part, l_part, cu_q_lens, num_seqs, *v_scales)
    return (out, *pages) if write_new else out
