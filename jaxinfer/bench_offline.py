"""`jaxinfer bench throughput` and `jaxinfer bench latency`: the engine alone, offline, modelled on
`vllm bench throughput` and `vllm bench latency`.

Prompts are random token ids (seeded), so no tokenizer or text is involved; every request is greedy and
goes straight into `Engine.add_request`, then `Engine.step()` runs until all are done. With --ignore-eos
each request makes exactly its drawn number of output tokens; without it a request may stop early at an
end-of-sequence token (the report counts what was made).

  throughput  --num-prompts requests submitted at once; elapsed = first add_request -> last request done.
              Reported: requests/s, output tok/s, total (prompt + output) tok/s, elapsed, prompt (prefill)
              and output (decode) token counts, engine steps and preemptions.
  latency     --batch-size requests submitted at once, --num-iters-warmup times unmeasured, then
              --num-iters times measured, each time with fresh prompt ids (the prefix cache never helps).
              Reported: the whole batch's end-to-end latency (mean, p50, p90, p99) and, per request, TTFT
              (submit -> first token) and TPOT ((last token - first token) / (output tokens - 1)).

One short warm-up request runs before a throughput measurement. Nothing may compile while measured: the
number of compilations (from `Engine.num_compiles_since_ready`) is reported, and a nonzero count warned.

Lengths are drawn once per run (the latency batch reuses its lengths every iteration):

  random          input uniform in [L - round(L * R), L + round(L * R)] (at least 1), L = --input-len and
                  R = --range-ratio; output likewise from --output-len
  --input-len-range LO,HI
                  input lengths = numpy.random.default_rng(SEED).integers(LO, HI, size=N) (HI excluded)
  sharegpt-like   log-normal, shaped like ShareGPT conversations: input median --input-len (default 88),
                  log-space sigma 1.1; output median --output-len (default 225), sigma 0.9. These defaults
                  give means of about 161 prompt and 338 output tokens, what the vLLM paper (Kwon et al.,
                  SOSP 2023) reports for ShareGPT. Lengths are rounded, at least 1, and clipped to the
                  context: input <= max_model_len - 1, input + output <= max_model_len.

Seeds: input lengths are the first draw of numpy.random.default_rng(--input-lens-seed, default --seed);
output lengths come from default_rng([--seed, 1]) and prompt token ids from default_rng([--seed, 2]).

Start-up: building the engine is timed and split into weight load (`Engine.load_seconds`), KV-cache
allocation (`kv_seconds`), bucket compilation (`compile_seconds`) and the programs' first runs (`warm_up_seconds`,
on a GPU or TPU); "other" is the rest of the total.
--warm-start also measures a cold and a warm start, each in a fresh process (`python -m jaxinfer <same
arguments> --startup-only`, which builds the engine and prints its split as one JSON line). A second
build in this process would not be a warm start: jax keeps lowered and compiled programs in in-memory
caches, and on a GPU or TPU this process would still hold the device memory (or, on a TPU, the device).
So, before this process touches the device, a first child builds the engine and so fills the persistent
compilation cache, a second child builds it from the filled cache, and only then does this process build
its own engine (from the cache too) and measure. The cache is `EngineConfig.cache_dir()`:
--compilation-cache-dir, else $JAXINFER_CACHE_DIR/xla, else ~/.cache/jaxinfer/xla. A "cold" build is
only cold if that cache did not already hold these programs: the report gives the number of files in the
cache before each build (point --compilation-cache-dir at an empty directory for a truly cold start).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxinfer.bench import step_until_done
from jaxinfer.cli import UsageError

# ShareGPT-like lengths: log-normal around these medians (see the module docstring).
SHAREGPT_INPUT_MEDIAN, SHAREGPT_INPUT_SIGMA = 88, 1.1
SHAREGPT_OUTPUT_MEDIAN, SHAREGPT_OUTPUT_SIGMA = 225, 0.9

# (input, output) lengths when --input-len / --output-len are not given, for the random dataset.
DEFAULT_LENS = {"throughput": (128, 128), "latency": (32, 128)}


# -- flags ------------------------------------------------------------------------------------------------------


def _len_range(s: str) -> tuple[int, int]:
    lo, sep, hi = s.partition(",")
    try:
        lo, hi = int(lo), int(hi)
    except ValueError:
        lo = hi = 0
    if not sep or not 1 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO < HI (HI excluded, as in numpy's "
                                         f"integers), got {s!r}")
    return lo, hi


def add_parsers(subparsers) -> None:
    """`throughput` and `latency` under `jaxinfer bench`."""
    from jaxinfer.cli import _nonneg_int, _positive_int

    def throughput_flags(g):
        g.add_argument("--num-prompts", type=_positive_int, default=100, metavar="N",
                       help="requests submitted (default: %(default)s)")

    def latency_flags(g):
        g.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                       help="requests submitted together (default: %(default)s)")
        g.add_argument("--num-iters-warmup", type=_nonneg_int, default=3, metavar="N",
                       help="unmeasured batches first (default: %(default)s)")
        g.add_argument("--num-iters", type=_positive_int, default=10, metavar="N",
                       help="measured batches (default: %(default)s)")

    _add_mode(
        subparsers, "throughput", throughput_flags,
        help="offline throughput: many requests at once, requests/s and tokens/s",
        description="Submit --num-prompts requests of random token ids at once to the engine (no server) and\n"
        "step until all are done: requests/s, output tok/s, total tok/s, prefill and decode token counts.",
        epilog="examples:\n"
        "  jaxinfer bench throughput --num-prompts 200 --input-len 128 --output-len 128 --ignore-eos\n"
        "  jaxinfer bench throughput --model llama-3.1-8b --load-format dummy --num-prompts 1000 \\\n"
        "      --input-len 256 --output-len 256 --ignore-eos\n"
        "  jaxinfer bench throughput --dataset sharegpt-like --num-prompts 500 --json-out tp.json\n"
        "  jaxinfer bench throughput --input-len-range 128,1025 --seed 1234 --output-len 128 --ignore-eos",
    )
    _add_mode(
        subparsers, "latency", latency_flags,
        help="offline latency of one batch: end-to-end, TTFT, TPOT percentiles",
        description="Submit --batch-size requests of random token ids at once to the engine (no server) and\n"
        "step until all are done, --num-iters times after --num-iters-warmup unmeasured times: the batch's\n"
        "end-to-end latency and each request's TTFT and TPOT (mean, p50, p90, p99).",
        epilog="examples:\n"
        "  jaxinfer bench latency --batch-size 8 --input-len 32 --output-len 128 --ignore-eos\n"
        "  jaxinfer bench latency --model llama-3.1-8b --load-format dummy --batch-size 1 --num-iters 30\n"
        "  jaxinfer bench latency --warm-start --json-out latency.json",
    )


def _add_mode(subparsers, mode: str, own_flags, **kw) -> None:
    """A mode's parser: the shared flags, plus `own_flags(workload_group)`."""
    from jaxinfer.cli import _dataset, _Formatter, _nonneg_int, _positive_int, add_engine_args, add_model_args

    p = subparsers.add_parser(mode, formatter_class=_Formatter, **kw)
    p.description += ("\n\nPrompts are random token ids, decoding is greedy. Start-up (weight load, KV-cache\n"
                      "allocation, bucket compilation) is reported separately; --warm-start adds a cold and a\n"
                      "warm start, each in a fresh process. The table comes last on stdout; --json-out keeps\n"
                      "every number with the date, versions, device and git commit.")
    add_model_args(p)
    d_in, d_out = DEFAULT_LENS[mode]
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", type=_dataset, choices=["random", "sharegpt-like"], default="random",
                   help="length distribution: random = uniform around --input-len / --output-len; sharegpt-like "
                   "= log-normal with ShareGPT's long tail, medians --input-len / --output-len (default: %(default)s)")
    g.add_argument("--input-len", type=_positive_int, metavar="N",
                   help=f"prompt tokens: the mean (random) or median (sharegpt-like) "
                   f"(default: {d_in}; sharegpt-like: {SHAREGPT_INPUT_MEDIAN})")
    g.add_argument("--output-len", type=_positive_int, metavar="N",
                   help=f"output tokens: the mean (random) or median (sharegpt-like) "
                   f"(default: {d_out}; sharegpt-like: {SHAREGPT_OUTPUT_MEDIAN})")
    g.add_argument("--range-ratio", type=float, default=0.0, metavar="R",
                   help="random: lengths uniform in [L - round(L*R), L + round(L*R)], 0 <= R < 1 "
                   "(default: %(default)s)")
    g.add_argument("--input-len-range", type=_len_range, metavar="LO,HI",
                   help="random: input lengths drawn as numpy.random.default_rng(SEED).integers(LO, HI) "
                   "(HI excluded), in place of --input-len and --range-ratio")
    g.add_argument("--seed", type=_nonneg_int, default=0, metavar="N",
                   help="seed for lengths and prompt token ids (default: %(default)s)")
    g.add_argument("--input-lens-seed", type=_nonneg_int, metavar="N",
                   help="seed for the input lengths alone (default: --seed)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens, so every request makes exactly its "
                   "output length")
    own_flags(g)
    o = p.add_argument_group("report")
    o.add_argument("--json-out", metavar="PATH", help="also write every number and the run's context as JSON")
    o.add_argument("--warm-start", action="store_true",
                   help="also time a cold and a warm engine start, each in a fresh process, through the "
                   "persistent compilation cache")
    o.add_argument("--profile", metavar="DIR",
                   help="write a jax profiler trace (Perfetto / TensorBoard) of the measured run to DIR; "
                   "benchmarks/trace_summary.py DIR sums its device time per kernel")
    o.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)  # the --warm-start child
    add_engine_args(p)
    # The JSON's "config" keeps these flags, not the plain `bench` ones argparse also leaves in the namespace.
    keys = tuple(a.dest for a in p._actions if a.dest not in ("help", "startup_only"))
    p.set_defaults(func=run, bench_mode=mode, config_keys=keys)


