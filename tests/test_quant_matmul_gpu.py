"""The GPU quantized matmul (pallas_kernels/quant_matmul_gpu) against its jnp reference, through the Pallas
interpreter; and `quant.qmatmul`'s GPU dispatch, run the same way, against the dequantize-then-matmul reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import quant
from pallas_kernels.quant_matmul_gpu import default_config, op_reference, quant_matmul


def _inputs(rng, M, N, K, bits, group, zeros, mins, x_scale, qkind, dtype):
    Q = K // group
    if bits == 4:
        q = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    elif qkind == "fp8":
        q = (rng.standard_normal((N, K)) * 50).astype(quant.FP8)
    elif qkind == "uint8":
        q = rng.integers(0, 256, (N, K), dtype=np.uint8)
    else:
        q = rng.integers(-127, 128, (N, K), dtype=np.int8)
    s = (rng.random((N, Q)) * 0.02 + 1e-3).astype(np.float32)
    z = rng.integers(0, 16 if bits == 4 else 256, (N, Q)).astype(np.float32) if zeros else None
    m = (rng.standard_normal((N, Q)) * 0.01).astype(np.float16) if mins else None
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    xs = jnp.asarray(rng.random(M) + 0.5, jnp.float32) if x_scale else None
    return x, jnp.asarray(q), jnp.asarray(s), None if z is None else jnp.asarray(z), None if m is None else jnp.asarray(m), xs


# (M, N, K, bits, group, zeros, mins, x_scale, q kind, dtype, tile overrides)
CASES = [
    (1, 96, 256, 4, 128, True, False, False, None, jnp.float32, {}),
    (1, 96, 256, 4, 128, True, False, False, None, jnp.bfloat16, {}),  # the nibble-as-float path
    (5, 80, 512, 4, 64, False, True, False, None, jnp.bfloat16, dict(splits=2)),  # mins (GGUF Q4_1), split-K
    (3, 64, 512, 4, 512, True, False, False, None, jnp.float16, dict(splits=2, block_k=128)),  # per channel, split
    (3, 64, 256, 4, 256, False, False, True, None, jnp.float32, {}),  # no zero point, per-row x scale
    (33, 130, 512, 4, 32, True, False, False, None, jnp.float32, dict(block_k=128)),  # 2 row tiles, N % bn != 0
    (17, 64, 256, 8, 256, False, False, False, "int8", jnp.bfloat16, {}),
    (2, 64, 512, 8, 128, True, True, False, "uint8", jnp.float32, {}),
    (2, 64, 256, 8, 256, False, False, True, "fp8", jnp.bfloat16, {}),
    (4, 48, 1024, 8, 1024, False, False, False, "int8", jnp.bfloat16, dict(splits=4, block_k=128)),
    # the weights as the dots' left operand: the accumulator is [bn, bm]
    (1, 96, 256, 4, 128, True, False, False, None, jnp.bfloat16, dict(weights_first=True)),
    (33, 130, 512, 4, 32, True, True, True, None, jnp.float32, dict(weights_first=True, block_k=128)),
    (3, 64, 512, 8, 512, False, False, True, "fp8", jnp.bfloat16, dict(weights_first=True, splits=2)),
    # bytes made floats through float32's mantissa: signed, unsigned with zero points, the weights-first form
    (17, 64, 256, 8, 256, False, False, False, "int8", jnp.bfloat16, dict(bytes_via_f32=True)),
    (2, 64, 512, 8, 128, True, True, False, "uint8", jnp.bfloat16, dict(bytes_via_f32=True)),
    (4, 48, 1024, 8, 1024, False, False, True, "int8", jnp.float16, dict(bytes_via_f32=True, weights_first=True)),
]


@pytest.mark.parametrize("M,N,K,bits,group,zeros,mins,x_scale,qkind,dtype,tiles", CASES)
def test_kernel_matches_reference(M, N, K, bits, group, zeros, mins, x_scale, qkind, dtype, tiles):
    rng = np.random.default_rng(M * 1000 + K + bits)
    args = _inputs(rng, M, N, K, bits, group, zeros, mins, x_scale, qkind, dtype)
    got = np.asarray(quant_matmul(*args, bits=bits, group=group, interpret=True, **tiles))
    want = np.asarray(op_reference(*args, bits=bits, group=group))
    assert got.shape == (M, N) and got.dtype == np.float32
    # float32 sums in another order; the 4-bit bf16 / f16 path adds a bias of 128 / 1024 to each value first
    tol = 1e-5 if dtype == jnp.float32 or bits == 8 else (3e-5 if dtype == jnp.bfloat16 else 2e-4)
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


def test_kernel_out_dtype_and_nan_free_padding():
    """Rows padded to the 16-row tile and channels past N never reach the output; out_dtype is honoured."""
    rng = np.random.default_rng(1)
    x, q, s, z, _, _ = _inputs(rng, 1, 70, 256, 4, 128, True, False, False, None, jnp.bfloat16)
    y = quant_matmul(x, q, s, z, bits=4, group=128, interpret=True, out_dtype=jnp.bfloat16)
    assert y.shape == (1, 70) and y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))


def test_kernel_rejects_mismatched_inputs():
    rng = np.random.default_rng(2)
    x, q, s, z, _, _ = _inputs(rng, 1, 64, 256, 4, 128, True, False, False, None, jnp.float32)
    with pytest.raises(ValueError, match="bits"):
        quant_matmul(x, q, s, bits=3, group=128, interpret=True)
    with pytest.raises(ValueError, match="inputs"):
        quant_matmul(x[:, :128], q, s, bits=4, group=128, interpret=True)
    with pytest.raises(ValueError, match="groups"):
        quant_matmul(x, q, s, bits=4, group=64, interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        quant_matmul(x, q, s, bits=4, group=128, block_k=96, interpret=True)


def test_default_config_fills_the_gpu_and_divides_k():
    for M, N, K, bits, group in [(1, 4096, 4096, 4, 128), (1, 4096, 14336, 8, 14336), (16, 28672, 4096, 8, 4096),
                                 (64, 6144, 4096, 4, 128), (1, 96, 256, 4, 128)]:
        c = default_config(M, N, K, bits, group)
        assert K % (c["splits"] * c["block_k"]) == 0 and c["block_m"] >= 16
        assert c["block_k"] % min(group, c["block_k"]) == 0
    # a 1-token step on a 4096-channel weight: 64 tiles, so K is split to give the SMs work
    assert default_config(1, 4096, 4096, 8, 4096)["splits"] > 1


def _weight(scheme, rng, out=(3, 32), I=256):
    w = rng.standard_normal((int(np.prod(out)), I)).astype(np.float32) * 0.1
    h = quant.QUANTIZERS[scheme](w)
    return quant.to_device_form(h, (I,)), w


@pytest.mark.parametrize("scheme,T", [("int4", 1), ("int4", 2), ("int4", 16), ("int8", 1), ("int8", 64), ("fp8", 1),
                                      ("int4", 80), ("int8", 80), ("fp8", 32)])
def test_qmatmul_gpu_dispatch_matches_reference(scheme, T):
    """quant.qmatmul on the GPU path gives the reference's product, for the engine's on-the-fly schemes: T within
    GPU_KERNEL_MAX_TOKENS takes the kernel (interpreted), larger steps XLA's forms (dequantized_dot for int4's
    groups, scaled_after_dot per channel, fp8_dot)."""
    rng = np.random.default_rng(T)
    qw, _ = _weight(scheme, rng)
    qw = jax.tree.map(jnp.asarray, qw)
    lo = quant.GPU_KERNEL_MIN_TOKENS_4BIT if scheme == "int4" else 1
    assert quant._gpu_kernel(qw, T, "gpu") == (lo <= T <= quant.GPU_KERNEL_MAX_TOKENS["fp8" if scheme == "fp8" else "int"])
    x = jnp.asarray(rng.standard_normal((T, 256)), jnp.bfloat16)
    got = np.asarray(quant.qmatmul(x, qw, backend="gpu", interpret=True), np.float32)
    xr = x if qw.act is None else quant.quantize_activations(x, qw.act)
    want = np.asarray(jnp.einsum("ti,oi->to", xr.astype(jnp.float32), quant.dequantize(qw).reshape(96, 256),
                                 precision=jax.lax.Precision.HIGHEST))
    assert got.shape == (T, 96)
    np.testing.assert_allclose(got, want, atol=8e-3 * np.abs(want).max(), rtol=0)  # bf16 output


def test_qmatmul_gpu_4bit_one_token_without_the_kernel(monkeypatch):
    """With the kernel off for 1-token 4-bit steps, XLA's group dots (no Pallas call, no dequantized copy) give the
    reference's product."""
    monkeypatch.setattr(quant, "GPU_KERNEL_MIN_TOKENS_4BIT", 2)
    rng = np.random.default_rng(11)
    qw, _ = _weight("int4", rng)
    qw = jax.tree.map(jnp.asarray, qw)
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.bfloat16)
    f = lambda x: quant.qmatmul(x, qw, backend="gpu", interpret=True)
    jaxpr = str(jax.make_jaxpr(f)(x))
    assert "pallas_call" not in jaxpr and "bf16[96,256]" not in jaxpr.replace(" ", "")  # no dequantized copy
    want = jnp.einsum("ti,oi->to", x.astype(jnp.float32), quant.dequantize(qw).reshape(96, 256),
                      precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(f(x), np.float32), np.asarray(want), atol=8e-3 * float(jnp.abs(want).max()))


