"""int8 weights (per output channel) times bf16 activations on many-token steps, on Hopper GPUs.

The product runs jax's Mosaic GPU mixed-type matmul (`jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu`:
tiles brought in by TMA, the int8 tile converted in registers and fed to wgmma as its left operand), with the weight
as the left operand ([N, K] as stored) and x^T [K, M] as the right one, so no dequantized copy of the weight is
written and each weight byte is read once per tile of tokens. The per-channel scale and the transpose back to
[M, N] are one XLA fusion after it.

    x [M, K] bf16, q [N, K] int8, scales [N, 1] -> [M, N] float32

`int8_matmul_reference` is the same product in jnp (what CI checks the wrapper's arithmetic against; the Mosaic
kernel itself runs only on a Hopper GPU: benchmarks/mixed_matmul_gpu.py checks it there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import hopper_ops

# Tiles: the kernel's M is our N (output channels), its N our tokens. Two compute warpgroups split the tokens
# (wg_dimension N), so a CTA covers 2 * tile_n tokens.
CONFIG = dict(tile_m=128, tile_n=64, tile_k=128, max_concurrent_steps=4, wg_dimension="N", grid_minor_dim="M",
              grid_tile_width=8, epi_tile_m=64, epi_tile_n=64)


def tokens_per_tile(config: dict | None = None) -> int:
    c = config or CONFIG
    return c["tile_n"] * (2 if c["wg_dimension"] == "N" else 1)


def channels_per_tile(config: dict | None = None) -> int:
    c = config or CONFIG
    return c["tile_m"] * (2 if c["wg_dimension"] == "M" else 1)


def fits(N: int, K: int, config: dict | None = None) -> bool:
    """Whether a weight [N, K] tiles evenly (tokens are padded to `tokens_per_tile`)."""
    c = config or CONFIG
    return N % channels_per_tile(c) == 0 and K % c["tile_k"] == 0


def available() -> bool:
    """The default device is a Hopper GPU (compute capability 9.x) and jax's kernel imports there (else a warning:
    int8 steps of many tokens then take XLA's slower form)."""
    return hopper_ops.available("hopper_mixed_type_matmul_mgpu", "mixed-type matmul", "int8 weights on many-token "
                                "steps take XLA's form (absl-py missing? pip install 'jaxinfer[gpu]')")


@functools.partial(jax.jit, static_argnames=("config_items",))
def _int8_matmul(x, q, scales, config_items):
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mm

    c = dict(config_items)
    D = mm.MatmulDimension
    cfg = mm.TuningConfig(**{**c, "wg_dimension": D[c["wg_dimension"]], "grid_minor_dim": D[c["grid_minor_dim"]]})
    M = x.shape[0]
    Mp = -(-M // tokens_per_tile(c)) * tokens_per_tile(c)
    xt = jnp.pad(x.astype(jnp.bfloat16), ((0, Mp - M), (0, 0))).T  # [K, Mp]
    y = mm.mixed_matmul_kernel(q, xt, out_dtype=jnp.bfloat16, config=cfg)  # [N, Mp]
    return (y[:, :M].astype(jnp.float32) * scales.astype(jnp.float32)).T


def int8_matmul(x, q, scales, *, config: dict | None = None):
    """x [M, K] times the int8 weight q [N, K] with per-channel scales [N, 1]: [M, N] float32 (Hopper only)."""
    if q.dtype != jnp.int8 or scales.shape != (q.shape[0], 1) or x.shape[1] != q.shape[1]:
        raise ValueError(f"int8_matmul takes x [M, K], q [N, K] int8, scales [N, 1]; got {x.shape}, {q.shape} {q.dtype}, "
                         f"{scales.shape}")
    c = config or CONFIG
    if not fits(q.shape[0], q.shape[1], c):
        raise ValueError(f"weight {q.shape} does not tile by {channels_per_tile(c)} channels x {c['tile_k']} inputs")
    return _int8_matmul(x, q, scales, tuple(sorted(c.items())))


def int8_matmul_reference(x, q, scales):
    """The same product in jnp: the values' dot in float32, then the scales."""
    y = jnp.dot(x.astype(jnp.float32), q.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return y * scales.astype(jnp.float32).T