# -- lengths and prompts ----------------------------------------------------------------------------------------


def draw_lengths(n: int, *, dataset: str = "random", input_len: int, output_len: int, range_ratio: float = 0.0,
                 input_len_range: tuple[int, int] | None = None, seed: int = 0, input_lens_seed: int | None = None,
                 max_model_len: int | None = None) -> tuple[list[int], list[int]]:
    """(input lengths, output lengths) of n requests; see the module docstring for the distributions."""
    rng_in = np.random.default_rng(seed if input_lens_seed is None else input_lens_seed)
    rng_out = np.random.default_rng([seed, 1])
    if dataset == "sharegpt-like":
        ins = np.rint(input_len * rng_in.lognormal(0.0, SHAREGPT_INPUT_SIGMA, n))
        outs = np.rint(output_len * rng_out.lognormal(0.0, SHAREGPT_OUTPUT_SIGMA, n))
    elif dataset == "random":
        if input_len_range:
            ins = rng_in.integers(*input_len_range, size=n)
        else:
            lo, hi = uniform_bounds(input_len, range_ratio)
            ins = rng_in.integers(lo, hi + 1, size=n)
        lo, hi = uniform_bounds(output_len, range_ratio)
        outs = rng_out.integers(lo, hi + 1, size=n)
    else:
        raise ValueError(f"dataset: expected random or sharegpt-like, got {dataset!r}")
    ins, outs = np.maximum(ins, 1).astype(np.int64), np.maximum(outs, 1).astype(np.int64)
    if max_model_len is not None:
        ins = np.minimum(ins, max_model_len - 1)
        outs = np.minimum(outs, max_model_len - ins)
    return ins.tolist(), outs.tolist()


