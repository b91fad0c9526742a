"""Speculative decoding on the CPU, end to end: single-stream tokens/s with and without it, on the default model.

    python benchmarks/spec_decode_cpu.py                              # ngram k=3 and the draft model, ~10 min
    python benchmarks/spec_decode_cpu.py --configs off,ngram3 --max-tokens 96 --json-out spec_cpu.json

Workloads: the fixed prompts of benchmarks/spec_ngram_replay.py (copy-heavy: fix the typos, repeat / quote a text,
rename in code; plain chat), each run alone (one stream), greedy, through the chat template, up to --max-tokens
output tokens. Configurations (each its own engine, built once, warmed on a throwaway prompt):
  off       no speculation
  ngramK    n-gram (prompt lookup) with K drafts, n-grams of 2-4 tokens
  draftK    the default model's own Q4_1 weights as the draft for its float32 self (`quantization="none"` on the
            target) with K drafts; its baseline is `off32` (the float32 target alone), not `off`
Reported per workload and configuration: decode tokens / decode time (each request timed from its first output
token to its last: the prompt's steps are the same with or without speculation),
the ratio to the configuration's baseline, acceptance, and whether the tokens equal the baseline's (they must:
the output is the target's own either way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.spec_ngram_replay import WORKLOADS  # noqa: E402


def engine_for(name: str):
    import jaxinfer
    from jaxinfer.tokenizer import default_model_path

    opts = dict(show_progress=False)
    if name.startswith("ngram"):
        opts["speculative_config"] = {"method": "ngram", "num_speculative_tokens": int(name[5:]),
                                      "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if name.startswith("draft") or name == "off32":
        opts["quantization"] = "none"  # the float32 target
    if name.startswith("draft"):
        opts["speculative_config"] = {"method": "draft_model", "model": default_model_path(),
                                      "num_speculative_tokens": int(name[5:])}
    return jaxinfer.LLM(**opts)


def run_config(name: str, max_tokens: int) -> dict:
    from jaxinfer.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = engine_for(name)
    build_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    out = {"build_s": build_s, "workloads": {}}
    eng = llm.engine
    for wl, prompts in WORKLOADS.items():
        s0 = eng.stats()
        tokens, seconds, texts = 0, 0.0, []
        for p in prompts:  # one stream at a time; timed from its first output token to its last
            rid = eng.add_request(llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]), params)
            first = last = None
            ids: list[int] = []
            while eng.has_unfinished():
                for o in eng.step():
                    if o.request_id == rid and o.outputs and len(o.outputs[0].token_ids) > len(ids):
                        ids = list(o.outputs[0].token_ids)
                        last = time.perf_counter()
                        first = first or last
            tokens += len(ids) - 1
            seconds += last - first
            texts.append(ids)
        s1 = eng.stats()
        drafts = s1.get("spec_draft_tokens", 0) - s0.get("spec_draft_tokens", 0)
        accepted = s1.get("spec_accepted_tokens", 0) - s0.get("spec_accepted_tokens", 0)
        out["workloads"][wl] = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                                "draft_tokens": drafts, "accepted_tokens": accepted,
                                "acceptance": accepted / drafts if drafts else None, "token_ids": texts}
        print(f"{name:8s} {wl:10s} {tokens:5d} tokens {seconds:7.2f} s {tokens / seconds:7.1f} tok/s"
              + (f"  acceptance {accepted / drafts:.2f} ({drafts} drafts)" if drafts else ""), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="off,ngram3,ngram4,off32,draft3")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    import jax

    names = args.configs.split(",")
    res = {n: run_config(n, args.max_tokens) for n in names}
    base = lambda n: "off32" if n.startswith("draft") else "off"  # noqa: E731
    print(f"\n{'config':8s} {'workload':10s} {'tok/s':>7s} {'vs base':>7s} {'accept':>6s}  same tokens as base")
    for n in names:
        for wl, r in res[n]["workloads"].items():
            b = res.get(base(n), {}).get("workloads", {}).get(wl)
            ratio = r["tok_s"] / b["tok_s"] if b else float("nan")
            same = (r["token_ids"] == b["token_ids"]) if b else None
            acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
            print(f"{n:8s} {wl:10s} {r['tok_s']:7.1f} {ratio:7.2f} {acc:>6s}  {same}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(jax=jax.__version__, backend=jax.default_backend(), cpu_count=os.cpu_count(),
                           max_tokens=args.max_tokens, results=res), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
