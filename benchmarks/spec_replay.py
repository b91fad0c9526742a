"""What speculative decoding's verify step costs and saves, for chosen acceptance rates: a replay proposer.

    python3 benchmarks/spec_replay.py --model llama-3.1-8b --load-format dummy --ks 1,2,4,8 --batches 1,8,32 \
        --rates 0.5,0.7,0.9,1.0 --json-out spec_replay.json                              # the H100 curve
    python3 benchmarks/spec_replay.py --ks 2 --batches 1 --rates 0.7 --output-len 32     # the default model, CPU

Each batch size B first runs without speculation: B prompts of --input-len random token ids, greedy, EOS ignored,
--output-len tokens each; their outputs are recorded. Then one engine per k (n-gram speculation configured, so the
verify buckets of k are compiled) runs the same prompts with its proposer replaced: for a request with n output
tokens it proposes the recorded tokens n .. n + k - 1, each corrupted (changed to another id) with probability
1 - rate, so a draft is accepted with probability `rate` given the ones before it were (rate 1.0: every step
verifies k drafts and keeps them all). Greedy verification keeps the target's own tokens, so the outputs must equal
the recorded ones (a verify step's logits may differ from a decode step's in the last bits; the table says where
they do, and the measured acceptance is reported beside the nominal rate).

Random weights (`--load-format dummy`) give near-flat logits whose greedy choice flips with those last bits, so a
recorded continuation is not the verify step's, and nothing would be accepted. There (`--simulate-acceptance`, the
default with dummy weights) the acceptance rule is replaced for timing: a good draft is the recorded token with its
lowest bit cleared, a corrupted one has it set, and a step keeps its drafts up to the first corrupted one, then the
target's token. Every step runs exactly as it would (same shapes, programs, pages; the cost of a step does not depend
on token values in a dense model); only the output is no longer the target's, so "same" is not reported.

Timed: the decode phase only (from the step after which every request has its first token to the end), as tokens
per second over all B streams; speed-up = that over the same without speculation; step cost = the mean time of a
step relative to a decode step of the same batch (at rate 1.0 every step verifies k drafts: k + 1 tokens a
sequence).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import zlib

import numpy as np


def engine(args, k: int | None):
    from jaxinfer.engine import Engine

    opts = dict(show_progress=False, max_num_seqs=max(args.batches), max_model_len=args.max_model_len)
    if args.load_format:
        opts["load_format"] = args.load_format
    if args.seq_buckets:
        opts["seq_buckets"] = tuple(int(x) for x in args.seq_buckets.split(","))
    if args.token_buckets:
        opts["token_buckets"] = tuple(int(x) for x in args.token_buckets.split(","))
        opts["max_num_batched_tokens"] = opts["token_buckets"][-1]
    if args.compilation_cache_dir:
        opts["compilation_cache_dir"] = args.compilation_cache_dir
    if args.kv_cache_memory:
        opts["kv_cache_memory"] = args.kv_cache_memory
    if args.quantization:
        opts["quantization"] = args.quantization
    if k:
        # drafts at every batch size: this measures where they stop paying (disable_by_batch_size's default)
        opts["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                      "disable_by_batch_size": max(args.batches)}
    t0 = time.perf_counter()
    eng = Engine(args.model, **opts)
    return eng, time.perf_counter() - t0


def run(eng, prompts, output_len: int) -> dict:
    """All prompts at once; the decode phase timed (see the module docstring)."""
    from jaxinfer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    rids = [eng.add_request(p, params) for p in prompts]
    seen: dict[str, list[int]] = {}
    t_decode, steps, s0 = None, 0, eng.stats()
    while eng.has_unfinished():
        for o in eng.step():
            seen[o.request_id] = list(o.outputs[0].token_ids)
        if t_decode is None:
            if len(seen) == len(rids) and all(seen[r] for r in rids):
                t_decode, n0 = time.perf_counter(), sum(len(v) for v in seen.values())
        else:
            steps += 1
    dt = time.perf_counter() - t_decode
    s1 = eng.stats()
    drafts = s1.get("spec_draft_tokens", 0) - s0.get("spec_draft_tokens", 0)
    accepted = s1.get("spec_accepted_tokens", 0) - s0.get("spec_accepted_tokens", 0)
    tokens = sum(len(v) for v in seen.values()) - n0
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, "steps": steps, "step_ms": 1e3 * dt / steps,
            "drafts": drafts, "accepted": accepted, "acceptance": accepted / drafts if drafts else None,
            "outputs": [seen[r] for r in rids]}


def free() -> None:
    """Collect a dropped engine, so its device memory is free before the next is built (an engine gc.freeze()s what
    start-up made, out of the collector's sight)."""
    gc.unfreeze()
    gc.collect()


def replay_proposer(recorded: dict[tuple, list[int]], k: int, rate: float, vocab: int, seed: int,
                    simulate: bool = False):
    def propose(req) -> list[int]:
        rec = recorded[tuple(req.prompt_token_ids)]
        n = len(req.output_token_ids)
        drafts = list(rec[n:n + k])
        # which drafts are corrupted depends on the request and position only, not on how often the engine asks
        rng = np.random.default_rng([seed, n, zlib.crc32(np.asarray(req.prompt_token_ids, np.int32).tobytes())])
        for j, t in enumerate(drafts):
            good = rng.random() < rate
            if simulate:
                drafts[j] = (t & ~1) | (not good)  # the lowest bit marks a corrupted draft (simulated acceptance)
            elif not good:
                drafts[j] = (t + 1 + int(rng.integers(vocab - 1))) % vocab  # another id
        return drafts

    return propose


def simulated_accept(proposed: list[int], target: list[int]) -> list[int]:
    """spec_decode.accept_greedy's replacement under --simulate-acceptance: drafts up to the first corrupted one."""
    out = []
    for p, t in zip(proposed, target):
        if p & 1:
            return out + [t]
        out.append(p)
    return out + [target[len(proposed)]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rates", default="0.5,0.7,0.9,1.0")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seq-buckets", default=None, help="default: 1, 8, 32 when those are the batches")
    p.add_argument("--token-buckets", default=None)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--simulate-acceptance", action=argparse.BooleanOptionalAction, default=None,
                   help="replace the acceptance rule for timing (default: with --load-format dummy)")
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 8GiB (default: the engine's sizing)")
    p.add_argument("--sampler-options", default=None, metavar="JSON",
                   help='XLA options for the sampler programs alone, e.g. \'{"xla_gpu_graph_min_graph_size": 1000000}\'')
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.sampler_options:
        from jaxinfer import runner

        runner.SAMPLER_COMPILER_OPTIONS = json.loads(args.sampler_options)
    ks = [int(x) for x in args.ks.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    if args.seq_buckets is None:
        args.seq_buckets = ",".join(str(b) for b in sorted(set(args.batches)))
    simulate = args.simulate_acceptance if args.simulate_acceptance is not None else args.load_format == "dummy"
    if simulate:
        import jaxinfer.engine

        jaxinfer.engine.accept_greedy = simulated_accept
    eng, build_s = engine(args, None)
    vocab = eng.cfg.vocab_size
    prompts = np.random.default_rng(0).integers(0, vocab, (max(args.batches) + 1, args.input_len)).tolist()
    run(eng, prompts[-1:], 4)  # warm-up
    off, off_sync, recorded = {}, {}, {}
    for B in args.batches:
        off[B] = run(eng, prompts[:B], args.output_len)
        recorded.update({tuple(q): o for q, o in zip(prompts[:B], off[B]["outputs"])})
        async_cfg = eng.ecfg  # the same steps without async scheduling: how much of a verify step's extra is host
        eng.ecfg = dataclasses.replace(async_cfg, async_scheduling=False)
        off_sync[B] = run(eng, prompts[:B], args.output_len)
        eng.ecfg = async_cfg
        print(f"off      B={B:3d} {off[B]['tok_s']:9.1f} tok/s  step {off[B]['step_ms']:6.2f} ms (without async "
              f"scheduling {off_sync[B]['step_ms']:6.2f} ms)", flush=True)
    builds = {"off": build_s}
    del eng
    free()
    rows = []
    save = _saver(args, simulate, builds, off, off_sync, rows)
    for k in ks:
        eng, builds[f"k{k}"] = engine(args, k)
        run(eng, prompts[-1:], 4)
        for B in args.batches:
            for rate in rates:
                # the engine's own check for likely drafts (_drafts_likely) asks the same proposer: random prompts hold
                # no repeated n-gram, so with the engine's it would never let a step carry drafts
                eng.scheduler.propose = eng._propose = replay_proposer(recorded, k, rate, vocab, B * 1000 + k, simulate)
                r = run(eng, prompts[:B], args.output_len)
                same = None if simulate else sum(o == off[B]["outputs"][i] for i, o in enumerate(r["outputs"]))
                row = {"k": k, "batch": B, "rate": rate, "speedup": r["tok_s"] / off[B]["tok_s"],
                       "step_cost": r["step_ms"] / off[B]["step_ms"], "same_outputs": same,
                       **{x: r[x] for x in r if x != "outputs"}}
                rows.append(row)
                print(f"k={k} B={B:3d} rate {rate:.2f}: {r['tok_s']:9.1f} tok/s  x{row['speedup']:.2f}  step "
                      f"{r['step_ms']:6.2f} ms (x{row['step_cost']:.2f} a decode)  acceptance "
                      f"{r['acceptance'] if r['acceptance'] is not None else float('nan'):.2f}"
                      + ("" if simulate else f"  same outputs {same}/{B}"), flush=True)
        del eng
        free()
        save()
    print(f"\n{'k':>2s} {'B':>4s} {'rate':>5s} {'accepted':>8s} {'tok/s':>9s} {'speed-up':>8s} {'step cost':>9s} "
          f"{'same':>6s}")
    for B in args.batches:
        print(f"{'-':>2s} {B:4d} {'off':>5s} {'':8s} {off[B]['tok_s']:9.1f} {1.0:8.2f} {1.0:9.2f}")
        o = off_sync[B]
        print(f"{'-':>2s} {B:4d} {'sync':>5s} {'':8s} {o['tok_s']:9.1f} {o['tok_s'] / off[B]['tok_s']:8.2f} "
              f"{o['step_ms'] / off[B]['step_ms']:9.2f}")
    for r in rows:
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        same = "-" if simulate else f"{r['same_outputs']}/{r['batch']}"
        print(f"{r['k']:2d} {r['batch']:4d} {r['rate']:5.2f} {acc:>8s} {r['tok_s']:9.1f} {r['speedup']:8.2f} "
              f"{r['step_cost']:9.2f} {same:>6s}")
    save()
    return 0


def _saver(args, simulate, builds, off, off_sync, rows):
    """Writes the JSON so far (after each k: a run cut short keeps what it measured)."""
    import jax

    def save():
        if not args.json_out:
            return
        with open(args.json_out, "w") as fh:
            json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), args=vars(args),
                           simulated_acceptance=simulate,
                           builds_s=builds, off={B: {x: v for x, v in r.items() if x != "outputs"}
                                                 for B, r in off.items()},
                           off_sync={B: {x: v for x, v in r.items() if x != "outputs"} for B, r in off_sync.items()},
                           rows=rows), fh, indent=1)

    return save


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