def uniform_bounds(length: int, ratio: float) -> tuple[int, int]:
    """Inclusive bounds of a random-dataset length: symmetric about it, so the mean is the length."""
    d = round(length * ratio)
    return max(1, length - d), length + d


def resolved_lens(args) -> tuple[int, int]:
    """--input-len and --output-len, or the dataset's defaults."""
    d_in, d_out = ((SHAREGPT_INPUT_MEDIAN, SHAREGPT_OUTPUT_MEDIAN) if args.dataset == "sharegpt-like"
                   else DEFAULT_LENS[args.bench_mode])
    return args.input_len or d_in, args.output_len or d_out


def num_requests(args) -> int:
    return args.num_prompts if args.bench_mode == "throughput" else args.batch_size


def lengths_from_args(args, max_model_len: int | None) -> tuple[list[int], list[int]]:
    input_len, output_len = resolved_lens(args)
    return draw_lengths(num_requests(args), dataset=args.dataset, input_len=input_len, output_len=output_len,
                        range_ratio=args.range_ratio, input_len_range=args.input_len_range, seed=args.seed,
                        input_lens_seed=args.input_lens_seed, max_model_len=max_model_len)


def check_workload(args, max_model_len: int | None, context_flag: str) -> None:
    """Raise UsageError, naming the flag, for a workload that cannot run; max_model_len None: not known yet."""
    if not 0 <= args.range_ratio < 1:
        raise UsageError(f"--range-ratio: must be in [0, 1), got {args.range_ratio}")
    if args.input_len_range and args.dataset != "random":
        raise UsageError("--input-len-range: draws uniform input lengths, so it needs --dataset random")
    if max_model_len is None or args.dataset != "random":  # sharegpt-like lengths are clipped instead
        return
    input_len, output_len = resolved_lens(args)
    longest_in = args.input_len_range[1] - 1 if args.input_len_range else uniform_bounds(input_len, args.range_ratio)[1]
    longest_out = uniform_bounds(output_len, args.range_ratio)[1]
    if longest_in + longest_out > max_model_len:
        flag = "--input-len-range" if args.input_len_range else "--input-len"
        raise UsageError(f"{flag} + --output-len: prompts of up to {longest_in} tokens plus up to {longest_out} "
                         f"output tokens ({longest_in + longest_out}) exceed the context of {max_model_len} tokens "
                         f"({context_flag})")


