"""The HF transformers peer on a GPU: continuous batching (`generate_batch`) on a model preset with random weights.

    python benchmarks/hf_peer.py --model llama-3.1-8b --num-prompts 256 --input-len-range 128,1025 --seed 1234 \
        --output-len 128 --json-out hf_peer.json

The same workload as `jaxinfer bench throughput` with the same flags: prompt lengths drawn as
`numpy.random.default_rng(seed).integers(lo, hi, size=num_prompts)`, random token ids, greedy, `--output-len`
new tokens each (random weights rarely produce an end-of-sequence token; the tokens actually generated are
counted). bf16 weights on CUDA, PyTorch eager, HF's paged attention for continuous batching. A short warm-up
runs first. Output tok/s = generated tokens / wall time of `generate_batch`. torch and transformers are the
peer's own dependencies (never the engine's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="a preset in configs/models")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-range", default="128,1025")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--attn-implementation", default="auto",
                   help="auto: HF's paged sdpa under its newer ('paged|sdpa') or older ('sdpa_paged') name, else sdpa")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json-out")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation import GenerationConfig

    from jaxinfer.config import CONFIGS_DIR

    hf = json.loads((CONFIGS_DIR / "models" / f"{args.model}.json").read_text())
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    names = ["paged|sdpa", "sdpa_paged", "sdpa"] if args.attn_implementation == "auto" else [args.attn_implementation]
    for name in names:
        try:
            with torch.device(args.device):
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=name)
            args.attn_implementation = name
            break
        except ValueError as e:
            print(f"attn_implementation {name!r} refused: {str(e)[:200]}", file=sys.stderr)
    else:
        raise SystemExit("no attention implementation accepted")
    model.eval()
    load_s = time.perf_counter() - t0
    lo, hi = (int(x) for x in args.input_len_range.split(","))
    rng = np.random.default_rng(args.seed)
    lens = rng.integers(lo, hi, size=args.num_prompts)
    ids = np.random.default_rng(args.seed + 1)
    prompts = [ids.integers(0, cfg.vocab_size, n).tolist() for n in lens]
    gen = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=0)
    with torch.no_grad():
        model.generate_batch(inputs=[q[:32] for q in prompts[:4]], generation_config=gen, progress_bar=False)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
        sync()
        wall = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in out.values())
    res = dict(engine="HF transformers generate_batch", transformers=transformers.__version__, torch=torch.__version__,
               device=torch.cuda.get_device_name() if args.device == "cuda" else args.device, attn_implementation=args.attn_implementation, model=args.model,
               num_prompts=args.num_prompts, prompt_tokens=int(lens.sum()), output_tokens=generated,
               requested_output_tokens=args.num_prompts * args.output_len, wall_s=wall, output_tok_s=generated / wall,
               model_init_s=load_s, argv=sys.argv)
    print(json.dumps(res, indent=1))
    print(f"\nHF generate_batch: {generated} output tokens in {wall:.2f} s = {generated / wall:.1f} out tok/s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
