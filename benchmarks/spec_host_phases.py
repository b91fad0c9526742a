"""Where the host's time goes in steps that carry n-gram drafts (they run synchronously): microseconds per phase.

    python benchmarks/spec_host_phases.py                       # a tiny random Llama with the default tokenizer
    python benchmarks/spec_host_phases.py --batch 8 --k 4 --rate 0.7
    python benchmarks/spec_host_phases.py --model PATH --load-format dummy

B requests, each a random span of --span tokens repeated up to --prompt-len (so the n-gram proposer always finds a
match), greedy, EOS ignored, decode until --max-tokens. The acceptance rule is replaced for timing: each draft is kept
with probability --rate while the ones before it were (random weights would keep almost none), then the target's
token; the tokens then go on repeating the span, so every step carries drafts. A tiny model keeps the device's share
small; the device's time is left out anyway: the wait in `LaunchedStep.result()` is timed apart from the read-back.

Each phase is the engine's own function, wrapped with time.perf_counter: the n-gram check of `_drafts_likely`, the
scheduler (and within it the proposer), `_admit`, `runner.prepare`, `runner.launch`, the read-back, `_sampled`,
`scheduler.update`, `_postprocess`, `_outputs`; within launch, the calls of the forward and sampler programs.
"serial" is what the device waits for between two such steps: from
the end of the wait for step N to the return of step N+1's launch (the caller's loop between step() calls included).
Mean over the steps whose completed batch carried drafts, after --skip warm steps.

A model whose tokens do not repeat the span (random weights, `--load-format dummy`) would stop finding drafts:
`--fixed-drafts` proposes k copies of each request's last token at every decode instead (the n-gram search is then
not timed). `--no-early-launch` runs the draft-carrying steps without `Engine._launch_early` (the step after is
launched when the caller asks for it), for comparing both; `--trace DIR` writes a jax profiler trace of the timed
steps (benchmarks/trace_summary.py reads it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("drafts_likely", "schedule", "propose", "admit", "prepare", "launch", "forward_call", "sampler_call",
          "readback", "sampled", "update", "postprocess", "outputs")


def tiny_model(path: str) -> str:
    """A random 2-layer Llama with the default model's tokenizer (as tests/conftest.py's tiny_chat_model)."""
    import torch
    import transformers

    from jaxinfer.tokenizer import Tokenizer, default_model_path

    tok = Tokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=max(49152, tok.vocab_size), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=4096, rms_norm_eps=1e-5,
                                   eos_token_id=tok.hf.eos_token_id, bos_token_id=tok.hf.bos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.hf.save_pretrained(path)
    return path


def instrument(eng, totals: dict, marks: dict):
    """Wrap the engine's phases; each adds its seconds to totals[phase] of the current step."""
    import jax

    from jaxinfer import runner as runner_mod

    def timed(name, fn):
        def call(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[name] += time.perf_counter() - t
        return call

    for name, obj, attr in (("drafts_likely", eng, "_drafts_likely"), ("admit", eng, "_admit"),
                            ("sampled", eng, "_sampled"), ("postprocess", eng, "_postprocess"),
                            ("outputs", eng, "_outputs"), ("schedule", eng.scheduler, "schedule"),
                            ("propose", eng.scheduler, "propose"), ("update", eng.scheduler, "update"),
                            ("prepare", eng.runner, "prepare")):
        setattr(obj, attr, timed(name, getattr(obj, attr)))
    launch = eng.runner.launch

    def launched(*a, **kw):
        t = time.perf_counter()
        out = launch(*a, **kw)
        t1 = time.perf_counter()
        totals["launch"] += t1 - t
        if marks.pop("ready", None) is not None:  # the first launch since a step was read
            totals["serial"] += t1 - marks["ready_at"]
        return out

    eng.runner.launch = launched
    # inside launch: the calls of the forward and sampler programs (argument handling, dispatch, CUDA graph launch)
    for name, progs in (("forward_call", eng.runner.compiled), ("sampler_call", eng.runner.compiled_samplers)):
        for key, prog in list(progs.items()):
            progs[key] = timed(name, prog)
    result = runner_mod.LaunchedStep.result

    def result_timed(self):
        t = time.perf_counter()
        jax.block_until_ready(self.out.token_ids)
        t1 = marks["ready"] = marks["ready_at"] = time.perf_counter()
        totals["wait"] += t1 - t
        out = result(self)
        totals["readback"] += time.perf_counter() - t1
        return out

    runner_mod.LaunchedStep.result = result_timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: a tiny random Llama with the default tokenizer")
    p.add_argument("--load-format", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.7)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--span", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--fixed-drafts", action="store_true", help="k copies of the last token as drafts (see above)")
    p.add_argument("--no-early-launch", action="store_true")
    p.add_argument("--trace", default=None, metavar="DIR")
    p.add_argument("--sampler-options", default=None, metavar="JSON",
                   help='XLA options for the sampler programs alone, e.g. \'{"xla_gpu_graph_min_graph_size": 1000000}\'')
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.sampler_options:
        from jaxinfer import runner

        runner.SAMPLER_COMPILER_OPTIONS = json.loads(args.sampler_options)
    import numpy as np

    import jaxinfer.engine
    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams

    rng = np.random.default_rng(0)

    def accept(proposed, target):  # each draft kept with probability rate (see the module docstring)
        out = []
        for p_, t in zip(proposed, target):
            if rng.random() >= args.rate:
                return out + [t]
            out.append(p_)
        return out + [target[len(proposed)]]

    jaxinfer.engine.accept_greedy = accept
    tmp = tempfile.TemporaryDirectory()
    model = args.model or tiny_model(tmp.name)
    B = args.batch
    opts = dict(show_progress=False, max_num_seqs=B, seq_buckets=(B,), token_buckets=(B, B * (args.k + 1), 512),
                max_model_len=args.prompt_len + args.max_tokens + 64, use_compilation_cache=False,
                speculative_config={"method": "ngram", "num_speculative_tokens": args.k, "disable_by_batch_size": B})
    if args.load_format:
        opts["load_format"] = args.load_format
    eng = Engine(model, **opts)
    V = eng.cfg.vocab_size
    if args.fixed_drafts:
        eng.scheduler.propose = eng._propose = lambda req: [req.output_token_ids[-1] if req.output_token_ids
                                                            else req.prompt_token_ids[-1]] * args.k
    if args.no_early_launch:
        eng._launch_early = lambda: None
    totals, marks = collections.defaultdict(float), {}
    instrument(eng, totals, marks)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for _ in range(B):
        span = rng.integers(100, V, args.span).tolist()
        eng.add_request((span * (-(-args.prompt_len // args.span)))[: args.prompt_len], params)
    rows, seen, tracing = [], 0, False
    while eng.has_unfinished():
        if args.trace and not tracing and len(rows) == args.skip:
            import jax

            jax.profiler.start_trace(args.trace)
            tracing = True
        totals.clear()
        t = time.perf_counter()
        eng.step()
        wall = time.perf_counter() - t
        drafts = eng.last_completed is not None and eng.stats()["spec_draft_tokens"] > seen
        seen = eng.stats()["spec_draft_tokens"]
        row = dict(totals)
        row["host"], row["wall"] = wall - totals["wait"], wall
        if drafts:
            rows.append(row)
    if tracing:
        jax.profiler.stop_trace()
    rows = rows[args.skip:]
    mean = {k: 1e6 * float(np.mean([r.get(k, 0.0) for r in rows])) for k in (*PHASES, "wait", "host", "serial", "wall")}
    print(f"B={B} k={args.k} rate {args.rate}: {len(rows)} draft-carrying steps, acceptance "
          f"{eng.spec_stats()['spec_acceptance_rate']:.2f}; microseconds per step")
    for k, v in mean.items():
        print(f"  {k:14s} {v:9.1f}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(args=vars(args), steps=len(rows), us=mean), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
