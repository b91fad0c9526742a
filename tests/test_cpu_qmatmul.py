"""The native CPU quantized matmul (pallas_kernels/cpu_qmatmul.cc) against its jnp reference.

Tolerance: kernel and reference both sum float32 products, in different orders (the kernel sums each
group, scales it, and adds mins * sum(x over the group); the reference dequantizes W, then one dot).
For a sum of n products each side is within n * u * B of the exact value, where u = 2**-24 and
B = |x| @ (|scales * q| + |mins|)^T is the sum of the magnitudes involved; the dequantization adds a few
u * B more. So |kernel - reference| <= 2 * (I + g + I/g + 4) * u * B is a bound that holds for any summation
order, while a wrong nibble, group or scale index is off by O(|y|), far above it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_qmatmul as cq


@pytest.fixture(scope="module")
def kernel():
    """Builds (or finds in the cache) the kernel once. CI has a C++ compiler: no compiler is a failure."""
    assert cq.available(), cq.build_error
    return cq


def make_inputs(rng, T, O, I, bits, g, with_mins):
    if bits == 4:
        q = cq.pack_int4(rng.integers(0, 16, (O, I), dtype=np.uint8))
    else:
        q = rng.integers(-128, 128, (O, I), dtype=np.int8)
    scales = rng.uniform(0.5, 2.0, (O, I // g)).astype(np.float32) * rng.choice([-1, 1], (O, I // g))
    mins = rng.standard_normal((O, I // g)).astype(np.float32) * 8 if with_mins else None
    x = rng.standard_normal((T, I)).astype(np.float32)
    return x, q, scales.astype(np.float32), mins


def check_close(y, x, q, scales, mins, bits, g):
    I = x.shape[-1]
    ref = cq.qmatmul_reference(x, q, scales, mins, bits=bits, group_size=g)
    w_abs = jnp.abs(cq.dequantize_reference(q, scales, None, bits=bits, group_size=g))  # |scales * q|
    if mins is not None:
        w_abs = w_abs + jnp.repeat(jnp.abs(mins), g, axis=1)
    bound = jnp.abs(x) @ w_abs.T  # B [T, O]
    tol = 2 * (I + g + I // g + 4) * 2.0**-24 * bound
    err = jnp.abs(y - ref)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert bool(jnp.all(err <= tol)), f"max err {float(jnp.max(err))}, tol there {float(tol.ravel()[jnp.argmax(err)])}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("g", [16, 32, 128, "I"])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("with_mins", [False, True])
@pytest.mark.parametrize("O", [40, 201])
def test_matches_reference(kernel, bits, g, T, with_mins, O):
    I = 256
    g = I if g == "I" else g
    rng = np.random.default_rng([bits, g, T, with_mins, O])
    x, q, scales, mins = make_inputs(rng, T, O, I, bits, g, with_mins)
    y = kernel.qmatmul(x, q, scales, mins, bits=bits, group_size=g)
    check_close(y, x, q, scales, mins, bits, g)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("pool", ["xla", "none"])
@pytest.mark.parametrize("portable", [False, True])
def test_paths(kernel, bits, pool, portable):
    """Every threading mode, and the portable loops (what a CPU without AVX2 runs), give the same results."""
    rng = np.random.default_rng([bits, len(pool), portable])
    O, I, g = 333, 192, 32
    x, q, scales, mins = make_inputs(rng, 5, O, I, bits, g, True)
    y = kernel.qmatmul(x, q, scales, mins, bits=bits, group_size=g, pool=pool, portable=portable)
    check_close(y, x, q, scales, mins, bits, g)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("T", [2, 4, 16, 64, 256])
@pytest.mark.parametrize("O, I, g", [(77, 576, 32), (50, 4160, 64), (30, 2080, 2080)])
def test_token_blocks(kernel, bits, T, O, I, g):
    """T > 4 runs dequantized tiles (24 rows x up to 2048 inputs) through a 4-token x 3-row micro-kernel
    (T <= 4 dequantizes in registers): row and token remainders, inputs cut into several chunks
    (I = 4160), one group spanning chunks (g = I = 2080 > 2048)."""
    rng = np.random.default_rng([bits, T, O, I, g])
    x, q, scales, mins = make_inputs(rng, T, O, I, bits, g, bits == 4)
    y = kernel.qmatmul(x, q, scales, mins, bits=bits, group_size=g)
    check_close(y, x, q, scales, mins, bits, g)


@pytest.mark.parametrize("bits", [4, 8])
def test_group_not_multiple_of_16(kernel, bits):
    """Per-channel scales on a width that is not a multiple of 16 take the portable loops."""
    rng = np.random.default_rng(bits)
    x, q, scales, mins = make_inputs(rng, 2, 7, 40, bits, 40, True)
    check_close(kernel.qmatmul(x, q, scales, mins, bits=bits, group_size=40), x, q, scales, mins, bits, 40)


def test_inside_jit_with_leading_dims(kernel):
    rng = np.random.default_rng(1)
    x, q, scales, mins = make_inputs(rng, 6, 64, 128, 4, 32, True)
    x3 = x.reshape(2, 3, 128)  # [B, T, I]

    @jax.jit
    def f(x, q, scales, mins):
        return jnp.tanh(cq.qmatmul(x, q, scales, mins, bits=4, group_size=32)) * 2

    y = f(x3, q, scales, mins)
    assert y.shape == (2, 3, 64)
    ref = jnp.tanh(cq.qmatmul_reference(x3, q, scales, mins, bits=4, group_size=32)) * 2
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=1e-4)


def test_pack_int4_layout():
    q = np.array([[1, 2, 15, 0]], np.uint8)
    np.testing.assert_array_equal(cq.pack_int4(q), [[0x21, 0x0F]])  # low nibble = even element
    with pytest.raises(ValueError):
        cq.pack_int4(np.array([[16, 0]]))


@pytest.mark.parametrize(
    "bits, q_shape, q_dtype, s_shape, g, match",
    [
        (4, (8, 64), np.uint8, (8, 4), 32, "q must be uint8 \\[O, 32\\]"),  # unpacked q for bits=4
        (8, (8, 64), np.uint8, (8, 2), 32, "q must be int8"),
        (8, (8, 64), np.int8, (8, 4), 32, "scales must be float32 \\[O, G\\] = \\[8, 2\\]"),
        (8, (8, 64), np.int8, (8, 3), 24, "group_size 24 must divide I = 64"),
        (5, (8, 64), np.int8, (8, 2), 32, "bits must be 4 or 8"),
    ],
)
def test_bad_shapes_raise(kernel, bits, q_shape, q_dtype, s_shape, g, match):
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match=match):
        kernel.qmatmul(x, np.zeros(q_shape, q_dtype), np.ones(s_shape, np.float32), None, bits=bits, group_size=g)


# ---------------------------------------------------------------------------------------------------------
# float32 weights (f32matmul). Tolerance as above with exact weights: 2 * (I + 4) * u * (|x| @ |W|).


def check_f32(y, x, w, out_major):
    ref = cq.f32matmul_reference(x, w, out_major=out_major)
    w_abs = jnp.abs(jnp.asarray(w).T if out_major else jnp.asarray(w))  # [I, O]
    tol = 2 * (x.shape[-1] + 4) * 2.0**-24 * (jnp.abs(x) @ w_abs)
    err = jnp.abs(y - ref)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert bool(jnp.all(err <= tol)), f"max err {float(jnp.max(err))}, tol there {float(tol.ravel()[jnp.argmax(err)])}"


@pytest.mark.parametrize("out_major", [False, True])
@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("I, O", [(576, 3072), (1536, 576), (37, 45), (100, 1001), (7, 3)])
def test_f32_matches_reference(kernel, out_major, T, I, O):
    """T = 1..8 (token blocks of up to 4, remainders), widths with a column tail (O % 8), column tiles of 32,
    16 and 8, inputs split over threads in chunks of 8 rows with a remainder (I % 8), and tiny matrices."""
    rng = np.random.default_rng([T, I, O, out_major])
    x = rng.standard_normal((T, I)).astype(np.float32)
    w = rng.standard_normal((O, I) if out_major else (I, O)).astype(np.float32)
    check_f32(kernel.f32matmul(x, w, out_major=out_major), x, w, out_major)


@pytest.mark.parametrize("out_major", [False, True])
@pytest.mark.parametrize("pool", ["xla", "none"])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("T", [1, 3, 6])
def test_f32_paths(kernel, out_major, pool, portable, T):
    """Both threading modes and the portable loops (a CPU without AVX2) give the reference's results."""
    rng = np.random.default_rng([T, out_major, len(pool), portable])
    I, O = 333, 1030
    x = rng.standard_normal((T, I)).astype(np.float32)
    w = rng.standard_normal((O, I) if out_major else (I, O)).astype(np.float32)
    check_f32(kernel.f32matmul(x, w, out_major=out_major, pool=pool, portable=portable), x, w, out_major)


