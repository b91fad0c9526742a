"""Tensor parallelism (`tensor_parallel_size`) on 8 host CPU devices: TP = 2, 4 and 8 give the tokens and logprobs
of one device, also with more devices than kv heads (each held N / K times), with int8 weights, and with the GPU
attention kernel run per device under shard_map (interpret mode); the KV cache is split over the kv heads; nothing
compiles after warm-up. It runs in a child process, because the number of host devices is fixed when jax starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_ENGINE_OPTIONS

CHILD = r"""
import json, os, re, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax
from jaxinfer.engine import Engine, device_bytes
from jaxinfer.step_input import pack
from jaxinfer.sampling_params import SamplingParams

model, opts, runs = sys.argv[1] or None, json.loads(sys.argv[2]), json.loads(sys.argv[3])
REQS = [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], dict(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)),
        ([7, 8, 9], dict(temperature=0.8, top_p=0.9, seed=3, max_tokens=8, ignore_eos=True)),
        ([5] * 23, dict(temperature=0, max_tokens=8, ignore_eos=True))]


def run(eng):
    ids = [eng.add_request(p, SamplingParams(**kw)) for p, kw in REQS]  # together: one batch
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                c = o.outputs[0]
                out[o.request_id] = dict(tokens=c.token_ids, logprobs=[[float(lp.logprob) for _, lp in sorted(d.items())]
                                                                        for d in (c.logprobs or [])])
    return [out[i] for i in ids]


res = []
for extra in runs:
    eng = Engine(model, **{**opts, **extra})
    out = run(eng)
    kv, r = eng.runner.kv.k[0], eng.runner
    # start-up's per-device estimate (weights and cache, one device's shards) against XLA's memory analysis of each
    # compiled forward program (its arguments: weights, cache, sampler state, page table, packed input)
    base = eng.weight_device_bytes + device_bytes((r.kv, r.sstate, r.page_table))
    mem = [(r.compiled[b].memory_analysis().argument_size_in_bytes, base + pack(r._empty_input(b[0], b[1])[0]).nbytes)
           for b in r.buckets]
    moe = next((lp.experts_gate_up for lp in eng.runner.params.layers if lp.experts_gate_up is not None), None)
    res.append(dict(out=out, mem=mem, expert_shards=None if moe is None else sorted({sh.data.shape[0] for sh in
                                                                                   moe.addressable_shards}), weight_device_bytes=eng.weight_device_bytes, weight_bytes=eng.weight_bytes, kv_spec=str(getattr(kv.sharding, "spec", None)), kv_heads=eng.cfg.num_kv_heads,
                    replicas=eng.cfg.kv_replicas, devices=len(kv.sharding.device_set),
                    shard_heads=sorted({s.data.shape[1] for s in kv.addressable_shards}),
                    compiles=eng.num_compiles_since_ready, attention=eng.runner._attn_fn.__name__,
                    loaded=r.programs_loaded, programs=len(r.program_seconds), vocab=eng.cfg.vocab_size,
                    # what the greedy sampler program gathers across devices (shapes of its all-gathers)
                    greedy_gathers=re.findall(r"= \w+\[([\d,]*)\][^\n=]*? all-gather\(",
                                              r.compiled_samplers[(max(r.seq_buckets), "greedy")].as_text())))