def make_prompts(input_lens: list[int], vocab_size: int, rng) -> list[list[int]]:
    return [rng.integers(0, vocab_size, size=n).tolist() for n in input_lens]


# -- start-up ---------------------------------------------------------------------------------------------------


def cache_files(directory: str) -> int:
    """Files in the persistent compilation cache (0 if it does not exist yet)."""
    return sum(len(files) for _, _, files in os.walk(directory))


def build_engine(args, opts: dict):
    """(engine, its start-up split)."""
    from jaxinfer.config import EngineConfig
    from jaxinfer.engine import Engine

    ecfg = EngineConfig.from_options(**opts)
    cache_dir = ecfg.cache_dir() if ecfg.use_compilation_cache else None
    before = cache_files(cache_dir) if cache_dir else None
    t0 = time.perf_counter()
    eng = Engine(args.model, **opts)
    total = time.perf_counter() - t0
    split = {
        "total_s": total, "weights_s": eng.load_seconds, "kv_cache_s": eng.kv_seconds,
        "compile_s": eng.compile_seconds, "lower_s": eng.lower_seconds,
        "programs_loaded": eng.runner.programs_loaded, "warm_up_s": eng.warm_up_seconds,
        "other_s": total - eng.load_seconds - eng.kv_seconds - eng.compile_seconds - eng.warm_up_seconds,
        "num_buckets": len(eng.runner.compiled), "cache_files_before": before,
        "cache_files_after": cache_files(cache_dir) if cache_dir else None,
    }
    return eng, split


def startup_in_fresh_process(args) -> tuple[dict | None, int]:
    """(start-up split, 0) from `python -m jaxinfer <these arguments> --startup-only`, or (None, its exit status)."""
    argv = [sys.executable, "-m", "jaxinfer", *getattr(args, "argv", sys.argv[1:]), "--startup-only"]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # the child runs this very jaxinfer
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)  # its messages go to our stderr
    wall = time.perf_counter() - t0
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return None, r.returncode or 1
    split = json.loads(lines[-1])
    split["process_wall_s"] = wall  # interpreter start and imports included
    return split, 0


def startup_line(name: str, s: dict) -> str:
    return (f"{name}: {s['total_s']:.1f} s = weights {s['weights_s']:.1f} s + KV cache {s['kv_cache_s']:.2f} s + "
            f"{s['num_buckets']} buckets compiled {s['compile_s']:.1f} s (lowering {s.get('lower_s', 0):.1f} s, "
            f"{s.get('programs_loaded', 0)} programs loaded whole) + warm-up {s.get('warm_up_s', 0):.2f} s + "
            f"other {s['other_s']:.2f} s")


# -- measuring --------------------------------------------------------------------------------------------------


