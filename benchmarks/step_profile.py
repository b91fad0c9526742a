"""Where the time of one decode step goes: host phases of `Engine.step()` against the device's own time.

    python benchmarks/step_profile.py --model llama-3.1-8b --load-format dummy     # GPU
    python benchmarks/step_profile.py --smoke                                     # tiny shapes: checks the script

For each decode batch size (--batch-sizes), requests with --context-token prompts are prefilled, then
--steps decode steps are timed three ways:
  engine     `Engine.step()` as users call it (ms/step, wall clock), with async scheduling (the default:
             step N+1 is launched before step N's tokens are read) and without;
  phases     synchronous steps split into schedule / admit / prepare / launch (packing, the copies to the
             device and the two program calls returning) / wait (until the sampled ids are on the host) /
             post (scheduler update, detokenizing, outputs);
  device     the step's two precompiled programs (forward, sampler) called back to back on one device
             input, blocked once at the end: the device's time per step with no host work in the way.
The gap between `engine` and `device` is host time the device waits for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--quantization", default=None, help="a weight scheme (int8, int4, fp8, ...), as `bench` takes it")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json-out")
    p.add_argument("--trace", metavar="DIR", help="also write a Perfetto trace of --trace-steps async "
                   "Engine.step() calls per batch size, to DIR/b<batch> (summarise: benchmarks/trace_summary.py)")
    p.add_argument("--trace-steps", type=int, default=20)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from jaxinfer import compile_guard, sampler
    from jaxinfer.engine import Engine
    from jaxinfer.runner import pack
    from jaxinfer.sampling_params import SamplingParams

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.smoke:
        sizes, args.context, args.steps = [1, 4], 16, 4
    maxb = max(sizes)
    opts = dict(load_format=args.load_format, max_num_seqs=maxb, token_buckets=sorted({*sizes, args.context}),
                seq_buckets=sorted(set(sizes)), max_model_len=args.context + 4 * args.steps + 64,
                attention_impl=args.attention_impl, quantization=args.quantization, show_progress=False)
    t0 = time.perf_counter()
    eng = Engine(args.model, **opts)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s; buckets {eng.runner.buckets}", flush=True)
    V = eng.cfg.vocab_size
    rng = np.random.default_rng(0)
    report = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cases": []}

    for B in sizes:
        case = dict(batch=B, context=args.context)
        for mode in ("async", "sync"):
            eng.ecfg = dataclasses.replace(eng.ecfg, async_scheduling=mode == "async")
            prompts = [rng.integers(0, V, args.context).tolist() for _ in range(B)]
            params = SamplingParams(temperature=0.0, max_tokens=3 * args.steps + args.trace_steps + 8, ignore_eos=True)
            ids = [eng.add_request(p, params) for p in prompts]
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running + list(eng.scheduler.waiting)):
                eng.step()
            for _ in range(3):
                eng.step()
            c0 = compile_guard.count()
            # 1. Engine.step() as users call it
            jax.block_until_ready(eng.runner.kv)
            t = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            case[f"engine_{mode}_ms"] = (time.perf_counter() - t) / args.steps * 1e3
            if mode == "async" and args.trace:
                with jax.profiler.trace(os.path.join(args.trace, f"b{B}"), create_perfetto_trace=True):
                    for _ in range(args.trace_steps):
                        eng.step()
                    jax.block_until_ready(eng.runner.kv)
            if mode == "sync":
                # 2. the same steps, phase by phase (synchronous: each phase ends before the next starts)
                ph = dict(schedule=0.0, admit=0.0, prepare=0.0, launch=0.0, wait=0.0, post=0.0)
                run = eng.runner
                for _ in range(args.steps):
                    t = time.perf_counter()
                    batch = eng.scheduler.schedule()
                    t1 = time.perf_counter(); ph["schedule"] += t1 - t
                    eng._admit(batch)
                    t2 = time.perf_counter(); ph["admit"] += t2 - t1
                    prepared = run.prepare(batch)
                    t3 = time.perf_counter(); ph["prepare"] += t3 - t2
                    launched = run.launch(*prepared)
                    t4 = time.perf_counter(); ph["launch"] += t4 - t3
                    result = launched.result()
                    t5 = time.perf_counter(); ph["wait"] += t5 - t4
                    sampled = [int(result.token_ids[i]) if batch.samples(i) else None for i in range(len(batch))]
                    appended = eng.scheduler.update(batch, sampled)
                    eng._postprocess(batch, appended, result)
                    eng._outputs(batch.requests)
                    ph["post"] += time.perf_counter() - t5
                case["phases_ms"] = {k: v / args.steps * 1e3 for k, v in ph.items()}
                # 3. device time: the step's two programs back to back on one input
                inp, md, bucket, _ = run.prepare(eng.scheduler.schedule())
                fwd, smp = run.compiled[bucket], run.compiled_samplers[(bucket[1], sampler.variant_for(md))]
                flat_in, flat_md = jax.device_put(pack(inp)), jax.device_put(pack(md))

                def device_step():
                    logits, _, run.kv, run.sstate, run.page_table = fwd(run.params, run.kv, run.sstate,
                                                                        run.page_table, flat_in)
                    out, run.sstate = smp(logits, run.sstate, flat_md)
                    return out

                jax.block_until_ready(device_step())
                t = time.perf_counter()
                for _ in range(args.steps):
                    out = device_step()
                jax.block_until_ready(out)
                case["device_step_ms"] = (time.perf_counter() - t) / args.steps * 1e3
                case["bucket"] = list(bucket)
            case[f"compiles_{mode}"] = compile_guard.count() - c0
            for rid in ids:
                eng.abort(rid)
            while eng.has_unfinished():
                eng.step()
        report["cases"].append(case)
        print(json.dumps(case), flush=True)

    names = list(report["cases"][0]["phases_ms"])
    print("\n| batch | Engine.step async ms | sync ms | device step ms | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for c in report["cases"]:
        print(f"| {c['batch']} | {c['engine_async_ms']:.2f} | {c['engine_sync_ms']:.2f} | {c['device_step_ms']:.2f} | "
              + " | ".join(f"{v:.2f}" for v in c["phases_ms"].values()) + " |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
