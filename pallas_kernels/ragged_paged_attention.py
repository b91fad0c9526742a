"""Ragged paged attention: one op for a mixed batch of prefill chunks and decode tokens.

Glossary (shared by every implementation in this module):
  T  query tokens in the step (all sequences concatenated, padded to a bucket)
  B  sequence rows (padded; rows >= num_seqs are ignored)
  N  query heads, K kv heads (N % K == 0; G = N // K query heads share one kv head), H head dim
  P  pages in the cache, S tokens per page, M pages per sequence row in the page table

Inputs:
  q            [T, N, H]   queries; sequence b owns rows cu_q_lens[b] : cu_q_lens[b + 1]
  k_pages      [P, K, S, H] keys, already holding this step's new tokens (see `write_kv`). Head-major
               inside a page: one (page, kv head) is a contiguous [S, H] tile, what a GPU block or a TPU
               DMA wants (a [.., K, H] minor layout would pad K up to the TPU's 8/16-row tiles).
  v_pages      [P, K, S, H]
  page_tables  [B, M] int32 page ids of each sequence, in order
  kv_lens      [B] int32   tokens in the cache for each sequence, including this step's
  cu_q_lens    [B + 1] int32 cumulative query lengths
  num_seqs     [] int32    live rows; tokens at or past cu_q_lens[num_seqs] are padding (output 0)
The query token at row t of sequence b sits at position kv_lens[b] - (cu_q_lens[b+1] - t); it attends to
cache positions j <= its own (causal within the chunk), and j > pos - sliding_window when a window is set.
Optional: soft_cap (logits -> cap * tanh(logits / cap)), k_scale / v_scale ([K] per-head dequantisation
scales for an 8-bit cache).

Implementations here are plain jnp: `ragged_paged_attention_reference` is the oracle (dense, exact
softmax, simple enough to trust); `ragged_paged_attention_xla` is the blocked online-softmax form the
engine uses where no Pallas kernel runs (CPU): its work grows with the live context, not the page table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite, so fully masked rows give 0 instead of NaN


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Scatter this step's K/V [T, K, H] into their cache slots (slot = page * S + offset).

    Padding tokens carry slot P * S, which is out of bounds and dropped. With the cache donated, XLA
    updates it in place: no copy of the cache per step. Live tokens never share a slot, and the padding ones
    are dropped, so the scatter is declared free of duplicates (XLA:GPU then writes rows in parallel
    without serialising on possible collisions).
    """
    P, K, S, H = k_pages.shape
    # Unsigned: slots are never negative, so jnp adds no negative-index wrap, and // and % by the page size are
    # plain shifts and masks.
    slot = slot_mapping.astype(jnp.uint32)
    page, off = slot // S, slot % S  # padding: page P, out of bounds
    k_pages = k_pages.at[page, :, off].set(k_new.astype(k_pages.dtype), mode="drop", unique_indices=True)
    v_pages = v_pages.at[page, :, off].set(v_new.astype(v_pages.dtype), mode="drop", unique_indices=True)
    return k_pages, v_pages


def gather_pages(pages_arr, page_ids):
    """[P, K, S, H] gathered at page_ids [..., n] -> [..., n * S, K, H] (token-major, for the jnp forms)."""
    g = pages_arr[page_ids]  # [..., n, K, S, H]
    g = jnp.swapaxes(g, -3, -2)  # [..., n, S, K, H]
    return g.reshape(*page_ids.shape[:-1], page_ids.shape[-1] * g.shape[-3], *g.shape[-2:])


def _token_metadata(T, kv_lens, cu_q_lens, num_seqs):
    """Per query token: its sequence row, its absolute position, and whether it is live."""
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)  # [T]
    B = kv_lens.shape[0]
    live = (t < cu_q_lens[num_seqs]) & (seq < num_seqs)
    seq = jnp.minimum(seq, B - 1)
    pos = kv_lens[seq] - (cu_q_lens[seq + 1] - t)  # [T]
    return seq, pos, live