print(json.dumps(res))
"""


def run_child(model_dir, runs, **opts):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), json.dumps({**TINY_ENGINE_OPTIONS, **opts}),
                           json.dumps(runs)], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same(a, b):
    for run in (a, b):  # the per-device memory estimate is XLA's
        assert all(xla == est for xla, est in run["mem"]), run["mem"]
    for x, y in zip(a["out"], b["out"]):
        assert x["tokens"] == y["tokens"] and len(x["tokens"]) == 8
        for u, v in zip(x["logprobs"], y["logprobs"]):
            assert max(abs(p - q) for p, q in zip(u, v)) < 1e-4


@pytest.fixture(scope="module")
def tiny8_dir(tmp_path_factory):
    """A tiny Llama with 8 query heads over 2 kv heads: TP 8 needs each kv head on 4 devices."""
    import torch
    import transformers

    from hf_models import TINY

    d = tmp_path_factory.mktemp("tiny8")
    cfg = transformers.LlamaConfig(**{**TINY, "num_attention_heads": 8, "rope_theta": 10000.0})
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)
    return d


def test_tensor_parallel_matches_one_device(tiny8_dir):
    """TP 2 (kv heads split), 4 and 8 (each of the 2 kv heads held 2 and 4 times); the kv-head copies, the cache's
    split (one kv head per device at TP 4 and 8) and the outputs."""
    one, *tps = run_child(tiny8_dir, [{}, {"tensor_parallel_size": 2}, {"tensor_parallel_size": 4},
                                      {"tensor_parallel_size": 8}], kv_cache_memory="256KiB")
    assert (one["kv_heads"], one["replicas"], one["devices"]) == (2, 1, 1)
    for tp, n in zip(tps, (2, 4, 8)):
        assert tp["devices"] == n and "tp" in tp["kv_spec"] and tp["shard_heads"] == [1]
        assert (tp["kv_heads"], tp["replicas"]) == (max(2, n), max(1, n // 2))
        assert tp["compiles"] == 0 and tp["attention"] == "per_device"  # under shard_map
        assert_same(one, tp)
        # the logits stay split over the vocabulary: greedy sampling exchanges a (value, id) per row and device
        assert tp["greedy_gathers"] and all(int(g.split(",")[-1]) < tp["vocab"] for g in tp["greedy_gathers"])
    assert one["attention"] == "attention"


def test_tensor_parallel_kernel_and_quantized(tiny_llama_dir):
    """The GPU attention kernel (interpret mode) per device under shard_map at TP 2, and int8, int4 and fp8 weights
    sharded at TP 4 (the tiny Llama's 2 kv heads held twice, their quantized rows copied), against one device each;
    each device holds a quarter of the weights or more (what does not divide, e.g. per-channel scales, is whole)."""
    base = dict(attention_impl="gpu", attention_interpret=True, token_buckets=(4, 16), seq_buckets=(1, 4),
                max_num_seqs=4, num_pages=40)
    quant = [{"quantization": q, "num_pages": 40, **tp} for q in ("int8", "int4", "fp8")
             for tp in ({}, {"tensor_parallel_size": 4})]
    res = run_child(tiny_llama_dir[0], [base, {**base, "tensor_parallel_size": 2}] + quant)
    assert_same(res[0], res[1])
    assert res[1]["attention"] == "per_device" and res[1]["devices"] == 2
    for one, tp in zip(res[2::2], res[3::2]):
        assert_same(one, tp)
        assert tp["replicas"] == 2 and tp["devices"] == 4
        assert one["weight_device_bytes"] / 4 <= tp["weight_device_bytes"] < one["weight_device_bytes"] / 2


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "llama-tied-mqa", "qwen3-moe", "mixtral", "gemma3"])
def test_tensor_parallel_families(family, tmp_path):
    """TP 4 on the other families' tiny models (q/k/v biases, q/k norms with a tied embedding, a sliding window, one
    kv head held four times) against one device."""
    from hf_models import make_hf_model

    make_hf_model(family, tmp_path)
    one, tp = run_child(tmp_path, [{}, {"tensor_parallel_size": 4}], kv_cache_memory="256KiB")
    assert tp["devices"] == 4 and tp["shard_heads"] == [1] and tp["compiles"] == 0
    assert_same(one, tp)


def test_mixture_of_experts_tensor_and_expert_parallel(tmp_path):
    """A Qwen3-MoE (8 experts, 2 per token, a dense first layer) at TP 8 with its experts split by MLP width and with
    expert parallelism (one whole expert per device), against one device."""
    import torch
    import transformers

    from hf_models import TINY

    cfg = transformers.Qwen3MoeConfig(**{**TINY, "num_attention_heads": 8, "head_dim": 16, "num_experts": 8,
                                         "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [0]})
    torch.manual_seed(2)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight"):
                p.mul_(20.0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    one, tp, ep = run_child(tmp_path, [{}, {"tensor_parallel_size": 8},
                                       {"tensor_parallel_size": 8, "enable_expert_parallel": True}],
                            kv_cache_memory="256KiB")
    assert one["expert_shards"] == [8] and tp["expert_shards"] == [8] and ep["expert_shards"] == [1]
    for run in (tp, ep):
        assert run["devices"] == 8 and run["compiles"] == 0
        assert_same(one, run)


def test_tensor_parallel_programs_saved_per_mesh(tiny_llama_dir, tmp_path):
    """The compiled-program store (warm start) keys programs by their mesh: a second TP 2 engine loads every program
    saved by the first, a TP 4 engine none of them (it compiles its own), and each gives one device's outputs."""
    cache = dict(use_compilation_cache=True, compilation_cache_dir=str(tmp_path / "cache"), num_pages=40)
    one, cold, warm, tp4 = run_child(tiny_llama_dir[0], [{"num_pages": 40}] + [{**cache, "tensor_parallel_size": n}
                                                                             for n in (2, 2, 4)])
    assert cold["loaded"] == 0 and warm["loaded"] == warm["programs"] > 0 and tp4["loaded"] == 0
    for run in (cold, warm, tp4):
        assert_same(one, run)
        assert run["compiles"] == 0


def test_tensor_parallel_default_model():
    """The default model (9 query heads over 3 kv heads, Q4_1 weights kept quantized) at TP 3 against one device."""
    one, tp = run_child("", [{}, {"tensor_parallel_size": 3}], kv_cache_memory="8MiB")
    assert tp["devices"] == 3 and tp["kv_heads"] == 3 and tp["replicas"] == 1 and tp["compiles"] == 0
    assert_same(one, tp)


def test_tensor_parallel_size_errors():
    """What does not divide, or devices that are not there, is a ValueError naming tensor_parallel_size."""
    import dataclasses

    import jaxinfer
    from jaxinfer.config import ModelConfig
    from jaxinfer.model import tensor_parallel_config

    cfg = ModelConfig("llama", 256, 64, 128, 2, 8, 2, 8, 512)
    assert tensor_parallel_config(cfg, 4).kv_replicas == 2 and tensor_parallel_config(cfg, 2).kv_replicas == 1
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide the model's num_attention_heads"):
        tensor_parallel_config(cfg, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size 16 must divide the model's num_attention_heads"):
        tensor_parallel_config(cfg, 16)
    with pytest.raises(ValueError, match="must be a multiple of the model's num_key_value_heads"):
        tensor_parallel_config(dataclasses.replace(cfg, num_heads=12, num_kv_heads=3, intermediate_size=96), 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 64: only \d+ cpu device"):
        jaxinfer.LLM(None, tensor_parallel_size=64, **TINY_ENGINE_OPTIONS)
