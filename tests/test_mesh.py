"""Tensor parallelism: the engine over a 2-device `jax.sharding.Mesh` (host CPU devices) gives the tokens and
logprobs of the single-device engine: the forward, the sampler variants (greedy, seeded top-p with a logit bias,
min_tokens, logprobs), prompt logprobs and a prefix-cache hit; a KV budget (per device) holds twice the pages,
each device keeping half of every page; and the sharded programs, saved whole, load onto the same devices. It runs
in a child process, because the number of host devices is fixed when jax starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import TINY_ENGINE_OPTIONS

CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import jax, numpy as np
from jax.sharding import Mesh
from jaxinfer.engine import Engine
from jaxinfer.sampling_params import SamplingParams

model, opts = sys.argv[1], json.loads(sys.argv[2])
REQS = [([1, 2, 3, 4, 5, 6, 7, 8], dict(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1)),
        ([7, 8, 9], dict(temperature=0.8, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True, logit_bias={5: 3.0})),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dict(temperature=0, max_tokens=6, min_tokens=4))]  # prefix hit on the first


def run(eng):
    out = {}
    for i, (prompt, params) in enumerate(REQS):  # one at a time: the third finds the first's pages cached
        eng.add_request(prompt, SamplingParams(**params))
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    c = o.outputs[0]
                    lps = [[float(lp.logprob) for _, lp in sorted(d.items())] for d in (c.logprobs or [])]
                    plps = [None if d is None else sorted((k, float(v.logprob)) for k, v in d.items())
                            for d in (o.prompt_logprobs or [])]
                    out[i] = dict(tokens=c.token_ids, logprobs=lps, prompt_logprobs=plps)
    return dict(out=[out[i] for i in range(len(REQS))], hits=eng.stats()["prefix_cache_hits"],
                compiles=eng.num_compiles_since_ready)


one = Engine(model, **opts)
single = run(one)
mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
cached = dict(opts, use_compilation_cache=True, compilation_cache_dir=sys.argv[3])
eng = Engine(model, mesh=mesh, **cached)
sharded = run(eng)
kv = eng.runner.kv.k[0]
again = Engine(model, mesh=mesh, **cached)  # the sharded programs loaded whole from the store
print(json.dumps(dict(single=single, sharded=sharded, kv_spec=str(kv.sharding.spec), pages=[one.num_pages, eng.num_pages],
                      shard_bytes=[s.data.nbytes for s in kv.addressable_shards], whole_bytes=kv.nbytes,
                      loaded=[eng.runner.programs_loaded, again.runner.programs_loaded, len(again.runner.program_seconds)],
                      again=run(again))))
"""


def test_two_device_mesh_matches_one_device(tiny_llama_dir, tmp_path):
    opts = dict(TINY_ENGINE_OPTIONS, kv_cache_memory="320KiB")  # per device: 160 pages of the tiny model (f32)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_llama_dir[0]), json.dumps(opts), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    single, sharded = res["single"], res["sharded"]
    assert "tp" in res["kv_spec"]  # the cache really is split over the kv heads
    assert res["shard_bytes"] == [res["whole_bytes"] // 2] * 2
    assert res["pages"] == [160, 320]  # the same bytes per device hold twice the pages
    assert sharded["compiles"] == 0 and single["hits"] and sharded["hits"] == single["hits"]
    for a, b in zip(single["out"], sharded["out"]):
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 6
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert max(abs(u - v) for u, v in zip(x, y)) < 1e-4
        for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"]):
            assert (x is None) == (y is None)
            if x is not None:
                assert [k for k, _ in x] == [k for k, _ in y]
                assert max(abs(u - v) for (_, u), (_, v) in zip(x, y)) < 1e-4
    assert len(single["out"][0]["prompt_logprobs"]) == 8 and single["out"][0]["logprobs"]
    n = res["loaded"][2]
    assert res["loaded"] == [0, n, n] and res["again"] == sharded  # saved whole, loaded onto the same two devices
