"""benchmarks/workload_floor.py: each part of the floor against a tiny case worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import bench_module

def _module():
    return bench_module("workload_floor")


def test_floor_parts_by_hand():
    cfg = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=2, vocab_size=10)
    r = _module().floor(cfg, np.array([3, 5]), out_len=3, flops=4.0, bw=1.0)
    # linear params 2 * (4*4*2 + 2*2*4 + 3*4*8) = 288, lm_head 40; 8 prompt + 2 * 2 decode tokens go through,
    # 6 are sampled: 2 * (288 * 12 + 40 * 6) = 7392 flops; 2 tail steps, each 656 bytes against 1312 / 4 flops-time
    assert r["tokens_through"] == 12
    assert r["gemm_tail_excess_s"] == pytest.approx(2 * (656 - 328))
    assert r["gemm_s"] == pytest.approx(7392 / 4 + 656)
    # decode contexts 4, 5 and 6, 7 tokens; 16 bytes of K and V per token (2 layers, 1 kv head, head dim 2, bf16)
    assert r["decode_kv_s"] == pytest.approx((4 + 5 + 6 + 7) * 16)
    # causal pairs 6 + 15; 4 * head_dim * heads * layers flops each
    assert r["prompt_attn_s"] == pytest.approx(4 * 2 * 2 * 2 * 21 / 4)
    # 8 prompt tokens x 2 layers x (3 * 8 + 8 * 4) elements x 2 bytes
    assert r["elementwise_s"] == pytest.approx(8 * 2 * 56 * 2)
    assert r["floor_s"] == pytest.approx(2504 + 352 + 168 + 1792)
    assert r["floor_fused_s"] == pytest.approx(r["floor_s"] - 1792)
    assert r["max_out_tok_s"] == pytest.approx(6 / r["floor_s"])


def test_cli_on_the_mixed_workload(capsys):
    assert _module().main(["--model", "llama-3.1-8b", "--target", "7000", "--measured", "5893"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("256 requests, 149309 prompt tokens, 32768 output tokens")
    assert "target 7,000 out tok/s" in out and "measured 5,893 out tok/s" in out
