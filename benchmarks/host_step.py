"""The host's share of an engine step: Python work per decode step at many rows, without a GPU.

    python benchmarks/host_step.py                        # 512 decode rows, SmolLM2-135M shape, dummy weights
    python benchmarks/host_step.py --rows 256 --output-kind final_only
    python benchmarks/host_step.py --rows 128 --decoded 500 --output-kind delta   # outputs already 500 tokens long

With async scheduling the host reads step N's tokens, builds the outputs, schedules and packs step N+1 while
the device runs; if that takes longer than the device's step, the device waits. This measures it directly:
for each decode step, the wall time of `Engine.step()` minus the time it waited for the device
(`Engine.last_wait_seconds`). The device's speed does not matter (a CPU is fine): only the host's work is
counted (a few minutes on a 2-core CPU, most of it the device's steps). Prints the median and the 90th
percentile over --steps steps, and a JSON line.
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
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--rows", type=int, default=512, help="sequences decoding together")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output-kind", choices=["cumulative", "delta", "final_only"], default="cumulative")
    p.add_argument("--decoded", type=int, default=3, help="decode steps run before the measured ones (how long "
                   "the outputs already are: a CUMULATIVE output copies all of it every step)")
    args = p.parse_args(argv)
    import numpy as np

    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

    R = args.rows
    eng = Engine(args.model, load_format=args.load_format, max_num_seqs=R, seq_buckets=[1, R],
                 token_buckets=[R, 4 * R], max_model_len=args.prompt_len + args.decoded + args.steps + 64,
                 show_progress=False)
    kind = RequestOutputKind[args.output_kind.upper()]
    rng = np.random.default_rng(0)
    for _ in range(R):
        eng.add_request(rng.integers(0, eng.cfg.vocab_size, args.prompt_len).tolist(),
                        SamplingParams(temperature=0.0, max_tokens=args.decoded + args.steps + 16, ignore_eos=True,
                                       output_kind=kind))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()  # every prompt in: the next steps are all decodes
    for _ in range(args.decoded):
        eng.step()
    host, wait = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        eng.step()
        wall = time.perf_counter() - t
        host.append(wall - eng.last_wait_seconds)
        wait.append(eng.last_wait_seconds)
    res = {"rows": R, "output_kind": args.output_kind, "decoded_before": args.decoded, "host_ms_p50": float(np.median(host) * 1e3),
           "host_ms_p90": float(np.percentile(host, 90) * 1e3), "wait_ms_p50": float(np.median(wait) * 1e3),
           "host_us_per_row": float(np.median(host) / R * 1e6)}
    print(f"{R} decode rows, {args.output_kind} outputs of {args.decoded}+ tokens: host {res['host_ms_p50']:.2f} ms per step (p90 "
          f"{res['host_ms_p90']:.2f}), {res['host_us_per_row']:.1f} us per row; waited for the device "
          f"{res['wait_ms_p50']:.2f} ms")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
