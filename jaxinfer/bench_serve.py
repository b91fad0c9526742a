"""`jaxinfer bench serve`: the HTTP server under load, measured from the client side.

An asyncio client (aiohttp) sends --num-prompts streaming /v1/completions requests per load level, each
a token-id prompt with `ignore_eos` so it makes exactly its drawn number of output tokens. A load level
is a --request-rate (Poisson arrivals: exponential gaps, seeded; `inf` sends everything at once), capped
by --max-concurrency requests in flight when given. Lengths are drawn once, seeded, and reused at every
level:

  random         input and output lengths uniform in [L * (1 - range), L * (1 + range)]
  sharegpt-like  log-normal lengths shaped like ShareGPT conversations (long-tailed prompts, shorter replies),
                 scaled so their medians are --input-len and --output-len, clipped to the context
                 (synthetic, seeded: no dataset file is read)

Per request (client clock): TTFT = send -> first token chunk; E2E = send -> last chunk; TPOT = (E2E -
TTFT) / (output tokens - 1); ITL = every gap between successive token chunks. Reported per level: mean,
p50, p90, p99 of each; request and output-token throughput; and goodput, the requests per second that
met every --goodput bound (e.g. `ttft:500 tpot:50`, milliseconds).

The server is either --base-url, or `jaxinfer serve` started in this process (its own event loop in a
thread; the engine has its own thread too), warmed with one request first. Prompts are windows over
English text tokenized by the server's /tokenize (seeded random token ids where the server has no tokenizer),
at random offsets, each starting with a few tokens drawn
afresh for every request at every level: the server's prefix cache can never serve one level's prompts
from an earlier level (reusing the prompts made every level after the first look faster than it was).
matplotlib (`pip install jaxinfer[bench]`) is imported only for --plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GOODPUT_KEYS = ("ttft", "tpot", "e2el")


def _rates(s: str) -> list[float]:
    try:
        rates = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or inf, got {s!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be > 0 (or inf), got {s!r}")
    return rates


def _goodput(s: str) -> tuple[str, float]:
    key, _, ms = s.partition(":")
    try:
        value = float(ms)
    except ValueError:
        value = -1.0
    if key not in GOODPUT_KEYS or not value > 0:
        raise argparse.ArgumentTypeError(f"expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)} and MS > 0, "
                                         f"got {s!r}")
    return key, value


def add_parser(subparsers) -> argparse.ArgumentParser:
    from jaxinfer.cli import _dataset, _Formatter, _positive_int, add_engine_args, add_model_args

    p = subparsers.add_parser(
        "serve", formatter_class=_Formatter, help="the HTTP server under load: TTFT, TPOT, ITL, latency, goodput",
        description=__doc__.split("\n\n", 1)[1].split("\n\nThe server is")[0],
        epilog="examples:\n"
        "  jaxinfer bench serve --request-rate 1,2,4,inf --num-prompts 50 --plot latency.png\n"
        "  jaxinfer bench serve --base-url http://127.0.0.1:8000 --max-concurrency 8 --dataset sharegpt-like\n"
        "  jaxinfer bench serve --goodput ttft:1000 tpot:100 --json-out serve.json",
    )
    add_model_args(p)
    g = p.add_argument_group("load")
    g.add_argument("--base-url", metavar="URL", help="a running server (default: start one in this process)")
    g.add_argument("--api-key", metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    g.add_argument("--num-prompts", type=_positive_int, default=100, metavar="N",
                   help="requests per load level (default: %(default)s)")
    g.add_argument("--request-rate", type=_rates, default=[math.inf], metavar="LIST",
                   help="requests per second, one load level each, e.g. 1,2,4,inf (default: inf)")
    g.add_argument("--max-concurrency", type=_positive_int, metavar="N",
                   help="most requests in flight at once (default: no cap)")
    g.add_argument("--dataset", type=_dataset, choices=["random", "sharegpt-like"], default="random",
                   help="length distribution (default: %(default)s)")
    g.add_argument("--input-len", type=_positive_int, default=128, metavar="N",
                   help="prompt length in tokens: mean (random) or median (sharegpt-like) (default: %(default)s)")
    g.add_argument("--output-len", type=_positive_int, default=128, metavar="N",
                   help="output length in tokens: mean (random) or median (sharegpt-like) (default: %(default)s)")
    g.add_argument("--range-ratio", type=float, default=0.0, metavar="R",
                   help="random: lengths uniform in L*(1-R)..L*(1+R) (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for lengths, offsets and arrivals (default: 0)")
    g.add_argument("--goodput", type=_goodput, nargs="+", metavar="KEY:MS",
                   help="service-level bounds in ms for goodput: ttft, tpot, e2el")
    g.add_argument("--json-out", metavar="PATH", help="write every number, per request too, as JSON")
    g.add_argument("--plot", metavar="PNG", help="plot latency against request throughput (needs matplotlib)")
    add_engine_args(p)
    p.set_defaults(func=run)
    return p


# -- workload -------------------------------------------------------------------------------------------------


def draw_lengths(args, max_model_len: int, rng) -> list[tuple[int, int]]:
    """(input, output) token counts per request, within the context."""
    n = args.num_prompts
    if args.dataset == "random":
        r = min(max(args.range_ratio, 0.0), 1.0)
        ins = rng.integers(int(args.input_len * (1 - r)), int(args.input_len * (1 + r)) + 1, n)
        outs = rng.integers(int(args.output_len * (1 - r)), int(args.output_len * (1 + r)) + 1, n)
    else:  # ShareGPT-like: log-normal, sigma as in ShareGPT v3 (prompts ~1.1, replies ~0.9 in log space)
        ins = args.input_len * rng.lognormal(0.0, 1.1, n)
        outs = args.output_len * rng.lognormal(0.0, 0.9, n)
    pairs = []
    for i, o in zip(ins, outs):
        i = max(1, min(int(i), max_model_len - 2))
        o = max(1, min(int(o), max_model_len - i))
        pairs.append((i, o))
    return pairs


def arrival_gaps(rate: float, n: int, rng) -> list[float]:
    return [0.0] * n if math.isinf(rate) else rng.exponential(1.0 / rate, n).tolist()


# -- one request ----------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    input_len: int
    output_len: int  # asked for
    ok: bool = False
    error: str = ""
    output_tokens: int = 0  # as the server's usage reports
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def fresh_heads(prompts: list[list[int]], pool, rng, head: int = 4) -> list[list[int]]:
    """The prompts with their first `head` tokens drawn anew from `pool`: same lengths, no shared prefix."""
    return [[int(t) for t in rng.choice(pool, min(head, len(p)))] + p[head:] for p in prompts]


async def sse_events(content):
    """The JSON events of a server-sent event stream (an aiohttp response's content), up to "[DONE]"; then one
    None if "[DONE]" came (a stream that breaks off ends without it)."""
    async for raw in content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)


async def send(session, url: str, headers: dict, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    res = RequestResult(len(prompt), max_tokens)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for chunk in sse_events(r.content):
                if chunk is None:  # [DONE]
                    break
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                if chunk.get("choices"):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
        res.e2el = (last or time.perf_counter()) - t0
        res.ok = last is not None
    except Exception as e:  # noqa: BLE001 - one failed request is a number in the report, not a crash
        res.error = f"{type(e).__name__}: {e}"
    return res


# -- one load level -------------------------------------------------------------------------------------------


async def run_level(url: str, headers: dict, model: str, prompts: list[list[int]], lengths, rate: float,
                    max_concurrency: int | None, gaps: list[float]) -> tuple[float, list[RequestResult]]:
    import aiohttp

    sem = asyncio.Semaphore(max_concurrency or len(prompts))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        async def one(p, o):
            async with sem:
                return await send(session, url, headers, model, p, o)

        tasks = []
        t0 = time.perf_counter()
        for p, (_, o), gap in zip(prompts, lengths, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(p, o)))
        results = await asyncio.gather(*tasks)
        return time.perf_counter() - t0, results


def _pcts(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs) * 1e3  # ms
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(rate: float, duration: float, results: list[RequestResult], goodput: dict[str, float] | None) -> dict:
    ok = [r for r in results if r.ok]
    good = None
    if goodput:
        def meets(r):
            ms = {"ttft": r.ttft * 1e3, "e2el": r.e2el * 1e3, "tpot": (r.tpot or 0.0) * 1e3}
            return all(ms[k] <= v for k, v in goodput.items())
        good = sum(meets(r) for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "exact_output_lengths": all(r.output_tokens == r.output_len for r in ok),
        "input_tokens": sum(r.input_len for r in ok), "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "goodput": None if good is None else good / duration, "good_requests": good,
        "ttft_ms": _pcts([r.ttft for r in ok]), "tpot_ms": _pcts([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _pcts([x for r in ok for x in r.itl]), "e2el_ms": _pcts([r.e2el for r in ok]),
        "requests": [{**asdict(r), "tpot": r.tpot} for r in results],
    }


# -- the server -----------------------------------------------------------------------------------------------


class InProcessServer:
    """`jaxinfer serve` on 127.0.0.1 (a free port), on its own event loop in a daemon thread."""

    def __init__(self, args):
        from jaxinfer.cli import check_options, engine_options_from_args
        from serving.api_server import ServerConfig, build_app, start_server
        from serving.async_engine import AsyncEngine

        opts = check_options(engine_options_from_args(args))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-server", daemon=True)
        self.thread.start()

        def factory():
            from jaxinfer.data_parallel import make_engine

            return make_engine(args.model, **opts)

        self.engine = AsyncEngine(factory)
        n = args.num_prompts
        app = build_app(self.engine, ServerConfig(model_name="jaxinfer", max_queued_requests=max(256, 2 * n)))

        async def start():
            runner, port = await start_server(app, "127.0.0.1", 0)
            self.engine.start()
            await self.engine.wait_ready()
            return runner, port

        self.runner, port = self._call(start())
        self.url = f"http://127.0.0.1:{port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self._call(self.runner.cleanup())
        self._call(self.engine.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# Token ids sent when the server has no tokenizer (dummy weights of a preset shape, vLLM's
# --skip-tokenizer-init): inside every Llama / Mistral / Qwen / Gemma vocabulary, clear of the special ids.
RANDOM_ID_RANGE = (1000, 30000)


async def _server_info(url: str, headers: dict, text: str) -> tuple[str, int, list[int] | None]:
    """The served model's name, its context length, and `text` tokenized by the server (None when the server has
    no tokenizer: /tokenize answers an error or is not there)."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/v1/models", headers=headers) as r:
            r.raise_for_status()
            card = (await r.json())["data"][0]
        async with s.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                          headers=headers) as r:
            ids = (await r.json()).get("tokens") if r.status == 200 else None
    return card["id"], card.get("max_model_len", 2048), ids


