"""How much n-gram speculation could save, measured on real greedy outputs before the verify step exists.

    python benchmarks/spec_ngram_replay.py                       # the default model, CPU, ~1 min
    python benchmarks/spec_ngram_replay.py --k 4 --n-max 4 --n-min 2 --max-tokens 128 --json-out replay.json

Runs the fixed prompts below (copy-heavy: fix the typos, repeat / quote a text; plain chat) greedily, then replays
each output as the verify loop would: at output position t the proposer sees the prompt and the first t output
tokens and guesses k; the guesses equal to the output's next tokens are accepted and the step adds them plus one.
Because greedy verification keeps exactly the target's tokens, the replay is what the engine would do. Reported per
workload: tokens per verify step (the speed-up if a (k + 1)-token step cost one decode step; its real cost is
measured separately), acceptance per draft position, and how often nothing was proposed.

--verify-cost then times what a verify step would cost: the engine's own compiled forward program for one sequence
at ~--context tokens feeding T = 1 .. k + 1 tokens (T = 1 is a plain decode; T > 1 goes through the ragged attention
path, as a verify step would), each T its own bucket. With those, the expected single-stream speed-up of each k is
the output tokens over the replayed steps' time, each step at the cost of its own size (1 + its guess, so a step
with no guess costs a plain decode), in units of a 1-token step. "step cost" is a full (k + 1)-token step's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = ("Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
        "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
        "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure.")
TYPOS = ("Four scroe and seven yeras ago our fathers brougth forth on this continent, a new nation, conceived in "
         "Libety, and dedicated to the propositon that all men are created equal. Now we are engagd in a great "
         "civil war, testing wether that nation, or any nation so conceived and so dedicatd, can long endure.")
CODE = ("def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
        "def variance(xs):\n    m = mean(xs)\n    total = 0\n    for x in xs:\n        total += (x - m) ** 2\n"
        "    return total / len(xs)\n")

WORKLOADS = {
    "copy-heavy": [
        f"Fix the typos in this paragraph and write it out again in full:\n\n{TYPOS}",
        f"Repeat the following text exactly, word for word:\n\n{TEXT}",
        f"Rename the variable `total` to `acc` in this code and show the whole code:\n\n{CODE}",
        f"Quote the sentence of this text that mentions a civil war, then explain it briefly:\n\n{TEXT}",
    ],
    "chat": [
        "What are three tips for staying healthy?",
        "Write a short poem about the sea.",
        "Explain what a hash table is in two sentences.",
        "Give me a recipe for pancakes.",
    ],
}


def replay(prompt: list[int], out: list[int], k: int, n_max: int, n_min: int):
    """Verify steps of greedy n-gram speculation over a known output -> (steps, accepted per step, proposed lens)."""
    from jaxinfer.spec_decode import accept_greedy, ngram_propose

    t, accepted, proposed = 0, [], []
    while t < len(out):
        guess = ngram_propose(prompt + out[:t], k, n_max, n_min)[: len(out) - t - 1]
        got = accept_greedy(guess, out[t:t + len(guess) + 1])  # the target's tokens are the known output's
        accepted.append(len(got) - 1)
        proposed.append(len(guess))
        t += len(got)
    return len(accepted), accepted, proposed


def verify_cost(args, t_max: int) -> dict[int, float]:
    """ms of the engine's compiled forward program for one sequence at ~args.context tokens feeding T tokens."""
    import jax
    import numpy as np

    from jaxinfer.engine import Engine
    from jaxinfer.runner import pack
    from jaxinfer.sampling_params import SamplingParams

    eng = Engine(args.model, max_num_seqs=1, seq_buckets=[1], token_buckets=list(range(1, t_max + 1)),
                 max_num_batched_tokens=t_max, max_model_len=args.context + 64, show_progress=False,
                 async_scheduling=False)
    rng = np.random.default_rng(0)
    eng.add_request(rng.integers(0, eng.cfg.vocab_size, args.context).tolist(), SamplingParams(max_tokens=32,
                                                                                              ignore_eos=True))
    while eng.scheduler.waiting or eng.scheduler.running[0].num_computed_tokens < args.context:  # the prompt
        eng.step()
    run, req = eng.runner, eng.scheduler.running[0]
    out = {}
    for T in range(1, t_max + 1):
        req.num_computed_tokens -= T - 1  # the step re-feeds T tokens at the end of the context: a verify step's shape
        batch = eng.scheduler.schedule()
        assert batch.num_tokens == T, (batch.num_tokens, T)
        inp, _, bucket, _ = run.prepare(batch)
        packed = jax.device_put(pack(inp))

        def step():
            logits, _, run.kv, run.sstate, run.page_table = run.compiled[bucket](run.params, run.kv, run.sstate,
                                                                                 run.page_table, packed)
            return logits

        jax.block_until_ready(step())
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(args.steps):
                o = step()
            jax.block_until_ready(o)
            best = min(best, (time.perf_counter() - t) / args.steps * 1e3)
        out[T] = best
        req.num_computed_tokens -= 1  # leave the sequence where it was for the next T
        req.num_pending -= batch.samples(0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--n-max", type=int, default=4)
    p.add_argument("--n-min", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ks", default=None, help="comma-separated k values to replay (default: --k)")
    p.add_argument("--verify-cost", action="store_true", help="also time 1 .. k + 1-token steps of one sequence")
    p.add_argument("--context", type=int, default=256, help="context of the --verify-cost sequence")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else [args.k]
    from jaxinfer import LLM, SamplingParams

    llm = LLM(args.model, max_num_seqs=8)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = {name: llm.chat([[{"role": "user", "content": q}] for q in prompts], sp, use_tqdm=False)
               for name, prompts in WORKLOADS.items()}
    rows = []
    for k in ks:
        for name, outs in outputs.items():
            tot_tokens = tot_steps = empty = 0
            sizes = []  # tokens fed by each verify step: 1 + its guess (a step with no guess is a plain decode)
            acc_at, prop_at = [0] * k, [0] * k  # steps whose draft position i was accepted / proposed
            for out in outs:
                ids = list(out.outputs[0].token_ids)
                steps, accepted, proposed = replay(list(out.prompt_token_ids), ids, k, args.n_max, args.n_min)
                tot_tokens += len(ids)
                tot_steps += steps
                empty += sum(1 for n in proposed if n == 0)
                sizes += [1 + n for n in proposed]
                for a, n in zip(accepted, proposed):
                    for i in range(n):
                        prop_at[i] += 1
                        acc_at[i] += i < a
            rows.append(dict(k=k, workload=name, prompts=len(outs), output_tokens=tot_tokens, verify_steps=tot_steps,
                             tokens_per_step=tot_tokens / tot_steps, steps_without_proposal=empty / tot_steps,
                             acceptance_by_position=[a / n if n else None for a, n in zip(acc_at, prop_at)],
                             step_sizes=sizes))
    del llm
    cost = verify_cost(args, max(ks) + 1) if args.verify_cost else {}
    for r in rows:  # decode-step units of time: each step at the cost of its own size
        sizes = r.pop("step_sizes")
        r["time_vs_decode"] = sum(cost[n] for n in sizes) / cost[1] / r["output_tokens"] if cost else None
    print(f"\nn-gram n={args.n_min}..{args.n_max}, greedy, max_tokens {args.max_tokens}")
    print(f"{'k':>2s} {'workload':12s} {'tokens':>6s} {'steps':>6s} {'tok/step':>8s} {'no guess':>8s} "
          f"{'step cost':>9s} {'speed-up':>8s}  acceptance by position")
    for r in rows:
        acc = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_position"])
        c = cost[r["k"] + 1] / cost[1] if cost else float("nan")
        r["step_cost_vs_decode"] = c if cost else None
        r["expected_speedup"] = 1 / r["time_vs_decode"] if cost else None
        print(f"{r['k']:2d} {r['workload']:12s} {r['output_tokens']:6d} {r['verify_steps']:6d} "
              f"{r['tokens_per_step']:8.2f} {r['steps_without_proposal']:8.0%} {c:9.2f} "
              f"{r['expected_speedup'] or float('nan'):8.2f}  {acc}")
    if cost:
        print("forward program of one sequence at ~%d tokens: " % args.context
              + ", ".join(f"T={t}: {ms:.2f} ms" for t, ms in sorted(cost.items())))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(args=vars(args), rows=rows, forward_ms_by_tokens=cost), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