def test_qmatmul_gpu_dispatch_gguf_mins_and_out_shape():
    """A GGUF Q4_1-style weight (scale and minimum per 32 inputs, float16) with a multi-dim output."""
    rng = np.random.default_rng(5)
    q = rng.integers(0, 16, (2, 48, 128)).astype(np.uint8)
    h = quant.HostQuant(q.reshape(96, 128), rng.random((96, 4)).astype(np.float16) * 0.01,
                        mins=-rng.random((96, 4)).astype(np.float16) * 0.05, bits=4, group_size=32, scheme="gguf:Q4_1")
    qw = jax.tree.map(jnp.asarray, quant.to_device_form(h, (128,)))
    qw = quant.QuantizedWeight(qw.q.reshape(2, 48, 64), qw.scales.reshape(2, 48, 4), mins=qw.mins.reshape(2, 48, 4),
                               bits=4, group_size=32, in_shape=(128,), scheme="gguf:Q4_1")
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    got = quant.qmatmul(x, qw, backend="gpu", interpret=True)
    want = jnp.einsum("ti,oi->to", x, quant.dequantize(qw).reshape(96, 128), precision=jax.lax.Precision.HIGHEST)
    assert got.shape == (3, 2, 48)
    np.testing.assert_allclose(np.asarray(got).reshape(3, 96), np.asarray(want), atol=1e-5 * float(jnp.abs(want).max()))


