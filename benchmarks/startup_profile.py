"""Where a start-up's time goes, program by program: lowering, the persistent-cache read (file, decompress,
deserialise onto the device), compiling, warm-up. Each start runs in a fresh process, as a user's would.

    python benchmarks/startup_profile.py --model llama-3.1-8b --engine-config h100-llama-3.1-8b \\
        --compilation-cache-dir /tmp/cc --starts 4 --compile-threads 8,1,16 --json-out startup.json

The first start fills the cache if it is empty (a cold start); the others load from it. --compile-threads
gives the thread counts to try for the warm starts (one start each after --starts starts at the preset's).
Programs saved whole (jaxinfer/executables.py) load before any lowering; the rest go through jax's persistent
cache, whose reads the child wraps (`compiler._cache_read`) to time their three parts: a profiling aid only, it
calls jax's own code and changes nothing it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _install_timers(calls: list) -> None:
    """Time each persistent-cache read in three parts (file, decompress, the rest: deserialise) and each cache key."""
    from jax._src import compilation_cache as cc
    from jax._src import compiler

    local = threading.local()
    read, get_cache, decompress = compiler._cache_read, cc._get_cache, cc.decompress_executable

    class TimedCache:  # the cache object, its `get` (the file read) timed
        def __init__(self, cache):
            self.cache = cache

        def get(self, key):
            t = time.monotonic()
            blob = self.cache.get(key)
            local.rec.update(read_s=time.monotonic() - t, bytes=len(blob) if blob is not None else 0)
            return blob

        def __getattr__(self, name):
            return getattr(self.cache, name)

    def _get_cache(*a, **k):
        cache = get_cache(*a, **k)
        return TimedCache(cache) if cache is not None and getattr(local, "rec", None) is not None else cache

    def decompress_executable(blob):
        t = time.monotonic()
        out = decompress(blob)
        local.rec["decompress_s"] = time.monotonic() - t
        return out

    def _cache_read(module_name, *a, **k):  # the rest of the time is deserialising onto the device
        local.rec = rec = {"module": module_name, "start": time.monotonic()}
        try:
            exe, compile_time = read(module_name, *a, **k)
        finally:
            local.rec = None
        rec["end"] = time.monotonic()
        rec["miss"] = exe is None
        rec["deserialize_s"] = rec["end"] - rec["start"] - rec.get("read_s", 0.0) - rec.get("decompress_s", 0.0)
        calls.append(rec)
        return exe, compile_time

    compiler._cache_read, cc._get_cache, cc.decompress_executable = _cache_read, _get_cache, decompress_executable
    key_fn = compiler._get_cache_key

    def _get_cache_key(*a, **k):
        t = time.monotonic()
        out = key_fn(*a, **k)
        calls.append({"cache_key_s": time.monotonic() - t})
        return out

    compiler._get_cache_key = _get_cache_key


def child(args) -> None:
    import jax

    from jaxinfer.config import engine_preset

    events: dict[str, list[float]] = {}
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: events.setdefault(event, []).append(duration))
    calls: list = []
    _install_timers(calls)
    opts = dict(engine_preset(args.engine_config) if args.engine_config else {})
    opts.update(load_format=args.load_format, compilation_cache_dir=args.compilation_cache_dir, show_progress=False)
    if args.threads:
        opts["compile_threads"] = args.threads
    from jaxinfer.engine import Engine

    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    eng = Engine(args.model, **opts)
    total, ru1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    r = eng.runner
    phase = {"start": r.compile_started}
    reads = [c for c in calls if "read_s" in c]
    hits = [c for c in reads if not c.get("miss")]
    misses = len(reads) - len(hits)
    others = [c for c in hits if c["start"] < phase["start"]]  # weights, KV cache and sampler-state programs
    hits = [c for c in hits if c["start"] >= phase["start"]]
    by_module: dict[str, list] = {}
    for c in hits:
        m = by_module.setdefault(c["module"], [0, 0.0, 0])
        m[0] += 1
        m[1] = round(m[1] + c["deserialize_s"], 3)
        m[2] += c["bytes"]

    def s(key, xs=hits):
        return round(sum(c.get(key, 0.0) for c in xs), 3)

    window = (max(c["end"] for c in hits) - min(c["start"] for c in hits)) if hits else 0.0
    progs = sorted(((str(k), round(v, 3)) for k, v in r.program_seconds.items()), key=lambda kv: -kv[1])
    out = {
        "threads": opts.get("compile_threads") or min(8, os.cpu_count() or 1),
        "total_s": total, "weights_s": eng.load_seconds, "kv_cache_s": eng.kv_seconds,
        "compile_s": eng.compile_seconds, "lower_s": eng.lower_seconds, "warm_up_s": eng.warm_up_seconds,
        "cpu_user_s": ru1.ru_utime - ru0.ru_utime, "cpu_sys_s": ru1.ru_stime - ru0.ru_stime,
        "programs": len(r.program_seconds), "programs_loaded": r.programs_loaded, "cache_hits": len(hits), "cache_misses": misses,
        "cache_bytes": sum(c.get("bytes", 0) for c in hits),
        "read_s": s("read_s"), "decompress_s": s("decompress_s"), "deserialize_s": s("deserialize_s"),
        "cache_key_s": s("cache_key_s", calls), "load_window_s": round(window, 3),
        "other_hits": len(others), "other_load_s": round(sum(c["end"] - c["start"] for c in others), 3),
        "by_module": by_module,
        "slowest_programs": progs[:8], "fastest_programs": progs[-3:],
        "events_s": {k: [len(v), round(sum(v), 3)] for k, v in sorted(events.items())},
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(out), flush=True)


def line(name: str, p: dict) -> str:
    return (f"{name:<14} {p['total_s']:6.1f} s: weights {p['weights_s']:.1f}, compile {p['compile_s']:.1f} "
            f"({p.get('programs_loaded', 0)} of {p['programs']} programs loaded whole; lower "
            f"{p['lower_s']:.1f}; cache key {p['cache_key_s']:.1f}, read {p['read_s']:.2f}, decompress "
            f"{p['decompress_s']:.2f}, deserialise {p['deserialize_s']:.1f} summed over {p['cache_hits']} hits "
            f"in a {p['load_window_s']:.1f} s window; {p['cache_misses']} misses), warm-up {p['warm_up_s']:.1f}; "
            f"cpu {p['cpu_user_s']:.1f}+{p['cpu_sys_s']:.1f} s, {p['threads']} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine-config")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--compilation-cache-dir", required=True)
    ap.add_argument("--starts", type=int, default=3, help="starts at the preset's thread count (the first may be cold)")
    ap.add_argument("--compile-threads", default="", help="comma-separated thread counts for one more start each")
    ap.add_argument("--json-out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    runs = [0] * args.starts + [int(t) for t in args.compile_threads.split(",") if t]
    base = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--load-format",
            args.load_format, "--compilation-cache-dir", args.compilation_cache_dir]
    if args.engine_config:
        base += ["--engine-config", args.engine_config]
    results = []
    for i, threads in enumerate(runs):
        cache = Path(args.compilation_cache_dir)
        files = sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0
        t0 = time.monotonic()
        r = subprocess.run(base + ["--threads", str(threads)], stdout=subprocess.PIPE, text=True)
        if r.returncode:
            sys.exit(f"start {i} failed with exit status {r.returncode}")
        p = json.loads(r.stdout.strip().splitlines()[-1])
        p.update(process_s=time.monotonic() - t0, cache_files_before=files)
        results.append(p)
        print(line(f"start {i}" + (" (cold)" if not files else ""), p) + f"; process {p['process_s']:.1f} s",
              flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
