"""Do the compiled attention kernels give the engine the tokens of the plain-jnp attention, on this machine?

    python benchmarks/kernels_e2e_check.py [--model qwen3-0.6b] [--attention-impl gpu] [--kv-cache-dtype fp8]
                                           [--quantization int4]

CI runs the kernels in interpret mode only; this runs them compiled, end to end. Two engines on the same dummy
float32 weights, one with `--attention-impl` (the GPU kernels: decode steps through the decode kernel reading the
fused qkv projection and writing the new K/V, mixed steps through the ragged kernel with split decodes), one with
the jnp `xla` form (both with the same `--kv-cache-dtype` and `--quantization`, if given). Prompts of 5-150 tokens with a 64-token step budget, so steps mix prefill chunks and decodes.
Matmuls at the highest precision, so the two differ only by summation order: greedy tokens must agree. Exit status
1 if any prompt's tokens differ.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3-0.6b", help="a model preset (dummy weights); default: %(default)s")
    p.add_argument("--attention-impl", default="gpu")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--kv-cache-dtype", default="auto", help="e.g. fp8 or int8: both engines read an 8-bit cache")
    p.add_argument("--quantization", default=None, help="e.g. int4: both engines run quantized weights")
    args = p.parse_args(argv)
    import jax
    import numpy as np

    import jaxinfer

    tokens = {}
    for impl in ("xla", args.attention_impl):
        llm = jaxinfer.LLM(args.model, load_format="dummy", dtype="float32", attention_impl=impl,
                           token_buckets=(16, 64), seq_buckets=(1, 4, 8), max_num_seqs=8, max_num_batched_tokens=64,
                           max_model_len=512, page_size=16, show_progress=False, use_compilation_cache=False,
                           kv_cache_memory="2GiB", kv_cache_dtype=args.kv_cache_dtype,
                           quantization=args.quantization)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 1000, n).tolist() for n in (5, 40, 100, 150, 7, 33)]
        sp = jaxinfer.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        with jax.default_matmul_precision("highest"):
            outs = llm.generate(prompts, sp, use_tqdm=False)
        tokens[impl] = [o.outputs[0].token_ids for o in outs]
        del llm
    ok = True
    for i, (a, b) in enumerate(zip(tokens["xla"], tokens[args.attention_impl])):
        diff = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        ok &= diff is None and len(a) == len(b)
        print(f"prompt {i}: {len(a)} tokens, " + ("identical" if diff is None else f"first difference at token {diff}"))
    what = f"kv cache {args.kv_cache_dtype}, weights {args.quantization or 'float32'}"
    print(f"{args.attention_impl} vs xla on {jax.devices()[0].device_kind} ({what}): "
          + ("same tokens" if ok else "DIFFERENT"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
