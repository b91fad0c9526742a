"""Load + start-up of the 8B shape from a safetensors checkpoint against the same model converted once
(`jaxinfer convert`: an orbax checkpoint and the engine's compiled programs), each start cold (an empty compilation
cache) in a fresh process, as a new machine of a fleet would start.

    python benchmarks/convert_start.py --preset llama-3.1-8b --engine-config h100-llama-3.1-8b --work /tmp/cs \\
        --json-out convert_start.json

Steps: write a checkpoint of the preset's shape with random bf16 weights (HF layout, safetensors shards, through
PyTorch as a writer only); start from it cold; `jaxinfer convert` it (timed); start from the converted directory
cold. A start is `Engine(...)` built until ready (weights loaded, programs compiled or loaded, warm-up), timed in the
child process. Both checkpoints were just written, so both are read from the OS page cache: the figures compare the
conversion work, not the disks. A table comes last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(preset: str, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((ROOT / "configs" / "models" / f"{preset}.json").read_text())
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = cfg.get("head_dim") or D // N
    out.mkdir(parents=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers made on the GPU where there is one
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape):
        return (0.02 * torch.randn(*shape, generator=g, device=dev)).to(torch.bfloat16).cpu()

    index = {}
    shards = [{"model.embed_tokens.weight": w(V, D), "model.norm.weight": torch.ones(D, dtype=torch.bfloat16),
               "lm_head.weight": w(V, D)}]
    for i in range(L):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": w(N * H, D), p + "self_attn.k_proj.weight": w(K * H, D),
                       p + "self_attn.v_proj.weight": w(K * H, D), p + "self_attn.o_proj.weight": w(D, N * H),
                       p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
                       p + "mlp.down_proj.weight": w(D, F), p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16)})
    for n, tensors in enumerate(shards):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))


CHILD = """
import json, sys, time
t0 = time.monotonic()
sys.path.insert(0, {root!r})
from jaxinfer.config import engine_preset
from jaxinfer.engine import Engine
e = Engine({model!r}, compilation_cache_dir={cache!r}, **engine_preset({preset!r}))
print(json.dumps({{"start_s": time.monotonic() - t0, "load_s": e.load_seconds, "compile_s": e.compile_seconds,
                  "programs_loaded": e.runner.programs_loaded, "programs": len(e.runner.program_seconds)}}))
"""


def start(model: str, cache: Path, preset: str) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    code = CHILD.format(root=str(ROOT), model=model, cache=str(cache), preset=preset)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"start from {model} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--engine-config", default="h100-llama-3.1-8b")
    ap.add_argument("--work", default="/tmp/convert_start")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    ckpt, conv = work / "safetensors", work / "converted"
    t = time.monotonic()
    write_checkpoint(a.preset, ckpt)
    res = {"write_checkpoint_s": time.monotonic() - t}
    res["from_safetensors"] = start(str(ckpt), work / "cc1", a.engine_config)
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "jaxinfer", "convert", str(ckpt), str(conv), "--quiet",
                        "--engine-config", a.engine_config, "--compilation-cache-dir", str(work / "cc_convert")],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"convert failed:\n{r.stderr[-3000:]}")
    res["convert_s"] = time.monotonic() - t
    res["convert"] = json.loads(r.stdout.strip().splitlines()[-1])
    res["from_converted"] = start(str(conv), work / "cc2", a.engine_config)
    res["from_converted_again"] = start(str(conv), work / "cc3", a.engine_config)
    res["sizes_gb"] = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e9 for p in (ckpt, conv)}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(f"{'start (cold cache)':28s} {'total s':>8s} {'load s':>7s} {'compile s':>9s} {'loaded':>7s}")
    for k in ("from_safetensors", "from_converted", "from_converted_again"):
        s = res[k]
        print(f"{k:28s} {s['start_s']:8.1f} {s['load_s']:7.1f} {s['compile_s']:9.1f} {s['programs_loaded']:4d}/{s['programs']}")
    print(f"convert (load + save + compile): {res['convert_s']:.1f} s")


if __name__ == "__main__":
    main()