def _mask(pos, kv_pos, live, sliding_window):
    # pos [T], kv_pos [T, L] -> [T, L]
    m = (kv_pos <= pos[:, None]) & (kv_pos >= 0) & live[:, None]
    if sliding_window is not None:
        m &= kv_pos > pos[:, None] - sliding_window
    return m


def _dequant(x, scale):
    x = x.astype(jnp.float32)
    return x if scale is None else x * scale.astype(jnp.float32)[:, None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def ragged_paged_attention_reference(
    q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens, num_seqs,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    k_scale=None, v_scale=None,
):
    """The oracle: gathers every token's whole page table and takes an exact softmax. O(T * M * S) memory."""
    T, N, H = q.shape
    P, K, S, _ = k_pages.shape
    M = page_tables.shape[1]
    G = N // K
    seq, pos, live = _token_metadata(T, kv_lens, cu_q_lens, num_seqs)
    pages = page_tables[seq]  # [T, M]
    k = _dequant(gather_pages(k_pages, pages), k_scale)  # [T, L, K, H]
    v = _dequant(gather_pages(v_pages, pages), v_scale)
    qg = q.astype(jnp.float32).reshape(T, K, G, H)
    s = jnp.einsum("tkgh,tlkh->tkgl", qg, k) * sm_scale  # [T, K, G, L]
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = jnp.broadcast_to(jnp.arange(M * S, dtype=jnp.int32), (T, M * S))
    m = _mask(pos, kv_pos, live, sliding_window)  # [T, L]
    s = jnp.where(m[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(m[:, None, None, :], p, 0.0)  # rows with nothing to attend (padding) become 0, not NaN
    v = jnp.where(m[:, :, None, None], v, 0.0)  # unused pages may hold anything, NaN included: 0 * NaN = NaN
    o = jnp.einsum("tkgl,tlkh->tkgh", p, v)
    return o.reshape(T, N, H).astype(q.dtype)


def _flash(qg, pos, live, pages_of_block, n_blocks, k_pages, v_pages, *, bp, kv_len=None, sliding_window=None,
           soft_cap=None, k_scale=None, v_scale=None):
    """Online softmax over blocks of `bp` pages for queries qg [R, K, G, H] (scaled) at positions pos [R] (live [R]).

    pages_of_block(j) -> [R, bp] page ids (each query its own block: one gather per query) or [1, bp] (one block
    shared by every query: gathered once; then kv_len, that sequence's length, masks its unwritten slots).
    Runs n_blocks blocks (a traced count). Returns the normalised output [R, K, G, H] float32 (0 where not live)."""
    R, K, G, H = qg.shape
    S = k_pages.shape[2]

    def body(j, carry):
        m_i, l_i, acc = carry  # [R, K, G], [R, K, G], [R, K, G, H]
        pages = pages_of_block(j)
        shared = pages.shape[0] == 1
        k = _dequant(gather_pages(k_pages, pages), k_scale)  # [1 or R, bS, K, H]
        v = _dequant(gather_pages(v_pages, pages), v_scale)
        kv_pos = j * bp * S + jnp.arange(bp * S, dtype=jnp.int32)
        msk = _mask(pos, jnp.broadcast_to(kv_pos, (R, bp * S)), live, sliding_window)[:, None, None, :]
        if shared:
            s = jnp.einsum("rkgh,lkh->rkgl", qg, k[0])  # [R, K, G, bS]
            v = jnp.where((kv_pos < kv_len)[None, :, None, None], v, 0.0)  # unwritten slots may hold NaN
        else:
            s = jnp.einsum("rkgh,rlkh->rkgl", qg, k)
            v = jnp.where(msk[:, 0, 0, :, None, None], v, 0.0)  # stray pages may hold NaN
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(msk, s, _NEG_INF)
        m_new = jnp.maximum(m_i, s.max(-1))
        p = jnp.where(msk, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_i - m_new)
        l_new = alpha * l_i + p.sum(-1)
        pv = jnp.einsum("rkgl,lkh->rkgh", p, v[0]) if shared else jnp.einsum("rkgl,rlkh->rkgh", p, v)
        return m_new, l_new, alpha[..., None] * acc + pv

    init = (jnp.full((R, K, G), _NEG_INF, jnp.float32), jnp.zeros((R, K, G), jnp.float32),
            jnp.zeros((R, K, G, H), jnp.float32))
    _, l_i, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return acc / jnp.where(l_i > 0, l_i, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_pages", "decode_only"))
def ragged_paged_attention_xla(
    q, k_pages, v_pages, page_tables, kv_lens, cu_q_lens, num_seqs,
    *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
    k_scale=None, v_scale=None, block_pages: int = 8, decode_only: bool = False,
):
    """Flash-style: a loop over blocks of `block_pages` pages with an online softmax, run only as far as the
    longest live sequence, so the cost follows the real context.

    How each row's keys are read (the cost of a step is the copies of its gathers):
      - a lone row (B == 1: a prefill chunk or a decode): its block is gathered once and shared by all T queries;
      - decode_only (every row one token): each token gathers its own row's block;
      - several rows (a mixed step: decodes and prefill chunks): the one-token rows as a batch of B queries, each
        gathering its own row's block, then the chunk rows one after another, each block gathered once for all T
        queries (masked to the row's own tokens). One loop serves any number of chunk rows: CPU code size, not
        only time, is what a process with many programs runs out of (its memory maps).
    """
    T, N, H = q.shape
    P, K, S, _ = k_pages.shape
    B, M = page_tables.shape
    G = N // K
    bp = min(block_pages, M)
    n_blocks_max = -(-M // bp)
    tables = jnp.pad(page_tables, ((0, 0), (0, n_blocks_max * bp - M)))  # pad pages are masked by position
    seq, pos, live = _token_metadata(T, kv_lens, cu_q_lens, num_seqs)
    qg = q.astype(jnp.float32).reshape(T, K, G, H) * sm_scale
    blocks = lambda n: jnp.minimum((n + bp * S - 1) // (bp * S), n_blocks_max)  # blocks holding n tokens
    block_of = lambda rows, j: jax.lax.dynamic_slice_in_dim(rows, j * bp, bp, axis=1)  # [R, bp]
    flash = functools.partial(_flash, k_pages=k_pages, v_pages=v_pages, bp=bp, sliding_window=sliding_window,
                              soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    row_live = jnp.arange(B) < num_seqs

    def one_row(r, tok_live, run):
        """All T queries against row r's blocks (each gathered once), live where tok_live; no blocks unless run."""
        return flash(qg, pos, tok_live, lambda j: block_of(jax.lax.dynamic_index_in_dim(tables, r, keepdims=True), j),
                     blocks(jnp.where(run, kv_lens[r], 0)), kv_len=kv_lens[r])

    if B == 1:
        o = one_row(0, live, row_live[0])
    elif decode_only:
        o = flash(qg, pos, live, lambda j: block_of(tables, j)[seq], blocks(jnp.max(jnp.where(row_live, kv_lens, 0))))
    else:
        q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
        chunk = row_live & (q_lens > 1)
        single = row_live & (q_lens == 1)
        first = jnp.minimum(cu_q_lens[:-1], T - 1)  # each row's first token
        od = flash(qg[first], kv_lens - 1, single, lambda j: block_of(tables, j),
                   blocks(jnp.max(jnp.where(single, kv_lens, 0))))  # [B, K, G, H]
        o = jnp.zeros((T, K, G, H), jnp.float32).at[jnp.where(single, first, T)].set(od, mode="drop")
        rows = jnp.nonzero(chunk, size=B, fill_value=0)[0]

        def chunk_row(c, o):
            r = rows[c]
            mine = live & (seq == r)
            return jnp.where(mine[:, None, None, None], one_row(r, mine, True), o)

        o = jax.lax.fori_loop(0, chunk.sum(), chunk_row, o)
    return o.reshape(T, N, H).astype(q.dtype)
