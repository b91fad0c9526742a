"""`jaxinfer bench`: decode speed on this machine, against HF transformers and llama.cpp on the same model.

Two numbers per engine, all greedy with the end-of-sequence token ignored so every run makes exactly
--output-len tokens from prompts of exactly --input-len tokens (real English text, tokenized):

  single stream   one request; TTFT (submit -> first token) and decode tok/s = (tokens - 1) / (time after
                  the first token); jaxinfer runs it --single-runs times (a new prompt each time) and reports
                  the median decode rate and the median TTFT
  batch           --batch-size requests submitted together; all output tokens / wall time (prefill included)

jaxinfer is warmed up with one short request first, and must not compile anything while measured (the
compile count is reported). Peers run in this same process after the engine is freed: HF transformers
(PyTorch CPU, fp32 weights dequantized from the GGUF, torch threads = cores) and llama.cpp through
`llama_cpp` when it is installed (its Python API runs one sequence at a time, so it has no batch number;
it computes on the GGUF's quantized weights, while jaxinfer and HF dequantize them to fp32).
torch, transformers' model code and llama_cpp are imported lazily: the engine never needs them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

# Prompt source: plain prose, repeated as needed, so prompts tokenize like real text.
_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels of cables, and every new problem meant a new arrangement of hardware. The stored-program "
    "computer changed that: instructions became data, and a single machine could be taught to do "
    "almost anything. Assembly languages gave names to the numbers, compilers turned formulas into "
    "instructions, and operating systems let many programs share one processor without knowing about "
    "each other. Each layer hid the details of the one beneath it, and each made programmers more "
    "productive at the cost of some speed. Today a developer can write a few lines that train a neural "
    "network on thousands of processors spread across a data centre, without thinking about caches, "
    "interconnects or the layout of memory. Yet performance still matters, and the best engineers know "
    "when to look beneath the abstraction: to count bytes moved, to measure rather than guess, and to "
    "remember that the fastest code is often the code that does not run at all. "
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from jaxinfer.cli import _Formatter, _positive_int, add_engine_args, add_model_args

    p = subparsers.add_parser(
        "bench", formatter_class=_Formatter, help="measure decode speed here, against HF transformers and llama.cpp",
        description="Measure generation speed on this machine (greedy, end-of-sequence ignored, so every run makes\n"
        "exactly --output-len tokens from prompts of exactly --input-len tokens of English text):\n"
        "  single stream  one request: time to first token (TTFT) and decode tok/s = (tokens - 1) / (time after\n"
        "                 the first token); jaxinfer's median of --single-runs runs\n"
        "  batch          --batch-size requests at once: all output tokens / wall time (prefill included)\n\n"
        "Start-up (weight load, KV-cache allocation, bucket compilation) is reported separately and a warm-up\n"
        "request runs first, so no compilation is measured. Unless --no-peers, HF transformers (PyTorch CPU,\n"
        "fp32) and llama.cpp (when `llama_cpp` is installed) run the same model and prompts for comparison.\n"
        "The table comes last on stdout; --json-out keeps every number with the date, versions and git commit.",
        epilog="examples:\n  jaxinfer bench                                    default model, 128 in / 128 out, batch 16\n"
        "  jaxinfer bench --json-out bench.json --no-peers\n"
        "  jaxinfer bench --input-len 512 --output-len 64 --batch-size 4\n"
        "  jaxinfer bench serve --request-rate 1,2,inf     the HTTP server under load (TTFT, TPOT, goodput)\n"
        "  jaxinfer bench throughput --num-prompts 200     offline: many requests at once, tokens/s\n"
        "  jaxinfer bench latency --batch-size 8           offline: one batch's latency, TTFT, TPOT",
    )
    add_model_args(p)
    g = p.add_argument_group("benchmark options")
    g.add_argument("--input-len", type=_positive_int, default=128, metavar="N",
                   help="prompt length in tokens (default: %(default)s)")
    g.add_argument("--output-len", type=_positive_int, default=128, metavar="N",
                   help="tokens generated per request (default: %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="concurrent requests in the batch measurement (default: %(default)s)")
    g.add_argument("--single-runs", type=_positive_int, default=3, metavar="N",
                   help="jaxinfer's single stream is run N times; the median run is reported (default: %(default)s)")
    g.add_argument("--no-peers", action="store_true", help="measure jaxinfer only (no HF transformers, no llama.cpp)")
    g.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                   help="CPU threads for the peers (default: all %(default)s cores)")
    g.add_argument("--json-out", metavar="PATH", help="also write every number and the run's context as JSON")
    add_engine_args(p)
    p.set_defaults(func=run)
    from jaxinfer import bench_offline, bench_serve

    modes = p.add_subparsers(dest="bench_command", metavar="{serve,throughput,latency}",
                             title="other measurements instead (see `jaxinfer bench MODE -h`)")
    bench_serve.add_parser(modes)
    bench_offline.add_parsers(modes)
    return p


# -- the run -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from jaxinfer.cli import check_options, engine_options_from_args

    opts = check_options(engine_options_from_args(args))
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    report = {"context": run_context(args), "config": _args_dict(args), "results": [], "notes": []}
    busy = _busy_note(report["context"]["loadavg_start"])
    if busy:
        report["notes"].append(busy)
        log(f"warning: {busy}")

    jx = bench_jaxinfer(args, opts, log)
    report["results"].append(jx["result"])
    report["notes"] += jx["result"].pop("notes", [])
    prompts, model_path = jx["prompts"], jx["model_path"]
    del jx
    gc.collect()

    if not args.no_peers:
        for name, fn in (("HF transformers", bench_hf), ("llama.cpp", bench_llama_cpp)):
            try:
                res = fn(args, model_path, prompts, log)
            except Exception as e:  # a peer's failure must not lose the engine's numbers
                res = {"engine": name, "skipped": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            if res.get("skipped"):
                report["notes"].append(f"{name} skipped: {res['skipped']}")
                log(f"{name} skipped: {res['skipped']}")
            report["results"].append(res)
            gc.collect()

    report["context"]["loadavg_end"] = _loadavg()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json_out}")
    print(format_table(report, args))
    return 0


def make_prompts(tokenizer, vocab_size: int, input_len: int, batch_size: int) -> list[list[int]]:
    """batch_size distinct prompts of exactly input_len tokens (windows over the same prose)."""
    need = input_len + batch_size
    if tokenizer is None:  # e.g. a preset with dummy weights: random ids
        import numpy as np

        ids = np.random.default_rng(0).integers(0, vocab_size, need).tolist()
    else:
        ids = tokenizer.encode(_TEXT, add_special_tokens=False)
        ids = ids * (need // len(ids) + 1)
    return [ids[i : i + input_len] for i in range(batch_size)]


def bench_jaxinfer(args, opts: dict, log) -> dict:
    import jax
    import numpy as np

    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, **opts)
    startup = time.perf_counter() - t0
    eng = llm.engine
    notes = []
    if args.input_len + args.output_len > eng.max_model_len:
        from jaxinfer.cli import UsageError

        raise UsageError(f"--input-len + --output-len ({args.input_len + args.output_len}) exceeds max_model_len "
                         f"({eng.max_model_len})")
    if args.batch_size > eng.ecfg.max_num_seqs:
        notes.append(f"batch size {args.batch_size} > max_num_seqs {eng.ecfg.max_num_seqs}: the rest waited in the queue")
    # Distinct windows for the warm-up, each single-stream run and the batch, so none is served from the
    # prefix cache that an earlier phase filled.
    windows = make_prompts(eng.tokenizer, eng.cfg.vocab_size, args.input_len, args.batch_size + args.single_runs + 1)
    prompts, singles, warm = (windows[: args.batch_size], windows[args.batch_size : -1], windows[-1])

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    log("jaxinfer: warm-up")
    run_requests(eng, [warm[: min(16, args.input_len)]], params(4))
    compiles0 = eng.num_compiles_since_ready
    log(f"jaxinfer: single stream ({args.input_len} in, {args.output_len} out)")
    runs = [single_stream_stats(*run_requests(eng, [p], params(args.output_len))) for p in singles]
    single = sorted(runs, key=lambda r: r["decode_tok_s"] or 0.0)[len(runs) // 2]  # the median run
    single = {**single, "ttft_s": sorted(r["ttft_s"] for r in runs)[len(runs) // 2],  # and the median TTFT
              "runs_decode_tok_s": [r["decode_tok_s"] for r in runs], "runs_ttft_s": [r["ttft_s"] for r in runs]}
    log(f"jaxinfer: batch of {args.batch_size}")
    batch = batch_stats(*run_requests(eng, prompts, params(args.output_len)))
    compiles = eng.num_compiles_since_ready - compiles0
    if compiles:
        notes.append(f"jaxinfer compiled {compiles} time(s) while measured: a step shape escaped the buckets")
    c = eng.ecfg
    dtype = np.dtype(eng.dtype).name
    result = {
        "engine": "jaxinfer",
        "backend": jax.default_backend(),
        "weights": dtype if eng.quantization == "none" else f"{eng.quantization} ({dtype} activations)",
        "quantization": eng.quantization, "weight_bytes": eng.weight_bytes,
        "model": eng.model_name,
        "startup": {
            "total_s": startup, "weights_s": eng.load_seconds, "kv_cache_s": eng.kv_seconds,
            "compile_s": eng.compile_seconds, "warm_up_s": eng.warm_up_seconds, "num_buckets": len(eng.runner.compiled),
        },
        "engine_config": {
            "token_buckets": list(c.token_buckets), "seq_buckets": list(c.seq_buckets),
            "decode_buckets": list(c.decode_buckets), "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.token_budget, "max_model_len": eng.max_model_len, "page_size": c.page_size,
            "num_pages": eng.num_pages, "dtype": dtype,
            "compilation_cache": c.use_compilation_cache,
        },
        "single": single,
        "batch": batch,
        "compiles_while_measured": compiles,
        "notes": notes,
    }
    log(f"jaxinfer: single {single['decode_tok_s']:.1f} tok/s (TTFT {single['ttft_s'] * 1e3:.0f} ms), "
        f"batch {batch['tok_s']:.1f} tok/s")
    model_path = eng.model_name if not str(eng.model_name).startswith("preset:") else None
    del llm, eng
    return {"result": result, "prompts": prompts, "model_path": model_path}


def run_requests(eng, prompts: list[list[int]], params) -> tuple[float, dict, dict, dict]:
    """Submit all prompts at once and step to the end; returns (t_submit, first-token times, end times, counts)."""
    t0 = time.perf_counter()
    for p in prompts:
        eng.add_request(p, params)
    first, end, count, _ = step_until_done(eng)
    return t0, first, end, count


def step_until_done(eng, by_bucket: dict | None = None) -> tuple[dict, dict, dict, int]:
    """Step the engine until it is idle: per request id, the perf_counter time of its first output token and of
    its end (the engine's own times, from the finished output's metrics, so FINAL_ONLY requests report them
    too), its output token count; and the number of steps. With by_bucket, also adds up per (T, B, decode)
    bucket the steps read back, their real tokens, the wall time of the `step()` calls that read them
    (with async scheduling that is about the device time of the step) and the part of it they spent waiting
    for the device (the rest is host work; a step that hardly waits had the device waiting for the host)."""
    first, end, count = {}, {}, {}
    steps = 0
    to_perf = time.perf_counter() - time.monotonic()  # the engine's metrics are time.monotonic() stamps
    while eng.has_unfinished():
        t = time.perf_counter()
        outs = eng.step()
        steps += 1
        now = time.perf_counter()
        if by_bucket is not None and eng.last_completed is not None:
            bucket, ntok = eng.last_completed
            acc = by_bucket.setdefault(bucket, [0, 0, 0.0, 0.0])
            acc[0], acc[1], acc[2], acc[3] = acc[0] + 1, acc[1] + ntok, acc[2] + now - t, acc[3] + eng.last_wait_seconds
        for o in outs:
            if o.finished:
                m = o.metrics
                if m.first_token_time is not None:
                    first[o.request_id] = m.first_token_time + to_perf
                end[o.request_id] = m.finished_time + to_perf
                count[o.request_id] = len(o.outputs[0].token_ids)
    return first, end, count, steps


def single_stream_stats(t0, first, end, count) -> dict:
    (rid,) = end
    n = count[rid]
    after = end[rid] - first[rid]
    return {"output_tokens": n, "ttft_s": first[rid] - t0, "decode_s": after,
            "decode_tok_s": (n - 1) / after if n > 1 and after > 0 else None, "e2e_s": end[rid] - t0}


def batch_stats(t0, first, end, count) -> dict:
    wall = max(end.values()) - t0
    total = sum(count.values())
    return {"batch_size": len(end), "output_tokens": total, "wall_s": wall, "tok_s": total / wall,
            "mean_ttft_s": sum(first[r] - t0 for r in first) / len(first)}


# -- peers ---------------------------------------------------------------------------------------------------


def bench_hf(args, model_path: str | None, prompts: list[list[int]], log) -> dict:
    if model_path is None:
        return {"engine": "HF transformers", "skipped": "the model is a preset with random weights"}
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = Path(model_path)
    t0 = time.perf_counter()
    log("HF transformers: loading (fp32)")
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    class Clock:  # a generate() streamer that only notes when tokens appear (the first put() is the prompt)
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(batch, n, streamer=None):
        ids = torch.tensor(batch, dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=pad, streamer=streamer)
        return out.shape[1] - ids.shape[1]

    log("HF transformers: warm-up")
    generate([prompts[0][:16]], 4)
    log("HF transformers: single stream")
    clock = Clock()
    t0 = time.perf_counter()
    n = generate([prompts[0]], args.output_len, clock)
    t_end = time.perf_counter()
    t_first = clock.times[1]
    single = {"output_tokens": n, "ttft_s": t_first - t0, "decode_s": t_end - t_first,
              "decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 else None, "e2e_s": t_end - t0}
    log(f"HF transformers: batch of {len(prompts)}")
    t0 = time.perf_counter()
    n = generate(prompts, args.output_len)
    wall = time.perf_counter() - t0
    batch = {"batch_size": len(prompts), "output_tokens": n * len(prompts), "wall_s": wall,
             "tok_s": n * len(prompts) / wall, "mean_ttft_s": None}
    log(f"HF transformers: single {single['decode_tok_s']:.1f} tok/s, batch {batch['tok_s']:.1f} tok/s")
    return {"engine": "HF transformers", "backend": f"torch {torch.__version__} cpu", "weights": "float32 (dequantized)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "threads": args.threads, "load_s": load_s, "single": single, "batch": batch}


def bench_llama_cpp(args, model_path: str | None, prompts: list[list[int]], log) -> dict:
    if model_path is None or not model_path.endswith(".gguf"):
        return {"engine": "llama.cpp", "skipped": "llama.cpp needs a .gguf model"}
    try:
        import llama_cpp
    except ImportError:
        return {"engine": "llama.cpp", "skipped": "llama_cpp is not installed (pip install llama-cpp-python)"}
    log("llama.cpp: loading")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=args.input_len + args.output_len + 16, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    load_s = time.perf_counter() - t0

    def generate(prompt, n):
        """(t_submit, t_first, t_end, tokens); generate() has no EOS check, so it runs exactly n tokens."""
        llm.reset()  # no prefix reuse between runs
        t0 = time.perf_counter()
        t_first, k = None, 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            k += 1
            if t_first is None:
                t_first = time.perf_counter()
            if k == n:
                break
        return t0, t_first, time.perf_counter(), k

    log("llama.cpp: warm-up")
    generate(prompts[0][:16], 4)
    log("llama.cpp: single stream")
    t0, t_first, t_end, n = generate(prompts[0], args.output_len)
    single = {"output_tokens": n, "ttft_s": t_first - t0, "decode_s": t_end - t_first,
              "decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 else None, "e2e_s": t_end - t0}
    log(f"llama.cpp: single {single['decode_tok_s']:.1f} tok/s")
    quant = Path(model_path).stem.rsplit(".", 1)[-1]
    llm = None  # frees the model before the next engine loads (generate() is not called again)
    return {"engine": "llama.cpp", "backend": f"llama-cpp-python {llama_cpp.__version__} cpu",
            "weights": f"{quant} (native)", "versions": {"llama_cpp": llama_cpp.__version__}, "threads": args.threads,
            "load_s": load_s, "single": single, "batch": None,
            "batch_note": "llama-cpp-python generates one sequence at a time"}


# -- context and the table -----------------------------------------------------------------------------------


def run_context(args, devices: bool = True) -> dict:
    """Where and how a benchmark ran. devices=False leaves JAX's backend alone: a client measuring a server on the
    same machine must not take the accelerator's memory."""
    import jax
    import jaxlib

    repo = Path(__file__).resolve().parent.parent
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["jaxinfer", *getattr(args, "argv", sys.argv[1:])]),
        "python_argv": list(sys.argv),
        "git_commit": _git(repo, "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git(repo, "status", "--porcelain", "--untracked-files=no")),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "backend": jax.default_backend() if devices else "client only",
        "devices": [str(d.device_kind) for d in jax.devices()] if devices else [],
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),  # other work on the machine skews every number
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _busy_note(load: list[float] | None) -> str | None:
    cpus = os.cpu_count() or 1
    if load and load[0] > 0.5 * cpus:
        return (f"the machine was busy before the run (1-min load average {load[0]:.1f} on {cpus} CPUs): "
                "other processes share the cores, so every number is low and the ratios are unreliable")
    return None


