"""The mixture-of-experts grouped matmul on Hopper GPUs: jax's Mosaic GPU ragged dot.

`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` runs one persistent CTA per SM over (row tile, column tile)
pairs of every group: a group's row tiles are brought in by TMA, multiplied by wgmma against that group's weight
tiles, and stored back through a ladder of TMA descriptors that writes the group's own rows only (rows of a tile
that belong to another group are computed, not written). Each expert's weight is read once per row tile of its
group. The kernel sizes its grid for an H100 SXM's 132 SMs.

    x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] (summing to M) -> [M, N] in x's dtype

`grouped_matmul_reference` is the same product in jnp (`jax.lax.ragged_dot`, float32 accumulation): what the
model runs everywhere else and what CI checks the dispatch against; the Mosaic kernel itself runs only on a Hopper
GPU (benchmarks/moe_gemm_gpu.py checks and times it there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import hopper_ops

CONFIG = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def fits(K: int, N: int, config: dict | None = None) -> bool:
    """Whether a weight [G, K, N] tiles evenly (rows need not: the last row tile of a group is masked)."""
    c = config or CONFIG
    return K % c["block_k"] == 0 and N % (c["block_n"] * c["grid_block_n"]) == 0


@functools.cache
def available() -> bool:
    """The default device is a Hopper GPU (compute capability 9.x) and jax's kernel imports there."""
    return hopper_ops.available("ragged_dot_mgpu", "ragged dot", "the experts' grouped matmuls take jax.lax.ragged_dot")


@functools.partial(jax.jit, static_argnames=("config_items",))
def _grouped_matmul(x, w, group_sizes, config_items):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes.astype(jnp.int32), **dict(config_items))


def grouped_matmul(x, w, group_sizes, *, config: dict | None = None):
    """x [M, K] times w [G, K, N] by groups of rows (group_sizes [G]): [M, N] in x's dtype (Hopper only)."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul takes x [M, K], w [G, K, N], group_sizes [G]; got {x.shape}, {w.shape}, "
                         f"{group_sizes.shape}")
    c = config or CONFIG
    if not fits(w.shape[1], w.shape[2], c):
        raise ValueError(f"weight {w.shape} does not tile by {c['block_k']} inputs x "
                         f"{c['block_n'] * c['grid_block_n']} outputs")
    return _grouped_matmul(x, w.astype(x.dtype), group_sizes, tuple(sorted(c.items())))


def grouped_matmul_reference(x, w, group_sizes):
    """The same product in jnp: `jax.lax.ragged_dot` accumulated in float32, cast to x's dtype."""
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(x.dtype)
