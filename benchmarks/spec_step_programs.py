"""Where a speculative step's time goes: each precompiled program's own time, one stream, every draft accepted.

    python benchmarks/spec_step_programs.py --method ngram --k 3        # the default model (Q4_1), n-gram replayed
    python benchmarks/spec_step_programs.py --method draft_model --k 3  # float32 target, its Q4_1 copy drafting
    python benchmarks/spec_step_programs.py --method off                # plain decode steps (--float32: the target)

One request (--prompt-len random ids, greedy, --max-tokens) runs once to record its tokens, then again from a prefix-
cache hit with every program wrapped to block until its outputs are ready: the forward program per bucket, the
sampler, and a draft model's forward and proposal programs. n-gram drafts are the recorded tokens (all accepted);
a draft model drafts for itself (its Q4_1 numbers are the float32 target's, so all are accepted too). Prints ms per
call of each program and ms per engine step (programs plus the host's work).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["off", "ngram", "draft_model"], default="ngram")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--float32", action="store_true", help="the target on float32 weights (draft_model: always)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    import jax
    import numpy as np

    from benchmarks.spec_replay import replay_proposer
    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams
    from jaxinfer.tokenizer import default_model_path

    opts = dict(show_progress=False, max_num_seqs=4, max_model_len=args.prompt_len + args.max_tokens + 16,
                async_scheduling=False)
    if args.float32 or args.method == "draft_model":
        opts["quantization"] = "none"
    if args.method != "off":
        opts["speculative_config"] = {"method": args.method, "num_speculative_tokens": args.k}
        if args.method == "draft_model":
            opts["speculative_config"]["model"] = default_model_path()
    eng = Engine(None, **opts)
    times = collections.defaultdict(lambda: [0, 0.0])

    def timed(name, fn):
        def call(*a):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*a))
            times[name][0] += 1
            times[name][1] += time.perf_counter() - t
            return out
        return call

    r = eng.runner
    for attr, label in (("compiled", "forward"), ("compiled_samplers", "sampler"), ("compiled_draft", "draft forward"),
                        ("compiled_propose", "draft propose")):
        progs = getattr(r, attr)
        for key in list(progs):
            progs[key] = timed(f"{label} {key}", progs[key])
    prompt = np.random.default_rng(0).integers(0, eng.cfg.vocab_size, args.prompt_len).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    eng.add_request(prompt, params)
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            out = list(o.outputs[0].token_ids)
    if args.method == "ngram":
        eng.scheduler.propose = replay_proposer({tuple(prompt): out}, args.k, 1.0, eng.cfg.vocab_size, 0)
    eng.add_request(prompt, params)
    eng.step(), eng.step()  # the cached prompt's last chunk and the first decode
    times.clear()
    steps, t0 = 0, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
    step_ms = 1e3 * (time.perf_counter() - t0) / steps
    per_call = {name: 1e3 * t / n for name, (n, t) in times.items()}
    print(f"{args.method} k={args.k}: {steps} steps, {step_ms:.2f} ms a step, acceptance "
          f"{eng.spec_stats()['spec_acceptance_rate']:.2f}")
    for name, ms in sorted(per_call.items()):
        print(f"  {name:40s} {times[name][0]:4d} calls {ms:8.2f} ms")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(args=vars(args), steps=steps, step_ms=step_ms, per_call_ms=per_call), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
