"""The reliability table's load rows (benchmarks/reliability.py): `jaxinfer serve` under more than it can take,
with clients that leave mid-stream, and SIGTERM under load.

soak          Poisson arrivals at a multiple of the server's measured capacity (completed requests per second with
              enough clients to keep every sequence slot busy), streamed completions of mixed lengths; a share of
              the clients closes its connection after a random number of tokens. Every request ends one way:
              completed (a finish reason and [DONE]), refused (429 with Retry-After and the OpenAI error shape:
              the queue is full), disconnected (by its client, on purpose), a 5xx, or lost (anything else: a broken
              or unfinished stream, a client-side timeout). The server's RSS, device memory and KV pages are
              sampled throughout; pages in use must be 0 once it is idle.
sigterm       streams running and queued when the server gets SIGTERM: the ones that end within
              --shutdown-timeout finish ("length"), the rest end with "abort" and [DONE]; requests after the signal
              get 503; the process exits 0 without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxinfer.bench_serve import sse_events  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict | None = None, timeout: float = 900.0, log_path: str | None = None):
    """`python -m jaxinfer serve ARGS` on a free port, once /ready answers 200: (process, base url, log path)."""
    import httpx

    port = free_port()
    log_path = log_path or f"/tmp/jaxinfer-serve-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxinfer", "serve", "--port", str(port), *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not become ready; its log: {open(log_path).read()[-3000:]}")


@contextlib.contextmanager
def served(args: list[str], env: dict | None = None, log_path: str | None = None):
    """`start_server` for the block: (process, base url, log path); stopped (SIGTERM) when the block ends, so the
    process's returncode is set after it."""
    proc, url, log_path = start_server(args, env=env, log_path=log_path)
    try:
        yield proc, url, log_path
    finally:
        stop_server(proc)


def error_shaped(text: str) -> bool:
    """Whether a response body is the OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    try:
        err = json.loads(text)["error"]
        return {"message", "type", "param", "code"} <= set(err) and isinstance(err["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


def stop_server(proc) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def metrics(session, url: str) -> dict[str, float]:
    """/metrics as {name: value}, samples of a labelled family summed (the _total / _count names as written)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = f"{s.name}{{status={s.labels['status']}}}" if "status" in s.labels else s.name
            out[key] = out.get(key, 0.0) + s.value
    return out


