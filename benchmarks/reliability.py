"""Faults injected into a running engine, and what the other requests saw: one table.

    python benchmarks/reliability.py                       # default model, its CPU defaults
    python benchmarks/reliability.py --requests 8 --json-out reliability.json

Each row runs the same requests (greedy and seeded-sampled, one of them the "culprit") with a fault injected through
`Engine.fault_hook` (test-only) or a patched step, and compares every other request's tokens with a run without the
fault. Rows:
  transient     one step raises once (at a random launch): nothing may be lost
  culprit       every step holding the culprit raises: it alone must end with finish_reason 'error'
  detokenizer   the culprit's text raises: it alone must end with 'error'
  NaN           the culprit's logits turn NaN at one step: it alone must end with 'error', no token drawn from them
  hung step     (serving.AsyncEngine, --step-timeout 4 s) a step sleeps 10 s: the watchdog must fail what is in flight
                at once, the server be unready until the step returns, then serve the same tokens again
  lost state    (serving.AsyncEngine) a step raises out of the engine: in-flight requests fail, a new engine is
                built from the factory: seconds until ready, and the next requests' tokens
Then `jaxinfer serve` on the same model in a child process (benchmarks/reliability_load.py,
benchmarks/reliability_inputs.py):
  load          its capacity (completed requests/s, a closed loop of --capacity-clients), then --soak-seconds of
                Poisson arrivals at --soak-load times it, --disconnect of the clients leaving mid-stream
  bad inputs    the hostile-JSON fuzzer and schemathesis (both modes, then the stateful phase) on that server;
                broken copies of the model file and of a small safetensors checkpoint, loaded in this process
  SIGTERM       streams running when the server is told to stop
  security      API keys, the HTTP parser's errors, a cache directory others can write, tampered program files
--rows picks some of: faults, load, inputs, sigterm, security (default: all). The inputs rows need the test extras
(`pip install -e '.[test]'`: schemathesis, hypothesis). All rows on the default model, 2 CPU cores: ~35 min.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the embedded default model")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--rows", default="faults,load,inputs,sigterm,security")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--soak-load", type=float, default=2.0, help="arrival rate as a multiple of the capacity")
    p.add_argument("--disconnect", type=float, default=0.1, help="share of clients that leave mid-stream")
    p.add_argument("--capacity-seconds", type=float, default=60.0)
    p.add_argument("--capacity-clients", type=int, default=32)
    p.add_argument("--fuzz-mutations", type=int, default=200, help="random mutations of a valid body, per route")
    p.add_argument("--schemathesis-examples", type=int, default=60, help="per route and mode, and stateful runs")
    p.add_argument("--corrupt-trials", type=int, default=40, help="overwritten copies of each file")
    p.add_argument("--workdir", default=None, help="for the servers' logs and caches (default: a temporary one)")
    args = p.parse_args(argv)
    rows_wanted = set(args.rows.split(","))
    report: dict = dict(requests=args.requests, max_tokens=args.max_tokens)
    table = Table(report, args.json_out)
    if "faults" in rows_wanted:
        report["rows"] = fault_rows(args, table)
    served_rows(args, rows_wanted, report, table)
    print("| what | measured |")
    print("|---|---|")
    print("\n".join(table))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(report, table=list(table)), fh, indent=1, default=str)
    return 0


class Table(list):
    """The table's rows, each also printed as it is measured (a long run shows its progress), and the report so far
    written to --json-out after each."""

    def __init__(self, report: dict, json_out: str | None):
        super().__init__()
        self.report, self.json_out = report, json_out

    def append(self, row: str) -> None:
        print(row, flush=True)
        super().append(row)
        if self.json_out:
            with open(self.json_out, "w") as fh:
                json.dump(dict(self.report, table=list(self)), fh, indent=1, default=str)


def fault_rows(args, table: list[str]) -> list[dict]:
    import numpy as np

    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams
    from serving.async_engine import AsyncEngine

    rng = np.random.default_rng(args.seed)
    eng = Engine(args.model, show_progress=False)
    V = eng.cfg.vocab_size
    prompts = [rng.integers(0, V, int(n)).tolist() for n in rng.integers(8, 200, args.requests)]
    params = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
              for i in range(args.requests)]
    culprit = args.requests // 2

    def run(hook=None):
        eng.fault_hook = hook
        faults = eng.num_step_faults
        ids = [eng.add_request(pr, sp) for pr, sp in zip(prompts, params)]
        ctx["ids"] = ids
        finals, t0 = {}, time.perf_counter()
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    finals[out.request_id] = out
        eng.fault_hook = None
        return [finals[i] for i in ids], eng.num_step_faults - faults, time.perf_counter() - t0

    ctx: dict = {}
    base, _, base_s = run()
    want = [o.outputs[0].token_ids for o in base]
    rows = []

    def row(name, outs, faults, secs, expect_failed=()):
        others = [i for i in range(args.requests) if i not in expect_failed]
        same = all(outs[i].outputs[0].token_ids == want[i] and outs[i].error is None for i in others)
        failed = [i for i in range(args.requests) if outs[i].outputs[0].finish_reason == "error"]
        pages = eng.scheduler.allocator.num_used
        rows.append(dict(fault=name, others_identical=same, failed=failed, expected_failed=list(expect_failed),
                         step_faults=faults, seconds=round(secs, 2), baseline_seconds=round(base_s, 2),
                         pages_in_use_after=pages))

    launches = []
    at = int(rng.integers(2, 8))

    def transient(batch):
        launches.append(1)
        if len(launches) == at:
            raise RuntimeError("injected: a step fails once")
    row("transient: one step raises once", *run(transient))

    def culprit_hook(batch):
        if any(r.group_id == ctx["ids"][culprit] for r in batch.requests):
            raise RuntimeError("injected: the culprit breaks its step")
    row("culprit: every step holding one request raises", *run(culprit_hook), expect_failed=(culprit,))

    nan_seen = []

    def nan_hook(batch):  # the culprit's logits become NaN at its 3rd step
        mine = [r for r in batch.requests if r.group_id == ctx["ids"][culprit]]
        nan_seen.extend(mine)
        return mine if len(nan_seen) == 3 else None
    row("NaN: one request's logits turn NaN at one step", *run(nan_hook), expect_failed=(culprit,))

    add_token = eng._add_token

    def broken(req, *a, **kw):
        if req.group_id == ctx["ids"][culprit] and len(req.output_token_ids) >= 3:
            raise RuntimeError("injected: its detokenizer broke")
        return add_token(req, *a, **kw)
    eng._add_token = broken
    row("detokenizer: one request's text raises", *run(), expect_failed=(culprit,))
    del eng._add_token

    # The server's engine thread: a hung step, then a lost state (a rebuild from the factory).
    built = []

    def factory():
        built.append(time.perf_counter())
        return eng if len(built) == 1 else Engine(args.model, show_progress=False)

    async def served():
        ae = AsyncEngine(factory, step_timeout=4.0)  # a 256-token step of the default model: ~1.7 s on 2 cores
        ae.start()
        await ae.wait_ready()

        async def one(i):
            toks = []
            async for out in ae.generate([(f"r{i}-{time.monotonic_ns()}", prompts[i], params[i])]):
                toks = out.outputs[0].token_ids
            return toks

        async def all_requests():
            return await asyncio.gather(*(one(i) for i in range(args.requests)), return_exceptions=True)

        out = {}
        hung = []
        ae.engine.fault_hook = lambda batch: hung or (hung.append(1), time.sleep(10))
        t0 = time.perf_counter()
        res = await all_requests()
        failed_at = time.perf_counter() - t0
        while not ae.is_ready:
            await asyncio.sleep(0.05)
        ready_after = time.perf_counter() - t0
        ae.engine.fault_hook = None
        again = await all_requests()
        out["hung"] = dict(failed=sum(isinstance(r, Exception) for r in res), failed_within_s=round(failed_at, 2),
                           ready_after_s=round(ready_after, 2), next_identical=again == want)
        real, calls = ae.engine.step, []

        def step():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected: the device state is lost")
            return real()
        ae.engine.step = step
        t0 = time.perf_counter()
        res = await all_requests()
        while not ae.is_ready:
            await asyncio.sleep(0.05)
        ready_after = time.perf_counter() - t0
        again = await all_requests()
        out["lost"] = dict(failed=sum(isinstance(r, Exception) for r in res), ready_after_s=round(ready_after, 2),
                           rebuilds=ae.num_rebuilds, next_identical=again == want)
        await ae.stop()
        return out

    srv = asyncio.run(served())
    # The sampled requests' tokens depend on their seeds, not on the engine: the rebuilt engine gives the same ones.
    rows.append(dict(fault="hung step (watchdog at 4 s; the step sleeps 10 s)", **srv["hung"]))
    rows.append(dict(fault="lost state (a step raises out of the engine; rebuilt from the factory)", **srv["lost"]))

    in_engine = [r for r in rows if "others_identical" in r]
    for r in in_engine:
        culprit_s = ("failed alone" if r["failed"] == r["expected_failed"] and r["failed"] else
                     "" if not r["failed"] else f"failed: {r['failed']}")
        table.append(f"| fault: {r['fault']} | others: {'identical tokens' if r['others_identical'] else 'DIFFERENT'} "
                     f"({args.requests - len(r['expected_failed'])} requests){'; the culprit ' + culprit_s if culprit_s else ''}; "
                     f"{r['step_faults']} step faults; {r['seconds']} s (no fault: {r['baseline_seconds']} s); "
                     f"pages in use after: {r['pages_in_use_after']} |")
    h, lo = rows[len(in_engine)], rows[len(in_engine) + 1]
    table.append(f"| fault: {h['fault']} | {h['failed']} in flight failed within {h['failed_within_s']} s; ready again "
                 f"after {h['ready_after_s']} s; next requests {'identical' if h['next_identical'] else 'DIFFERENT'} |")
    table.append(f"| fault: {lo['fault']} | {lo['failed']} in flight failed; ready again after {lo['ready_after_s']} s "
                 f"({lo['rebuilds']} rebuild); next requests {'identical' if lo['next_identical'] else 'DIFFERENT'} |")
    return rows


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f} MB"


def _ms(x) -> str:
    return "n/a" if x is None else f"{x * 1e3:,.0f} ms"


def served_rows(args, wanted: set[str], report: dict, table: list[str]) -> None:
    """The rows of a `jaxinfer serve` child process: load, bad inputs, SIGTERM, security."""
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reliability_inputs as ri
    import reliability_load as rl

    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxinfer-reliability-")
    os.makedirs(workdir, exist_ok=True)
    model = "reliability"  # the id the servers answer to
    serve_args = (["--model", args.model] if args.model else []) + ["--served-model-name", model]
    if wanted & {"load", "inputs"}:
        with rl.served(serve_args, log_path=os.path.join(workdir, "serve.log")) as (proc, url, _):
            if "load" in wanted:
                work = rl.workload(2000, args.seed, rl.WORDS)
                cap = asyncio.run(rl.capacity(url, {}, model, work, args.capacity_clients, args.capacity_seconds))
                rate = args.soak_load * cap["requests_per_s"]
                work = rl.workload(int(1.5 * rate * args.soak_seconds) + 100, args.seed + 1, rl.WORDS)  # none twice
                soak = asyncio.run(rl.soak(url, {}, model, work, rate=rate, seconds=args.soak_seconds,
                                           disconnect=args.disconnect, seed=args.seed, pid=proc.pid))
                report["capacity"], report["soak"] = cap, soak
                o = soak["outcomes"]
                table.append(
                    f"| load: {soak['seconds']:.0f} s of Poisson arrivals at {args.soak_load:g}x the capacity "
                    f"({cap['requests_per_s']:.2f} req/s, {cap['output_tokens_per_s']:.0f} out tok/s with "
                    f"{cap['clients']} clients), {args.disconnect:.0%} of clients leaving mid-stream | "
                    f"{soak['sent']} sent: {o.get('completed', 0)} completed, {o.get('disconnected', 0)} disconnected, "
                    f"{o.get('refused', 0)} refused (429); **{soak['server_errors']} 5xx** (server's count "
                    f"{soak['server_5xx_counted']:.0f}), **{soak['lost']} lost**, {soak['unexpected_4xx']} other 4xx; "
                    f"TTFT p50 / p99 {_ms(soak['ttft_p50_s'])} / {_ms(soak['ttft_p99_s'])}, ITL p50 / p99 "
                    f"{_ms(soak['itl_p50_s'])} / {_ms(soak['itl_p99_s'])}; RSS {_mb(soak['rss_start'])} -> "
                    f"{_mb(soak['rss_end'])} (peak {_mb(soak['rss_peak'])}); device memory "
                    f"{_mb(soak['device_start'])} -> {_mb(soak['device_end'])}; pages in use at the end: "
                    f"{soak['pages_in_use_end']:.0f} |")
            if "inputs" in wanted:
                fz = ri.fuzz_json(url, {}, model, args.seed, args.fuzz_mutations)
                sc = ri.schemathesis_run(url, None, args.schemathesis_examples, args.schemathesis_examples,
                                         args.schemathesis_examples)
                report["fuzz"], report["schemathesis"] = fz, sc
                table.append(f"| bad inputs: hostile JSON / UTF-8 bodies on the 4 JSON routes | {fz['tried']} tried "
                             f"({fz['statuses']}; {fz['long_running']} of them valid requests decoding past 30 s): "
                             f"**{fz['server_errors']} 5xx, {fz['hangs']} hangs**, {fz['bad']} "
                             f"answers not in the error shape or leaking a path; server answering after: "
                             f"{fz['alive_after']} ({fz['seconds']} s) |")
                table.append(f"| bad inputs: schemathesis, every route, inside and outside the schema, then stateful "
                             f"along the links | {sc['calls']} calls ({sc['stateful_calls']} stateful; "
                             f"{sc['statuses']}): **{sc['server_errors']} 5xx**, {sc['failures']} conformance "
                             f"failures, {sc['no_answer']} without an answer in 120 s |")
        report["server_exit"] = proc.returncode
    if "inputs" in wanted:
        from jaxinfer.tokenizer import default_model_path

        gguf_path = args.model if args.model and args.model.endswith(".gguf") else default_model_path()
        cf = ri.corrupt_files(gguf_path, args.corrupt_trials, args.seed)
        report["corrupt_files"] = cf
        table.append(f"| bad inputs: broken copies of the model's GGUF and of a safetensors checkpoint (truncated, "
                     f"header and tables overwritten) | {cf['tried']} tried: {cf['value_error']} ValueError naming "
                     f"the file, {cf['loaded']} loaded, **{cf['other']} anything else**; slowest "
                     f"{cf['slowest_s']} s |")
    if "sigterm" in wanted:
        st = rl.sigterm_under_load(serve_args, model,
                                   log_path=os.path.join(workdir, "serve-sigterm.log"))
        report["sigterm"] = st
        table.append(f"| SIGTERM with {st['streams']} streams running (--shutdown-timeout {st['shutdown_timeout']:g} "
                     f"s) | finish reasons {st['finishes']} (every stream ended cleanly: {st['clean']}); a request "
                     f"after the signal: {st['request_after_signal']}; exit code {st['exit_code']} after "
                     f"{st['exit_after_s']} s; traceback: {st['traceback']} |")
    if "security" in wanted:
        sec = ri.security(serve_args, model, os.path.join(workdir, "security"))
        report["security"] = sec
        for r in sec["rows"]:
            table.append(f"| security: {r['check']} | {r['result']}; refused as specified: "
                         f"**{r['refused_as_specified']}** |")


if __name__ == "__main__":
    raise SystemExit(main())
