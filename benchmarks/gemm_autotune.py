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
`search-forward` compiles only the forward programs of the token buckets, each under the exhaustive search
(passed per compile: the sampler programs, minutes each under it, are left out), into an empty cache directory.
--quantization searches a weight scheme's programs (fp8's large-M GEMMs: 404 s of autotuning on a fresh H100
without results at hand); `bundle --merge-into` then adds them to the preset's bundle.
`bundle` packs the folder (tagged with this jaxlib and GPU) into one JSON file that `jaxinfer.autotune.seed`
copies into a fresh cache at start-up (`--merge-into` adds them to an existing bundle, replacing its results for
the same fusions). See jaxinfer/autotune.py.
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
                    load_format="dummy", warm_up=False, kv_cache_memory="4GiB", quantization=args.quantization,
                    compilation_cache_dir=args.cache_dir, show_progress=False)
        t0 = time.monotonic()
        Engine(args.model, **opts)
        folder = autotune.cache_folder(args.cache_dir)
        n = sum(1 for p in folder.rglob("*.pb")) if folder and folder.is_dir() else 0
        print(f"T={t} B={b}: {time.monotonic() - t0:.1f} s, {n} results in the cache", flush=True)


def search_forward(args) -> None:
    """The forward programs of the token buckets only, each compiled under the exhaustive search (passed per
    compile, so the sampler programs, minutes each under it, are not compiled at all). Nothing is seeded: the
    cache directory should start empty, or XLA reuses what it holds instead of searching."""
    import jax

    from jaxinfer import compile_guard
    from jaxinfer.config import EngineConfig
    from jaxinfer.loader import load_model, resolve_dtype
    from jaxinfer.model import init_kv_cache
    from jaxinfer.runner import ModelRunner

    compile_guard.enable_persistent_cache(args.cache_dir)
    preset = engine_preset(args.engine_config) if args.engine_config else {}
    max_seqs = preset.get("max_num_seqs", 512)
    loaded = None
    for t in args.token_buckets:
        b = min(t, max_seqs)
        ecfg = EngineConfig.from_options(**dict(preset, token_buckets=(t,), seq_buckets=(b,), max_num_seqs=b,
                                                max_num_batched_tokens=t, load_format="dummy", show_progress=False,
                                                quantization=args.quantization, compilation_cache_dir=args.cache_dir))
        dtype = resolve_dtype(ecfg.dtype, jax.default_backend())
        loaded = loaded or load_model(args.model, ecfg, dtype)
        max_len = min(ecfg.max_model_len or loaded.cfg.max_position_embeddings, loaded.cfg.max_position_embeddings)
        pages = -(-max_len // ecfg.page_size) + 1  # GEMM fusions do not depend on the cache's size
        kv = init_kv_cache(loaded.cfg, pages, ecfg.page_size, dtype, abstract=True)
        runner = ModelRunner(loaded.cfg, ecfg, loaded.params, kv, pages, max_len)
        for key, lower in runner._programs().items():
            if isinstance(key, tuple) and len(key) == 3:  # (T, B, decode): a forward program
                t0 = time.monotonic()
                lower().compile({"xla_gpu_exhaustive_tiling_search": True})
                folder = autotune.cache_folder(args.cache_dir)
                n = sum(1 for _ in folder.rglob("*.pb")) if folder and folder.is_dir() else 0
                print(f"forward {key}: {time.monotonic() - t0:.1f} s, {n} results in the cache", flush=True)


def bundle(args) -> None:
    b = autotune.bundle(args.cache_dir, note=args.note)
    if args.merge_into:  # an existing bundle of the same jaxlib and GPU, its results updated by these
        with open(args.merge_into) as f:
            old = json.load(f)
        if (old["jaxlib"], old["device_kind"]) != (b["jaxlib"], b["device_kind"]):
            sys.exit(f"--merge-into: {args.merge_into} is for jaxlib {old['jaxlib']} on {old['device_kind']}, "
                     f"these results for jaxlib {b['jaxlib']} on {b['device_kind']}")
        b = dict(old, results={**old["results"], **b["results"]},
                 note=(old.get("note", "") + " " + b["note"]).strip())
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
    s.add_argument("--quantization", default=None, help="a weight scheme (fp8, int8, int4): its GEMMs' results")
    s.set_defaults(func=search)
    f = sub.add_parser("search-forward", help="the forward programs only, under the exhaustive search")
    f.add_argument("--model", required=True, help="a model preset or checkpoint (weights are dummy)")
    f.add_argument("--engine-config", help="engine preset whose options (dtype, page size, ...) to compile with")
    f.add_argument("--token-buckets", required=True, type=lambda v: [int(x) for x in v.split(",")])
    f.add_argument("--cache-dir", required=True, help="an empty compilation cache directory")
    f.add_argument("--quantization", default=None, help="a weight scheme (fp8, int8, int4): its GEMMs' results")
    f.set_defaults(func=search_forward)
    b = sub.add_parser("bundle", help="pack the cache's autotune results into one JSON file")
    b.add_argument("--cache-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--note", default="", help="what the bundle covers and how it was made")
    b.add_argument("--merge-into", help="an existing bundle: its results, updated by these, go to --out")
    b.set_defaults(func=bundle)
    args = p.parse_args()
    if getattr(args, "exhaustive", False):  # read when jax starts its GPU backend, which nothing has done yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_exhaustive_tiling_search=true").strip()
    args.func(args)


if __name__ == "__main__":
    main()
