"""Traffic-adaptive buckets, before and after: padding and throughput of `jaxinfer bench throughput` on a workload,
three fresh processes each: adaptive buckets off; on with an empty cache (it learns while it runs: the new programs
compile beside serving); on again (the learned sizes compiled at start-up from the first run's record).

    python benchmarks/adaptive_buckets.py --engine-config cpu-default --window 32 \\
        --workload "--num-prompts 64 --input-len-range 32,400 --seed 1234 --output-len 16" --json-out ab.json
    (on a GPU: --model llama-3.1-8b --load-format dummy --engine-config h100-llama-3.1-8b and the mixed workload)

Each process's JSON is `bench throughput --json-out`; the table comes last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from jaxinfer.config import engine_preset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="as --model of bench throughput (default: the default model)")
    ap.add_argument("--load-format", default=None)
    ap.add_argument("--engine-config", default="cpu-default")
    ap.add_argument("--window", type=int, default=64, help="adaptive_window: prompt-carrying steps per proposal")
    ap.add_argument("--max-buckets", type=int, default=8)
    ap.add_argument("--workload", required=True, help="bench throughput's workload flags, one string")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adaptive-"))
    base = engine_preset(a.engine_config)
    runs = {}
    for name, adaptive in (("off", False), ("learning", True), ("learned", True)):
        cfg = work / f"{name}.json"
        cfg.write_text(json.dumps({**base, "adaptive_buckets": adaptive, "adaptive_window": a.window,
                                   "adaptive_max_buckets": a.max_buckets}))
        cmd = [sys.executable, "-m", "jaxinfer", "bench", "throughput", "--quiet", "--engine-config", str(cfg),
               "--compilation-cache-dir", str(work / ("cc_off" if name == "off" else "cc_on")),
               "--json-out", str(work / f"{name}.out.json"), *shlex.split(a.workload)]
        cmd += ["--model", a.model] if a.model else []
        cmd += ["--load-format", a.load_format] if a.load_format else []
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{name}: bench failed\n{p.stderr[-3000:]}")
        runs[name] = json.loads((work / f"{name}.out.json").read_text())
    rows = {k: r["results"] for k, r in runs.items()}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"workload": a.workload, "engine_config": a.engine_config,
                                                "window": a.window, "runs": runs}, indent=1))
    print(f"workload: {a.workload}")
    print(f"{'run':10s} {'padding':>8s} {'out tok/s':>10s} {'vs off':>7s} {'added':>6s} {'compiles':>9s}")
    for k, r in rows.items():
        print(f"{k:10s} {r['padding_share'] * 100:7.1f}% {r['output_tokens_per_s']:10.1f} "
              f"{r['output_tokens_per_s'] / rows['off']['output_tokens_per_s']:7.3f} {r['adaptive_buckets_added']:6d} "
              f"{r['compiles_while_measured']:9d}")


if __name__ == "__main__":
    main()