def run_all(eng, prompts: list[list[int]], params: list) -> dict:
    """Submit every prompt, step until all are done; per-request first-token and end times (perf_counter)."""
    t0 = time.perf_counter()
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    by_bucket = {}
    first, end, count, steps = step_until_done(eng, by_bucket)
    buckets = [{"T": T, "B": B, "decode": d, "steps": n, "real_tokens": ntok, "seconds": s, "wait_seconds": w}
               for (T, B, d), (n, ntok, s, w) in sorted(by_bucket.items(), key=lambda kv: -kv[1][2])]
    return {"t0": t0, "ids": ids, "first": first, "end": end, "count": count, "steps": steps,
            "elapsed_s": max(end.values()) - t0, "steps_by_bucket": buckets}


def greedy(n: int, ignore_eos: bool):
    from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=ignore_eos, output_kind=RequestOutputKind.FINAL_ONLY)


def warm_up(eng, rng) -> None:
    n = max(1, min(16, eng.max_model_len - 5))
    run_all(eng, make_prompts([n], eng.cfg.vocab_size, rng), [greedy(min(4, eng.max_model_len - n), True)])


def measure_throughput(eng, input_lens, output_lens, args, rng) -> dict:
    prompts = make_prompts(input_lens, eng.cfg.vocab_size, rng)
    params = [greedy(n, args.ignore_eos) for n in output_lens]
    warm_up(eng, rng)
    stats0, compiles0 = eng.stats(), eng.num_compiles_since_ready
    tok0 = (eng.runner.tokens_scheduled, eng.runner.tokens_computed)
    with profiled(args.profile), gc_pauses() as gc_stats:
        r = run_all(eng, prompts, params)
    stats1 = eng.stats()
    scheduled, computed = eng.runner.tokens_scheduled - tok0[0], eng.runner.tokens_computed - tok0[1]
    prompt_tokens, output_tokens = sum(input_lens), sum(r["count"].values())
    elapsed = r["elapsed_s"]
    return {
        "num_requests": len(prompts), "elapsed_s": elapsed,
        "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "requested_output_tokens": sum(output_lens),
        "requests_stopped_early": sum(r["count"][i] < n for i, n in zip(r["ids"], output_lens)),
        "engine_steps": r["steps"], "steps_by_bucket": r["steps_by_bucket"], "preemptions": stats1["preemptions"] - stats0["preemptions"],
        "prefix_cache_hit_tokens": stats1["prefix_cache_hits"] - stats0["prefix_cache_hits"],
        "compiles_while_measured": eng.num_compiles_since_ready - compiles0, "gc": gc_stats,
        "speculation": spec_delta(stats0, stats1) if eng.ecfg.speculative_config else None,
        # the steps' padding: tokens their buckets computed beyond those scheduled, as a share of the computed ones
        "padding_share": 1 - scheduled / max(1, computed),
        "adaptive_buckets_added": stats1["adaptive_buckets_added"],
    }


def spec_delta(before: dict, after: dict) -> dict:
    """Speculative decoding while measured (Engine.spec_stats between two snapshots): draft tokens proposed and
    accepted, overall and per draft position."""
    per = lambda key: [b - a for a, b in zip(before[key] + [0] * len(after[key]), after[key])]  # noqa: E731
    proposed, accepted = per("spec_proposed_per_position"), per("spec_accepted_per_position")
    return {"verify_runs": after["spec_verify_runs"] - before["spec_verify_runs"],
            "off_steps": after["spec_off_steps"] - before["spec_off_steps"],
            "draft_tokens": sum(proposed), "accepted_tokens": sum(accepted),
            "acceptance_rate": sum(accepted) / sum(proposed) if sum(proposed) else 0.0,
            "proposed_per_position": proposed, "accepted_per_position": accepted}


def _spec_line(sp: dict | None) -> list[str]:
    if sp is None:
        return []
    per = ", ".join(f"{a / p:.2f}" if p else "-" for a, p in zip(sp["accepted_per_position"], sp["proposed_per_position"]))
    return [f"speculative decoding while measured: {sp['verify_runs']} verify runs, {sp['draft_tokens']} draft tokens, "
            f"{sp['accepted_tokens']} accepted ({sp['acceptance_rate']:.0%}); acceptance per draft position: {per or '-'}; "
            f"{sp['off_steps']} steps past disable_by_batch_size (no drafts)"]


