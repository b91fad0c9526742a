"""int8 weights x bf16 activations on many-token steps, Hopper only: pallas_kernels/int8_matmul_hopper (jax's Mosaic
GPU mixed-type matmul: TMA loads, the int8 tile converted in registers and fed to wgmma as its left operand) against
the bf16 dot, XLA's int8 form and our Pallas (Triton) kernel.

    python benchmarks/mixed_matmul_gpu.py --ms 128,256,512,2048 --json-out mixed_mm.json

Each case multiplies one activation by L distinct
weights in one program (>= ~400 MB, so they come from HBM as a step's layers do); microseconds per GEMM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quant_gemm_gpu import SHAPES, kernel_fn, make_weight, time_chain, xla_fn  # noqa: E402


def mgpu_fn(cfg):
    import jax.numpy as jnp

    from pallas_kernels.int8_matmul_hopper import int8_matmul

    return lambda x, w: int8_matmul(x, w.q, w.scales, config=cfg).astype(jnp.bfloat16)


def configs(quick=False):
    if quick:  # the wrapper's default and a few neighbours
        from pallas_kernels.int8_matmul_hopper import CONFIG

        for change in ({}, dict(tile_n=128), dict(tile_k=64), dict(wg_dimension="M"), dict(tile_m=64, tile_n=128)):
            yield {**CONFIG, **change}
        return
    for tm, tn, tk, steps, wg in itertools.product((64, 128), (64, 128), (64, 128), (4, 2), ("N", "M")):
        yield dict(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=steps, wg_dimension=wg, grid_minor_dim="M",
                   grid_tile_width=8, epi_tile_m=64, epi_tile_n=64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="128,256,512,2048")
    p.add_argument("--shapes", default="qkv,o,gate_up,down")
    p.add_argument("--sweep-shapes", default="o,gate_up")
    p.add_argument("--sweep-m", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="sweep only the default tiles and a few neighbours")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer import quant

    print(f"jax {jax.__version__}, {jax.devices()[0]}", flush=True)
    key, rows = jax.random.PRNGKey(0), []
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]

    def weights(N, K):
        w0 = make_weight(key, "int8", N, K)
        return [make_weight(jax.random.fold_in(key, i), "int8", N, K) for i in range(max(2, min(16, int(4e8 // w0.nbytes))))]

    def check(fn, x, w):
        got = np.asarray(jax.jit(fn)(x, w), np.float32)
        want = np.asarray(jnp.dot(x.astype(jnp.float32), quant.dequantize(w).T, precision=jax.lax.Precision.HIGHEST))
        return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

    # 1. tiles at one M on a few shapes
    best = {}
    for name, K, N in [s for s in SHAPES if s[0] in args.sweep_shapes.split(",")]:
        ws, M = weights(N, K), args.sweep_m
        x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.bfloat16)
        for cfg in configs(args.quick):
            try:
                err = check(mgpu_fn(cfg), x, ws[0])
                dt, _ = time_chain(mgpu_fn(cfg), x, ws, args.reps)
            except Exception as e:  # a tile that does not fit must not stop the rest
                print(f"sweep {name} M={M} {cfg}: FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            rows.append(dict(kind="sweep", shape=name, M=M, us=dt * 1e6, rel_err=err, **{k: str(v) for k, v in cfg.items()}))
            print(f"sweep {name:8s} M={M} {cfg} {dt * 1e6:8.1f} us  err {err:.1e}", flush=True)
            if dt < best.get(name, (1e9, None))[0]:
                best[name] = (dt, cfg)
    picks = [c for _, c in best.values()]
    print("best:", {k: (round(v[0] * 1e6, 1), v[1]) for k, v in best.items()}, flush=True)

    # 2. every shape and M: bf16, XLA's int8, our kernel, the Mosaic kernel with each shape's best sweep tiles
    table = []
    for name, K, N in shapes:
        wb = [jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.bfloat16) for i in range(max(2, min(16, int(4e8 // (2 * K * N)))))]
        ws = weights(N, K)
        for M in [int(m) for m in args.ms.split(",")]:
            x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.bfloat16)
            line = dict(shape=name, M=M)
            line["bf16"], _ = time_chain(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16), x, wb, args.reps)
            line["xla"], _ = time_chain(xla_fn, x, ws, args.reps)
            line["pallas"], _ = time_chain(kernel_fn(), x, ws, args.reps)
            for i, cfg in enumerate(picks):
                try:
                    err = check(mgpu_fn(cfg), x, ws[0])
                    dt, _ = time_chain(mgpu_fn(cfg), x, ws, args.reps)
                except Exception as e:
                    print(f"{name} M={M} mgpu{i}: FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                line[f"mgpu{i}"] = dt
                line[f"mgpu{i}_err"] = err
            table.append(line)
            rows.append(dict(kind="gemm", **{k: v * 1e6 if k in ("bf16", "xla", "pallas") or (k.startswith("mgpu") and "err" not in k) else v for k, v in line.items()}))
            print(" ".join(f"{k}={v * 1e6:.1f}" if isinstance(v, float) and "err" not in k else f"{k}={v}" for k, v in line.items()), flush=True)
        del wb, ws
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), picks=[{k: str(v) for k, v in c.items()} for c in picks], rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
