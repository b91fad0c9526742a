"""Ragged paged attention on one GPU: our Triton-lowered Pallas kernels against the XLA forms and jax's own.

    python benchmarks/attention_gpu.py            # the H100 run: decode grid, prefill / mixed chunks
    python benchmarks/attention_gpu.py --sweep    # also try kernel knobs around the defaults
    python benchmarks/attention_gpu.py --smoke    # CPU, tiny shapes, interpret mode: checks the script

Decode: 1 query token per sequence, GQA 32 q / 8 kv heads, head dim 128, bf16, page 16, batch x context in
{1, 16, 64, 256} x {512, 2048, 8192}. Prefill / mixed: chunks of 512 - 4096 tokens, and an 8192-token step of
the H100 mixed workload (its prompts of 128 - 1024 tokens; with decode rows; padded to the engine's bucket).
Implementations:
ours (decode_only kernel for decode, ragged kernel for everything), `ragged_paged_attention_xla` (the jnp
online-softmax form under XLA), the dense `ragged_paged_attention_reference` where its O(T * L) gather fits,
and for decode `jax.experimental.pallas.ops.gpu.paged_attention` (its own [K, P, S, H] cache layout, built
separately).

Timing: each implementation runs `--loop` times inside one jitted `fori_loop` (no per-call dispatch in the
number), median of `--reps` such loops after a warm-up, with `block_until_ready`; `host_us` is the median
of back-to-back Python calls, for comparison. Inputs rotate over several page-table sets spread over a
cache larger than the 50 MB L2, so small cases do not time the cache. GB/s counts the K/V bytes the op must
read (each live token once) plus q and out; TFLOP/s counts 4 * H * N * (visible kv per query token), with
causal visibility. Ratios are to 2.94 TB/s (measured copy bandwidth) and 787 TFLOP/s (bf16 matmul).
`--kernel-time` adds each variant's device time per call of its own kernels, summed from a profiler trace of
back-to-back calls (copies between host and device left out): what the op costs inside a larger program, without
the loop's own per-iteration work (its input-set slicing and loop control, 10-25 us per call on the H100s measured,
which dominates the smallest cases). Each variant's max |error| against the XLA form is reported; a failing
variant prints its error and the rest go on. JSON goes to $OUT/attention_gpu.json if OUT is set, else ./attention_gpu.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # trace_summary, beside this script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
)
from pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu  # noqa: E402

PEAK_BW = 2.94e12
PEAK_FLOPS = 787e12
L2_BYTES = 50e6


def make_case(key, q_lens, kv_lens, *, N, K, H, S, dtype, min_bytes, pad_to=None):
    """A ragged batch plus `n_sets` page tables / queries over one cache, so rotating sets leaves L2. pad_to: the
    per-sequence arrays padded to that many rows past num_seqs, as the engine's sequence buckets pad them."""
    B = len(q_lens)
    pages_per_seq = [-(-k // S) for k in kv_lens]
    M = max(pages_per_seq)
    used = sum(pages_per_seq)
    kv_bytes = 2 * sum(kv_lens) * K * H * jnp.dtype(dtype).itemsize
    n_sets = int(max(1, min(16, -(-min_bytes // max(kv_bytes, 1)))))
    P = used * n_sets
    T = sum(q_lens)
    kk, kv, kq, kp = jax.random.split(key, 4)
    k_pages = jax.random.normal(kk, (P, K, S, H), jnp.float32).astype(dtype)
    v_pages = jax.random.normal(kv, (P, K, S, H), jnp.float32).astype(dtype)
    perm = np.asarray(jax.random.permutation(kp, P)).astype(np.int32)
    tables = np.zeros((n_sets, B, M), np.int32)
    at = 0
    for s in range(n_sets):
        for b, n in enumerate(pages_per_seq):
            tables[s, b, :n] = perm[at: at + n]
            at += n
    qs = jax.random.normal(kq, (n_sets, T, N, H), jnp.float32).astype(dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_arr = np.asarray(kv_lens, np.int32)
    if pad_to and pad_to > B:
        tables = np.pad(tables, ((0, 0), (0, pad_to - B), (0, 0)))
        kv_arr = np.pad(kv_arr, (0, pad_to - B))
        cu = np.pad(cu, (0, pad_to - B), constant_values=T)
    return dict(q=qs, k=k_pages, v=v_pages, tables=jnp.asarray(tables), kv_lens=jnp.asarray(kv_arr),
                cu=jnp.asarray(cu), num_seqs=jnp.asarray(B, jnp.int32), n_sets=n_sets, T=T, B=B, M=M,
                q_lens=list(q_lens), kv_lens_list=list(kv_lens), N=N, K=K, H=H, S=S, dtype=dtype)


def mixed_workload_step(tokens, decodes, context=0):
    """(q_lens, kv_lens) of one step of the H100 mixed workload: whole prompts of `default_rng(1234).integers(128,
    1025)` tokens in order (the last one cut to fit) filling `tokens` with `decodes` one-token rows of `context`."""
    from jaxinfer.bench_offline import draw_lengths  # the workload's own prompt lengths

    lens = draw_lengths(256, input_len=128, output_len=128, input_len_range=(128, 1025), seed=1234)[0]
    q, left = [], tokens - decodes
    for n in lens:
        if left <= 0:
            break
        q.append(int(min(n, left)))
        left -= q[-1]
    return q + [1] * decodes, q + [context] * decodes


def cost(case):
    """(bytes the op must move, flops) with causal visibility."""
    it = jnp.dtype(case["dtype"]).itemsize
    N, K, H = case["N"], case["K"], case["H"]
    kv_bytes = 2 * sum(case["kv_lens_list"]) * K * H * it
    qo_bytes = 2 * case["T"] * N * H * it
    visible = sum(sum(range(kl - ql + 1, kl + 1)) for ql, kl in zip(case["q_lens"], case["kv_lens_list"]))
    return kv_bytes + qo_bytes, 4 * H * N * visible


def ragged_fn(impl, sm_scale, **kw):
    """fn(q, k, v, tables) for one of our / the jnp implementations (other inputs closed over)."""
    def fn(case, q, k, v, tables):
        return impl(q, k, v, tables, case["kv_lens"], case["cu"], case["num_seqs"], sm_scale=sm_scale, **kw)
    return fn


def jax_paged_fn(case, sm_scale, interpret, **kw):
    """jax's decode kernel: q [B, N, H], pages [K, P, S, H], block_tables [B, M], lengths [B].

    It applies no softmax scale, so its queries come pre-scaled (its own inputs, like its cache layout).
    """
    from jax.experimental.pallas.ops.gpu import paged_attention as pa

    M = case["M"]
    k_splits = kw.pop("k_splits", 16)
    while M % k_splits:
        k_splits //= 2
    ppcb = kw.pop("pages_per_compute_block", 8)
    while (M // k_splits) % min(ppcb, M // k_splits):
        ppcb //= 2
    def fn(case, q, k, v, tables):  # q, k, v arrive as its own inputs (the `own` of its variant)
        return pa.paged_attention(q, k, v, tables, case["kv_lens"], k_splits=k_splits,
                                  pages_per_compute_block=ppcb, interpret=interpret, **kw)
    own = ((case["q"].astype(jnp.float32) * sm_scale).astype(case["q"].dtype),
           jnp.swapaxes(case["k"], 0, 1), jnp.swapaxes(case["v"], 0, 1))
    return fn, own


def kernel_seconds(one, args, calls):
    """Device seconds per call of the kernels `one` launches, from a profiler trace of `calls` back-to-back calls."""
    import tempfile

    from trace_summary import kernel_us

    jax.block_until_ready(one(*args(0)))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for i in range(calls):
                o = one(*args(i))
            jax.block_until_ready(o)
        return kernel_us(d) / calls / 1e6


def time_fn(fn, case, reps, loop, own=None, kernel_time=False):
    """(device-loop seconds per call, host seconds per call, first output, kernel seconds per call or None)."""
    n = case["n_sets"]
    qs, k, v = own or (case["q"], case["k"], case["v"])
    sets = [(qs[i], k, v, case["tables"][i]) for i in range(n)]  # sliced once, outside the timing
    args = lambda i: sets[i % n]  # noqa: E731
    one = jax.jit(functools.partial(fn, case))
    out = jax.block_until_ready(one(*args(0)))

    @jax.jit
    def many(qs, k, v, tables):
        def body(i, o):
            j = i % n
            return fn(case, qs[j], k, v, tables[j]).astype(o.dtype)
        return jax.lax.fori_loop(0, loop, body, jnp.zeros_like(out))

    jax.block_until_ready(many(qs, k, v, case["tables"]))
    dev = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(many(qs, k, v, case["tables"]))
        dev.append((time.perf_counter() - t0) / loop)
    host = []
    for r in range(reps):
        t0 = time.perf_counter()
        for i in range(loop):
            o = one(*args(r * loop + i))
        jax.block_until_ready(o)
        host.append((time.perf_counter() - t0) / loop)
    kernel = kernel_seconds(one, args, loop) if kernel_time else None
    return statistics.median(dev), statistics.median(host), out, kernel


def run_case(kind, name, case, variants, args, results):
    nbytes, flops = cost(case)
    base = None
    for impl, fn, knobs, *own in variants:
        rec = dict(kind=kind, case=name, impl=impl, knobs=knobs, B=case["B"], T=case["T"],
                   max_kv=max(case["kv_lens_list"]), bytes=nbytes, flops=flops)
        try:
            t_dev, t_host, out, t_kernel = time_fn(fn, case, args.reps, args.loop, *own, kernel_time=args.kernel_time)
            out = np.asarray(out, np.float32)
            if impl == "xla":
                base = out
            err = float(np.max(np.abs(out - base))) if base is not None and out.shape == base.shape else None
            rec.update(time_us=t_dev * 1e6, host_us=t_host * 1e6, gbps=nbytes / t_dev / 1e9,
                       tflops=flops / t_dev / 1e12, bw_frac=nbytes / t_dev / PEAK_BW,
                       flop_frac=flops / t_dev / PEAK_FLOPS, max_err_vs_xla=err)
            kernel = ""
            if t_kernel:
                rec.update(kernel_us=t_kernel * 1e6, kernel_bw_frac=nbytes / t_kernel / PEAK_BW,
                           kernel_flop_frac=flops / t_kernel / PEAK_FLOPS)
                kernel = (f"  kernels {t_kernel * 1e6:8.1f} us {rec['kernel_bw_frac']:5.0%} of bw "
                          f"{rec['kernel_flop_frac']:5.0%} of flops")
            print(f"{kind:7s} {name:24s} {impl:14s} {t_dev * 1e6:10.1f} us  (host {t_host * 1e6:8.1f})  "
                  f"{rec['gbps']:7.0f} GB/s {rec['bw_frac']:5.0%}  {rec['tflops']:6.1f} TF/s "
                  f"{rec['flop_frac']:5.0%}  err {err}{kernel}", flush=True)
        except Exception as e:  # one failing variant must not stop the rest
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"{kind:7s} {name:24s} {impl:14s} FAILED: {rec['error'][:400]}", flush=True)
            traceback.print_exc(limit=3)
        results.append(rec)


# --sweep: knob sets around the defaults (decode kernel / ragged kernel).
DECODE_SWEEP = (
    {"num_kv_splits": 1},
    {"num_kv_splits": 2},
    {"num_kv_splits": 4},
    {"num_kv_splits": 8},
    {"decode_block_kv": 64},
    {"decode_block_kv": 256},
    {"decode_num_warps": 8},
    {"decode_num_stages": 2},
    {"decode_num_stages": 4},
    {"decode_block_kv": 64, "num_kv_splits": 1},
    {"decode_block_kv": 64, "num_kv_splits": 2},
    {"decode_block_kv": 64, "decode_num_stages": 4, "num_kv_splits": 1},
    {"decode_block_kv": 64, "decode_num_stages": 2, "num_kv_splits": 1},
    {"decode_num_stages": 2, "num_kv_splits": 1},
    {"decode_block_kv": 64, "decode_num_stages": 2},
    {"decode_block_kv": 32},
    {"decode_block_kv": 32, "decode_num_stages": 4},
    {"decode_block_kv": 64, "decode_num_warps": 2},
    {"decode_block_kv": 32, "decode_num_warps": 2},
)
PREFILL_SWEEP = (
    {"block_m": 64},
    {"block_m": 64, "block_kv": 128},
    {"block_kv": 32},
    {"block_kv": 128},
    {"num_warps": 8},
    {"block_kv": 128, "num_warps": 8},
    {"num_stages": 2},
    {"num_stages": 4},
    {"num_warps": 8, "num_stages": 2},
    {"num_warps": 8, "num_stages": 4},
    {"block_kv": 128, "num_warps": 8, "num_stages": 2},
    {"block_m": 256, "num_warps": 8},
    {"block_m": 64, "num_warps": 8},
)


def knob_variants(ours, sm_scale, knob_list, **fixed):
    """One variant of our kernel per dict of knobs, named ours_<knob>=<value>_..."""
    return [("ours_" + "_".join(f"{k}={x}" for k, x in knobs.items()), ragged_fn(ours, sm_scale, **fixed, **knobs), knobs)
            for knobs in knob_list]


def decode_variants(case, sm_scale, args):
    ours = functools.partial(ragged_paged_attention_gpu, interpret=args.interpret)
    v = []
    # The XLA form first: it is the error baseline for the rest.
    v.append(("xla", ragged_fn(ragged_paged_attention_xla, sm_scale), {}))
    v.append(("ours", ragged_fn(ours, sm_scale, decode_only=True), {"decode_only": True}))
    v.append(("ours_ragged", ragged_fn(ours, sm_scale), {}))
    v += knob_variants(ours, sm_scale, json.loads(args.knobs or "[]"), decode_only=True)
    if args.sweep:
        v += knob_variants(ours, sm_scale, DECODE_SWEEP, decode_only=True)
    try:
        fn, own = jax_paged_fn(case, sm_scale, args.interpret)
        v.append(("jax_paged", fn, {"k_splits": 16, "pages_per_compute_block": 8}, own))
    except Exception as e:
        print(f"jax paged_attention unavailable: {e}")
    if dense_fits(case):
        v.append(("dense_ref", ragged_fn(ragged_paged_attention_reference, sm_scale), {}))
    return v


def prefill_variants(case, sm_scale, args):
    ours = functools.partial(ragged_paged_attention_gpu, interpret=args.interpret)
    v = [("xla", ragged_fn(ragged_paged_attention_xla, sm_scale), {}),
         ("ours", ragged_fn(ours, sm_scale), {}),
         ("ours_split_decodes", ragged_fn(ours, sm_scale, split_decodes=True), {"split_decodes": True})]
    v += knob_variants(ours, sm_scale, json.loads(args.prefill_knobs or "[]"))
    if args.sweep:
        v += knob_variants(ours, sm_scale, PREFILL_SWEEP)
    if case["B"] == 1 and case["q_lens"] == case["kv_lens_list"] and not args.interpret:
        v += dense_prefill_peers(case, sm_scale)
    if dense_fits(case):
        v.append(("dense_ref", ragged_fn(ragged_paged_attention_reference, sm_scale), {}))
    return v


def dense_prefill_peers(case, sm_scale):
    """jax's own dense causal attention kernels on the same prompt (contiguous K/V, no page table): the
    Triton-lowered `pallas.ops.gpu.attention.mha` (K/V heads repeated to N: it has no GQA) and the Mosaic GPU
    `attention_mgpu.attention` (TMA, wgmma, warp specialisation; it applies no softmax scale, so q comes
    pre-scaled, and in jax 0.11 it only runs in float16, so its inputs are cast). They show what each Pallas
    backend reaches on this shape without paging."""
    T, K, H, G = case["T"], case["K"], case["H"], case["N"] // case["K"]
    pages = case["tables"][0, 0]
    k = jnp.swapaxes(case["k"][pages], 1, 2).reshape(-1, K, H)[:T]  # [T, K, H], the same K/V as set 0
    v = jnp.swapaxes(case["v"][pages], 1, 2).reshape(-1, K, H)[:T]
    peers = []
    try:
        from jax.experimental.pallas.ops.gpu import attention as tri

        for stages in (2, 3):
            def fn(case, q, k, v, tables, stages=stages):
                return tri.mha(q[None], k[None], v[None], None, sm_scale=sm_scale, causal=True,
                               num_stages=stages)[0]
            peers.append((f"jax_mha_triton_s{stages}", fn, {"num_stages": stages},
                          (case["q"], jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1))))
    except Exception as e:
        print(f"jax mha unavailable: {e}")
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mg

        for bq, bkv, steps in ((128, 128, 2), (128, 64, 3)):
            cfg = mg.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps, causal=True)

            def fn(case, q, k, v, tables, cfg=cfg):
                return mg.attention(q[None], k[None], v[None], cfg)[0]
            f16 = jnp.float16
            peers.append((f"jax_mgpu_{bq}x{bkv}x{steps}", fn, {"block_q": bq, "block_kv": bkv, "steps": steps},
                          ((case["q"].astype(jnp.float32) * sm_scale).astype(f16), k.astype(f16), v.astype(f16))))
    except Exception as e:
        print(f"jax attention_mgpu unavailable: {e}")
    return peers


def dense_fits(case):
    # The reference gathers [T, M * S, K, H] f32 for k and v, and builds [T, K, G, M * S] logits.
    T, L = case["T"], case["M"] * case["S"]
    return T * L * (2 * case["K"] * case["H"] + 3 * case["N"]) * 4 < 6e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpret mode")
    ap.add_argument("--sweep", action="store_true", help="also time kernel knobs around the defaults")
    ap.add_argument("--only", choices=("decode", "prefill"), default=None)
    ap.add_argument("--filter", default=None, help="regex: only cases whose name matches")
    ap.add_argument("--knobs", default=None, help='decode: a JSON list of knob dicts to time, e.g. '
                    '\'[{"num_kv_splits": 2}]\'')
    ap.add_argument("--prefill-knobs", default=None, help='prefill / mixed: a JSON list of knob dicts to time, e.g. '
                    '\'[{"num_stages": 3}]\'')
    ap.add_argument("--decode-cases", default=None, metavar="BxCTX,...",
                    help="decode cases instead of the grid, e.g. 256x400,16x2048")
    ap.add_argument("--kernel-time", action="store_true",
                    help="also sum each variant's kernel time per call from a profiler trace (see above)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--loop", type=int, default=None)
    args = ap.parse_args()
    args.interpret = args.smoke
    args.reps = args.reps or (2 if args.smoke else 7)
    args.loop = args.loop or (2 if args.smoke else 20)
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)

    if args.smoke:
        N, K, H, S, dtype = 8, 2, 64, 16, jnp.float32
        decode_grid = [(2, 64), (3, 200)]
        prefill_cases = {"prefill_48": ([48], [48]), "mixed_32+3dec": ([32, 1, 1, 1], [40, 64, 100, 17]),
                         "mixed_32+3dec_B8": ([32, 1, 1, 1], [40, 64, 100, 17], 8)}
        min_bytes = 0
    else:
        N, K, H, S, dtype = 32, 8, 128, 16, jnp.bfloat16
        decode_grid = [(b, c) for b in (1, 16, 64, 256) for c in (512, 2048, 8192)]
        if args.decode_cases:
            decode_grid = [tuple(int(x) for x in c.split("x")) for c in args.decode_cases.split(",")]
        prefill_cases = {
            **{f"prefill_{t}": ([t], [t]) for t in (512, 1024, 2048, 4096)},
            "chunk_2048_on_6144": ([2048], [8192]),
            "8x512_prefill": ([512] * 8, [512] * 8),
            "mixed_2048+64dec@2048": ([2048] + [1] * 64, [2048] * 65),
            # what a 2048-token step of 256 x 256-token prompts looks like in the engine: 8 chunks + 248 decodes
            "mixed_8x225+248dec@400": ([225] * 8 + [1] * 248, [225] * 8 + [400] * 248),
            # an 8192-token step of the H100 mixed workload (prompts of default_rng(1234).integers(128, 1025))
            "mixed256_prompts_8k": mixed_workload_step(8192, 0),
            "mixed256_step_8k+128dec@640": mixed_workload_step(8192, 128, 640),
            # the same in the engine's (8192, 512) bucket: the per-sequence arrays padded to 512 rows
            "mixed256_step_8k+128dec@640_B512": (*mixed_workload_step(8192, 128, 640), 512),
        }
        min_bytes = 4 * L2_BYTES
    sm_scale = H**-0.5
    results = []
    key = jax.random.PRNGKey(0)
    mem_cap = 30e9  # bytes of cache (+ jax's layout copy) we allow one case

    if args.only in (None, "decode"):
        for B, ctx in decode_grid:
            name = f"B={B} ctx={ctx}"
            if args.filter and not re.search(args.filter, name):
                continue
            if 4 * B * ctx * K * H * jnp.dtype(dtype).itemsize > mem_cap:
                print(f"decode  {name}: skipped (memory)")
                continue
            try:
                case = make_case(key, [1] * B, [ctx] * B, N=N, K=K, H=H, S=S, dtype=dtype, min_bytes=min_bytes)
                run_case("decode", name, case, decode_variants(case, sm_scale, args), args, results)
            except Exception as e:
                print(f"decode  {name}: FAILED to build: {e}")
            finally:
                case = None
    if args.only in (None, "prefill"):
        for name, (q_lens, kv_lens, *pad) in prefill_cases.items():
            if args.filter and not re.search(args.filter, name):
                continue
            try:
                case = make_case(key, q_lens, kv_lens, N=N, K=K, H=H, S=S, dtype=dtype, min_bytes=min_bytes,
                                 pad_to=pad[0] if pad else None)
                run_case("prefill", name, case, prefill_variants(case, sm_scale, args), args, results)
            except Exception as e:
                print(f"prefill {name}: FAILED to build: {e}")
            finally:
                case = None

    path = os.path.join(os.environ.get("OUT") or ".", "attention_gpu.json")
    with open(path, "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), peak_bw=PEAK_BW, peak_flops=PEAK_FLOPS,
                       results=results), f, indent=1)

    print(f"\n{'kind':7s} {'case':24s} {'impl':34s} {'us':>9s} {'GB/s':>6s} {'%bw':>5s} {'TF/s':>6s} "
          f"{'%peak':>5s} {'err':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['kind']:7s} {r['case']:24s} {r['impl'][:34]:34s} FAILED")
            continue
        err = "" if r["max_err_vs_xla"] is None else f"{r['max_err_vs_xla']:.1e}"
        print(f"{r['kind']:7s} {r['case']:24s} {r['impl'][:34]:34s} {r['time_us']:9.1f} {r['gbps']:6.0f} "
              f"{r['bw_frac']:5.0%} {r['tflops']:6.1f} {r['flop_frac']:5.0%} {err:>8s}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
