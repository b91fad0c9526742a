"""Summarise a jax profiler trace (the Perfetto `*.trace.json.gz` that `jax.profiler.trace` writes): device time
per kernel name, largest first, so one can see where a step's time goes without opening a UI.

    python benchmarks/trace_summary.py TRACE_DIR_OR_FILE [--top 40] [--steps 5]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def load(path: str) -> dict:
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise SystemExit(f"no *.trace.json.gz under {path}")
        path = max(files, key=os.path.getmtime)
    with gzip.open(path) if path.endswith(".gz") else open(path) as f:
        return json.load(f)


def device_lanes(events):
    """(device process names by pid, thread names by (pid, tid), device time by lane, the lanes whose events are
    kernels: the stream lanes; the "XLA Ops" / "XLA Modules" / "Steps" lanes repeat them per op / program)."""
    pnames = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = {pid for pid, n in pnames.items() if re.search(r"/device:(GPU|TPU)", n)}
    tnames = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    lanes = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in dev:
            lanes[(e["pid"], e["tid"])] += e.get("dur", 0)
    keep = {lane for lane in lanes if not re.search(r"XLA (Ops|Modules)|Steps", str(tnames.get(lane, "")))}
    return {p: pnames[p] for p in dev}, tnames, lanes, keep


def kernel_us(path: str) -> float:
    """Device time of a trace's kernels, copies between host and device left out (microseconds)."""
    tr = load(path)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    keep = device_lanes(events)[3]
    return sum(e.get("dur", 0) for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in keep
               and not re.match(r"(?i)memcpy", e.get("name", "")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--steps", type=int, default=1, help="divide the totals by this many steps")
    p.add_argument("--modules", action="store_true",
                   help="also list the XLA programs run (the 'XLA Modules' lane): count, mean and total device "
                   "time, and the idle gaps before them")
    p.add_argument("--gaps", type=int, default=0, metavar="N",
                   help="also sum the device's idle gaps by size and list the N longest, with the kernels around them")
    p.add_argument("--group", action="store_true",
                   help="merge kernels whose names differ only by numeric suffixes (fusion.12, fusion.13, ...)")
    args = p.parse_args(argv)
    tr = load(args.path)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    pnames, tnames, lanes, keep = device_lanes(events)  # device lanes: processes whose name mentions the GPU / TPU
    for lane, us in lanes.most_common():
        print(f"lane {tnames.get(lane, lane)}: {us / 1e3 / args.steps:.3f} ms per step")
    tot, cnt = collections.Counter(), collections.Counter()
    spans = []
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in keep:
            name = re.sub(r"([._]\d+)+$", "", e["name"]) if args.group else e["name"]
            tot[name] += e.get("dur", 0)
            cnt[name] += 1
            spans.append((float(e["ts"]), float(e["ts"]) + e.get("dur", 0), name))
    total = sum(tot.values())
    print(f"device lanes: {[pnames[p] for p in sorted(pnames)]}")
    print(f"total kernel time {total / 1e3 / args.steps:.3f} ms per step over {sum(cnt.values())} events")
    if spans:  # how much of the traced window the device was busy (kernels on any kept lane)
        spans.sort()
        busy, (lo, hi, last), gaps = 0.0, spans[0], []
        for a, b, name in spans[1:]:
            if a > hi:
                busy, lo = busy + hi - lo, a
                gaps.append((a - hi, hi - spans[0][0], last, name))
                hi = b
            else:
                hi = max(hi, b)
            last = name if b >= hi else last
        busy += hi - lo
        window = max(b for _, b, _ in spans) - spans[0][0]
        print(f"device busy {busy / 1e3 / args.steps:.3f} ms per step of a {window / 1e3 / args.steps:.3f} ms "
              f"window: idle {1 - busy / window:.1%}")
    for name, us in tot.most_common(args.top):
        print(f"{us / args.steps:10.1f} us  {cnt[name] / args.steps:6.1f}x  {us / total:5.1%}  {name[:110]}")
    if args.gaps and spans:
        print_gaps(gaps, args.gaps)
    if args.modules:
        print_modules(events, tnames)
    return 0


def print_gaps(gaps, n: int) -> None:
    """Idle time between kernels, summed by gap length, then the n longest gaps."""
    classes = [(0, 20), (20, 200), (200, 2000), (2000, float("inf"))]
    print("idle gaps (us):", ", ".join(
        f"[{lo}, {hi}): {sum(1 for g in gaps if lo <= g[0] < hi)} gaps, {sum(g[0] for g in gaps if lo <= g[0] < hi) / 1e3:.1f} ms"
        for lo, hi in classes))
    for us, at, before, after in sorted(gaps, reverse=True)[:n]:
        print(f"  {us:9.1f} us idle at {at / 1e3:9.3f} ms, after {before[:40]} before {after[:40]}")


def print_modules(events, tnames) -> None:
    """Per XLA program: runs, mean and total device span, and the mean gap since the previous program ended."""
    runs = sorted((float(e["ts"]), e.get("dur", 0), e["name"]) for e in events
                  if e.get("ph") == "X" and "XLA Modules" in str(tnames.get((e.get("pid"), e.get("tid")), "")))
    if not runs:
        print("no 'XLA Modules' lane in this trace")
        return
    stats = collections.defaultdict(lambda: [0, 0.0, 0.0])  # runs, total us, total gap us
    prev_end = None
    for ts, dur, name in runs:
        st = stats[name]
        st[0], st[1] = st[0] + 1, st[1] + dur
        if prev_end is not None:
            st[2] += max(0.0, ts - prev_end)
        prev_end = ts + dur
    print(f"{'runs':>6}  {'mean ms':>9}  {'total ms':>9}  {'gap before, mean ms':>19}  program")
    for name, (n, us, gap) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"{n:6d}  {us / n / 1e3:9.3f}  {us / 1e3:9.1f}  {gap / n / 1e3:19.3f}  {name[:90]}")


if __name__ == "__main__":
    raise SystemExit(main())
