"""Quantized weight GEMMs of a Llama-3.1-8B step on the GPU: the Pallas kernel (pallas_kernels/quant_matmul_gpu)
against XLA's forms of the same product and against the bf16 dot, each against its byte floor.

    python benchmarks/quant_gemm_gpu.py                        # check, sweep tiles at M = 1, then every shape
    python benchmarks/quant_gemm_gpu.py --no-sweep --ms 1,16,64,256,2048 --json-out quant_gemm.json
    python benchmarks/quant_gemm_gpu.py --smoke                # CPU: tiny shapes through the interpreter

Schemes are the engine's on-the-fly ones: int4 (4-bit with zero points, groups of 128, float32 scales), int8
(per channel, float32 scales), fp8 (per channel, W8A8: activations quantized per token). Each case multiplies one
activation by L distinct weights in one program (>= ~400 MB, so they come from HBM, not the 50 MB L2, as the
layers of a step do) and reports microseconds per GEMM and the weight bytes' bandwidth against 2.94 TB/s.
"xla" is what `jaxinfer.quant` ran before the kernel: scales after a dot of the integer values (int4, int8) and
cuBLASLt's fp8 GEMM (fp8).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BW = 2.94e12
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]


def make_weight(key, scheme, N, K):
    """Random quantized weight [N, K] of `scheme` in the engine's device form (a jaxinfer.quant.QuantizedWeight)."""
    import jax
    import jax.numpy as jnp

    from jaxinfer import quant

    k1, k2, k3 = jax.random.split(key, 3)
    if scheme == "int4":
        q = jax.random.randint(k1, (N, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        s = jax.random.uniform(k2, (N, K // 128), jnp.float32, 1e-3, 2e-3)
        z = jax.random.randint(k3, (N, K // 128), 0, 16).astype(jnp.float32)
        return quant.QuantizedWeight(q, s, zeros=z, bits=4, group_size=128, in_shape=(K,), scheme="int4-g128")
    s = jax.random.uniform(k2, (N, 1), jnp.float32, 1e-3, 2e-3)
    if scheme == "int8":
        q = jax.random.randint(k1, (N, K), -127, 128, jnp.int32).astype(jnp.int8)
        return quant.QuantizedWeight(q, s, bits=8, in_shape=(K,), scheme="int8")
    q = jnp.clip(jax.random.normal(k1, (N, K), jnp.float32) * 100, -quant.FP8_MAX, quant.FP8_MAX).astype(quant.FP8)
    return quant.QuantizedWeight(q, s, bits=8, in_shape=(K,), act="fp8", scheme="fp8")


def kernel_fn(interpret=False, **cfg):
    """x [M, K], w -> [M, N] through the Pallas kernel, as `quant.qmatmul` calls it (W8A8: x quantized first)."""
    import jax.numpy as jnp

    from jaxinfer import quant
    from pallas_kernels.quant_matmul_gpu import quant_matmul

    def f(x, w):
        xs = None
        if w.act is not None:
            x, xs = quant.quantize_activations_rows(x, w.act)
        return quant_matmul(x, w.q, w.scales, w.zeros, w.mins, xs, bits=w.bits, group=w.group, interpret=interpret,
                            out_dtype=jnp.bfloat16, **cfg)
    return f


def xla_fn(x, w):
    import jax.numpy as jnp

    from jaxinfer import quant

    if w.act == "fp8":
        return quant.fp8_dot(x, w).astype(jnp.bfloat16)
    return quant.scaled_after_dot(x, w).astype(jnp.bfloat16)


def deq_fn(x, w):
    import jax.numpy as jnp

    from jaxinfer import quant

    return quant.dequantized_dot(x, w).astype(jnp.bfloat16)


def time_chain(fn, x, ws, reps):
    """Seconds per GEMM of fn(x, w) over the L weights ws, in one jitted program."""
    import jax

    f = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    jax.block_until_ready(f(x, ws))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(x, ws)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps / len(ws))
    return best, out[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,4,16,64,256,512,2048")
    p.add_argument("--schemes", default="int4,int8,fp8")
    p.add_argument("--shapes", default=None, help="comma-separated names from: " + ",".join(s[0] for s in SHAPES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-sweep", action="store_true", help="skip the tile sweep at M = 1")
    p.add_argument("--sweep-shapes", default="o,gate_up,down")
    p.add_argument("--sweep-ms", default="1")
    p.add_argument("--sweep-schemes", default="int4,int8")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer import quant

    interpret = args.smoke
    shapes = SHAPES if not args.shapes else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    schemes = args.schemes.split(",")
    if args.smoke:
        shapes, ms, args.reps, args.sweep_shapes = [("tiny", 256, 128)], [1, 16], 1, "tiny"
    print(f"jax {jax.__version__}, {jax.devices()[0]}", flush=True)
    rows, key = [], jax.random.PRNGKey(0)

    # 1. the kernel against the reference (dequantize, float32 matmul) on this device
    for scheme in schemes:
        N, K = (128, 256) if args.smoke else (4096, 4096)
        w = make_weight(key, scheme, N, K)
        for M in (1, 64):
            x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.bfloat16)
            got = np.asarray(jax.jit(kernel_fn(interpret))(x, w), np.float32)
            xr = x if w.act is None else quant.quantize_activations(x, w.act)
            want = np.asarray(jnp.dot(xr.astype(jnp.float32), quant.dequantize(w).T,
                                      precision=jax.lax.Precision.HIGHEST))
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            print(f"check {scheme:5s} M={M:3d}: max error / max |y| = {err:.2e}", flush=True)
            rows.append(dict(kind="check", scheme=scheme, M=M, rel_err=err))

    # 2. tiles at M = 1 (the batch-1 decode GEMV)
    if not args.no_sweep:
        grid = dict(block_n=[64, 128], block_k=[256, 512], num_stages=[4], num_warps=[4],
                    weights_first=[False, True], bytes_via_f32=[False, True])
        for scheme, (name, K, N), M in itertools.product(
                args.sweep_schemes.split(","), [s for s in shapes if s[0] in args.sweep_shapes.split(",")],
                [int(m) for m in args.sweep_ms.split(",")]):
            w0 = make_weight(key, scheme, N, K)
            L = max(2, min(16, int(4e8 // w0.nbytes)))
            ws = [make_weight(jax.random.fold_in(key, i), scheme, N, K) for i in range(L)]
            x = jax.random.normal(jax.random.PRNGKey(1), (M, K), jnp.bfloat16)
            for vals in itertools.product(*grid.values()):
                cfg = dict(zip(grid, vals))
                if K % cfg["block_k"] or (scheme == "int4" and cfg["block_k"] < 128) or \
                        (cfg["bytes_via_f32"] and scheme != "int8"):  # only integer bytes take that path
                    continue
                try:
                    dt, _ = time_chain(kernel_fn(interpret, **cfg), x, ws, args.reps)
                except Exception as e:  # a tile that does not fit must not stop the rest
                    print(f"sweep {scheme} {name} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                tb = w0.nbytes / dt / 1e12
                rows.append(dict(kind="sweep", scheme=scheme, shape=name, M=M, us=dt * 1e6, tb_s=tb, **cfg))
                print(f"sweep {scheme:5s} {name:8s} M={M} {cfg} {dt * 1e6:8.1f} us {tb:5.2f} TB/s ({tb * 1e12 / PEAK_BW:4.0%})",
                      flush=True)

    # 3. every shape and M: bf16 dot, XLA's quantized form, the kernel (default tiles)
    table = []
    for name, K, N in shapes:
        wb = [jax.random.normal(jax.random.fold_in(key, i), (K, N), jnp.bfloat16) for i in range(max(2, min(16, int(4e8 // (2 * K * N)))))]
        for M in ms:
            x = jax.random.normal(jax.random.PRNGKey(M), (M, K), jnp.bfloat16)
            t_bf16, _ = time_chain(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16), x, wb, args.reps)
            line = dict(shape=name, M=M, bf16_us=t_bf16 * 1e6)
            for scheme in schemes:
                w0 = make_weight(key, scheme, N, K)
                ws = [make_weight(jax.random.fold_in(key, i), scheme, N, K) for i in range(max(2, min(16, int(4e8 // w0.nbytes))))]
                impls = [("xla", xla_fn), ("kernel", kernel_fn(interpret))]
                if scheme == "int8":
                    impls.append(("kernel_f32", kernel_fn(interpret, bytes_via_f32=True)))
                if M >= 16 and w0.act is None:
                    impls.append(("deq", deq_fn))
                for impl, fn in impls:
                    try:
                        dt, _ = time_chain(fn, x, ws, args.reps)
                    except Exception as e:
                        print(f"{scheme} {impl} {name} M={M}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    line[f"{scheme}_{impl}_us"] = dt * 1e6
                    rows.append(dict(kind="gemm", scheme=scheme, impl=impl, shape=name, M=M, us=dt * 1e6,
                                     tb_s=w0.nbytes / dt / 1e12, bf16_us=t_bf16 * 1e6))
                del ws
            table.append(line)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()), flush=True)
        del wb
    cols = ["bf16"] + [f"{s}_{i}" for s in schemes for i in ("xla", "kernel", "kernel_f32", "deq")
                       if (s != "fp8" or i != "deq") and (s == "int8" or i != "kernel_f32")]
    print("\nmicroseconds per GEMM (weights from HBM)")
    print(f"{'shape':8s} {'M':>5s} " + " ".join(f"{c:>12s}" for c in cols))
    for line in table:
        print(f"{line['shape']:8s} {line['M']:5d} " + " ".join(f"{line.get(c + '_us', float('nan')):12.1f}" for c in cols))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
