"""CPU quantized matmul kernel vs XLA's f32 dot, on SmolLM2-135M's decode shapes.

    python benchmarks/cpu_qmatmul.py [--tokens 1,4] [--reps 30] [--pools xla,none] [--kinds f32,f32k,q4,q8]

Kinds: f32 XLA's dot on float32 W [I, O]; f32k the kernel's f32matmul on the same W; q4 / q8 the kernel's qmatmul.

Per layer (D = 576): qkv 576 -> 960, o 576 -> 576, gate_up 576 -> 3072, down 1536 -> 576; 30 layers chained
inside one jit (each output feeds the next matmul, so nothing overlaps), 106M weights. Reports the median
ms per chain and the effective GB/s of weight bytes read (scales and mins included), then each matrix
alone. Weights are jit arguments, not constants. Timings are medians of --reps runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import cpu_qmatmul as cq  # noqa: E402

D, F, QKV, LAYERS = 576, 1536, 960, 30
SHAPES = {"qkv": (QKV, D), "o": (D, D), "gate_up": (2 * F, D), "down": (D, F)}  # name: (O, I)
GROUP = 32


def make_weights(kind: str, rng) -> list[dict]:
    """Per layer, per matrix: f32 -> W [I, O] (the layout a model feeds jnp.dot); q4/q8 -> (q, scales, mins)."""
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, (O, I) in SHAPES.items():
            if kind == "f32":
                layer[name] = jnp.asarray(rng.standard_normal((I, O), np.float32) / np.sqrt(I))
                continue
            G = I // GROUP
            scales = jnp.asarray(rng.random((O, G), np.float32) / (8 * np.sqrt(I)))
            if kind == "q4":
                q = cq.pack_int4(rng.integers(0, 16, (O, I), dtype=np.uint8))
                mins = jnp.asarray(-8 * np.asarray(scales))
            else:
                q, mins = rng.integers(-128, 128, (O, I), dtype=np.int8), None
            layer[name] = (jnp.asarray(q), scales, mins)
        layers.append(layer)
    return layers


def weight_bytes(tree) -> int:
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(tree))


def matmul_fn(kind: str, pool: str):
    if kind == "f32":
        return lambda x, w: jnp.dot(x, w)
    if kind == "f32k":
        return lambda x, w: cq.f32matmul(x, w, pool=pool)
    bits = 4 if kind == "q4" else 8
    return lambda x, w: cq.qmatmul(x, *w, bits=bits, group_size=GROUP, pool=pool)


def chain_fn(kind: str, pool: str):
    mm = matmul_fn(kind, pool)

    @jax.jit
    def chain(x, layers):  # x [T, D]
        for w in layers:
            h = jnp.tanh(mm(x, w["qkv"])[:, :D])  # [T, D]
            h = mm(h, w["o"])  # [T, D]
            gu = mm(h, w["gate_up"])  # [T, 2F]
            x = jnp.tanh(mm(jax.nn.silu(gu[:, :F]) * gu[:, F:], w["down"]))  # [T, D]
        return x

    return chain


def median_ms(fns: dict, args: dict, reps: int) -> dict:
    """Median ms per call of each fn, timed in interleaved rounds so load from other processes on this
    machine hits every variant alike."""
    for k, fn in fns.items():
        jax.block_until_ready(fn(*args[k]))  # compile + warm up
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[k]))
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def single_fn(kind: str, pool: str):
    """One matrix shape, LAYERS distinct matrices chained (so weights come from memory, not cache, and jit
    dispatch is amortized); the output is cut or tiled to the next input's width."""
    mm = matmul_fn(kind, pool)

    @jax.jit
    def chain(x, ws):  # x [T, I]
        I = x.shape[1]
        for w in ws:
            y = mm(x, w)  # [T, O]
            x = jnp.tanh(jnp.tile(y, (1, -(-I // y.shape[1])))[:, :I])
        return x

    return chain


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--pools", default="xla", help="kernel threading to compare: xla,none")
    ap.add_argument("--kinds", default="f32,q4,q8", help="f32 (XLA, always run: the baseline), f32k, q4, q8")
    ap.add_argument("--no-single", action="store_true", help="skip the per-matrix table")
    ap.add_argument("--single-tokens", default="1", help="token counts of the per-matrix table")
    args = ap.parse_args()
    if not cq.available():
        sys.exit(cq.build_error)
    rng = np.random.default_rng(0)
    kinds = [k for k in args.kinds.split(",") if k != "f32"]
    weights = {k: make_weights(k, rng) for k in ["f32"] + [k for k in kinds if k != "f32k"]}
    if "f32k" in kinds:
        weights["f32k"] = weights["f32"]
    runs = [("f32", "-")] + [(k, p) for k in kinds for p in args.pools.split(",")]
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus, {LAYERS} layers, g={GROUP}, "
          f"q4 with mins, q8 without; median of {args.reps}")
    print(f"{'T':>3} {'weights':>7} {'pool':>5} {'ms/chain':>9} {'GB/s':>6} {'MB':>6} {'vs f32':>7}")
    for T in [int(t) for t in args.tokens.split(",")]:
        x = jnp.asarray(rng.standard_normal((T, D), np.float32))
        ms = median_ms({r: chain_fn(*r) for r in runs}, {r: (x, weights[r[0]]) for r in runs}, args.reps)
        for kind, pool in runs:
            nb = weight_bytes(weights[kind])
            m = ms[kind, pool]
            print(f"{T:>3} {kind:>7} {pool:>5} {m:9.2f} {nb / m / 1e6:6.1f} {nb / 1e6:6.1f} "
                  f"{ms['f32', '-'] / m:6.2f}x", flush=True)
    if args.no_single:
        return
    for T in [int(t) for t in args.single_tokens.split(",")]:
        print(f"\nsingle matrix shapes, T={T}: {LAYERS} distinct matrices chained; us per matrix (GB/s of weight bytes)")
        print(f"{'matrix':>16} " + " ".join(f"{k + '/' + p:>17}" for k, p in runs))
        for name, (O, I) in SHAPES.items():
            x = jnp.asarray(rng.standard_normal((T, I), np.float32))
            ws = {k: [layer[name] for layer in weights[k]] for k in weights}
            ms = median_ms({r: single_fn(*r) for r in runs}, {r: (x, ws[r[0]]) for r in runs}, args.reps)
            cells = []
            for kind, pool in runs:
                us = 1e3 * ms[kind, pool] / LAYERS
                cells.append(f"{us:7.1f} us ({weight_bytes(ws[kind]) / LAYERS / us / 1e3:4.1f})")
            print(f"{name + ' ' + str(O) + 'x' + str(I):>16} " + " ".join(f"{c:>17}" for c in cells), flush=True)

if __name__ == "__main__":
    main()
