"""Running streams while a long prompt is admitted: the time between tokens of streams already decoding, while a
long prompt's chunks are prefilled in the same steps (chunked prefill shares each step's token budget).

    python benchmarks/long_prompt_itl.py                              # default model, its CPU engine preset
    python benchmarks/long_prompt_itl.py --streams 4 --prompt-len 4200 --json-out itl.json

Greedy streams decode first; then the long prompt is queued and `Engine.step()` runs until the long prompt's
first token. Reports the running streams' inter-token latency over that window (max, p99, mean), the steps that
carried the prompt's chunks and those that did not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the embedded default model")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=4200)
    p.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                   help="an engine option over the preset's (repeatable), e.g. max_num_batched_tokens=64")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    import numpy as np

    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams

    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    eng = Engine(args.model, show_progress=False, **options)
    rng = np.random.default_rng(0)
    V = eng.cfg.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True)
    streams = [eng.add_request(rng.integers(0, V, 24).tolist(), SamplingParams(max_tokens=1000, **greedy))
               for _ in range(args.streams)]
    seen = {r: 0 for r in streams}
    while min(seen.values()) < 3:  # every stream decoding
        for o in eng.step():
            seen[o.request_id] = len(o.outputs[0].token_ids)
    long_id = eng.add_request(rng.integers(0, V, args.prompt_len).tolist(), SamplingParams(max_tokens=1, **greedy))
    last = {r: time.perf_counter() for r in streams}
    gaps, chunk_steps, other_steps = [], [], []
    done, before = False, 0
    while not done:
        t0 = time.perf_counter()
        outs = eng.step()
        now = time.perf_counter()
        req = next((r for r in eng.scheduler.running + eng.scheduler.waiting if r.request_id.split("#")[0] == long_id), None)
        computed = req.num_computed_tokens if req is not None else args.prompt_len
        carried_prompt = computed != before
        before = computed
        for o in outs:
            if o.request_id == long_id:
                done = done or len(o.outputs[0].token_ids) > 0
            elif len(o.outputs[0].token_ids) > seen[o.request_id]:
                seen[o.request_id] = len(o.outputs[0].token_ids)
                gaps.append(now - last[o.request_id])
                last[o.request_id] = now
        (chunk_steps if carried_prompt else other_steps).append(now - t0)
    for r in streams:
        eng.abort(r)
    g = np.array(gaps)
    res = dict(streams=args.streams, prompt_len=args.prompt_len, token_budget=eng.ecfg.token_budget, mixed_step_token_budget=eng.scheduler.mixed_step_token_budget,
               itl_max_s=float(g.max()), itl_p99_s=float(np.percentile(g, 99)), itl_mean_s=float(g.mean()),
               gaps=len(g), chunk_steps=len(chunk_steps), chunk_step_mean_s=float(np.mean(chunk_steps)),
               other_step_mean_s=float(np.mean(other_steps)) if other_steps else None,
               window_s=float(sum(chunk_steps) + sum(other_steps)))
    print(f"{args.streams} streams decoding while a {args.prompt_len}-token prompt is admitted: inter-token latency "
          f"max {res['itl_max_s']:.3f} s, p99 {res['itl_p99_s']:.3f} s, mean {res['itl_mean_s']:.3f} s over "
          f"{res['gaps']} gaps; {res['chunk_steps']} steps with the prompt ({res['chunk_step_mean_s']:.3f} s each), "
          f"first token of the prompt after {res['window_s']:.1f} s")
    print(json.dumps(res))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
