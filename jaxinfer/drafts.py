"""Speculative decoding's proposers on the device: a draft model's programs and an EAGLE head's (spec_decode.py has
the host side, runner.py launches these).

A draft model (method draft_model) has two kinds of programs, over its own weights and its own paged KV cache (as
many pages as the target's, the same page ids and device page table):
        draft[(T, B)]                  (draft params, draft kv, table, input) -> draft kv
runs every step's input through the draft model as well (launched after the target's step), so its cache holds
every position the target's does, and
        draft_propose[(B, variant)]    (draft params, draft kv, sampler state, table, input) -> drafts [B, k], kv, table
runs k single-token decode steps (a `lax.scan`) for the rows that speculate, before the step that verifies them: each
samples with that row's sampling at its output position (`sampler.sample`, same key as the target's there) and feeds
the token to the next. A row with fewer drafts than k stops writing K/V after its last one. Speculation runs each
step to the end, so these programs read every input token from the host.

An EAGLE head (method eagle, eagle.py) predicts features, not tokens; the same two kinds of programs:
        draft[(T, B)]                  (head, target params, head kv, feats, table, input, h [T, D], sampled [B],
                                        eagle input) -> head kv, feats
takes the target's step: at each token row, the target's feature there (h after its final norm) and the token after
it (the next input token, or the token the step sampled for that row: for a verify row, the target's own token, so
an accepted row's pair is right and the first rejected row's too) go through the head, writing its K/V at that
position. Its predicted next features of each sequence's last k + 1 rows are kept per sampler slot in `feats`
[S + 1, k + 1, D] (row S: padding), as one of them follows the position the verify step ends on;
        draft_propose[(B, variant)]    (head, target params, head kv, sampler state, table, input, feats)
                                        -> drafts [B, k], kv, table
draws the first draft from the kept feature of the sequence's last position (the target's lm_head on it), then
k - 1 times feeds (draft, predicted feature) through the head for the next.

An EAGLE-3 head (method eagle3) has the same programs, with two differences: the step's program takes, instead of
h, the target's three hidden states it reads ([T, 3D], a fourth output of the target's forward program: see
runner.make_forward_fn) and fuses them (fc) into the feature of each row; and a draft is drawn from the head's own
lm_head over its draft vocabulary (eagle.eagle3_logits), from the head's output, which is also what is kept and fed
back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer import sampler as sampling
from jaxinfer.config import ModelConfig
from jaxinfer.eagle import Eagle3Spec, eagle3_forward, eagle3_fuse, eagle3_logits, eagle_forward, eagle_logits
from jaxinfer.model import AttentionMetadata, KVCache, Params, compute_logits, forward, pytree_dataclass, rms_norm
from jaxinfer.step_input import StepInput, set_pages, unpack


@pytree_dataclass
class ProposeInput:
    """A proposal program's input, per row b of a sequence bucket B (padding rows: num_drafts 0)."""

    token_ids: Any  # [B] int32 draft model: the row's last token (its K/V not in the draft cache yet)
    prev_ids: Any  # [B] int32 draft model: the token before it (its K/V rewritten: it may be missing, see below)
    feat_src: Any  # [B] int32 EAGLE: the kept feature of the position before it, slot * (k + 1) + j
    positions: Any  # [B] int32 draft model: the last token's position; EAGLE: the one before (the drafts' pairs follow)
    row_slot: Any  # [B] int32 page-table row
    num_drafts: Any  # [B] int32 draft tokens the row proposes (<= k); 0: a padding row
    num_seqs: Any  # [] int32 rows that propose (the first ones)
    new_slot: Any  # [U] int32 page-table entries to set first (as StepInput's)
    new_col: Any  # [U] int32
    new_page: Any  # [U] int32


