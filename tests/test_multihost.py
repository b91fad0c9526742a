"""A multi-host engine (jaxinfer/multihost.py): two processes on loopback, each with two host CPU devices, joined by
jax.distributed (gloo collectives), one engine at TP 4 over both. Through the Python API: the tokens and logprobs
of one device for greedy, seeded, penalised, biased and prompt-logprob requests, a second batch that hits the prefix
cache (every kind of device call crosses), nothing compiled after warm-up, every page free at the end, the
follower, sent SIGTERM as it starts following, going on until the first process ends, then exiting 0. Through `jaxinfer serve` on both: the same tokens over HTTP; the
second process killed, the server reports it within a bounded time (a clear log line, /ready and /health 503, new
requests refused) instead of hanging, and still exits on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import TINY_ENGINE_OPTIONS

OPTS = dict(TINY_ENGINE_OPTIONS, num_pages=160)
PROMPTS = [[1 + i, 2, 3, 4, 5, 6, 7, 8, 9, 10 + i] * (1 + i % 3) for i in range(5)]
# a second batch: the first prompts again, longer (prefix-cache hits past one step's page-table room)
PROMPTS2 = [p * 2 + [11, 12] for p in PROMPTS[1:3]]


def _params():
    from jaxinfer.sampling_params import SamplingParams

    return [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=8, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5),
            SamplingParams(temperature=0, max_tokens=8, min_tokens=4, logit_bias={7: 3.0}),
            SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)]


def _outputs(outs):
    return [dict(tokens=list(o.outputs[0].token_ids),
                 logprobs=[[float(lp.logprob) for _, lp in sorted(d.items())] for d in (o.outputs[0].logprobs or [])],
                 prompt_logprobs=[None if d is None else [float(lp.logprob) for _, lp in sorted(d.items())]
                                  for d in (o.prompt_logprobs or [])])
            for o in outs]


CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
sys.path.insert(0, sys.argv[5])
import jaxinfer
from jaxinfer import multihost
from test_multihost import PROMPTS, PROMPTS2, _outputs, _params

addr, pid, model, opts = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
assert multihost.initialize(addr, 2, pid)
llm = jaxinfer.LLM(model, tensor_parallel_size=4, **opts)
if not multihost.is_leader():
    sys.exit(llm.follow())
first = _outputs(llm.generate(PROMPTS, _params(), use_tqdm=False))
second = _outputs(llm.generate(PROMPTS2, _params()[2:4], use_tqdm=False))
s = llm.engine.stats()
print(json.dumps(dict(first=first, second=second, compiles=llm.engine.num_compiles_since_ready,
                      pages_used=s["pages_used"], hits=s["prefix_cache_hits"],
                      devices=sorted(d.id for d in llm.engine.runner.kv.k[0].sharding.device_set))))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _close(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _close_enough(a, b, tol=1e-4):
    return len(a) == len(b) and all(max((abs(x - y) for x, y in zip(u, v)), default=0) < tol
                                    for u, v in zip(a, b) if u is not None or v is not None)


def test_two_processes_match_one_device(tiny_llm, tiny_llama_dir):
    addr = f"127.0.0.1:{_free_port()}"
    here = os.path.dirname(__file__)
    args = lambda pid: [sys.executable, "-c", CHILD, addr, str(pid), str(tiny_llama_dir[0]), json.dumps(OPTS), here]  # noqa: E731
    follower = subprocess.Popen(args(1), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    leader = subprocess.Popen(args(0), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []  # a deployment's SIGTERM reaches every host at once: the follower keeps following until told to stop
        while not seen or "follows process 0" not in seen[-1]:
            seen.append(follower.stderr.readline())
            assert seen[-1], "".join(seen)[-4000:]
        follower.send_signal(signal.SIGTERM)
        out, err = leader.communicate(timeout=900)
        assert leader.returncode == 0, err[-4000:]
        assert follower.wait(120) == 0, follower.stderr.read()[-4000:]  # told to stop when the first process ended
        assert "SIGTERM: following process 0 until it stops" in follower.stderr.read()
    finally:
        _close(leader, follower)
    res = json.loads(out.strip().splitlines()[-1])
    ref = _outputs(tiny_llm.generate(PROMPTS, _params(), use_tqdm=False))
    ref2 = _outputs(tiny_llm.generate(PROMPTS2, _params()[2:4], use_tqdm=False))
    for a, b in zip(ref + ref2, res["first"] + res["second"]):
        assert a["tokens"] == b["tokens"]
        assert _close_enough(a["logprobs"], b["logprobs"]) and _close_enough(a["prompt_logprobs"], b["prompt_logprobs"])
    assert res["devices"] == [0, 1, 2048, 2049]  # both processes' devices hold the cache
    assert res["hits"] > 0 and res["pages_used"] == 0 and res["compiles"] == 0


def test_serve_reports_a_lost_process(tiny_llm, tiny_llama_dir):
    port, addr = _free_port(), f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "jaxinfer", "serve", "--model", str(tiny_llama_dir[0]), "--port", str(port),
           "--served-model-name", "tiny", "--token-buckets", "4,16,64", "--seq-buckets", "1,4,16", "--max-num-seqs",
           "16", "--max-model-len", "128", "--page-size", "4", "--kv-cache-memory", "4MiB", "--no-compilation-cache",
           "--quiet", "--coordinator-address", addr, "--num-processes", "2"]
    env = dict(_env(), XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    follower = subprocess.Popen(cmd + ["--process-id", "1"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    leader = subprocess.Popen(cmd + ["--process-id", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and leader.poll() is None:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"server never became ready: {leader.communicate(timeout=30)[0][-3000:]}")
        prompt = PROMPTS[0]
        r = httpx.post(url + "/v1/completions", timeout=120, json=dict(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True))
        assert r.status_code == 200, r.text
        from jaxinfer.sampling_params import SamplingParams

        want = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0]
        assert r.json()["choices"][0]["text"] == want.text and r.json()["usage"]["completion_tokens"] == 8

        follower.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and httpx.get(url + "/ready", timeout=5).status_code == 200:
            time.sleep(0.2)
        noticed = time.monotonic() - t0
        assert noticed < 30, "the lost process was not reported within 30 s"
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and "process 1" in health.json()["error"]
        r = httpx.post(url + "/v1/completions", timeout=30, json=dict(model="tiny", prompt=prompt, max_tokens=4))
        assert r.status_code == 503  # refused at once, no hang
        leader.send_signal(signal.SIGTERM)
        log = leader.communicate(timeout=120)[0]
    finally:
        _close(leader, follower)
    assert "process 1 of this 2-process engine stopped" in log, log[-3000:]
