"""The engine's one attention dispatch point: which ragged paged-attention implementation runs.

All implementations share the signature documented in `pallas_kernels.ragged_paged_attention`.
`auto` picks per backend; today every backend runs the blocked jnp form (`xla`), and the Pallas kernels
plug in here behind the same call.
"""

from __future__ import annotations

import functools

import jax

from jaxinfer.config import ModelConfig
from pallas_kernels import ragged_paged_attention as rpa

IMPLEMENTATIONS = {
    "reference": rpa.ragged_paged_attention_reference,
    "xla": rpa.ragged_paged_attention_xla,
}


def select_impl(requested: str, backend: str | None = None) -> str:
    if requested != "auto":
        if requested not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {['auto', *IMPLEMENTATIONS]}, got {requested!r}")
        return requested
    return "xla"


def make_attention_fn(cfg: ModelConfig, impl: str):
    """(q [T, N, H], k_pages, v_pages, meta: AttentionMetadata) -> [T, N, H]."""
    op = functools.partial(
        IMPLEMENTATIONS[select_impl(impl, jax.default_backend())],
        sm_scale=cfg.head_dim**-0.5,
        sliding_window=cfg.sliding_window,
    )

    def attention(q, k_pages, v_pages, meta):
        return op(q, k_pages, v_pages, meta.page_tables, meta.kv_lens, meta.cu_q_lens, meta.num_seqs)

    return attention
