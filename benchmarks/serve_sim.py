"""Online serving on a modelled GPU: the real `jaxinfer serve` (aiohttp, AsyncEngine, scheduler, page allocator,
step preparation, outputs) with every device call replaced by a wait of the step's modelled device time, measured by
the real `jaxinfer bench serve`. What a bucket set or scheduler setting does to TTFT / ITL / throughput before
spending GPU time on it, and the padding it leaves.

    python benchmarks/serve_sim.py --rate 64 -- --engine-config h100-llama-3.1-8b --mixed-step-token-budget 8192
    python benchmarks/serve_sim.py --rate 64 -- --engine-config h100-llama-3.1-8b-serve

Step model (milliseconds, by the compiled bucket a step runs: T tokens, B rows), one of two:
  linear (--step-model "5.5,0.0225,0.008", the default): a + t * T + b * B, fitted to the H100 8B rows of
    benchmarks/RESULTS.md (a decode of 1 / 64 / 256 rows 5.6 / 7.4 / 13.3 ms against 5.6 / 7.8 / 14.0 measured, an
    8192-token step 194 ms against ~190). A padded token or row costs as much as a real one; the KV cache's reads
    are left out, so it is optimistic where many long contexts decode at once.
  roofline (--step-model "roofline:5.46,0.0225,44.6,0.2"): a + max(w, t * T) + kv * C / 1e6, w the weights' read
    (16.06 GB at 2.94 TB/s), t the compute per padded token, kv the nanoseconds per cached token read (131 kB an 8B
    token at 2.94 TB/s), C the context tokens of the step's real sequences. Padding costs only where the GEMMs are
    compute-bound (beyond ~240 tokens); the KV reads grow with the real rows' contexts (decodes of 1 / 8 / 32 / 64
    rows at ~576 tokens: 5.7 / 5.9 / 6.5 / 7.3 ms against 5.7 / 5.8 / 7.3 / 7.8 measured).
Steps run one at a time on the modelled device; the host's Python runs for real (on this machine's CPU, not the GPU
host's) up to the device call: packing the step's input and jax's dispatch are left out with it. The server is
pinned to one core and the client to another where there are two. The model (dummy weights, no tokenizer) only sets
the vocabulary: the server's flags after `--` choose buckets, budgets and limits; on a CPU pass
`--mixed-step-token-budget` (the CPU's own default is 64).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server(step_model: str, steps_file: str, argv: list[str]) -> int:
    """`jaxinfer serve argv` with the device modelled: no compile, no warm-up, a one-page KV cache."""
    import atexit

    import numpy as np

    from jaxinfer import engine as E
    from jaxinfer import runner as R
    from jaxinfer.cli import main

    roofline = step_model.startswith("roofline")
    if roofline:
        w, t, kv, a = (float(x) for x in (step_model.partition(":")[2] or "5.46,0.0225,44.6,0.2").split(","))
    else:
        a, t, b = (float(x) for x in step_model.split(","))
    device_free = [0.0]  # when the modelled device finishes the last step launched
    steps = []  # (T, B, real tokens) per step

    class Step:  # what the engine reads of runner.LaunchedStep
        def __init__(self, ids, bucket, context):
            T, B, _ = self.bucket = bucket
            self.ids = ids
            ms = a + max(w, t * T) + kv * context / 1e6 if roofline else a + t * T + b * B
            self.done = device_free[0] = max(time.monotonic(), device_free[0]) + ms / 1e3

        def result(self):
            time.sleep(max(0.0, self.done - time.monotonic()))
            return R.StepResult(self.ids, None, None, None)

    def launch(self, inp, md, bucket, prompt_targets=None, nan_rows=None):
        T, B, _ = bucket
        slots, positions = np.asarray(inp.token_slot), np.asarray(inp.positions)
        real = slots < self.sstate.last_token.shape[0]
        steps.append((T, B, int(real.sum())))
        _, seq = np.unique(slots[real], return_inverse=True)
        last = np.zeros(seq.max() + 1 if seq.size else 0, np.int64)
        np.maximum.at(last, seq, positions[real])
        context = int((last + 1).sum())  # cached tokens the step's sequences attend to
        pos = positions[np.asarray(inp.logits_indices)[:B]]
        return Step((pos * 7919 % 29000 + 1000).astype(np.int32), bucket, context)  # some token ids (no EOS is asked)

    def compile_all(self, show_progress=True, store=None):
        self.program_seconds, self.programs_loaded, self.compile_seconds, self.lower_seconds = {}, 0, 0.0, 0.0
        self.compile_started = time.monotonic()

    real_kv = E.init_kv_cache
    R.ModelRunner.compile_all, R.ModelRunner.warm_up, R.ModelRunner.launch = compile_all, lambda self: None, launch
    R.ModelRunner._op = lambda self, name, *args: None  # page-table and sampler-state updates: nothing to update
    E.Engine._memory_shortfall = lambda self, kv: 0
    E.Engine._executable_store = lambda self, *args, **kw: None
    E.init_kv_cache = lambda cfg, n, *args, abstract=False, **kw: real_kv(cfg, n if abstract else 1, *args,
                                                                         abstract=abstract, **kw)
    atexit.register(lambda: np.save(steps_file, np.asarray(steps, np.int64).reshape(-1, 3)))
    return main(["serve", *argv])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="64", help="request rate(s), comma separated (inf: all at once)")
    ap.add_argument("--num-prompts", type=int, default=500)
    ap.add_argument("--dataset", default="sharegpt-like")
    ap.add_argument("--step-model", default="5.5,0.0225,0.008",
                    help="a,t,b: a + t * T + b * B milliseconds a step; or roofline[:w,t,kv,a] (see above)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--kv-cache-memory", default="10GiB", help="sized as the GPU's (10 GiB of this model's pages "
                    "hold about what an 8B model's 56 GB do on an H100)")
    ap.add_argument("--port", type=int, default=8310)
    ap.add_argument("--json-out")
    ap.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps-file", help=argparse.SUPPRESS)
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then `jaxinfer serve` flags")
    a = ap.parse_args()
    rest = a.serve_args[1:] if a.serve_args[:1] == ["--"] else a.serve_args
    if a.server:
        return server(a.step_model, a.steps_file, rest)
    import numpy as np

    cores = os.sched_getaffinity(0)
    pin = lambda i: ["taskset", "-c", str(sorted(cores)[i])] if len(cores) > 1 else []  # noqa: E731
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        steps_file = os.path.join(tmp, "steps.npy")
        srv = subprocess.Popen(
            [*pin(0), sys.executable, __file__, "--server", "--steps-file", steps_file, "--step-model", a.step_model,
             "--", "--model", a.model, "--load-format", "dummy", "--port", str(a.port), "--max-queued-requests",
             "100000", "--kv-cache-memory", a.kv_cache_memory, *rest],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "server.log"), "w"))
        try:
            url = f"http://127.0.0.1:{a.port}"
            while True:
                try:
                    urllib.request.urlopen(url + "/ready", timeout=1)
                    break
                except OSError:
                    if srv.poll() is not None:
                        sys.stderr.write(open(os.path.join(tmp, "server.log")).read()[-3000:])
                        return 1
                    time.sleep(0.5)
            subprocess.run([*pin(1), sys.executable, "-m", "jaxinfer", "bench", "serve", "--base-url", url,
                            "--dataset", a.dataset, "--num-prompts", str(a.num_prompts), "--request-rate", a.rate,
                            *(["--json-out", a.json_out] if a.json_out else [])], env=env, check=True)
        finally:
            srv.terminate()
            srv.wait(timeout=60)
        s = np.load(steps_file)
    T, B, real = s[:, 0], s[:, 1], s[:, 2]
    print(f"modelled steps: {len(s)}, padded tokens {int(T.sum())}, real {int(real.sum())}: "
          f"{1 - real.sum() / max(1, T.sum()):.1%} padding")
    for lo, hi in ((0, 512), (512, 2048), (2048, 1 << 30)):
        m = (T > lo) & (T <= hi)
        if m.any():
            print(f"  buckets of {lo + 1}-{min(hi, int(T.max()))} tokens: {int(m.sum())} steps, {real[m].mean():.0f} "
                  f"real tokens of {T[m].mean():.0f} on average")
    if a.json_out:
        r = json.load(open(a.json_out))
        r["modelled_steps"] = {"step_model_ms": a.step_model, "serve_args": rest, "steps": len(s),
                               "padded_tokens": int(T.sum()), "real_tokens": int(real.sum())}
        json.dump(r, open(a.json_out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
