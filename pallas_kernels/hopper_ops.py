"""Whether one of jax's Mosaic GPU ops (`jax.experimental.pallas.ops.gpu.<name>`) can run here: the kernel wrappers
for Hopper GPUs (int8_matmul_hopper, grouped_matmul_hopper) ask this before dispatching to them."""

from __future__ import annotations

import importlib
import warnings

import jax


def available(op: str, what: str, fallback: str) -> bool:
    """The default device is a Hopper GPU (compute capability 9.x) and jax's op `op` imports there; else False, with a
    warning naming `what` failed to import and the `fallback` taken instead when the GPU is a Hopper."""
    d = jax.devices()[0]
    if d.platform != "gpu" or not str(getattr(d, "compute_capability", "0")).startswith("9"):
        return False
    try:
        importlib.import_module(f"jax.experimental.pallas.ops.gpu.{op}")
    except Exception as e:  # noqa: BLE001 - an older jax, or a missing import of its own
        warnings.warn(f"jax's Mosaic GPU {what} is not importable ({type(e).__name__}: {e}); {fallback}", stacklevel=3)
        return False
    return True
