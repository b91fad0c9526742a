"""Data parallelism (`data_parallel_size`) on 8 host CPU devices: DP = 2 and DP 2 x TP 2 give the tokens and
logprobs of one device for a batch of greedy and seeded requests, both replicas serve, a request goes to the replica
caching its prompt's prefix even when that one is busier (else to the least loaded), aborts reach the right
replica, pages are accounted per replica, nothing compiles after warm-up. In a child process (the number of host
devices is fixed when jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_ENGINE_OPTIONS

CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jaxinfer
from jaxinfer.sampling_params import SamplingParams

model, opts = sys.argv[1], json.loads(sys.argv[2])
PROMPTS = [[1 + i, 2, 3, 4, 5, 6, 7, 8, 9, 10 + i] * (1 + i % 3) for i in range(6)]
PARAMS = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2) if i % 2 == 0 else
          SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=8, ignore_eos=True) for i in range(6)]


def outputs(llm):
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [dict(tokens=o.outputs[0].token_ids,
                 logprobs=[[float(lp.logprob) for _, lp in sorted(d.items())] for d in (o.outputs[0].logprobs or [])])
            for o in outs]


res = {"one": outputs(jaxinfer.LLM(model, **opts))}
for name, extra in (("dp2", {"data_parallel_size": 2}), ("dp2tp2", {"data_parallel_size": 2, "tensor_parallel_size": 2})):
    llm = jaxinfer.LLM(model, **opts, **extra)
    eng = llm.engine
    out = outputs(llm)
    s = eng.stats()
    res[name] = dict(out=out, replicas=len(eng.replicas), served=[r["prefix_cache_queries"] for r in s["replicas"]],
                     pages_total=s["pages_total"], pages=[e.num_pages for e in eng.replicas],
                     devices=[sorted(d.id for d in e.runner.kv.k[0].sharding.device_set) for e in eng.replicas],
                     compiles=eng.num_compiles_since_ready, pages_used=s["pages_used"])
eng = jaxinfer.LLM(model, **opts, data_parallel_size=2).engine
# prefix-aware routing: a long prompt, run to its end, leaves its pages cached on the replica that ran it
long = list(range(40, 80))
rid = eng.add_request(long, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
owner = eng._owner[rid]
while eng.has_unfinished():
    eng.step()
r = eng.replicas.index(owner)
for i in range(3):  # make that replica the busier one
    eng.replicas[r].add_request([200 + i] * 5, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
routed = dict(prefix=eng.replicas.index(eng.route(long[:36] + [7, 7, 7])), other=eng.replicas.index(eng.route([9] * 12)),
              owner=r)
# an abort through the front frees the pages on its replica
a = eng.add_request([3] * 30, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
ra = eng.replicas.index(eng._owner[a])
eng.step()
used_before = eng.replicas[ra].stats()["pages_used"]
eng.abort(a)
used_at_abort = eng.replicas[ra].scheduler.allocator.num_used
reasons = {}
while eng.has_unfinished():
    for o in eng.step():
        if o.finished:
            reasons[o.request_id] = (o.outputs[0].finish_reason, len(o.outputs[0].token_ids))
res["routing"] = dict(routed, abort_replica=ra, used_before=used_before, used_at_abort=used_at_abort,
                      aborted=reasons[a], used_after=[e.scheduler.allocator.num_used for e in eng.replicas])
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def result(tiny_llama_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    opts = dict(TINY_ENGINE_OPTIONS, token_buckets=(4, 16, 64), seq_buckets=(1, 4, 8), max_num_seqs=8,
                kv_cache_memory="256KiB")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_llama_dir[0]), json.dumps(opts)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,devices", [("dp2", [[0], [1]]), ("dp2tp2", [[0, 1], [2, 3]])])
def test_data_parallel_matches_one_device(result, name, devices):
    one, dp = result["one"], result[name]
    for a, b in zip(one, dp["out"]):
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 8
        for u, v in zip(a["logprobs"], b["logprobs"]):
            assert max(abs(p - q) for p, q in zip(u, v)) < 1e-4
    assert dp["replicas"] == 2 and dp["devices"] == devices
    assert all(n > 0 for n in dp["served"])  # both replicas took requests
    assert dp["pages_total"] == sum(dp["pages"]) and dp["compiles"] == 0


def test_data_parallel_routing_and_abort(result):
    r = result["routing"]
    assert r["prefix"] == r["owner"]  # the cached prefix wins over the load
    assert r["other"] != r["owner"]  # an unrelated prompt goes to the less loaded replica
    # the abort reached its replica: the request stops there, its pages are freed at once
    assert r["aborted"][0] == "abort" and r["aborted"][1] < 50
    assert r["used_before"] > 0 and r["used_at_abort"] == 0 and r["used_after"] == [0, 0]


def test_data_parallel_size_errors():
    import jaxinfer
    from jaxinfer.engine import Engine

    with pytest.raises(ValueError, match=r"data_parallel_size 4 x tensor_parallel_size 8 needs 32 devices"):
        jaxinfer.LLM(None, data_parallel_size=4, tensor_parallel_size=8, **TINY_ENGINE_OPTIONS)
    with pytest.raises(ValueError, match="an Engine is one replica"):
        Engine(None, data_parallel_size=2, **TINY_ENGINE_OPTIONS)
    with pytest.raises(ValueError, match="data_parallel_size must be an integer >= 1"):
        jaxinfer.LLM(None, data_parallel_size=0, **TINY_ENGINE_OPTIONS)
