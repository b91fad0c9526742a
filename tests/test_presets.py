"""The engine and deployment presets (configs/engine, configs/deploy): each loads and validates by name, and the TPU
presets' step shapes (token and sequence buckets, page size, batch limits) run the whole engine with the TPU attention
kernel (interpret mode on this CPU) on a tiny Llama, greedy tokens equal to HF transformers'. Only the mesh is left
out here (tests/test_tensor_parallel.py runs the meshes); no TPU runs in CI."""

from __future__ import annotations

import json
import numpy as np
import pytest

import jaxinfer
from hf_models import hf_greedy
from jaxinfer.config import CONFIGS_DIR, EngineConfig, engine_preset

PRESETS = sorted((p.parent.name, p.stem) for folder in ("engine", "deploy") for p in (CONFIGS_DIR / folder).glob("*.json"))
STEP_SHAPE = ("token_buckets", "seq_buckets", "max_num_seqs", "max_num_batched_tokens", "page_size")


def test_every_preset_loads_by_name():
    assert {"tpu-v5e-1", "tpu-v5e-4", "tpu-v5e-8", "tpu-v5e-16", "tpu-v6e-1", "tpu-v6e-4", "tpu-v6e-8", "a3-highgpu-8g",
            "a2-highgpu-1g", "g2-standard-8"} <= {name for folder, name in PRESETS if folder == "deploy"}
    for folder, name in PRESETS:
        opts = engine_preset(name)
        assert opts == {k: v for k, v in json.loads((CONFIGS_DIR / folder / f"{name}.json").read_text()).items()
                        if not k.startswith("_")}
        ecfg = EngineConfig.from_options(**opts)
        if folder == "deploy":  # what a deployment needs to read off a preset
            raw = json.loads((CONFIGS_DIR / folder / f"{name}.json").read_text())
            assert {"_model", "_mesh", "_cache", "_status"} <= set(raw), name
            assert ecfg.tensor_parallel_size >= 1 and ecfg.max_model_len and ecfg.dtype == "bfloat16"
    with pytest.raises(ValueError, match="known presets: .*tpu-v5e-8"):
        engine_preset("tpu-v9")


TPU_SHAPES = sorted({tuple(json.dumps(engine_preset(name).get(k)) for k in STEP_SHAPE)
                     for folder, name in PRESETS if name.startswith("tpu-")})


@pytest.mark.parametrize("shape", TPU_SHAPES, ids=lambda s: f"tokens{json.loads(s[0])[-1]}-seqs{json.loads(s[1])[-1]}")
def test_tpu_presets_step_shapes_with_the_tpu_kernel(shape, tiny_llama_dir):
    d, model = tiny_llama_dir
    opts = {k: json.loads(v) for k, v in zip(STEP_SHAPE, shape)}
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    llm = jaxinfer.LLM(str(d), attention_impl="tpu", attention_interpret=True, max_model_len=128, num_pages=64,
                       show_progress=False, use_compilation_cache=False, **opts)
    assert llm.engine.ecfg.token_buckets == opts["token_buckets"] and llm.engine.ecfg.page_size == opts["page_size"]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 40, 90)]
    outs = llm.generate(prompts, jaxinfer.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, 10)
    assert llm.engine.num_compiles_since_ready == 0
