"""The Hopper grouped matmul (pallas_kernels/grouped_matmul_hopper): which expert matmuls take it, and the wrapper's
arguments, with jax's Mosaic GPU ragged dot swapped for the jnp product it computes. The Mosaic kernel itself runs
only on a Hopper GPU (benchmarks/moe_gemm_gpu.py checks it there against jax.lax.ragged_dot)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import model
from jaxinfer.config import ModelConfig
from pallas_kernels import grouped_matmul_hopper as gm


@pytest.fixture
def kernel_as_jnp(monkeypatch):
    """jax's Mosaic ragged dot replaced by a per-group loop over the rows (not ragged_dot: an independent form)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    calls = []

    def fake(lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n):
        calls.append((lhs.shape, rhs.shape, block_m, block_n))
        assert lhs.dtype == rhs.dtype and group_sizes.dtype == jnp.int32
        ends = jnp.cumsum(group_sizes)
        group = jnp.sum(jnp.arange(lhs.shape[0])[:, None] >= ends[None, :], axis=1)  # each row's group
        out = jnp.einsum("mk,mkn->mn", lhs.astype(jnp.float32), rhs[jnp.minimum(group, rhs.shape[0] - 1)].astype(jnp.float32))
        return out.astype(lhs.dtype)

    monkeypatch.setattr(ragged_dot_mgpu, "ragged_dot", fake)
    gm._grouped_matmul.clear_cache()
    yield calls
    gm._grouped_matmul.clear_cache()


def test_wrapper_matches_reference(kernel_as_jnp):
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([3, 0, 9, 1], jnp.int32)
    x = jnp.asarray(rng.standard_normal((13, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((4, 128, 256)), jnp.bfloat16)
    got = np.asarray(gm.grouped_matmul(x, w, sizes), np.float32)
    want = np.asarray(gm.grouped_matmul_reference(x, w, sizes), np.float32)
    assert kernel_as_jnp and got.shape == (13, 256)
    np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max(), rtol=0)
    with pytest.raises(ValueError, match="does not tile"):
        gm.grouped_matmul(x, w[:, :, :200], sizes)
    with pytest.raises(ValueError, match="grouped_matmul takes"):
        gm.grouped_matmul(x, w, sizes[:3])


def test_moe_mlp_takes_it_when_enabled(kernel_as_jnp, monkeypatch):
    """model.moe_mlp with the dispatch on (a Hopper GPU forced here): both grouped matmuls go to the kernel from
    HOPPER_GROUPED_MIN_ROWS rows, and the MLP's output equals the ragged_dot one's."""
    cfg = dataclasses.replace(ModelConfig.from_preset("qwen3-30b-a3b"), hidden_size=128, moe_intermediate_size=128,
                              num_experts=8, num_experts_per_tok=2)
    spec = model.param_specs(dataclasses.replace(cfg, num_layers=1, dense_layers=())).layers[0]
    key = jax.random.key(0)
    lp = model.LayerParams(*[None] * 9, **{
        name: (0.1 * jax.random.normal(jax.random.fold_in(key, i), getattr(spec, name).shape)).astype(jnp.bfloat16)
        for i, name in enumerate(("router", "experts_gate_up", "experts_down"))})
    h = jax.random.normal(jax.random.fold_in(key, 9), (6, 128)).astype(jnp.bfloat16)
    monkeypatch.setattr(model, "MOE_GATHER_MAX_PAIRS_PER_EXPERT", {})  # a GPU's dispatch: the grouped form
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # one GPU (the kernel is not used on a mesh)
    want = np.asarray(model.moe_mlp(lp, cfg, h), np.float32)
    assert not kernel_as_jnp  # off by default
    monkeypatch.setattr(gm, "available", lambda: True)
    monkeypatch.setattr(model, "HOPPER_GROUPED_MIN_ROWS", 8)
    got = np.asarray(model.moe_mlp(lp, cfg, h), np.float32)  # 6 tokens x 2 experts = 12 rows
    assert [c[1] for c in kernel_as_jnp] == [(8, 128, 256), (8, 128, 128)]
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=0)
    kernel_as_jnp.clear()
    model.moe_mlp(lp, cfg, h[:3])  # 6 rows: below the threshold
    assert not kernel_as_jnp