def _git(repo: Path, *cmd) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _args_dict(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in ("func", "argv")}


def format_table(report: dict, args) -> str:
    rows = [r for r in report["results"] if not r.get("skipped")]
    hf = next((r for r in rows if r["engine"] == "HF transformers"), None)

    def rate(r, key):
        m = r.get(key)
        return None if not m else (m["decode_tok_s"] if key == "single" else m["tok_s"])

    def fmt(x, spec=".1f"):
        return "n/a" if x is None else format(x, spec)

    def ratio(r, key):
        a, b = rate(r, key), (rate(hf, key) if hf else None)
        return None if a is None or not b else a / b

    header = ["engine", "weights", "single tok/s", "TTFT ms", f"batch{args.batch_size} tok/s", "vs HF single",
              "vs HF batch"]
    body = []
    for r in rows:
        single = r.get("single") or {}
        body.append([r["engine"], r.get("weights", ""), fmt(rate(r, "single")),
                     fmt(single.get("ttft_s") and single["ttft_s"] * 1e3, ".0f"), fmt(rate(r, "batch")),
                     fmt(ratio(r, "single"), ".2f") + ("x" if ratio(r, "single") else ""),
                     fmt(ratio(r, "batch"), ".2f") + ("x" if ratio(r, "batch") else "")])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    ctx = report["context"]
    jx = next(r for r in report["results"] if r["engine"] == "jaxinfer")
    s = jx["startup"]
    out = [
        "",
        f"jaxinfer bench: {Path(jx['model']).name}, {args.input_len} prompt tokens, {args.output_len} output tokens, "
        f"greedy, EOS ignored; {ctx['backend']} backend, {ctx['cpu_count']} CPUs ({ctx['cpu_model']}), "
        f"git {ctx['git_commit']}{'+dirty' if ctx['git_dirty'] else ''}",
        f"jaxinfer start-up {s['total_s']:.1f} s: weights {s['weights_s']:.1f} s, KV cache {s['kv_cache_s']:.2f} s, "
        f"{s['num_buckets']} buckets compiled in {s['compile_s']:.1f} s, warm-up {s.get('warm_up_s', 0):.2f} s"
        + ("" if jx["engine_config"]["compilation_cache"] else " (compilation cache off)"),
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(b) for b in body),
    ]
    if report["notes"]:
        out += [""] + [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)