@contextlib.contextmanager
def gc_pauses():
    """Python's garbage-collector passes during the block: a dict filled with their count, total and longest
    pause, and the passes over the oldest generation (the long ones)."""
    stats = {"collections": 0, "full_collections": 0, "seconds": 0.0, "longest_ms": 0.0}
    start = [0.0]

    def callback(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
            return
        dt = time.perf_counter() - start[0]
        stats["collections"] += 1
        stats["full_collections"] += info.get("generation") == 2
        stats["seconds"] += dt
        stats["longest_ms"] = max(stats["longest_ms"], dt * 1e3)

    gc.callbacks.append(callback)
    try:
        yield stats
    finally:
        gc.callbacks.remove(callback)


@contextlib.contextmanager
def profiled(trace_dir: str | None):
    """A jax profiler trace of the block into trace_dir (nothing when None)."""
    if not trace_dir:
        yield
        return
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        yield


def percentiles(xs: list[float], scale: float = 1.0) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def measure_latency(eng, input_lens, output_lens, args, rng) -> dict:
    params = [greedy(n, args.ignore_eos) for n in output_lens]
    compiles0 = stats0 = None
    batches, ttft, tpot, stopped_early = [], [], [], 0
    for i in range(args.num_iters_warmup + args.num_iters):
        if i == args.num_iters_warmup:
            compiles0, stats0 = eng.num_compiles_since_ready, eng.stats()
        with profiled(args.profile if i == args.num_iters_warmup else None):  # the first measured iteration
            r = run_all(eng, make_prompts(input_lens, eng.cfg.vocab_size, rng), params)
        if i < args.num_iters_warmup:
            continue
        batches.append(r["elapsed_s"])
        for rid, n in zip(r["ids"], output_lens):
            k = r["count"][rid]
            stopped_early += k < n
            if rid in r["first"]:
                ttft.append(r["first"][rid] - r["t0"])
            if k > 1:
                tpot.append((r["end"][rid] - r["first"][rid]) / (k - 1))
    return {
        "batch_size": len(input_lens), "num_iters": args.num_iters, "num_iters_warmup": args.num_iters_warmup,
        "latency_s": percentiles(batches), "ttft_ms": percentiles(ttft, 1e3), "tpot_ms": percentiles(tpot, 1e3),
        "iteration_latencies_s": batches, "requests_stopped_early": stopped_early,
        "compiles_while_measured": eng.num_compiles_since_ready - compiles0,
        "speculation": spec_delta(stats0, eng.stats()) if eng.ecfg.speculative_config else None,
    }


# -- the run ----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from jaxinfer.bench import _busy_note, _loadavg, run_context
    from jaxinfer.cli import check_options, engine_options_from_args
    from jaxinfer.config import EngineConfig

    opts = check_options(engine_options_from_args(args))
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.startup_only:
        _, split = build_engine(args, opts)
        print(json.dumps(split), flush=True)
        return 0

    check_workload(args, args.max_model_len, "--max-model-len")
    ecfg = EngineConfig.from_options(**opts)
    if args.warm_start and not ecfg.use_compilation_cache:
        raise UsageError("--warm-start: a warm start loads programs from the persistent compilation cache; "
                         "drop --no-compilation-cache")
    startup = {"compilation_cache": ecfg.use_compilation_cache,
               "cache_dir": ecfg.cache_dir() if ecfg.use_compilation_cache else None}
    if args.warm_start:  # before this process touches the device (see the module docstring)
        for key, what in (("cold_process", "cold"), ("warm_process", "warm")):
            log(f"start-up, {what}, in a fresh process (compilation cache {startup['cache_dir']}) ...")
            split, rc = startup_in_fresh_process(args)
            if split is None:
                print(f"error: --warm-start: the {what} start-up process failed with exit status {rc} (its messages "
                      "are above)", file=sys.stderr, flush=True)
                return rc
            startup[key] = split
            log(startup_line(f"start-up, {what}, fresh process", split))

    report = {"mode": args.bench_mode, "context": run_context(args), "config": _config(args), "notes": []}
    busy = _busy_note(report["context"]["loadavg_start"])
    if busy:
        report["notes"].append(busy)
        log(f"warning: {busy}")
    eng, startup["this_process"] = build_engine(args, opts)
    log(startup_line("start-up, this process", startup["this_process"]))
    report["startup"] = startup
    if args.max_model_len is None:
        check_workload(args, eng.max_model_len, "the model's context length; see --max-model-len")

    input_lens, output_lens = lengths_from_args(args, eng.max_model_len)
    rng = np.random.default_rng([args.seed, 2])
    report["model"] = eng.model_name
    report["engine_config"] = engine_summary(eng)
    report["workload"] = workload_summary(args, input_lens, output_lens)
    n = len(input_lens)
    if args.bench_mode == "throughput":
        log(f"throughput: {n} requests ...")
        res = measure_throughput(eng, input_lens, output_lens, args, rng)
    else:
        if n > eng.ecfg.max_num_seqs:
            report["notes"].append(f"batch size {n} > max_num_seqs {eng.ecfg.max_num_seqs}: the rest of each batch "
                                   "waited in the queue")
        log(f"latency: batch of {n}, {args.num_iters_warmup} warm-up + {args.num_iters} measured iterations ...")
        res = measure_latency(eng, input_lens, output_lens, args, rng)
    report["results"] = res
    if args.profile:
        what = "the run" if args.bench_mode == "throughput" else "the first measured iteration"
        report["notes"].append(f"{what} was traced with the jax profiler into {args.profile}; tracing slows it")
    report["notes"] += notes_for(report)
    for note in report["notes"]:
        if note.startswith("warning:"):  # shown even with --quiet
            print(note, file=sys.stderr, flush=True)
    report["context"]["loadavg_end"] = _loadavg()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json_out}")
    print(format_table(report))
    return 0