def test_gpu_kernel_dispatch_rules():
    rng = np.random.default_rng(6)
    import dataclasses

    qw, _ = _weight("int4", rng)
    assert quant._gpu_kernel(qw, 2, "gpu") and not quant._gpu_kernel(qw, 2, "cpu")
    assert quant._gpu_kernel(qw, 1, "gpu") == (quant.GPU_KERNEL_MIN_TOKENS_4BIT <= 1)  # 1-token steps on 4-bit groups
    assert not quant._gpu_kernel(qw, quant.GPU_KERNEL_MAX_TOKENS["int"] + 1, "gpu")
    assert not quant._gpu_kernel(dataclasses.replace(qw, g_idx=np.zeros(256, np.int32)), 2, "gpu")  # act-order
    i8, _ = _weight("int8", rng)
    assert quant._gpu_kernel(i8, 1, "gpu")
    w8a8 = dataclasses.replace(i8, act="int8")
    assert quant._gpu_kernel(w8a8, 1, "gpu") and not quant._gpu_kernel(dataclasses.replace(w8a8, act_group=128), 1, "gpu")
    fp8, _ = _weight("fp8", rng)
    assert quant._gpu_kernel(fp8, 1, "gpu") == (quant.GPU_KERNEL_MAX_TOKENS["fp8"] >= 1)  # cuBLASLt's fp8 GEMM
    assert not quant._gpu_kernel(fp8, quant.GPU_KERNEL_MAX_TOKENS["fp8"] + 1, "gpu")


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_w8a8_activations_enter_in_their_8bit_type(act):
    """W8A8 through the kernel: the quantized activations arrive as int8 / e4m3 (not as bf16 values, whose round
    trip XLA may fold away) with their per-token scales, and give the reference's product."""
    import dataclasses

    rng = np.random.default_rng(8)
    scheme = "int8" if act == "int8" else "fp8"
    qw, _ = _weight(scheme, rng)
    qw = jax.tree.map(jnp.asarray, dataclasses.replace(qw, act=act))
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
    v, s = quant.quantize_activations_rows(x, act)
    assert v.dtype == (jnp.int8 if act == "int8" else quant.FP8)
    got = np.asarray(quant_matmul(v, qw.q.reshape(96, 256), qw.scales.reshape(96, -1), x_scale=s, bits=8, group=256,
                                  interpret=True))
    xr = quant.quantize_activations(x, act)
    want = np.asarray(jnp.einsum("ti,oi->to", xr, quant.dequantize(qw).reshape(96, 256), precision="highest"))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    if act == "int8":  # and through qmatmul's GPU dispatch
        y = np.asarray(quant.qmatmul(x, qw, backend="gpu", interpret=True), np.float32).reshape(3, 96)
        np.testing.assert_allclose(y, want, atol=8e-3 * np.abs(want).max(), rtol=0)
