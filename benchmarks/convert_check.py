"""A converted model restores to the weights and greedy tokens of a direct load, per weight scheme, on this machine's
devices (the CPU tests cover the CPU forms; this runs the GPU / TPU forms):

    python benchmarks/convert_check.py --model qwen3-1.7b --schemes none,int8,int4,fp8

Each scheme: random weights of the preset's shape (`load_format="dummy"`, the same seed), converted without programs,
restored; every leaf compared bit for bit, then 4 greedy requests of 32 tokens from both engines. A table comes last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import jax
    import numpy as np

    from jaxinfer.convert import convert
    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-1.7b")
    ap.add_argument("--schemes", default="none,int8,int4,fp8")
    a = ap.parse_args()
    opts = dict(max_model_len=512, max_num_seqs=4, token_buckets=(16, 64), seq_buckets=(1, 4), kv_cache_memory="1GiB",
                show_progress=False)
    prompts = [[int(t) for t in np.random.default_rng(i).integers(10, 1000, 20)] for i in range(4)]
    rows = []
    for q in a.schemes.split(","):
        with tempfile.TemporaryDirectory() as d:
            convert(a.model, f"{d}/out", programs=False, load_format="dummy", quantization=q, **opts)
            engines = [Engine(a.model, load_format="dummy", quantization=q, **opts), Engine(f"{d}/out", **opts)]
            leaves = [jax.tree_util.tree_leaves(e.runner.params) for e in engines]
            same = len(leaves[0]) == len(leaves[1]) and all(
                x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
                for x, y in zip(*leaves))
            outs = []
            for e in engines:
                ids = [e.add_request(p, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)) for p in prompts]
                done = {}
                while e.has_unfinished():
                    done.update({o.request_id: o.outputs[0].token_ids for o in e.step() if o.finished})
                outs.append([done[i] for i in ids])
            rows.append((q, engines[1].quantization, same, outs[0] == outs[1]))
            del engines
    print(f"{'scheme':7s} {'weights':40s} {'leaves equal':>12s} {'tokens equal':>12s}")
    for q, desc, same, tok in rows:
        print(f"{q:7s} {desc[:40]:40s} {str(same):>12s} {str(tok):>12s}")
    sys.exit(0 if all(r[2] and r[3] for r in rows) else 1)


if __name__ == "__main__":
    main()