def workload(n: int, seed: int, vocab_words: list[str], in_range=(16, 160), out_range=(8, 64)):
    """n (prompt text, max_tokens) pairs: random words (no two share a start, so the prefix cache does not make
    the load lighter than it looks), lengths uniform in the ranges."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(vocab_words, int(rng.integers(*in_range)))
        out.append((f"{i}: " + " ".join(words), int(rng.integers(*out_range))))
    return out


WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under name very through just form sentence great think say help low line "
         "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
         "small end put home read hand port large spell add even land here must big high such follow act why ask men "
         "change went light kind off need house picture try us again animal point mother world near build self earth "
         "father head stand own page should country found answer school grow study still learn plant cover food sun "
         "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
         "draw left late run while press close night real life few north open seem together next white children "
         "begin got walk example ease paper group always music those both mark often letter until mile river car "
         "feet care second book carry took science eat room friend began idea fish mountain stop once base hear "
         "horse cut sure watch color face wood main enough plain girl usual young ready above ever red list though "
         "feel talk bird soon body dog family direct pose leave song measure door product black short numeral class "
         "wind question happen complete ship area half rock order fire south problem piece told knew pass since top "
         "whole king space heard best hour better true during hundred five remember step early hold west ground "
         "interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay "
         "against pattern slow center love person money serve appear road map rain rule govern pull cold notice "
         "voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun "
         "field rest correct able pound done beauty drive stood contain front teach week final gave green oh quick "
         "develop ocean warm free minute strong special mind behind clear tail produce fact street inch multiply "
         "nothing course stay wheel full force blue object decide surface deep moon island foot system busy test "
         "record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate").split()


async def stream(session, url: str, headers: dict, model: str, prompt: str, max_tokens: int,
                 leave_after: int | None = None) -> dict:
    """One streamed completion; `leave_after` chunks in, the client closes its connection. The outcome's kind:
    completed, refused (429), disconnected, server_error (5xx), client_error (another 4xx), lost."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": 1,
            "ignore_eos": True, "stream": True}
    res = {"kind": "lost", "status": None, "ttft": None, "itl": [], "tokens": 0, "finish": None, "error": ""}
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
            res["status"] = r.status
            if r.status != 200:
                text = await r.text()
                if r.status == 429 and error_shaped(text) and r.headers.get("Retry-After"):
                    res["kind"] = "refused"
                else:
                    res["kind"] = "server_error" if r.status >= 500 else "client_error"
                    res["error"] = f"HTTP {r.status}: {text[:200]}"
                return res
            done = False
            async for chunk in sse_events(r.content):
                if chunk is None:
                    done = True
                    break
                if "error" in chunk:
                    res["error"] = chunk["error"].get("message", "error")
                    res["kind"] = "server_error"
                    return res
                for c in chunk.get("choices", []):
                    now = time.perf_counter()
                    if c.get("text"):
                        res["tokens"] += 1
                        if last is None:
                            res["ttft"] = now - t0
                        else:
                            res["itl"].append(now - last)
                        last = now
                    if c.get("finish_reason"):
                        res["finish"] = c["finish_reason"]
                if leave_after is not None and res["tokens"] >= leave_after:
                    res["kind"] = "disconnected"
                    r.close()
                    return res
            if done and res["finish"] is not None:
                res["kind"] = "completed"
            else:
                res["error"] = f"stream ended without {'[DONE]' if not done else 'a finish reason'}"
    except Exception as e:  # noqa: BLE001 - counted as lost, with what it was
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def _session(timeout: float = 900.0):
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                 connector=aiohttp.TCPConnector(limit=0))


async def capacity(url: str, headers: dict, model: str, work: list, clients: int, seconds: float) -> dict:
    """Completed requests per second with `clients` back-to-back clients (a closed loop) for `seconds`."""
    async with _session() as session:
        t0, done, tokens, i = time.perf_counter(), [], [0], [0]

        async def client():
            while time.perf_counter() - t0 < seconds:
                prompt, n = work[i[0] % len(work)]
                i[0] += 1
                r = await stream(session, url, headers, model, prompt, n)
                if r["kind"] == "completed":
                    done.append(time.perf_counter())
                    tokens[0] += r["tokens"]

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return dict(clients=clients, seconds=round(elapsed, 1), completed=len(done),
                requests_per_s=len(done) / elapsed, output_tokens_per_s=tokens[0] / elapsed)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(q / 100 * len(xs))) - 1)]