# -- the run --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxinfer.bench import _TEXT, _args_dict, _busy_note, _loadavg, run_context

    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    goodput = dict(args.goodput) if args.goodput else None
    report = {"context": run_context(args, devices=not args.base_url), "config": _args_dict(args), "results": [], "notes": []}
    busy = _busy_note(report["context"]["loadavg_start"])
    if busy:
        report["notes"].append(busy)
        log(f"warning: {busy}")
    server = None
    if args.base_url:
        url = args.base_url.rstrip("/")
    else:
        log("starting the server in this process (load + compile) ...")
        t = time.perf_counter()
        server = InProcessServer(args)
        url = server.url
        report["server_startup_s"] = time.perf_counter() - t
        log(f"server ready in {report['server_startup_s']:.1f} s at {url}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model, max_model_len, text_ids = asyncio.run(_server_info(url, headers, _TEXT))
        rng = np.random.default_rng(args.seed)
        if not text_ids:
            report["notes"].append(f"the server has no tokenizer: prompts are random token ids in "
                                   f"[{RANDOM_ID_RANGE[0]}, {RANDOM_ID_RANGE[1]})")
            log(f"note: {report['notes'][-1]}")
            text_ids = np.random.default_rng([args.seed, 3]).integers(*RANDOM_ID_RANGE, 4096).tolist()
        lengths = draw_lengths(args, max_model_len, rng)
        longest = max(i for i, _ in lengths)
        text_ids = text_ids * (longest // len(text_ids) + 2)
        offsets = rng.integers(0, len(text_ids) - longest, len(lengths))
        prompts = [text_ids[s : s + i] for s, (i, _) in zip(offsets, lengths)]
        report["model"] = model
        warm = asyncio.run(run_level(url, headers, model, prompts[:1], [(0, 4)], math.inf, None, [0.0]))[1][0]
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")
        pool = np.unique(text_ids)
        for level, rate in enumerate(args.request_rate):
            gaps = arrival_gaps(rate, len(prompts), np.random.default_rng([args.seed, 1]))
            level_prompts = fresh_heads(prompts, pool, np.random.default_rng([args.seed, 2, level]))
            log(f"request rate {rate:g}/s, {len(prompts)} requests"
                + (f", at most {args.max_concurrency} in flight" if args.max_concurrency else "") + " ...")
            duration, results = asyncio.run(run_level(url, headers, model, level_prompts, lengths, rate,
                                                      args.max_concurrency, gaps))
            res = summarize(rate, duration, results, goodput)
            report["results"].append(res)
            if res["failed"]:
                report["notes"].append(f"rate {rate:g}: {res['failed']} requests failed: {res['errors']}")
    finally:
        if server is not None:
            server.close()
    report["context"]["loadavg_end"] = _loadavg()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json_out}")
    if args.plot:
        plot(report, args.plot)
        log(f"wrote {args.plot}")
    print(format_table(report, args))
    return 0 if all(not r["failed"] for r in report["results"]) else 1


def format_table(report: dict, args) -> str:
    def f(x, spec=".1f"):
        return "n/a" if x is None else format(x, spec)

    header = ["rate/s", "done", "req/s", "out tok/s", "goodput/s"]
    for m in ("ttft", "tpot", "itl", "e2el"):
        header += [f"{m} mean", f"{m} p50", f"{m} p90", f"{m} p99"]
    body = []
    for r in report["results"]:
        row = [str(r["request_rate"]), f"{r['completed']}/{r['completed'] + r['failed']}",
               f(r["request_throughput"], ".2f"), f(r["output_throughput"]), f(r["goodput"], ".2f")]
        for m in ("ttft", "tpot", "itl", "e2el"):
            row += [f(r[f"{m}_ms"][k], ".0f") for k in ("mean", "p50", "p90", "p99")]
        body.append(row)
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    ctx = report["context"]
    lens = f"{args.dataset} lengths, input {args.input_len}, output {args.output_len}"
    out = ["", f"jaxinfer bench serve: {report.get('model')}, {args.num_prompts} requests per level, {lens}"
           + (f", at most {args.max_concurrency} in flight" if args.max_concurrency else "")
           + (f"; server at {args.base_url}" if args.base_url else f"; {ctx['backend']} backend")
           + f", {ctx['cpu_count']} CPUs, git {ctx['git_commit']}"
           + ("+dirty" if ctx["git_dirty"] else ""),
           "latencies in ms (client clock); goodput: requests/s meeting "
           + (" ".join(f"{k}<={v:g}ms" for k, v in args.goodput) if args.goodput else "(no --goodput given)"),
           "", line(header), line(["-" * w for w in widths]), *(line(b) for b in body)]
    if report["notes"]:
        out += [""] + [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    x = [r["request_throughput"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, m, title in zip(axes, ("ttft", "tpot", "itl", "e2el"),
                            ("time to first token", "time per output token", "inter-token latency",
                             "end-to-end latency")):
        for k, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(x, [r[f"{m}_ms"][k] for r in rows], style, label=k)
        for xi, r in zip(x, rows):
            ax.annotate(f"{r['request_rate']}/s" if r["request_rate"] != "inf" else "inf",
                        (xi, r[f"{m}_ms"]["p50"] or 0), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set(title=title, xlabel="achieved requests/s (offered rate annotated)", ylabel="ms")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"jaxinfer bench serve: {report.get('model')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
