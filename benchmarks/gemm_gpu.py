"""The weight GEMMs of a Llama-3.1-8B step, alone: x [M, K] @ w [K, N] in bf16 for the batch sizes we bucket to.

    python benchmarks/gemm_gpu.py                      # XLA's dot, whatever backend XLA picks
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python benchmarks/gemm_gpu.py --tag cublas
    python benchmarks/gemm_gpu.py --smoke              # CPU: tiny shapes

Each case multiplies one activation by L distinct weight matrices in one program (so the weights come from
HBM, not L2, like the layers of a step) and reports the achieved bandwidth of the weight bytes (the floor at
small M) and TFLOP/s (the ceiling at large M) against the measured 2.94 TB/s and 787 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BW, PEAK_FLOPS = 2.94e12, 787e12
# (name, K, N) of Llama-3.1-8B's weights: fused qkv, o, gate (or up), gate and up fused, down, lm_head.
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate", 4096, 14336), ("gate_up", 4096, 28672), ("down", 14336, 4096), ("lm_head", 4096, 128256)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,16,64,128,256,512,2048")
    p.add_argument("--shapes", default=None, help="comma-separated names from: " + ",".join(s[0] for s in SHAPES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--layouts", default="kn", help="comma-separated weight layouts: kn (w [K, N], x @ w: the model's) "
                   "and / or nk (w [N, K], x @ w.T: the checkpoints' [out, in])")
    p.add_argument("--tag", default=os.environ.get("XLA_FLAGS", "default"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json-out", default=None)
    p.add_argument("--mlp", action="store_true", help="time 8 MLP blocks (norm, gate/up, silu, down, residual) in "
                   "their variants instead of single GEMMs")
    p.add_argument("--mlp-blocks", type=int, default=8, help="how many MLP blocks (distinct weights) with --mlp")
    p.add_argument("--trace", metavar="DIR", help="also write a profiler trace of one call per case and summarise it")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = SHAPES if not args.shapes else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    if args.smoke:
        shapes, args.reps = [("tiny", 64, 128)], 2
    ms = [int(m) for m in args.ms.split(",")]
    mm = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16)
    print(f"jax {jax.__version__}, {jax.devices()[0]}, tag {args.tag}", flush=True)
    if args.mlp:
        return mlp_variants(args, ms)
    rows = []
    for (name, K, N), layout in [(s, lay) for s in shapes for lay in args.layouts.split(",")]:
        nbytes_w = K * N * 2
        L = max(2, min(16, int(4e8 // nbytes_w)))  # >= ~400 MB of weights per call: well past the 50 MB L2
        ws = [jax.random.normal(jax.random.PRNGKey(i), (K, N), jnp.bfloat16) * 0.02 for i in range(L)]
        if layout == "nk":  # stored transposed; the product is the same
            ws = [jnp.array(w.T) for w in ws]
        for M in ms:
            x = jax.random.normal(jax.random.PRNGKey(99), (M, K), jnp.bfloat16)
            if layout == "nk":
                f = jax.jit(lambda x, ws: [jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                               preferred_element_type=jnp.bfloat16) for w in ws])
            else:
                f = jax.jit(lambda x, ws: [mm(x, w) for w in ws])
            try:
                jax.block_until_ready(f(x, ws))
                t = time.perf_counter()
                for _ in range(args.reps):
                    o = f(x, ws)
                jax.block_until_ready(o)
                dt = (time.perf_counter() - t) / args.reps / L
                w0 = ws[0].T if layout == "nk" else ws[0]
                ref = np.asarray(jnp.dot(x[:4].astype(jnp.float32), w0.astype(jnp.float32)))
                err = float(np.max(np.abs(np.asarray(o[0][:4], np.float32) - ref)))
            except Exception as e:  # one failing case must not stop the rest
                print(f"{name} M={M}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            if args.trace:
                trace_once(f, (x, ws), os.path.join(args.trace, f"{name}_M{M}"), steps=L)
            tbs = (nbytes_w + 2 * M * (K + N)) / dt / 1e12
            tfs = 2 * M * K * N / dt / 1e12
            rows.append(dict(shape=name, layout=layout, K=K, N=N, M=M, us=dt * 1e6, tb_s=tbs, tflop_s=tfs, err=err))
            print(f"{args.tag[:40]:40s} {name:8s} {layout} M={M:5d} {dt * 1e6:9.1f} us  {tbs:5.2f} TB/s "
                  f"({tbs * 1e12 / PEAK_BW:4.0%})  {tfs:6.1f} TF/s ({tfs * 1e12 / PEAK_FLOPS:4.0%})  err {err:.1e}",
                  flush=True)
        ws = None
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), tag=args.tag, rows=rows), fh, indent=1)
    return 0


def trace_once(f, a, path, steps):
    import jax

    from benchmarks import trace_summary

    with jax.profiler.trace(path):
        jax.block_until_ready(f(*a))
    trace_summary.main([path, "--top", "6", "--steps", str(steps)])


def mlp_variants(args, ms) -> int:
    """8 Llama-3.1-8B MLP blocks, weights distinct per block, in the forms the model could take."""
    import jax
    import jax.numpy as jnp

    D, F, nl = 4096, 14336, args.mlp_blocks
    if args.smoke:
        D, F, nl = 64, 128, 2
    key = jax.random.PRNGKey(0)
    mk = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) * 0.02
    sep = [(mk(3 * i, (D, F)), mk(3 * i + 1, (D, F)), mk(3 * i + 2, (F, D))) for i in range(nl)]
    fused = [(jnp.concatenate([g, u], 1), d) for g, u, d in sep] if nl <= 8 else None
    norm_w = jnp.ones((D,), jnp.bfloat16)

    def norm(x):
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(x.dtype) * norm_w

    def separate(x, ws, barrier=False):
        for g, u, d in ws:
            h = norm(x)
            if barrier:
                h = jax.lax.optimization_barrier(h)
            x = x + jnp.dot(jax.nn.silu(jnp.dot(h, g)) * jnp.dot(h, u), d)
        return x

    def gate_up(x, ws):
        for gu, d in ws:
            a = jnp.dot(norm(x), gu)
            x = x + jnp.dot(jax.nn.silu(a[:, :F]) * a[:, F:], d)
        return x

    variants = {"separate": (separate, sep), "separate+barrier": (lambda x, w: separate(x, w, True), sep),
                "fused_gate_up": (gate_up, fused)}
    variants = {k: v for k, v in variants.items() if v[1] is not None}
    nbytes = nl * 3 * D * F * 2
    for M in ms:
        x = jax.random.normal(jax.random.PRNGKey(99), (M, D), jnp.bfloat16)
        ref = None
        for name, (fn, ws) in variants.items():
            f = jax.jit(fn)
            out = jax.block_until_ready(f(x, ws))
            ref = out if ref is None else ref
            t = time.perf_counter()
            for _ in range(args.reps):
                out = f(x, ws)
            jax.block_until_ready(out)
            dt = (time.perf_counter() - t) / args.reps / nl
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            print(f"{args.tag[:40]:40s} mlp {name:18s} M={M:5d} {dt * 1e6:9.1f} us/block  "
                  f"{nbytes / nl / dt / 1e12:5.2f} TB/s  err {err:.1e}", flush=True)
            if args.trace:
                trace_once(f, (x, ws), os.path.join(args.trace, f"mlp_{name}_M{M}"), steps=nl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