def _config(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in args.config_keys}


def engine_summary(eng) -> dict:
    c = eng.ecfg
    return {
        "token_buckets": list(c.token_buckets), "seq_buckets": list(c.seq_buckets),
        "decode_buckets": list(c.decode_buckets), "max_num_seqs": c.max_num_seqs,
        "max_num_batched_tokens": c.token_budget, "max_model_len": eng.max_model_len, "page_size": c.page_size,
        "num_pages": eng.num_pages, "dtype": np.dtype(eng.dtype).name, "quantization": eng.quantization,
        "weight_bytes": eng.weight_bytes, "attention_impl": c.attention_impl,
        "prefix_caching": c.enable_prefix_caching, "vocab_size": eng.cfg.vocab_size,
    }


def workload_summary(args, input_lens: list[int], output_lens: list[int]) -> dict:
    input_len, output_len = resolved_lens(args)

    def stats(xs):
        return {"min": int(min(xs)), "mean": float(np.mean(xs)), "median": float(np.median(xs)), "max": int(max(xs))}

    return {
        "dataset": args.dataset, "num_requests": len(input_lens), "input_len": input_len, "output_len": output_len,
        "range_ratio": args.range_ratio,
        "input_len_range": list(args.input_len_range) if args.input_len_range else None,
        "seed": args.seed, "input_lens_seed": args.seed if args.input_lens_seed is None else args.input_lens_seed,
        "ignore_eos": args.ignore_eos, "input_stats": stats(input_lens), "output_stats": stats(output_lens),
        "input_lens": input_lens, "output_lens": output_lens,
    }


def notes_for(report: dict) -> list[str]:
    res, notes = report["results"], []
    if res["compiles_while_measured"]:
        notes.append(f"warning: {res['compiles_while_measured']} compilation(s) while measured: a step shape escaped "
                     "the buckets, so the numbers include compile time")
    if res["requests_stopped_early"]:
        notes.append(f"{res['requests_stopped_early']} request(s) stopped at an end-of-sequence token before their "
                     "output length (--ignore-eos makes every length exact)")
    if res.get("preemptions"):
        notes.append(f"{res['preemptions']} preemption(s): the KV cache was full, so some prompts were recomputed")
    s = report["startup"]
    cold = s.get("cold_process") or s["this_process"]
    if s["compilation_cache"] and cold["cache_files_before"]:
        notes.append(f"the compilation cache held {cold['cache_files_before']} files before the first build, so "
                     "its compile time may be cache loads, not compilation")
    return notes


# -- the table --------------------------------------------------------------------------------------------------


