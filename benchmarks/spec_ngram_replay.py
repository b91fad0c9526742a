"""How much n-gram speculation could save, measured on real greedy outputs before the verify step exists.

    python benchmarks/spec_ngram_replay.py                       # the default model, CPU, ~1 min
    python benchmarks/spec_ngram_replay.py --k 4 --n-max 4 --n-min 2 --max-tokens 128 --json-out replay.json

Runs the fixed prompts below (copy-heavy: fix the typos, repeat / quote a text; plain chat) greedily, then replays
each output as the verify loop would: at output position t the proposer sees the prompt and the first t output
tokens and guesses k; the guesses equal to the output's next tokens are accepted and the step adds them plus one.
Because greedy verification keeps exactly the target's tokens, the replay is what the engine would do. Reported per
workload: tokens per verify step (the speed-up if a (k + 1)-token step cost one decode step; its real cost is
measured separately), acceptance per draft position, and how often nothing was proposed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--n-max", type=int, default=4)
    p.add_argument("--n-min", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    from jaxinfer import LLM, SamplingParams

    llm = LLM(args.model, max_num_seqs=8)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    rows = []
    for name, prompts in WORKLOADS.items():
        outs = llm.chat([[{"role": "user", "content": q}] for q in prompts], sp, use_tqdm=False)
        tot_tokens = tot_steps = 0
        acc_at = [0] * args.k  # steps whose draft position i was accepted
        prop_at = [0] * args.k  # steps that proposed position i
        empty = 0
        for out in outs:
            ids = list(out.outputs[0].token_ids)
            steps, accepted, proposed = replay(list(out.prompt_token_ids), ids, args.k, args.n_max, args.n_min)
            tot_tokens += len(ids)
            tot_steps += steps
            empty += sum(1 for n in proposed if n == 0)
            for a, n in zip(accepted, proposed):
                for i in range(n):
                    prop_at[i] += 1
                    acc_at[i] += i < a
        row = dict(workload=name, prompts=len(prompts), output_tokens=tot_tokens, verify_steps=tot_steps,
                   tokens_per_step=tot_tokens / tot_steps, steps_without_proposal=empty / tot_steps,
                   acceptance_by_position=[a / n if n else None for a, n in zip(acc_at, prop_at)])
        rows.append(row)
    print(f"\nn-gram k={args.k} n={args.n_min}..{args.n_max}, greedy, max_tokens {args.max_tokens}")
    print(f"{'workload':12s} {'tokens':>6s} {'steps':>6s} {'tok/step':>8s} {'no guess':>8s}  acceptance by position")
    for r in rows:
        acc = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_position"])
        print(f"{r['workload']:12s} {r['output_tokens']:6d} {r['verify_steps']:6d} {r['tokens_per_step']:8.2f} "
              f"{r['steps_without_proposal']:8.0%}  {acc}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(args=vars(args), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
