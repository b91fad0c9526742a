"""A step's input as the host builds it and as its programs take it: `StepInput`, packed into one int32 buffer.

The numpy form (`ModelRunner.prepare` fills it, padded to a (T, B) bucket) becomes ONE flat int32 array (`pack`: a
single host-to-device copy), which each program unpacks against the ShapeDtypeStructs it was lowered with (`unpack`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxinfer.model import AttentionMetadata, pytree_dataclass


@pytree_dataclass
class StepInput:
    token_ids: Any  # [T] int32; -1: the sequence's last sampled token, still on the device
    positions: Any  # [T] int32
    token_slot: Any  # [T] int32 sampler-state row of each token's sequence; padding: S
    is_prompt: Any  # [T] bool   token belongs to the prompt (else: an earlier output re-entering)
    reset_slot: Any  # [B] int32 rows to clear before this step (first chunk, no prefix-cache hit); else S
    logits_indices: Any  # [B] int32 token row whose hidden state is sampled for each sequence
    row_slot: Any  # [B] int32 page-table row (sampler slot) of each sequence; padding rows: 0
    new_slot: Any  # [U] int32 page-table entries to set before the step: row, padding S (dropped) ...
    new_col: Any  # [U] int32 ... column (page index in the sequence) ...
    new_page: Any  # [U] int32 ... and page id
    attn: AttentionMetadata  # page_tables None here: the program gathers them from the device table


def pack(tree) -> np.ndarray:
    """A pytree of numpy arrays (int32 / uint32 / float32 / bool) -> one flat int32 array."""
    parts = []
    for x in jax.tree_util.tree_leaves(tree):
        x = np.asarray(x)
        parts.append((x.astype(np.int32) if x.dtype == np.bool_ else x.view(np.int32)).ravel())
    return np.concatenate(parts)


def unpack(flat: jax.Array, template):
    """Inverse of `pack`, inside jit: `template` is the pytree of ShapeDtypeStructs it was packed from."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    out, offset = [], 0
    for leaf in leaves:
        n = math.prod(leaf.shape)
        x = flat[offset : offset + n].reshape(leaf.shape)
        offset += n
        if leaf.dtype == np.bool_:
            x = x != 0
        elif leaf.dtype != np.int32:
            x = jax.lax.bitcast_convert_type(x, leaf.dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract(tree):
    """The pytree's ShapeDtypeStructs (what a program is lowered against)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)


def set_pages(table, slots, cols, pages):
    """The device page table [S, M] with pages set at (slots, cols); entries with slot S are padding (dropped)."""
    return table.at[slots, cols].set(pages, mode="drop")
