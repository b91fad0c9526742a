"""The engine's one attention dispatch point: which ragged paged-attention implementation runs.

All implementations share the contract documented in `pallas_kernels.ragged_paged_attention`:
  reference  dense jnp oracle (tests; small shapes only)
  xla        blocked online-softmax jnp; what CPUs run
  tpu        Pallas Mosaic TPU kernel (`pallas_kernels.ragged_paged_attention_tpu`)
  gpu        Pallas GPU kernel (`pallas_kernels.ragged_paged_attention_gpu`), when present
`auto` picks the kernel of the backend, and `xla` elsewhere. `interpret=True` runs a Pallas kernel through
the Pallas interpreter, so the kernel path can be exercised end to end on a CPU.

On a mesh (tensor parallelism) every implementation runs per device under `jax.shard_map`: each device holds its
kv heads (the cache's and the step's queries, keys and values, split along the kv-head axis) and attends over
them alone; the metadata is replicated. No collective: the output projection after it sums the devices' heads.
"""

from __future__ import annotations

import functools
import importlib

import jax
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ModelConfig
from pallas_kernels import ragged_paged_attention as rpa

_KERNELS = {  # name -> (module, function): imported on first use
    "tpu": ("pallas_kernels.ragged_paged_attention_tpu", "ragged_paged_attention_tpu"),
    "gpu": ("pallas_kernels.ragged_paged_attention_gpu", "ragged_paged_attention_gpu"),
}
IMPLEMENTATIONS = ("reference", "xla", *_KERNELS)
_BACKEND_KERNEL = {"tpu": "tpu", "gpu": "gpu"}  # H100: the Triton-lowered kernel is 2.4x the jnp form end to end


def select_impl(requested: str, backend: str) -> str:
    if requested == "auto":
        return _BACKEND_KERNEL.get(backend, "xla")
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {['auto', *IMPLEMENTATIONS]}, got {requested!r}")
    return requested


def get_op(impl: str):
    if impl == "reference":
        return rpa.ragged_paged_attention_reference
    if impl == "xla":
        return rpa.ragged_paged_attention_xla
    module, name = _KERNELS[impl]
    return getattr(importlib.import_module(module), name)


def make_attention_fn(cfg: ModelConfig, impl: str, interpret: bool = False, mesh=None):
    """(qkv [T, K, G + 2, H], k_pages, v_pages, meta: AttentionMetadata, decode=False, window=the model's) -> (out
    [T, N, H], k_pages, v_pages): qkv holds per kv head its G query heads, then the step's new key and value (the model's fused
    projection, rope applied); the new K/V are written into their slots, then attention runs. mesh: run it per
    device over the kv heads (module docstring)."""
    chosen = select_impl(impl, jax.default_backend())
    kwargs = dict(sm_scale=cfg.attn_scale)
    if chosen in _KERNELS:
        kwargs["interpret"] = interpret
    base_op = functools.partial(get_op(chosen), **kwargs)

    def attention(qkv, k_pages, v_pages, meta, decode: bool = False, window: int | None = cfg.sliding_window):
        op = functools.partial(base_op, sliding_window=window)  # a layer's own window (Gemma 3's local / global)
        # decode: every live sequence has one query token (a decode bucket); only the GPU kernel uses it: its
        # decode kernel writes the new K/V itself (no scatter before it), and in a mixed step it takes the
        # one-token sequences. The GPU kernels read the queries out of qkv in place (no copy of them per layer).
        # An 8-bit cache: qkv's key and value are already in the cache's units, and its scales are applied around
        # the op (model._attention_block), so the op reads the stored numbers as they are.
        args = (meta.page_tables, meta.kv_lens, meta.cu_q_lens, meta.num_seqs)
        if chosen == "gpu" and decode:
            return op(qkv, k_pages, v_pages, *args, decode_only=True, fused_qkv=True)
        T, K, G2, H = qkv.shape
        k_pages, v_pages = rpa.write_kv(k_pages, v_pages, qkv[:, :, G2 - 2], qkv[:, :, G2 - 1], meta.slot_mapping)
        if chosen == "gpu":
            return op(qkv, k_pages, v_pages, *args, split_decodes=True, fused_qkv=True), k_pages, v_pages
        q = qkv[:, :, : G2 - 2].reshape(T, K * (G2 - 2), H)
        extra = {"decode_only": True} if decode and chosen == "xla" else {}  # one token per row
        return op(q, k_pages, v_pages, *args, **extra), k_pages, v_pages

    axis = rpa_axis(mesh)
    if axis is None:
        return attention
    heads = P(None, axis)  # qkv [T, K, ...], pages [P, K, ...], out [T, N, H]: the second axis split

    def per_device(qkv, k_pages, v_pages, meta, decode: bool = False, window: int | None = cfg.sliding_window):
        fn = jax.shard_map(functools.partial(attention, decode=decode, window=window), mesh=mesh,
                           in_specs=(heads, heads, heads, P()),
                           out_specs=(heads, heads, heads), check_vma=False)
        return fn(qkv, k_pages, v_pages, meta)

    return per_device


def rpa_axis(mesh) -> str | None:
    """The mesh axis that splits the kv heads, when it has more than one device; else None."""
    from jaxinfer.model import SHARDING_RULES, tp_size

    return SHARDING_RULES["kv_heads"] if tp_size(mesh) > 1 else None
