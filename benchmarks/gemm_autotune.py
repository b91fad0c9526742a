"""Run XLA's autotuner over an engine preset's step programs and pack its results for configs/autotune/.

    # one process per GPU, each over some token buckets, all into one cache directory:
    CUDA_VISIBLE_DEVICES=0 python benchmarks/gemm_autotune.py search --model llama-3.1-8b \\
        --engine-config h100-llama-3.1-8b --token-buckets 1,32 --cache-dir /tmp/tune &
    ...; wait
    python benchmarks/gemm_autotune.py bundle --cache-dir /tmp/tune --out configs/autotune/h100-llama-3.1-8b.json

`search` builds the engine once per token bucket T (dummy weights, the preset's other options) with only the
(T, B) programs, B = min(T, max_num_seqs); with --exhaustive, under XLA's exhaustive tiling search
(`--xla_gpu_exhaustive_tiling_search`, minutes per program). XLA writes each fusion's choice into the cache's
autotune folder as it goes, so a search cut short keeps what it finished. The GEMM fusions of a program
depend on T (and the lm_head's on B) only, so these cover every program of that T. Leave the GPU idle
otherwise: the choices are timings.
`bundle` packs the folder (tagged with this jaxlib and GPU) into one JSON file that `jaxinfer.autotune.seed`
copies into a fresh cache at start-up. See jaxinfer/autotune.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxinfer import autotune  # noqa: E402
from jaxinfer.config import engine_preset  # noqa: E402


def search(args) -> None:
    from jaxinfer.engine import Engine

    preset = engine_preset(args.engine_config) if args.engine_config else {}
    max_seqs = preset.get("max_num_seqs", 512)
    for t in args.token_buckets:
        b = min(t, max_seqs)
        opts = dict(preset, token_buckets=(t,), seq_buckets=(b,), max_num_seqs=b, max_num_batched_tokens=t,
                    load_format="dummy", warm_up=False, kv_cache_memory="4GiB",
                    compilation_cache_dir=args.cache_dir, show_progress=False)
        t0 = time.monotonic()
        Engine(args.model, **opts)
        folder = autotune.cache_folder(args.cache_dir)
        n = sum(1 for p in folder.rglob("*.pb")) if folder and folder.is_dir() else 0
        print(f"T={t} B={b}: {time.monotonic() - t0:.1f} s, {n} results in the cache", flush=True)


def bundle(args) -> None:
    b = autotune.bundle(args.cache_dir, note=args.note)
    with open(args.out, "w") as f:
        json.dump(b, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"{len(b['results'])} results ({b['device_kind']}, jaxlib {b['jaxlib']}) -> {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="compile the programs of some token buckets, XLA's autotuner on")
    s.add_argument("--model", required=True, help="a model preset or checkpoint (weights are dummy)")
    s.add_argument("--engine-config", help="engine preset whose options (dtype, page size, ...) to compile with")
    s.add_argument("--token-buckets", required=True, type=lambda v: [int(x) for x in v.split(",")])
    s.add_argument("--cache-dir", required=True, help="compilation cache directory (shared by parallel searches)")
    s.add_argument("--exhaustive", action="store_true", help="XLA's exhaustive GEMM tiling search")
    s.set_defaults(func=search)
    b = sub.add_parser("bundle", help="pack the cache's autotune results into one JSON file")
    b.add_argument("--cache-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--note", default="", help="what the bundle covers and how it was made")
    b.set_defaults(func=bundle)
    args = p.parse_args()
    if getattr(args, "exhaustive", False):  # read when jax starts its GPU backend, which nothing has done yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_exhaustive_tiling_search=true").strip()
    args.func(args)


if __name__ == "__main__":
    main()
