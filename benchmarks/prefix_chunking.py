"""Prefix caching and chunked prefill, measured on the engine API (`Engine.add_request` / `Engine.step`).

    python benchmarks/prefix_chunking.py --json-out prefix_chunking.json          # CPU, default model
    python benchmarks/prefix_chunking.py --model llama-3.1-8b --load-format dummy   # GPU
    python benchmarks/prefix_chunking.py --smoke                                   # tiny shapes: checks the script

(a) shared prefix: one seeded synthetic system prompt (--sys-len tokens) + --num-questions short distinct
    questions, all submitted at once, --output-len tokens each (greedy, EOS ignored). Prefix caching off,
    then on (the cache is cleared before each run): TTFT mean / p50 / p99 from submission, output tok/s
    (all output tokens / wall time), hit rate, and the tokens the engine actually computed (the "off" run
    must compute every prompt token; the script checks it).
(b) long prompts during decoding: --decoders requests decode steadily while a --long-len-token prompt
    arrives every --arrive-every steps (--long-prompts of them). Inter-token latency (p50 / p99 / max) of
    the steady decoders over the tokens after the first arrival, with chunked prefill (token budget
    --chunk-budget) and without (budget = the largest token bucket, so a long prompt runs in one step).

One engine serves every run: the scheduler's `enable_prefix_caching` and `token_budget` are switched
between runs, so all runs use the same precompiled buckets. A warm-up runs first, and the number of
compilations while measuring is reported (it must be 0). The table comes last on stdout; --json-out writes
every number with the date, git commit, jax version, backend, load average and the exact argv.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Default sizes per backend; every one can be overridden by its flag (--sys-len, --token-buckets 16,128,...).
SIZES = {
    # CPU (2 cores, float32 SmolLM2-135M): prefill costs ~2 ms/token plus the jnp attention's gathers, which
    # grow with the context, so few questions and two long prompts keep the run near 3-4 minutes.
    "cpu": dict(sys_len=1000, num_questions=6, question_len=16, output_len=32, decoders=8, long_prompts=2,
                long_len=1500, arrive_every=16, chunk_budget=128, token_buckets=(16, 128, 1024, 1536), max_model_len=2048),
    "gpu": dict(sys_len=1000, num_questions=64, question_len=16, output_len=32, decoders=8, long_prompts=8,
                long_len=1500, arrive_every=16, chunk_budget=128, token_buckets=(16, 128, 512, 2048), max_model_len=4096),
    "smoke": dict(sys_len=40, num_questions=4, question_len=5, output_len=4, decoders=2, long_prompts=2,
                  long_len=48, arrive_every=4, chunk_budget=16, token_buckets=(16, 64), max_model_len=128),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir, .gguf, or preset (default: the embedded SmolLM2-135M)")
    p.add_argument("--load-format", default="auto", help="auto | safetensors | gguf | dummy")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): checks that the script runs")
    for k in SIZES["cpu"]:
        flag = "--" + k.replace("_", "-")
        if k == "token_buckets":
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), default=None, metavar="T,T,...")
        else:
            p.add_argument(flag, type=int, default=None, metavar="N")
    p.add_argument("--page-size", type=int, default=None, metavar="N")
    p.add_argument("--num-pages", type=int, default=None, metavar="N", help="KV pages (default: from memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", metavar="PATH")
    p.add_argument("--verbose", action="store_true", help="engine start-up progress on stderr")
    args = p.parse_args(argv)
    args.argv = list(sys.argv if argv is None else ["benchmarks/prefix_chunking.py", *argv])
    return args


def resolve_sizes(args, backend: str) -> dict:
    base = SIZES["smoke" if args.smoke else ("cpu" if backend == "cpu" else "gpu")]
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}


# -- workloads ---------------------------------------------------------------------------------------------


def synthetic_ids(tokenizer, vocab_size: int, n: int, rng: np.random.Generator) -> list[int]:
    """n token ids of seeded synthetic text (random words from a small word list) or, without a tokenizer,
    seeded random ids."""
    if tokenizer is None:
        return rng.integers(0, vocab_size, n).tolist()
    words = ("the model cache page token system prompt answer question value memory step engine request "
             "batch layer head query key latency compute decode chunk prefix share user data time").split()
    ids: list[int] = []
    while len(ids) < n:
        text = " ".join(rng.choice(words, 64)) + "."
        ids += tokenizer.encode(" " + text, add_special_tokens=False)
    return ids[:n]


def counting_tokens(sched):
    """Wrap sched.schedule so every scheduled token is counted (what the engine actually computes)."""
    counter = {"tokens": 0, "steps": 0}
    orig = sched.schedule

    def schedule(*args, **kwargs):
        b = orig(*args, **kwargs)
        counter["tokens"] += b.num_tokens
        counter["steps"] += int(len(b) > 0)
        return b

    sched.schedule = schedule
    return counter


@contextlib.contextmanager
def scheduler_settings(sched, *, caching: bool, budget: int):
    old = sched.enable_prefix_caching, sched.token_budget
    sched.enable_prefix_caching, sched.token_budget = caching, budget
    sched.allocator.clear_cache()
    try:
        yield
    finally:
        sched.enable_prefix_caching, sched.token_budget = old
        sched.allocator.clear_cache()


def pct(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def shared_prefix_run(eng, counter, prompts, output_len, caching: bool, budget: int) -> dict:
    from jaxinfer.sampling_params import SamplingParams

    sched = eng.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    with scheduler_settings(sched, caching=caching, budget=budget):
        s0, c0 = eng.stats(), dict(counter)
        t0 = time.perf_counter()
        ids = [eng.add_request(p, params) for p in prompts]
        first, end, ntok = {}, {}, 0
        while len(end) < len(ids):
            outs = eng.step()
            now = time.perf_counter()
            for o in outs:
                if o.outputs[0].token_ids and o.request_id not in first:
                    first[o.request_id] = now
                if o.finished:
                    end[o.request_id] = now
                    ntok += len(o.outputs[0].token_ids)
        wall = max(end.values()) - t0
        s1 = eng.stats()
    ttft = [first[r] - t0 for r in ids]
    queries = s1["prefix_cache_queries"] - s0["prefix_cache_queries"]
    hits = s1["prefix_cache_hits"] - s0["prefix_cache_hits"]
    computed = counter["tokens"] - c0["tokens"]
    full = sum(len(p) for p in prompts) + len(prompts) * (output_len - 1)
    if not caching and (hits or computed != full):
        raise AssertionError(f"caching off, yet {hits} cache hits and {computed} tokens computed (every token: {full})")
    return {
        "prefix_caching": caching, "token_budget": budget, "requests": len(prompts), "output_tokens": ntok,
        "wall_s": wall, "output_tok_s": ntok / wall, "ttft_mean_s": float(np.mean(ttft)), "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99), "hit_rate": hits / queries if queries else 0.0, "cache_hit_tokens": hits,
        "tokens_computed": computed, "tokens_if_uncached": full, "steps": counter["steps"] - c0["steps"],
    }


def long_arrivals_run(eng, counter, steady_prompts, long_prompts, sz: dict, budget: int) -> dict:
    from jaxinfer.sampling_params import SamplingParams

    sched = eng.scheduler
    every, n_long = sz["arrive_every"], len(long_prompts)
    warm_steps = 4  # decoders' prefills are done and they decode before the first arrival
    steady_len = warm_steps + n_long * every + 2 * every
    steady_p = SamplingParams(temperature=0.0, max_tokens=steady_len, ignore_eos=True)
    long_p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with scheduler_settings(sched, caching=True, budget=budget):
        c0 = dict(counter)
        steady = [eng.add_request(p, steady_p) for p in steady_prompts]
        times: dict[str, list[float]] = {r: [] for r in steady}
        long_ids, step, t_first_arrival, done = [], 0, None, set()
        step_s = []
        while len(done) < len(steady) + n_long:
            if step >= warm_steps and (step - warm_steps) % every == 0 and len(long_ids) < n_long:
                if t_first_arrival is None:
                    t_first_arrival = time.perf_counter()
                long_ids.append(eng.add_request(long_prompts[len(long_ids)], long_p))
            ts = time.perf_counter()
            outs = eng.step()
            now = time.perf_counter()
            step_s.append(now - ts)
            step += 1
            for o in outs:
                if o.request_id in times:
                    toks = o.outputs[0].token_ids
                    times[o.request_id] += [now] * (len(toks) - len(times[o.request_id]))
                if o.finished:
                    done.add(o.request_id)
        # inter-token gaps of the steady decoders that end after the first long prompt arrived
        itl = [b - a for ts_ in times.values() for a, b in zip(ts_, ts_[1:]) if t_first_arrival is not None and b > t_first_arrival]
    return {
        "token_budget": budget, "chunked": budget < sz["long_len"], "steady_decoders": len(steady),
        "long_prompts": n_long, "long_len": sz["long_len"], "arrive_every_steps": every, "steps": step,
        "itl_samples": len(itl), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "itl_max_s": max(itl) if itl else None, "itl_mean_s": float(np.mean(itl)) if itl else None,
        "step_p50_s": pct(step_s, 50), "tokens_computed": counter["tokens"] - c0["tokens"],
    }


# -- context and report ------------------------------------------------------------------------------------


def _git(*cmd) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_context(args) -> dict:
    import jax
    import jaxlib

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": args.argv, "command": shlex.join([sys.executable, *args.argv]),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(), "loadavg_start": _loadavg(),
    }


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def format_table(report: dict) -> str:
    a, b = report["shared_prefix"], report["long_arrivals"]
    lines = [
        f"(a) shared prefix: {report['sizes']['sys_len']}-token system prompt + {report['sizes']['num_questions']} "
        f"questions, {report['sizes']['output_len']} tokens out",
        "| prefix cache | TTFT mean ms | TTFT p50 ms | TTFT p99 ms | output tok/s | hit rate | tokens computed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in a:
        lines.append(f"| {'on' if r['prefix_caching'] else 'off'} | {_ms(r['ttft_mean_s'])} | {_ms(r['ttft_p50_s'])} | "
                     f"{_ms(r['ttft_p99_s'])} | {r['output_tok_s']:.1f} | {r['hit_rate']:.1%} | {r['tokens_computed']} |")
    lines += [
        "",
        f"(b) {report['sizes']['decoders']} decoding requests, a {report['sizes']['long_len']}-token prompt every "
        f"{report['sizes']['arrive_every']} steps ({report['sizes']['long_prompts']} of them)",
        "| prefill | token budget | ITL p50 ms | ITL p99 ms | ITL max ms | ITL samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in b:
        lines.append(f"| {'chunked' if r['chunked'] else 'whole'} | {r['token_budget']} | {_ms(r['itl_p50_s'])} | "
                     f"{_ms(r['itl_p99_s'])} | {_ms(r['itl_max_s'])} | {r['itl_samples']} |")
    lines.append(f"\ncompiles while measured: {report['compiles_while_measured']}; backend {report['context']['backend']}; "
                 f"load average {report['context']['loadavg_start']} -> {report['context']['loadavg_end']}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    from jaxinfer.engine import Engine

    ctx = run_context(args)
    sz = resolve_sizes(args, jax.default_backend())
    max_seqs = max(sz["num_questions"], sz["decoders"] + sz["long_prompts"])
    opts = dict(token_buckets=sz["token_buckets"], seq_buckets=(max_seqs,), max_num_seqs=max_seqs,
                max_model_len=sz["max_model_len"], load_format=args.load_format, seed=args.seed,
                show_progress=args.verbose)
    if args.page_size:
        opts["page_size"] = args.page_size
    if args.num_pages:
        opts["num_pages"] = args.num_pages
    if args.smoke:
        opts.update(page_size=opts.get("page_size", 4), use_compilation_cache=False)
    whole = sz["token_buckets"][-1]
    if sz["long_len"] + sz["decoders"] > whole or sz["sys_len"] + sz["question_len"] > whole:
        raise SystemExit(f"the largest token bucket ({whole}) must hold a whole long prompt plus the decoders")
    t0 = time.perf_counter()
    eng = Engine(args.model, **opts)
    startup = time.perf_counter() - t0
    counter = counting_tokens(eng.scheduler)
    tok, vocab = eng.tokenizer, eng.cfg.vocab_size
    rng = np.random.default_rng(args.seed)

    # Warm-up: one step in each token bucket, made of max_seqs short prompts (cheap attention), so no
    # measured step is the first to run its bucket.
    from jaxinfer.sampling_params import SamplingParams

    buckets = sz["token_buckets"]
    with scheduler_settings(eng.scheduler, caching=False, budget=whole):
        for prev, t in zip((0, *buckets), buckets):
            m = min(max_seqs, t - prev)
            for _ in range(m):
                eng.add_request(synthetic_ids(tok, vocab, -(-(prev + 1) // m), rng),
                                SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
            while eng.has_unfinished():
                eng.step()
    compiles0 = eng.num_compiles_since_ready

    system = synthetic_ids(tok, vocab, sz["sys_len"], rng)
    prompts = [system + synthetic_ids(tok, vocab, sz["question_len"], rng) for _ in range(sz["num_questions"])]
    shared = [shared_prefix_run(eng, counter, prompts, sz["output_len"], caching, whole) for caching in (False, True)]

    steady_prompts = [synthetic_ids(tok, vocab, 32, rng) for _ in range(sz["decoders"])]
    long_prompts = [synthetic_ids(tok, vocab, sz["long_len"], rng) for _ in range(sz["long_prompts"])]
    arrivals = [long_arrivals_run(eng, counter, steady_prompts, long_prompts, sz, budget)
                for budget in (whole, sz["chunk_budget"])]

    ctx["loadavg_end"] = _loadavg()
    report = {
        "context": ctx, "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sz.items()},
        "engine": {"model": eng.model_name, "startup_s": startup, "compile_s": eng.compile_seconds,
                   "num_buckets": len(eng.runner.compiled), "page_size": eng.ecfg.page_size, "num_pages": eng.num_pages,
                   "max_num_seqs": max_seqs, "dtype": np.dtype(eng.dtype).name},
        "compiles_while_measured": eng.num_compiles_since_ready - compiles0,
        "shared_prefix": shared, "long_arrivals": arrivals,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
