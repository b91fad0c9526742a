"""The Hopper int8 path (pallas_kernels/int8_matmul_hopper): which weights and steps take it, and the wrapper's own
arithmetic (token padding, the transposes, the per-channel scale) with jax's Mosaic kernel swapped for the jnp
product it computes. The Mosaic kernel itself runs only on a Hopper GPU (benchmarks/mixed_matmul_gpu.py checks it)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import quant
from pallas_kernels import int8_matmul_hopper as hop


def _int8_weight(rng, O, I):
    h = quant.QUANTIZERS["int8"](rng.standard_normal((O, I)).astype(np.float32) * 0.1)
    return jax.tree.map(jnp.asarray, quant.to_device_form(h, (I,)))


@pytest.fixture
def kernel_as_jnp(monkeypatch):
    """jax's mixed-type kernel replaced by the product it computes: (a as b's dtype) @ b, out_dtype."""
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mm

    calls = []

    def fake(a, b, *, out_dtype, config):
        calls.append((a.shape, b.shape, config))
        assert a.dtype == jnp.int8 and b.dtype == jnp.bfloat16
        assert b.shape[1] % (config.tile_n * 2) == 0  # tokens padded to whole tiles
        return jnp.dot(a.astype(b.dtype), b, preferred_element_type=jnp.float32).astype(out_dtype)

    monkeypatch.setattr(mm, "mixed_matmul_kernel", fake)
    hop._int8_matmul.clear_cache()
    yield calls
    hop._int8_matmul.clear_cache()


@pytest.mark.parametrize("M", [65, 128, 300])
def test_wrapper_matches_reference(kernel_as_jnp, M):
    rng = np.random.default_rng(M)
    w = _int8_weight(rng, 256, 256)
    x = jnp.asarray(rng.standard_normal((M, 256)), jnp.bfloat16)
    got = np.asarray(hop.int8_matmul(x, w.q, w.scales))
    want = np.asarray(hop.int8_matmul_reference(x, w.q, w.scales))
    assert got.shape == (M, 256) and kernel_as_jnp
    np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max(), rtol=0)  # the kernel's bf16 output


def test_qmatmul_takes_it_for_large_int8_steps(kernel_as_jnp, monkeypatch):
    """quant.qmatmul on a Hopper GPU (forced here): per-channel int8 steps above the Pallas kernel's range go to the
    Mosaic kernel, with the fused weight's output shape kept, and give the dequantized product."""
    monkeypatch.setattr(quant, "_hopper_available", lambda: True)
    rng = np.random.default_rng(1)
    w = _int8_weight(rng, 2 * 128, 256)
    w = dataclasses.replace(w, q=w.q.reshape(2, 128, 256), scales=w.scales.reshape(2, 128, 1))
    T = quant.HOPPER_INT8_MIN_TOKENS
    x = jnp.asarray(rng.standard_normal((T, 256)), jnp.bfloat16)
    got = quant.qmatmul(x, w, backend="gpu")
    assert len(kernel_as_jnp) == 1 and got.shape == (T, 2, 128)
    want = jnp.einsum("ti,oi->to", x.astype(jnp.float32), quant.dequantize(w).reshape(256, 256),
                      precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(got, np.float32).reshape(T, 256), np.asarray(want),
                               atol=2e-2 * float(jnp.abs(want).max()), rtol=0)


def test_dispatch_rules():
    rng = np.random.default_rng(2)
    w = _int8_weight(rng, 256, 256)
    T = quant.HOPPER_INT8_MIN_TOKENS
    assert T > quant.GPU_KERNEL_MAX_TOKENS["int"]  # below it the Pallas kernel runs
    assert quant._hopper_int8(w, T, "gpu", hopper=True)
    assert not quant._hopper_int8(w, T, "gpu", hopper=False)  # not a Hopper GPU
    assert not quant._hopper_int8(w, T - 1, "gpu", hopper=True)
    assert not quant._hopper_int8(w, T, "cpu", hopper=True) and not quant._hopper_int8(w, T, "tpu", hopper=True)
    assert not quant._hopper_int8(_int8_weight(rng, 96, 256), T, "gpu", hopper=True)  # 96 channels: no whole tile
    assert not quant._hopper_int8(dataclasses.replace(w, act="int8"), T, "gpu", hopper=True)  # W8A8
    assert not quant._hopper_int8(dataclasses.replace(w, zeros=w.scales), T, "gpu", hopper=True)
    for scheme in ("int4", "fp8"):
        h = quant.QUANTIZERS[scheme](rng.standard_normal((256, 256)).astype(np.float32))
        assert not quant._hopper_int8(jax.tree.map(jnp.asarray, quant.to_device_form(h, (256,))), T, "gpu", hopper=True)


def test_bad_inputs_are_refused():
    q = jnp.zeros((256, 256), jnp.int8)
    s = jnp.ones((256, 1), jnp.float32)
    with pytest.raises(ValueError, match="int8_matmul takes"):
        hop.int8_matmul(jnp.zeros((4, 128), jnp.bfloat16), q, s)
    with pytest.raises(ValueError, match="int8_matmul takes"):
        hop.int8_matmul(jnp.zeros((4, 256), jnp.bfloat16), q.astype(jnp.uint8), s)
    with pytest.raises(ValueError, match="does not tile"):
        hop.int8_matmul(jnp.zeros((4, 256), jnp.bfloat16), q[:96], s[:96])
