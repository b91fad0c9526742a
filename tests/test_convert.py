"""`jaxinfer convert`: a model converted once (orbax weights, tokenizer, compiled programs) restores onto one device
and onto meshes of other sizes with the weights and greedy outputs of its source; a second process starts from it
without compiling; what does not fit says why. The restores run in a child process with 8 host CPU devices (their
number is fixed when jax starts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_ENGINE_OPTIONS

CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax
import numpy as np
from jaxinfer.convert import convert
from jaxinfer.engine import Engine
from jaxinfer.sampling_params import SamplingParams

src, out, opts, tps, qz = sys.argv[1] or None, sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
qz = {} if qz == "-" else {"quantization": qz}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 8, 9], [5] * 23]


def run(eng):
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)) for p in PROMPTS]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                c = o.outputs[0]
                done[o.request_id] = dict(tokens=c.token_ids, lp=[float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs)])
    return [done[i] for i in ids]


def leaves(eng):
    flat = jax.tree_util.tree_leaves_with_path(eng.runner.params)
    return {jax.tree_util.keystr(p): (np.asarray(x), str(getattr(x.sharding, "spec", None)), x.dtype.name) for p, x in flat}


manifest = convert(src, out, **opts, **qz)
res = dict(quantization=manifest["quantization"], programs=manifest["programs"], runs=[])
for tp in tps:
    o = {**opts, **qz, "tensor_parallel_size": tp}
    direct, restored = Engine(src, **o), Engine(out, **{**opts, "tensor_parallel_size": tp})
    a, b = leaves(direct), leaves(restored)
    same = sorted(a) == sorted(b) and all(np.array_equal(a[k][0], b[k][0]) and a[k][1:] == b[k][1:] for k in a)
    res["runs"].append(dict(tp=tp, same_weights=same, replicas=restored.cfg.kv_replicas, direct=run(direct),
                            restored=run(restored), compiles=restored.num_compiles_since_ready,
                            quantization=restored.quantization, loaded=restored.runner.programs_loaded))
print(json.dumps(res))
"""


def child(src, out, opts, tps, quantization="-"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), json.dumps(opts), json.dumps(tps),
                           quantization], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_runs(res, tps):
    assert [r["tp"] for r in res["runs"]] == tps
    for r in res["runs"]:
        assert r["same_weights"], r["tp"]  # every leaf: values, sharding and dtype as the direct load's
        assert r["compiles"] == 0
        for x, y in zip(r["direct"], r["restored"]):
            assert x["tokens"] == y["tokens"] and len(x["tokens"]) == 8
            assert np.allclose(x["lp"], y["lp"], atol=1e-5)
    return {r["tp"]: r for r in res["runs"]}


def test_convert_tiny_model_restores_on_one_and_eight_devices(tmp_path):
    """A tiny Llama of 8 query heads over 2 kv heads, converted on one device, restored on 1 device and at TP 2 and
    8 (each kv head copied 4 times at restore); then a second process serves from it with every program loaded."""
    import torch
    import transformers

    from hf_models import TINY

    src = tmp_path / "src"
    cfg = transformers.LlamaConfig(**{**TINY, "num_attention_heads": 8, "rope_theta": 10000.0})
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(src, safe_serialization=True)
    out = tmp_path / "converted"
    opts = {**TINY_ENGINE_OPTIONS, "kv_cache_memory": "256KiB"}
    res = child(src, out, opts, [1, 2, 8])
    runs = check_runs(res, [1, 2, 8])
    assert runs[8]["replicas"] == 4 and runs[1]["replicas"] == 1
    assert runs[1]["loaded"] > 0 and runs[8]["loaded"] == 0  # the shipped programs are for one device
    (rec,) = res["programs"]
    assert rec["device_kind"] == "cpu" and rec["devices"] == 1
    saved = list((out / "programs" / "executables").iterdir())
    assert len(saved) == 1 and saved[0].name == "p0-" + rec["fingerprint"] and len(list(saved[0].glob("*.jxe"))) > 5
    assert json.loads((out / "jaxinfer.json").read_text())["model_config"]["kv_replicas"] == 1