def test_f32_bad_shapes_raise(kernel):
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        kernel.f32matmul(x, np.zeros((32, 64), np.float32))  # [O, I] without out_major
    with pytest.raises(ValueError, match="float32 w"):
        kernel.f32matmul(x, np.zeros((64, 32), np.float16))


@pytest.mark.parametrize("T", [1, 2, 4, 5, 8, 9])
def test_model_dot_float32(kernel, T):
    """model.dot on float32 weights: every equation of the model and the EAGLE head (multi-dim inputs and outputs,
    the tied embedding [V, D] as the LM head) equals the einsum within float32 rounding, and runs the kernel up
    to CPU_F32_KERNEL_MAX_TOKENS tokens, XLA's dot above."""
    from jaxinfer import model

    rng = np.random.default_rng(T)
    cases = [("td,dkgh->tkgh", (T, 48), (48, 2, 5, 8)), ("tnh,nhd->td", (T, 6, 8), (6, 8, 48)),
             ("td,dcf->tcf", (T, 48), (48, 2, 40)), ("tf,fd->td", (T, 40), (40, 48)),
             ("bd,vd->bv", (T, 48), (301, 48)), ("bd,dv->bv", (T, 48), (48, 301)),
             ("tcd,cde->te", (T, 2, 48), (2, 48, 48))]
    for eq, xs, ws in cases:
        x, w = (jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in (xs, ws))
        fn = jax.jit(lambda x, w, eq=eq: model.dot(eq, x, w))
        uses_kernel = "jaxinfer_cpu_f32matmul" in fn.lower(x, w).as_text()
        assert uses_kernel == (T <= model.CPU_F32_KERNEL_MAX_TOKENS), eq
        y, ref = fn(x, w), jnp.einsum(eq, x, w, precision=jax.lax.Precision.HIGHEST)
        I = int(np.prod(xs[1:]))
        bound = jnp.einsum(eq, jnp.abs(x), jnp.abs(w), precision=jax.lax.Precision.HIGHEST)
        assert y.shape == ref.shape
        assert bool(jnp.all(jnp.abs(y - ref) <= 2 * (I + 4) * 2.0**-24 * bound)), eq
    assert model._weight_layout("tkgs,skh->tkgh") is None  # not a weight contraction: XLA's einsum