def _draft_step(inp, page_tables, cu_q_lens, j, page_size: int, num_pages: int):
    """Positions [B] and attention metadata of a proposal loop's step j, one token per row at its position + j: a row
    past its drafts repeats its last position and writes nothing (its cache slot is the dropped one)."""
    pos = inp.positions + jnp.minimum(j, jnp.maximum(inp.num_drafts - 1, 0))  # [B]
    page = jnp.take_along_axis(page_tables, (pos // page_size)[:, None], axis=1)[:, 0]
    return pos, AttentionMetadata(
        slot_mapping=jnp.where(j < inp.num_drafts, page * page_size + pos % page_size, num_pages * page_size),
        page_tables=page_tables,
        kv_lens=jnp.where(inp.num_drafts > 0, pos + 1, 0),
        cu_q_lens=cu_q_lens,
        num_seqs=inp.num_seqs,
    )


def make_draft_forward_fn(cfg: ModelConfig, attn_fn, template: StepInput):
    """A step's input through the draft model, for its K/V only: (params, kv, table, flat) -> kv. The table is read
    (with the step's new entries, as the target's program sets them), not returned."""

    def draft_step(params: Params, kv: KVCache, table, flat):
        inp = unpack(flat, template)
        table = set_pages(table, inp.new_slot, inp.new_col, inp.new_page)
        attn = dataclasses.replace(inp.attn, page_tables=jnp.take(table, inp.row_slot, axis=0))
        _, kv = forward(params, cfg, jnp.maximum(inp.token_ids, 0), inp.positions, kv, attn, attn_fn)
        return kv

    return draft_step


def make_propose_fn(cfg: ModelConfig, attn_fns, template, k: int, page_size: int, num_pages: int, variant: str):
    """The draft model's k steps: (params, kv, sampler state, table, flat) -> drafts [B, k], kv, table. attn_fns:
    (mixed, decode) attention. Step 0 feeds each row's last two tokens (positions - 1 and positions: a ragged step
    of two tokens a row) and samples the first draft at output position md.position; step j >= 1 feeds draft j at
    position + j and samples md.position + j. Rewriting the token before the last lets a step that carried drafts
    leave its draft forward out (runner.launch): all its drafts accepted, the draft cache lacks only the last one."""
    mixed_attn, decode_attn = attn_fns

    def propose(params: Params, kv: KVCache, sstate, table, flat):
        inp, md = unpack(flat, template)
        table = set_pages(table, inp.new_slot, inp.new_col, inp.new_page)
        page_tables = jnp.take(table, inp.row_slot, axis=0)  # [B, M]
        B = inp.token_ids.shape[0]
        cu_q_lens = jnp.minimum(jnp.arange(B + 1, dtype=jnp.int32), inp.num_seqs)

        def sample(h, j):
            out, _ = sampling.sample(compute_logits(params, cfg, h), dataclasses.replace(md, position=md.position + j),
                                     sstate, variant=variant, max_logprobs=0)
            return out.token_ids

        live = inp.num_drafts > 0  # [B]
        pos2 = jnp.maximum(jnp.stack([inp.positions - 1, inp.positions], axis=1), 0)  # [B, 2]
        page = jnp.take_along_axis(page_tables, pos2 // page_size, axis=1)
        attn0 = AttentionMetadata(
            slot_mapping=jnp.where(live[:, None], page * page_size + pos2 % page_size, num_pages * page_size).reshape(-1),
            page_tables=page_tables, kv_lens=jnp.where(live, inp.positions + 1, 0), cu_q_lens=2 * cu_q_lens,
            num_seqs=inp.num_seqs)
        tokens2 = jnp.stack([inp.prev_ids, inp.token_ids], axis=1).reshape(-1)
        h, kv = forward(params, cfg, tokens2, pos2.reshape(-1), kv, attn0, mixed_attn)  # [2B, D]
        d0 = sample(h[1::2], 0)

        def one(carry, j):
            tokens, kv = carry
            pos, attn = _draft_step(inp, page_tables, cu_q_lens, j, page_size, num_pages)
            h, kv = forward(params, cfg, tokens, pos, kv, attn, decode_attn)  # [B, D]
            d = sample(h, j)
            return (d, kv), d

        (_, kv), rest = jax.lax.scan(one, (d0, kv), jnp.arange(1, k, dtype=jnp.int32))  # [k - 1, B]
        return jnp.concatenate([d0[None], rest]).T, kv, table

    return propose


@dataclass
class DraftModel:
    """A proposer in the runner: a draft model's or an EAGLE head's (eagle) config, weights and KV cache (abstract
    until the engine allocates it), and the drafts it proposes per speculating row. An EAGLE head also keeps its
    predicted features (`feats`, see the module docstring) and, per sampler slot, which request wrote them last and
    the position of their first row."""

    cfg: ModelConfig
    params: Any  # Params, or eagle.EagleParams
    kv: Any
    num_speculative_tokens: int
    eagle: bool = False
    eagle3: Eagle3Spec | None = None  # an EAGLE-3 head (eagle is True too)
    feats: Any = None  # eagle: [S + 1, k + 1, D]
    feat_owner: dict = dataclasses.field(default_factory=dict)  # eagle: slot -> (request id, first row's position)


def make_eagle_step_fn(cfg: ModelConfig, target_cfg: ModelConfig, attn_fn, template: StepInput,
                       eagle3: Eagle3Spec | None = None):
    """An EAGLE head over a step's rows (see the module docstring): (head, target params, head kv, feats, table,
    flat, h [T, D] (EAGLE-3: the target's three hidden states [T, 3D]), sampled [B], next_ids [T], feat_dst [T]) ->
    head kv, feats. next_ids: the token after each token row, >= 0 an id, -(r + 1) the step's sampled row r;
    feat_dst: where a row's predicted feature is kept, slot * (k + 1) + j (out of range: not kept)."""

    def eagle_step(ep, tp: Params, kv: KVCache, feats, table, flat, h, sampled, next_ids, feat_dst):
        inp = unpack(flat, template)
        table = set_pages(table, inp.new_slot, inp.new_col, inp.new_page)
        attn = dataclasses.replace(inp.attn, page_tables=jnp.take(table, inp.row_slot, axis=0))
        tokens = jnp.where(next_ids >= 0, next_ids, jnp.take(sampled, jnp.maximum(-next_ids - 1, 0)))
        if eagle3 is not None:
            pred, kv = eagle3_forward(ep, tp, cfg, eagle3, tokens, eagle3_fuse(ep, h), inp.positions, kv, attn,
                                      attn_fn)
        else:
            f = rms_norm(h, tp.final_norm, target_cfg.rms_norm_eps)  # [T, D] the target's features
            pred, kv = eagle_forward(ep, tp, cfg, tokens, f.astype(h.dtype), inp.positions, kv, attn, attn_fn)
        S1, K1, D = feats.shape
        feats = feats.reshape(S1 * K1, D).at[feat_dst].set(pred.astype(feats.dtype), mode="drop")
        return kv, feats.reshape(S1, K1, D)

    return eagle_step


def make_eagle_propose_fn(cfg: ModelConfig, attn_fn, template, k: int, page_size: int, num_pages: int, variant: str,
                          eagle3: Eagle3Spec | None = None, vocab_size: int = 0):
    """An EAGLE head's k drafts: (head, target params, head kv, sampler state, table, flat, feats) -> drafts [B, k],
    kv, table. Draft j + 1 comes from the feature predicted after draft j (the first: from the kept one).
    EAGLE-3: its own lm_head over the draft vocabulary, mapped to the target's vocabulary of vocab_size ids."""

    def logits_of(ep, tp, f):
        return eagle3_logits(ep, cfg, vocab_size, f) if eagle3 is not None else eagle_logits(tp, f)

    def head(ep, tp, tokens, f, pos, kv, attn):
        if eagle3 is not None:
            return eagle3_forward(ep, tp, cfg, eagle3, tokens, f, pos, kv, attn, attn_fn)
        return eagle_forward(ep, tp, cfg, tokens, f, pos, kv, attn, attn_fn)


    def propose(ep, tp: Params, kv: KVCache, sstate, table, flat, feats):
        inp, md = unpack(flat, template)
        table = set_pages(table, inp.new_slot, inp.new_col, inp.new_page)
        page_tables = jnp.take(table, inp.row_slot, axis=0)  # [B, M]
        B = inp.positions.shape[0]
        cu_q_lens = jnp.minimum(jnp.arange(B + 1, dtype=jnp.int32), inp.num_seqs)
        f0 = jnp.take(feats.reshape(-1, feats.shape[-1]), inp.feat_src, axis=0)  # [B, D]

        def draw(f, j):
            out, _ = sampling.sample(logits_of(ep, tp, f), dataclasses.replace(md, position=md.position + j), sstate,
                                     variant=variant, max_logprobs=0)
            return out.token_ids

        def one(carry, j):
            tokens, f, kv = carry
            pos, attn = _draft_step(inp, page_tables, cu_q_lens, j, page_size, num_pages)  # the pair (draft j, ...)
            f, kv = head(ep, tp, tokens, f, pos, kv, attn)  # [B, D]
            d = draw(f, j)
            return (d, f, kv), d

        d0 = draw(f0, 0)
        (_, _, kv), rest = jax.lax.scan(one, (d0, f0, kv), jnp.arange(1, k, dtype=jnp.int32))  # [k - 1, B]
        return jnp.concatenate([d0[None], rest]).T, kv, table

    return propose
