"""The hardware floor of an offline workload on one GPU: the least time any engine needs for it, from the work
it must do and two measured ceilings, and what a throughput target asks of it.

    python benchmarks/workload_floor.py --model llama-3.1-8b --num-prompts 256 --input-len-range 128,1025 \
        --seed 1234 --output-len 128 [--target 7000] [--measured 5782]

Prompt lengths are drawn by `jaxinfer bench throughput`'s own `draw_lengths` (`default_rng(seed).integers(lo,
hi)`); every request decodes `--output-len` tokens (EOS ignored). Work counted (bf16 weights and KV cache):
  gemm         2 x (linear parameters) flops per token through the model, plus the lm_head for each sampled
               token, at the matmul ceiling; and, after the last prompt token has gone through (the last
               request's prefill), at least output_len - 1 steps in which no prompt token is left, each reading
               every weight once: where such a step's flops take less time than its weight bytes at the copy
               bandwidth, the difference is added (each counted with the most rows a step can hold, the
               number of requests, so the smallest excess)
  decode_kv    every decode row reads its whole context (K and V, every layer) once, at the copy bandwidth
  prompt_attn  causal attention flops of the prompts at the matmul ceiling
  elementwise  what must cross memory between the GEMMs of a token that goes through a prefill step, per
               layer: silu(gate) * up (read 2 F, write F) and two residual add + RMSNorm passes (read x and
               the update, write x and the normed x), at the copy bandwidth; an engine whose GEMMs fuse these
               into their epilogues avoids them, so the floor is given with and without them
Rotary embedding, K/V writes, embedding gathers, sampling and launch gaps are left out. The parts add up: this is
the floor of an engine whose kernels run one after another (an XLA program's, vLLM's); one that runs
bandwidth-bound attention beside compute-bound GEMMs on the same GPU (nano-batch overlap, persistent kernels)
has a lower one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

MATMUL_FLOPS = 787e12  # bf16 8192^3 matmul measured on the H100 through JAX
COPY_BW = 2.94e12  # elementwise read + write, same machine


def floor(cfg: dict, prompt_lens: np.ndarray, out_len: int, flops=MATMUL_FLOPS, bw=COPY_BW, dtype_bytes=2) -> dict:
    D, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = cfg.get("head_dim") or D // N
    V = cfg["vocab_size"]
    linear = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)  # qkv, o, gate / up / down
    lm_head = D * V
    n = len(prompt_lens)
    prompt = int(prompt_lens.sum())
    through = prompt + n * (out_len - 1)  # tokens through the model: each prompt, then each output but the last
    sampled = n * out_len
    gemm_flops = 2.0 * (linear * through + lm_head * sampled)
    tail_steps = out_len - 1
    step_bytes = (linear + lm_head) * dtype_bytes
    step_flops = 2.0 * (linear + lm_head) * n
    tail_excess = tail_steps * max(0.0, step_bytes / bw - step_flops / flops)
    gemm_s = gemm_flops / flops + tail_excess
    kv_token_bytes = 2 * L * K * H * dtype_bytes
    # decode row k (1 .. out_len - 1) of a request with prompt p attends to p + k positions
    kv_reads = sum(int(p) * tail_steps + tail_steps * (tail_steps + 1) // 2 for p in prompt_lens)
    decode_kv_s = kv_reads * kv_token_bytes / bw
    visible = sum(int(p) * (int(p) + 1) // 2 for p in prompt_lens)
    prompt_attn_s = 4.0 * H * N * L * visible / flops
    prefill_tokens = prompt  # at least these go through steps that hold prompt tokens
    per_token_layer = (3 * F + 2 * 4 * D) * dtype_bytes
    elementwise_s = prefill_tokens * L * per_token_layer / bw
    unfused = gemm_s + decode_kv_s + prompt_attn_s + elementwise_s
    fused = unfused - elementwise_s
    out_tokens = n * out_len
    return dict(requests=n, prompt_tokens=prompt, output_tokens=out_tokens, tokens_through=through,
                gemm_s=gemm_s, gemm_tail_excess_s=tail_excess, decode_kv_s=decode_kv_s, prompt_attn_s=prompt_attn_s,
                elementwise_s=elementwise_s, floor_s=unfused, floor_fused_s=fused,
                max_out_tok_s=out_tokens / unfused, max_out_tok_s_fused=out_tokens / fused)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.1-8b", help="a preset in configs/models")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-range", default="128,1025", help="LO,HI (HI excluded)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--matmul-flops", type=float, default=MATMUL_FLOPS)
    p.add_argument("--copy-bw", type=float, default=COPY_BW)
    p.add_argument("--target", type=float, help="out tok/s asked for: the share of the floor it needs")
    p.add_argument("--measured", type=float, action="append", default=[],
                   help="out tok/s an engine reached (repeatable): its share of the floor")
    args = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "models", f"{args.model}.json")) as f:
        cfg = json.load(f)
    lo, hi = (int(x) for x in args.input_len_range.split(","))
    sys.path.insert(0, root)
    from jaxinfer.bench_offline import draw_lengths

    lens = draw_lengths(args.num_prompts, input_len=lo, output_len=args.output_len, input_len_range=(lo, hi),
                        seed=args.seed)[0]
    lens = np.asarray(lens)
    r = floor(cfg, lens, args.output_len, args.matmul_flops, args.copy_bw)
    print(f"{r['requests']} requests, {r['prompt_tokens']} prompt tokens, {r['output_tokens']} output tokens; "
          f"ceilings {args.matmul_flops / 1e12:.0f} TFLOP/s, {args.copy_bw / 1e12:.2f} TB/s")
    for k in ("gemm_s", "gemm_tail_excess_s", "decode_kv_s", "prompt_attn_s", "elementwise_s"):
        print(f"  {k:20s} {r[k]:7.3f} s")
    print(f"floor {r['floor_s']:.3f} s = {r['max_out_tok_s']:,.0f} out tok/s at most "
          f"(elementwise fused into the GEMMs: {r['floor_fused_s']:.3f} s = {r['max_out_tok_s_fused']:,.0f})")
    for label, tps in ([("target", args.target)] if args.target else []) + [("measured", m) for m in args.measured]:
        s = r["output_tokens"] / tps
        print(f"{label} {tps:,.0f} out tok/s = {s:.3f} s: {r['floor_s'] / s:.1%} of the floor "
              f"({r['floor_fused_s'] / s:.1%} of the fused one)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