async def soak(url: str, headers: dict, model: str, work: list, *, rate: float, seconds: float,
               disconnect: float = 0.1, seed: int = 0, pid: int | None = None, sample_every: float = 10.0,
               idle_timeout: float = 600.0) -> dict:
    """Poisson arrivals at `rate` requests/s for `seconds`; each client leaves mid-stream with probability
    `disconnect`. Then waits for the server to go idle. The outcome counts, latencies and the samples."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pid = pid or os.getpid()
    samples: list[dict] = []
    async with _session() as session:
        async def sample(t0):
            m = await metrics(session, url)
            samples.append(dict(t=round(time.perf_counter() - t0, 1), rss=rss_bytes(pid),
                                device=m.get("jaxinfer_device_memory_bytes"), pages=m.get("jaxinfer_kv_pages_used"),
                                running=m.get("jaxinfer_running_requests"), queued=m.get("jaxinfer_queue_length")))

        before = await metrics(session, url)
        t0 = time.perf_counter()
        await sample(t0)
        stop = asyncio.Event()

        async def sampler():
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), sample_every)
                except asyncio.TimeoutError:
                    await sample(t0)

        sampling = asyncio.create_task(sampler())
        tasks, k = [], 0
        while time.perf_counter() - t0 < seconds:
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
            prompt, n = work[k % len(work)]
            leave = int(rng.integers(1, max(2, n))) if rng.random() < disconnect else None
            tasks.append(asyncio.create_task(stream(session, url, headers, model, prompt, n, leave)))
            k += 1
        sent_s = time.perf_counter() - t0
        results = await asyncio.gather(*tasks)
        load_s = time.perf_counter() - t0
        deadline = time.perf_counter() + idle_timeout
        while time.perf_counter() < deadline:  # aborted requests leave at the next step: wait for idle
            m = await metrics(session, url)
            if not m.get("jaxinfer_running_requests") and not m.get("jaxinfer_queue_length"):
                break
            await asyncio.sleep(0.5)
        stop.set()
        await sampling
        await sample(t0)
        after = await metrics(session, url)
    kinds: dict[str, int] = {}
    for r in results:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    served = [r for r in results if r["kind"] in ("completed", "disconnected")]
    ttft = [r["ttft"] for r in served if r["ttft"] is not None]
    itl = [x for r in served for x in r["itl"]]
    server_5xx = sum(v - before.get(k, 0.0) for k, v in after.items()
                     if k.startswith("jaxinfer_requests_total{status=5"))
    return dict(
        rate=rate, seconds=round(sent_s, 1), load_seconds=round(load_s, 1), sent=len(results), outcomes=kinds,
        lost=kinds.get("lost", 0), server_errors=kinds.get("server_error", 0), server_5xx_counted=server_5xx,
        unexpected_4xx=kinds.get("client_error", 0),
        errors=sorted({r["error"] for r in results if r["error"]})[:5],
        ttft_p50_s=_pct(ttft, 50), ttft_p99_s=_pct(ttft, 99), itl_p50_s=_pct(itl, 50), itl_p99_s=_pct(itl, 99),
        output_tokens=sum(r["tokens"] for r in results),
        rss_start=samples[0]["rss"], rss_end=samples[-1]["rss"], rss_peak=max(s["rss"] for s in samples),
        device_start=samples[0]["device"], device_end=samples[-1]["device"],
        pages_in_use_end=samples[-1]["pages"], samples=samples)


def sigterm_under_load(serve_args: list[str], model: str, *, streams: int = 12, short: int = 8, long: int = 400,
                       shutdown_timeout: float = 5.0, log_path: str | None = None) -> dict:
    """`streams` streamed requests (half `short` tokens, half `long`), SIGTERM once they have generated two tokens a
    stream in all (some may still wait for a slot): how each ended, what a request after the signal got, the exit
    code and time, a traceback or not."""
    import httpx

    proc, url, log_path = start_server([*serve_args, "--shutdown-timeout", str(shutdown_timeout)],
                                       log_path=log_path)

    async def go():
        async with _session() as session:
            tasks = [asyncio.create_task(stream(session, url, {}, model, f"{i} shut down soon", short if i % 2 else long))
                     for i in range(streams)]
            t_wait = time.perf_counter()
            while time.perf_counter() - t_wait < 300:  # under way: two tokens a stream generated, in all
                m = await metrics(session, url)
                if m.get("jaxinfer_generation_tokens_total", 0) >= 2 * streams:
                    break
                await asyncio.sleep(0.1)
            t_sig = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:
                after = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "late"}, timeout=10)
                after_status = after.status_code
            except httpx.TransportError as e:
                after_status = f"{type(e).__name__}"
            results = await asyncio.gather(*tasks)
            return t_sig, after_status, results

    t_sig, after_status, results = asyncio.run(go())
    try:
        rc = proc.wait(shutdown_timeout + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "killed"
    exit_s = time.perf_counter() - t_sig
    log = open(log_path).read()
    finishes: dict[str, int] = {}
    for r in results:
        key = r["finish"] if r["kind"] == "completed" else r["kind"]
        finishes[key] = finishes.get(key, 0) + 1
    return dict(streams=streams, shutdown_timeout=shutdown_timeout, finishes=finishes,
                clean=all(r["kind"] == "completed" for r in results), request_after_signal=after_status,
                exit_code=rc, exit_after_s=round(exit_s, 1), traceback="Traceback" in log)