def test_convert_default_model_and_second_process_loads_programs(tmp_path):
    """The default model (GGUF Q4_1, its tokenizer rebuilt from the file) converted with its compiled programs:
    restored on 1 device and at TP 3 with the source's weights and outputs; a second process (`jaxinfer generate
    --model OUT`) loads every program (no compile) and answers as the source does; other options say why they
    compile."""
    out = tmp_path / "converted"
    opts = {**TINY_ENGINE_OPTIONS, "kv_cache_memory": "8MiB"}
    res = child("", out, opts, [1, 3])
    runs = check_runs(res, [1, 3])
    assert runs[1]["quantization"].startswith("gguf:Q4_1") and runs[3]["quantization"].startswith("gguf:Q4_1")
    n = len(list(next((out / "programs" / "executables").iterdir()).glob("*.jxe")))
    assert runs[1]["loaded"] == n and runs[3]["loaded"] == 0  # the shipped programs, by the restoring engine itself
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    flags = ["--token-buckets", "4,16,64", "--seq-buckets", "1,4,16", "--max-num-seqs", "16", "--max-model-len", "128",
             "--page-size", "4", "--kv-cache-memory", "8MiB", "--no-compilation-cache"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

    def generate(model, *extra):
        args = [sys.executable, "-m", "jaxinfer", "generate", "The capital of France is", "--max-tokens", "12",
                "--json", *flags, *extra] + (["--model", str(model)] if model else [])
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)[0]["outputs"][0]["text"], p.stderr

    text, log = generate(out)
    assert f"loaded {n} of {n} programs saved whole" in log, log[-2000:]
    assert "tracing programs" not in log and "compiling programs" not in log
    assert text == generate(None)[0] and text.strip()
    _, log = generate(out, "--max-model-len", "96")
    assert "compiled programs do not fit this engine, compiling: engine option max_model_len: shipped 128, here 96" in log
    assert len(list(next((out / "programs" / "executables").iterdir()).glob("*.jxe"))) == n  # read only: none removed

    # converted at TP 3: the sharded programs call the native CPU kernel, whose FFI target a loading process
    # registers before it deserialises them
    out3 = tmp_path / "converted-tp3"
    p = subprocess.run([sys.executable, "-m", "jaxinfer", "convert", "", str(out3), "-tp", "3", "--quiet", *flags],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    n3 = len(list(next((out3 / "programs" / "executables").iterdir()).glob("*.jxe")))
    text3, log = generate(out3, "-tp", "3")
    assert f"loaded {n3} of {n3} programs saved whole" in log and "could not be loaded" not in log, log[-2000:]
    assert text3 == text


def test_convert_quantized_restores_sharded(tiny_llama_dir, tmp_path):
    """int8 weights quantized at conversion: restored at TP 4 (the tiny Llama's 2 kv heads copied twice, quantized
    rows and scales alike) with the weights and outputs of quantizing at load."""
    out = tmp_path / "converted"
    res = child(tiny_llama_dir[0], out, {**TINY_ENGINE_OPTIONS, "kv_cache_memory": "256KiB"}, [1, 4], "int8")
    runs = check_runs(res, [1, 4])
    assert res["quantization"].startswith("int8") and runs[4]["quantization"] == res["quantization"]


def test_convert_errors(tiny_llama_dir, tmp_path):
    """A non-empty output, another device kind, a quantization other than the converted one, a damaged manifest:
    ValueErrors naming what to change."""
    import jaxinfer
    from jaxinfer import convert

    src = str(tiny_llama_dir[0])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        convert.convert(src, str(taken), programs=False, show_progress=False)
    with pytest.raises(ValueError, match="device_kind 'TPU v5 lite'.*this machine has 'cpu'"):
        convert.convert(src, str(tmp_path / "tpu"), device_kind="TPU v5 lite", show_progress=False)
    out = tmp_path / "plain"
    convert.convert(src, str(out), programs=False, show_progress=False)
    assert not (out / "programs").exists()
    with pytest.raises(ValueError, match="quantization 'int8' does not match the converted model"):
        jaxinfer.LLM(str(out), quantization="int8", **TINY_ENGINE_OPTIONS)
    with pytest.raises(ValueError, match="load_format 'dummy'"):
        jaxinfer.LLM(str(out), load_format="dummy", **TINY_ENGINE_OPTIONS)
    m = json.loads((out / "jaxinfer.json").read_text())
    (out / "jaxinfer.json").write_text(json.dumps({**m, "format": 99}))
    with pytest.raises(ValueError, match="format 99.*convert the model again"):
        jaxinfer.LLM(str(out), **TINY_ENGINE_OPTIONS)
    with pytest.raises(ValueError, match="only gs:// is supported"):
        jaxinfer.LLM("s3://bucket/model", **TINY_ENGINE_OPTIONS)
    if importlib.util.find_spec("gcsfs") is None:  # without the gcs extra, a gs:// model names it
        with pytest.raises(ValueError, match=r"needs gcsfs; pip install 'jaxinfer\[gcs\]'"):
            jaxinfer.LLM("gs://bucket/model", **TINY_ENGINE_OPTIONS)


def test_regroup_kv_heads_round_trip():
    """kv-head copies 1 -> 4 -> 2 -> 1 keep every query head and the key / value of its group."""
    from jaxinfer.model import regroup_kv_heads

    K, G, H, D = 2, 4, 3, 5
    x = np.arange(D * K * (G + 2) * H, dtype=np.float32).reshape(D, K, G + 2, H)
    x4 = np.asarray(regroup_kv_heads(x, 1, 1, 4))
    assert x4.shape == (D, K * 4, 1 + 2, H)
    for k in range(K):
        for j in range(4):
            np.testing.assert_array_equal(x4[:, k * 4 + j, 0], x[:, k, j])  # query head k * G + j
            np.testing.assert_array_equal(x4[:, k * 4 + j, 1:], x[:, k, G:])
    x2 = np.asarray(regroup_kv_heads(x4, 1, 4, 2))
    np.testing.assert_array_equal(np.asarray(regroup_kv_heads(x2, 1, 2, 1)), x)


@pytest.mark.parametrize("family", ["qwen3-moe", "gemma3"])
def test_convert_moe_and_gemma3(family, tmp_path):
    """A mixture-of-experts model (stacked experts, a dense layer) and a Gemma 3 (local and global layers, four norms)
    converted, then restored on 1 device and at TP 2 (Qwen3-MoE also with expert parallelism) with the weights and
    tokens of a direct load."""
    from hf_models import make_hf_model

    src = tmp_path / "src"
    make_hf_model(family, src)
    opts = {**TINY_ENGINE_OPTIONS, "kv_cache_memory": "256KiB"}
    check_runs(child(src, tmp_path / "out", opts, [1, 2]), [1, 2])
    if family == "qwen3-moe":
        ep = {**opts, "enable_expert_parallel": True}
        check_runs(child(src, tmp_path / "out_ep", ep, [2]), [2])