def _f(x, spec=".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_table(report: dict) -> str:
    ctx, w, res, s = report["context"], report["workload"], report["results"], report["startup"]
    lens = f"input {w['input_len']}, output {w['output_len']}"
    if w["dataset"] == "sharegpt-like":
        lens = f"input median {w['input_len']}, output median {w['output_len']}"
    if w["input_len_range"]:
        lens = f"input in [{w['input_len_range'][0]}, {w['input_len_range'][1]}), output {w['output_len']}"
    if w["dataset"] == "random" and w["range_ratio"]:
        lens += f", range ratio {w['range_ratio']:g}"
    device = ctx["devices"][0] if ctx.get("devices") else ctx["backend"]
    out = ["", f"jaxinfer bench {report['mode']}: {Path(str(report['model'])).name}, {w['num_requests']} requests, "
           f"{w['dataset']} lengths ({lens}), greedy, EOS {'ignored' if w['ignore_eos'] else 'honoured'}; "
           f"{ctx['backend']} backend ({device}), git {ctx['git_commit']}{'+dirty' if ctx['git_dirty'] else ''}", ""]

    starts = [("cold, fresh process", s.get("cold_process")), ("warm, fresh process", s.get("warm_process")),
              ("this process", s["this_process"])]
    rows = [[name, _f(x["total_s"]), _f(x["weights_s"]), _f(x["kv_cache_s"], ".2f"), _f(x["compile_s"]),
             _f(x.get("warm_up_s"), ".2f"), _f(x["other_s"], ".2f"), str(x["num_buckets"]),
             _f(x["cache_files_before"], "d"), _f(x.get("process_wall_s"))]
            for name, x in starts if x]
    out += _table(["start-up", "total s", "weights s", "KV cache s", "compile s", "warm-up s", "other s", "buckets",
                   "cache files before", "process s"], rows)
    out.append("total = Engine(...) construction; process s = the whole fresh process (interpreter start, imports, "
               "exit)")
    out.append(f"compilation cache: {s['cache_dir']}" if s["compilation_cache"] else "compilation cache: off")
    out.append("")

    if report["mode"] == "throughput":
        out += _table(["requests", "elapsed s", "req/s", "output tok/s", "total tok/s", "prompt (prefill) tok",
                       "output (decode) tok", "steps", "compiles"],
                      [[str(res["num_requests"]), _f(res["elapsed_s"], ".2f"), _f(res["requests_per_s"], ".2f"),
                        _f(res["output_tokens_per_s"]), _f(res["total_tokens_per_s"]), str(res["prompt_tokens"]),
                        str(res["output_tokens"]), str(res["engine_steps"]), str(res["compiles_while_measured"])]])
        if "padding_share" in res:
            out.append(f"padding: {res['padding_share'] * 100:.1f}% of the tokens the buckets computed; adaptive "
                       f"buckets added so far: {res['adaptive_buckets_added']}")
        out += [""] + _table(["bucket (T x B)", "steps", "real tokens / step", "ms / step", "waiting for device ms",
                              "share of time"],
                             [[f"{b['T']} x {b['B']}{' decode' if b['decode'] else ''}", str(b["steps"]),
                               _f(b["real_tokens"] / b["steps"], ".0f"), _f(b["seconds"] / b["steps"] * 1e3, ".2f"),
                               _f(b["wait_seconds"] / b["steps"] * 1e3, ".2f"),
                               _f(b["seconds"] / res["elapsed_s"] * 100, ".0f") + "%"]
                              for b in res["steps_by_bucket"]])
        g = res.get("gc")
        if g:
            out.append(f"python garbage collector while measured: {g['collections']} passes ({g['full_collections']} "
                       f"full), {g['seconds'] * 1e3:.0f} ms, longest {g['longest_ms']:.1f} ms")
        out += _spec_line(res.get("speculation"))
    else:
        out.append(f"batch of {res['batch_size']}, {res['num_iters']} measured iterations after "
                   f"{res['num_iters_warmup']} warm-up; {res['compiles_while_measured']} compilations while measured")
        out += _table(["", "mean", "p50", "p90", "p99"],
                      [[name] + [_f(res[key][k], spec) for k in ("mean", "p50", "p90", "p99")]
                       for name, key, spec in (("batch latency s", "latency_s", ".3f"), ("TTFT ms", "ttft_ms", ".1f"),
                                               ("TPOT ms", "tpot_ms", ".2f"))])
        out += _spec_line(res.get("speculation"))
    if report["notes"]:
        out += [""] + [n if n.startswith("warning:") else f"note: {n}" for n in report["notes"]]
    return "\n".join(out)
