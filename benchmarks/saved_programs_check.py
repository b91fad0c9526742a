"""Do programs saved whole (jaxinfer/executables.py) give the tokens of freshly compiled ones, on this machine?

    python benchmarks/saved_programs_check.py --model llama-3.1-8b --engine-config h100-llama-3.1-8b \\
        --compilation-cache-dir /tmp/cc_check

Four starts, each in a fresh process, on one cache directory (emptied first): (A) compiles everything (jax's cache
and the store fill); the store's folder is then deleted, so (B) takes every program from jax's persistent cache and
saves it again (the path of an upgrade on a machine whose jax cache is warm); (C) and (D) load every program from
the store. (On a CPU, B saves nothing, by design: XLA:CPU cannot re-serialise what it loaded from jax's cache; C and
D then take jax's cache again.) Each start generates greedily for 24 token prompts of 50-900 tokens and prints how
many programs it loaded and a digest of the output tokens: all four digests must agree. Exit status 1 if they do
not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(args) -> None:
    import jaxinfer
    from jaxinfer.config import engine_preset
    from jaxinfer.sampling_params import SamplingParams

    opts = dict(engine_preset(args.engine_config) if args.engine_config else {}, load_format=args.load_format,
                compilation_cache_dir=args.compilation_cache_dir, show_progress=False)
    llm = jaxinfer.LLM(args.model, **opts)
    r = llm.engine.runner
    vocab = llm.engine.cfg.vocab_size
    prompts = [[(i * 7 + j * 13) % (vocab - 10) + 10 for j in range(50 + 37 * i)] for i in range(24)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    print(json.dumps(dict(loaded=r.programs_loaded, programs=len(r.program_seconds), lower_s=round(r.lower_seconds, 2),
                          digest=hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16])), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--engine-config")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--compilation-cache-dir", required=True, help="emptied first")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    from jaxinfer.executables import FOLDER

    shutil.rmtree(args.compilation_cache_dir, ignore_errors=True)
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--load-format",
            args.load_format, "--compilation-cache-dir", args.compilation_cache_dir]
    if args.engine_config:
        argv += ["--engine-config", args.engine_config]
    digests = []
    for name in ("A fresh compile", "B from jax's cache, saved again", "C from the store", "D from the store"):
        if name.startswith("B"):
            shutil.rmtree(os.path.join(args.compilation_cache_dir, FOLDER))
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        if r.returncode:
            print(f"{name}: failed with exit status {r.returncode}")
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        digests.append(res["digest"])
        print(f"{name}: {res['loaded']} of {res['programs']} programs loaded whole, lowering {res['lower_s']} s, "
              f"tokens {res['digest']}", flush=True)
    same = len(set(digests)) == 1
    print("same tokens in all four starts" if same else "the starts disagree")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
