"""Where the time of one decode step goes: host phases of `Engine.step()` against the device's own time.

    python benchmarks/step_profile.py --model llama-3.1-8b --load-format dummy     # GPU
    python benchmarks/step_profile.py --smoke                                     # tiny shapes: checks the script

For each decode batch size (--batch-sizes), requests with --context-token prompts are prefilled, then
--steps decode steps are timed three ways:
  engine     `Engine.step()` as users call it (ms/step, wall clock);
  phases     the same steps split into schedule / admit / prepare / device_put / dispatch (the call
             returning) / wait (until the sampled ids are on the host) / update+postprocess;
  device     the precompiled step called back to back on one device input, blocked once at the end: the
             device's time per step with no host work in the way; and the forward pass alone (no
             sampler), compiled for the same bucket.
The gap between `engine` and `device` is host time the device waits for.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json-out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from jaxinfer import compile_guard
    from jaxinfer.engine import Engine
    from jaxinfer.model import compute_logits, forward
    from jaxinfer.sampling_params import SamplingParams

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.smoke:
        sizes, args.context, args.steps = [1, 4], 16, 4
    maxb = max(sizes)
    opts = dict(load_format=args.load_format, max_num_seqs=maxb, token_buckets=sorted({*sizes, args.context}),
                seq_buckets=sorted(set(sizes)), max_model_len=args.context + 4 * args.steps + 64,
                attention_impl=args.attention_impl, show_progress=False)
    t0 = time.perf_counter()
    eng = Engine(args.model, **opts)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s; buckets {eng.runner.buckets}", flush=True)
    V = eng.cfg.vocab_size
    rng = np.random.default_rng(0)
    report = {"device": str(jax.devices()[0]), "jax": jax.__version__, "cases": []}

    for B in sizes:
        prompts = [rng.integers(0, V, args.context).tolist() for _ in range(B)]
        params = SamplingParams(temperature=0.0, max_tokens=3 * args.steps + 8, ignore_eos=True)
        ids = [eng.add_request(p, params) for p in prompts]
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running + list(eng.scheduler.waiting)):
            eng.step()
        for _ in range(3):
            eng.step()
        c0 = compile_guard.count()
        # 1. Engine.step() as is
        jax.block_until_ready(eng.runner.kv)
        t = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        engine_ms = (time.perf_counter() - t) / args.steps * 1e3
        # 2. the same, phase by phase
        ph = dict(schedule=0.0, admit=0.0, prepare=0.0, device_put=0.0, dispatch=0.0, wait=0.0, post=0.0)
        run = eng.runner
        for _ in range(args.steps):
            t = time.perf_counter()
            batch = eng.scheduler.schedule()
            t1 = time.perf_counter(); ph["schedule"] += t1 - t
            eng._admit(batch)
            t2 = time.perf_counter(); ph["admit"] += t2 - t1
            inp = run.prepare(batch)
            t3 = time.perf_counter(); ph["prepare"] += t3 - t2
            dev = jax.device_put(inp)
            t4 = time.perf_counter(); ph["device_put"] += t4 - t3
            T, Bk = inp.token_ids.shape[0], inp.logits_indices.shape[0]
            out, run.kv, run.sstate = run.compiled[(T, Bk)](run.params, run.kv, run.sstate, dev)
            t5 = time.perf_counter(); ph["dispatch"] += t5 - t4
            toks = np.asarray(out.token_ids)
            t6 = time.perf_counter(); ph["wait"] += t6 - t5
            sampled = [int(toks[i]) if batch.samples(i) else None for i in range(len(batch))]
            eng.scheduler.update(batch, sampled)
            eng._postprocess(batch, sampled, None)
            eng._outputs(batch)
            ph["post"] += time.perf_counter() - t6
        phases = {k: v / args.steps * 1e3 for k, v in ph.items()}
        # 3. device time: the same bucket back to back, and the forward pass alone
        batch = eng.scheduler.schedule()
        inp = run.prepare(batch)
        dev = jax.device_put(inp)
        T, Bk = inp.token_ids.shape[0], inp.logits_indices.shape[0]
        fn = run.compiled[(T, Bk)]
        out, run.kv, run.sstate = fn(run.params, run.kv, run.sstate, dev)
        jax.block_until_ready(out)
        t = time.perf_counter()
        for _ in range(args.steps):
            out, run.kv, run.sstate = fn(run.params, run.kv, run.sstate, dev)
        jax.block_until_ready(out)
        device_ms = (time.perf_counter() - t) / args.steps * 1e3

        from jaxinfer.attention import make_attention_fn
        attn_fn = make_attention_fn(eng.cfg, eng.ecfg.attention_impl, eng.ecfg.attention_interpret)
        cfg = eng.cfg

        def fwd(params, kv, inp):
            h, kv = forward(params, cfg, inp.token_ids, inp.positions, kv, inp.attn, attn_fn)
            return jax.numpy.argmax(compute_logits(params, cfg, h[inp.logits_indices]), -1), kv

        f = jax.jit(fwd, donate_argnums=(1,)).lower(run.params, run.kv, dev).compile()
        o, run.kv = f(run.params, run.kv, dev)
        jax.block_until_ready(o)
        t = time.perf_counter()
        for _ in range(args.steps):
            o, run.kv = f(run.params, run.kv, dev)
        jax.block_until_ready(o)
        forward_ms = (time.perf_counter() - t) / args.steps * 1e3
        for rid in ids:
            eng.abort(rid)
        eng.step()
        case = dict(batch=B, bucket=[T, Bk], context=args.context, engine_ms=engine_ms, phases_ms=phases,
                    device_step_ms=device_ms, device_forward_ms=forward_ms, compiles_while_measured=compile_guard.count() - c0 - 1)
        report["cases"].append(case)
        print(json.dumps(case), flush=True)

    print("\n| batch | Engine.step ms | device step ms | forward only ms | " + " | ".join(ph) + " |")
    print("|---" * (4 + len(ph)) + "|")
    for c in report["cases"]:
        print(f"| {c['batch']} | {c['engine_ms']:.2f} | {c['device_step_ms']:.2f} | {c['device_forward_ms']:.2f} | "
              + " | ".join(f"{v:.2f}" for v in c["phases_ms"].values()) + " |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
