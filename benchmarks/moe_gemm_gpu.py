"""The mixture-of-experts MLP's grouped matmuls against their own floor, per step size: `model.moe_mlp` (routing,
the expert sort, two `jax.lax.ragged_dot`s, the weighted scatter back) on one layer of a preset's shape, and a
gather form for few tokens (each token's k experts' weights gathered, then batched matmuls), and on a Hopper GPU the
same MLP with jax's Mosaic GPU ragged dot in place of `jax.lax.ragged_dot` (a few tile configs), at T tokens per step.

Floor of a step: the bytes of the experts the step's routing touches (weights read once) at the copy bandwidth,
or its flops (2 * T * k * 3 * D * Fe) at the matmul peak, whichever is longer (the H100's, as
benchmarks/workload_floor.py measured them; the share of the floor means something on an H100 only). Routing is uniform random, so T * k >= E touches every expert.

    python benchmarks/moe_gemm_gpu.py --preset qwen3-30b-a3b --tokens 1,8,64,512,2048,8192 --json-out moe.json
    python benchmarks/moe_gemm_gpu.py --preset qwen3-30b-a3b --tokens 1,16 --scale 0.05   (a CPU dry run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.workload_floor import COPY_BW, MATMUL_FLOPS  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer import model  # noqa: E402
from jaxinfer.model import LayerParams, gathered_experts, moe_mlp, param_specs, route  # noqa: E402
from pallas_kernels import grouped_matmul_hopper  # noqa: E402

# Tile configs of jax's Mosaic GPU ragged dot tried at each step size (over pallas_kernels.grouped_matmul_hopper's)
HOPPER_CONFIGS = {"m64n128": {}, "m128n128": dict(block_m=128), "m64n128s6": dict(max_concurrent_steps=6),
                  "m128n128g2": dict(block_m=128, grid_block_n=2), "m64n256": dict(block_n=256, max_concurrent_steps=3)}


def gather_moe(lp, cfg, h):
    """Each token's k experts' weights gathered ([T, k, ...]) and applied as batched matmuls (model.gathered_experts):
    reads k experts per token, so for T * k < E it reads less than the grouped form's E (no sort, no groups)."""
    w, e = route(h @ lp.router.astype(h.dtype), cfg.num_experts_per_tok, cfg.norm_topk_prob)
    return gathered_experts(lp, cfg, h, w, e)


def timed(fn, *args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,8,64,512,2048,8192")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink D and Fe by this factor (CPU dry runs)")
    ap.add_argument("--no-hopper", dest="hopper", action="store_false",
                    help="skip jax's Mosaic GPU ragged dot (pallas_kernels/grouped_matmul_hopper)")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    cfg = ModelConfig.from_preset(a.preset)
    if a.scale != 1.0:
        cfg = dataclasses.replace(cfg, hidden_size=max(64, int(cfg.hidden_size * a.scale) // 64 * 64),
                                  moe_intermediate_size=max(64, int(cfg.moe_intermediate_size * a.scale) // 64 * 64))
    dtype = jnp.dtype(a.dtype)
    spec = param_specs(dataclasses.replace(cfg, num_layers=1, dense_layers=())).layers[0]
    key = jax.random.key(0)
    lp = LayerParams(*[None] * 9, **{  # only the MLP's leaves: the rest of the layer is not run
        name: (0.02 * jax.random.normal(jax.random.fold_in(key, i), getattr(spec, name).shape)).astype(dtype)
        for i, name in enumerate(("router", "experts_gate_up", "experts_down"))})
    E, k, D, Fe = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    expert_bytes = 3 * D * Fe * dtype.itemsize
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    bw, peak = COPY_BW, MATMUL_FLOPS  # the H100's, measured through JAX (workload_floor.py)
    rows = []
    def with_kernel(min_rows, config):
        def fn(lp, h):
            saved = (model.HOPPER_GROUPED_MIN_ROWS, grouped_matmul_hopper.CONFIG)
            model.HOPPER_GROUPED_MIN_ROWS, grouped_matmul_hopper.CONFIG = min_rows, config
            try:
                return moe_mlp(lp, cfg, h)
            finally:
                model.HOPPER_GROUPED_MIN_ROWS, grouped_matmul_hopper.CONFIG = saved
        return jax.jit(fn)

    model.MOE_GATHER_MAX_PAIRS_PER_EXPERT = {}  # "grouped" is the sorted grouped matmul at every step size
    grouped = with_kernel(None, grouped_matmul_hopper.CONFIG)  # jax.lax.ragged_dot
    hopper = {name: with_kernel(1, {**grouped_matmul_hopper.CONFIG, **c}) for name, c in HOPPER_CONFIGS.items()}
    use_hopper = a.hopper and grouped_matmul_hopper.available()
    gathered = jax.jit(lambda lp, h: gather_moe(lp, cfg, h))
    for T in (int(t) for t in a.tokens.split(",")):
        h = (jax.random.normal(jax.random.fold_in(key, 100 + T), (T, D))).astype(dtype)
        _, experts = route(h @ lp.router, k, cfg.norm_topk_prob)
        touched = len(np.unique(np.asarray(experts)))
        floor_s = max(touched * expert_bytes / bw, 2 * T * k * 3 * D * Fe / peak)
        row = {"tokens": T, "experts_touched": touched, "grouped_us": timed(grouped, lp, h, reps=a.reps) * 1e6}
        if use_hopper:  # jax's Mosaic GPU ragged dot per tile config: its time and its largest difference
            ref = np.asarray(grouped(lp, h), np.float32)
            for name, fn in hopper.items():
                try:
                    err = float(np.max(np.abs(np.asarray(fn(lp, h), np.float32) - ref)) / (np.max(np.abs(ref)) or 1))
                    row[f"hopper_{name}_us"], row[f"hopper_{name}_err"] = timed(fn, lp, h, reps=a.reps) * 1e6, err
                except Exception as e:  # noqa: BLE001 - a config the kernel refuses (shared memory): recorded
                    row[f"hopper_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if T * k <= 4 * E:  # the gather form materialises T * k experts' weights: only for small steps
            row["gather_us"] = timed(gathered, lp, h, reps=a.reps) * 1e6
        row["h100_floor_us"] = floor_s * 1e6
        row["grouped_share_of_floor"] = floor_s * 1e6 / row["grouped_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"preset": a.preset, "config": dataclasses.asdict(cfg), "dtype": a.dtype,
                                                "backend": backend, "device": device, "rows": rows}, indent=1,
                                               default=str))


if __name__ == "__main__":
    main()
