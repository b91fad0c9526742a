"""Faults injected into a running engine, and what the other requests saw: one table.

    python benchmarks/reliability.py                       # default model, its CPU defaults
    python benchmarks/reliability.py --requests 8 --json-out reliability.json

Each row runs the same requests (greedy and seeded-sampled, one of them the "culprit") with a fault injected through
`Engine.fault_hook` (test-only) or a patched step, and compares every other request's tokens with a run without the
fault. Rows:
  transient     one step raises once (at a random launch): nothing may be lost
  culprit       every step holding the culprit raises: it alone must end with finish_reason 'error'
  detokenizer   the culprit's text raises: it alone must end with 'error'
  NaN           the culprit's logits turn NaN at one step: it alone must end with 'error', no token drawn from them
  hung step     (serving.AsyncEngine, --step-timeout 4 s) a step sleeps 10 s: the watchdog must fail what is in flight
                at once, the server be unready until the step returns, then serve the same tokens again
  lost state    (serving.AsyncEngine) a step raises out of the engine: in-flight requests fail, a new engine is
                built from the factory: seconds until ready, and the next requests' tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the embedded default model")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    import numpy as np

    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams
    from serving.async_engine import AsyncEngine

    rng = np.random.default_rng(args.seed)
    eng = Engine(args.model, show_progress=False)
    V = eng.cfg.vocab_size
    prompts = [rng.integers(0, V, int(n)).tolist() for n in rng.integers(8, 200, args.requests)]
    params = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
              for i in range(args.requests)]
    culprit = args.requests // 2

    def run(hook=None):
        eng.fault_hook = hook
        faults = eng.num_step_faults
        ids = [eng.add_request(pr, sp) for pr, sp in zip(prompts, params)]
        ctx["ids"] = ids
        finals, t0 = {}, time.perf_counter()
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    finals[out.request_id] = out
        eng.fault_hook = None
        return [finals[i] for i in ids], eng.num_step_faults - faults, time.perf_counter() - t0

    ctx: dict = {}
    base, _, base_s = run()
    want = [o.outputs[0].token_ids for o in base]
    rows = []

    def row(name, outs, faults, secs, expect_failed=()):
        others = [i for i in range(args.requests) if i not in expect_failed]
        same = all(outs[i].outputs[0].token_ids == want[i] and outs[i].error is None for i in others)
        failed = [i for i in range(args.requests) if outs[i].outputs[0].finish_reason == "error"]
        pages = eng.scheduler.allocator.num_used
        rows.append(dict(fault=name, others_identical=same, failed=failed, expected_failed=list(expect_failed),
                         step_faults=faults, seconds=round(secs, 2), baseline_seconds=round(base_s, 2),
                         pages_in_use_after=pages))

    launches = []
    at = int(rng.integers(2, 8))

    def transient(batch):
        launches.append(1)
        if len(launches) == at:
            raise RuntimeError("injected: a step fails once")
    row("transient: one step raises once", *run(transient))

    def culprit_hook(batch):
        if any(r.group_id == ctx["ids"][culprit] for r in batch.requests):
            raise RuntimeError("injected: the culprit breaks its step")
    row("culprit: every step holding one request raises", *run(culprit_hook), expect_failed=(culprit,))

    nan_seen = []

    def nan_hook(batch):  # the culprit's logits become NaN at its 3rd step
        mine = [r for r in batch.requests if r.group_id == ctx["ids"][culprit]]
        nan_seen.extend(mine)
        return mine if len(nan_seen) == 3 else None
    row("NaN: one request's logits turn NaN at one step", *run(nan_hook), expect_failed=(culprit,))

    add_token = eng._add_token

    def broken(req, *a, **kw):
        if req.group_id == ctx["ids"][culprit] and len(req.output_token_ids) >= 3:
            raise RuntimeError("injected: its detokenizer broke")
        return add_token(req, *a, **kw)
    eng._add_token = broken
    row("detokenizer: one request's text raises", *run(), expect_failed=(culprit,))
    del eng._add_token

    # The server's engine thread: a hung step, then a lost state (a rebuild from the factory).
    built = []

    def factory():
        built.append(time.perf_counter())
        return eng if len(built) == 1 else Engine(args.model, show_progress=False)

    async def served():
        ae = AsyncEngine(factory, step_timeout=4.0)  # a 256-token step of the default model: ~1.7 s on 2 cores
        ae.start()
        await ae.wait_ready()

        async def one(i):
            toks = []
            async for out in ae.generate([(f"r{i}-{time.monotonic_ns()}", prompts[i], params[i])]):
                toks = out.outputs[0].token_ids
            return toks

        async def all_requests():
            return await asyncio.gather(*(one(i) for i in range(args.requests)), return_exceptions=True)

        out = {}
        hung = []
        ae.engine.fault_hook = lambda batch: hung or (hung.append(1), time.sleep(10))
        t0 = time.perf_counter()
        res = await all_requests()
        failed_at = time.perf_counter() - t0
        while not ae.is_ready:
            await asyncio.sleep(0.05)
        ready_after = time.perf_counter() - t0
        ae.engine.fault_hook = None
        again = await all_requests()
        out["hung"] = dict(failed=sum(isinstance(r, Exception) for r in res), failed_within_s=round(failed_at, 2),
                           ready_after_s=round(ready_after, 2), next_identical=again == want)
        real, calls = ae.engine.step, []

        def step():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected: the device state is lost")
            return real()
        ae.engine.step = step
        t0 = time.perf_counter()
        res = await all_requests()
        while not ae.is_ready:
            await asyncio.sleep(0.05)
        ready_after = time.perf_counter() - t0
        again = await all_requests()
        out["lost"] = dict(failed=sum(isinstance(r, Exception) for r in res), ready_after_s=round(ready_after, 2),
                           rebuilds=ae.num_rebuilds, next_identical=again == want)
        await ae.stop()
        return out

    srv = asyncio.run(served())
    # The sampled requests' tokens depend on their seeds, not on the engine: the rebuilt engine gives the same ones.
    rows.append(dict(fault="hung step (watchdog at 4 s; the step sleeps 10 s)", **srv["hung"]))
    rows.append(dict(fault="lost state (a step raises out of the engine; rebuilt from the factory)", **srv["lost"]))

    print(f"| fault injected | what the other requests saw | the culprit | recovery |")
    print("|---|---|---|---|")
    in_engine = [r for r in rows if "others_identical" in r]
    for r in in_engine:
        print(f"| {r['fault']} | {'identical tokens' if r['others_identical'] else 'DIFFERENT'} "
              f"({args.requests - len(r['expected_failed'])} requests) | "
              f"{'failed alone' if r['failed'] == r['expected_failed'] and r['failed'] else 'none' if not r['failed'] else r['failed']} | "
              f"{r['step_faults']} step faults; {r['seconds']} s (no fault: {r['baseline_seconds']} s); "
              f"pages in use after: {r['pages_in_use_after']} |")
    h, lo = rows[len(in_engine)], rows[len(in_engine) + 1]
    print(f"| {h['fault']} | {h['failed']} in flight failed within {h['failed_within_s']} s | | ready again after "
          f"{h['ready_after_s']} s; next requests {'identical' if h['next_identical'] else 'DIFFERENT'} |")
    print(f"| {lo['fault']} | {lo['failed']} in flight failed | | ready again after {lo['ready_after_s']} s "
          f"({lo['rebuilds']} rebuild); next requests {'identical' if lo['next_identical'] else 'DIFFERENT'} |")
    print(json.dumps(rows))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(requests=args.requests, max_tokens=args.max_tokens, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
