"""8-bit KV caches (fp8 e4m3, int8) with per-layer, per-kv-head scales: the model's logits read back from them, the
engine's page count, and prefix-cache reuse of 8-bit pages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from hf_models import sequence_logits
from jaxinfer.config import EngineConfig
from jaxinfer.loader import load_model
from jaxinfer.model import kv_absmax, kv_cache_scales

IDS = list(np.random.default_rng(3).integers(0, 256, 48))

# Tolerances (relative to the logits' max magnitude): e4m3 keeps 3 mantissa bits, so each key and value is off by
# up to 2^-4 relative (the tiny model shows ~2%); int8 with 1.5x headroom by up to 1.5 / 254 of its channel's
# largest value. The bounds are about 2x what two layers of the tiny model show.
TOL = {"fp8": 0.05, "int8": 0.02}


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_logits_from_an_8bit_cache(tiny_llama_dir, kv):
    m = load_model(str(tiny_llama_dir[0]), EngineConfig(show_progress=False), jnp.float32)
    dtype = jnp.int8 if kv == "int8" else jnp.float8_e4m3fn
    scales = kv_cache_scales(m.params, m.cfg, dtype, IDS)
    k_max, v_max = (np.asarray(a) for a in kv_absmax(m.params, m.cfg, jnp.asarray(IDS, jnp.int32)))
    assert scales[0].shape == k_max.shape == (m.cfg.num_layers, m.cfg.num_kv_heads, m.cfg.head_dim)
    if kv == "int8":  # the largest value of each channel sits 1.5x inside the int8 range
        np.testing.assert_allclose(scales[0] * 127 / 1.5, np.maximum(k_max, 1e-3 * k_max.max(-1, keepdims=True)),
                                   rtol=1e-6)
    ref = sequence_logits(m.params, m.cfg, IDS)
    for impl in ("reference", "xla"):
        got = sequence_logits(m.params, m.cfg, IDS, impl=impl, kv_dtype=dtype, kv_scales=scales)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert 0 < err < TOL[kv], (impl, err)
    # scales of 1 (the fp8 default) for int8: the tiny model's keys and values, far below 1, round to 0 or +-1
    if kv == "int8":
        ones = (np.ones_like(scales[0]), np.ones_like(scales[1]))
        got = sequence_logits(m.params, m.cfg, IDS, kv_dtype=dtype, kv_scales=ones)
        assert np.abs(got - ref).max() / np.abs(ref).max() > 10 * TOL[kv]


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_engine_with_an_8bit_cache(tiny_llama_dir, kv):
    """Twice the pages in the same memory; greedy tokens as the float cache's for a while; a prompt served again
    from its cached 8-bit pages gives the same tokens as the first time."""
    opts = dict(token_buckets=(4, 32), seq_buckets=(1, 4), max_num_seqs=4, max_model_len=96, page_size=8,
                kv_cache_memory="256KiB", show_progress=False, use_compilation_cache=False)
    base = jaxinfer.LLM(str(tiny_llama_dir[0]), **opts)
    llm = jaxinfer.LLM(str(tiny_llama_dir[0]), kv_cache_dtype=kv, **opts)
    assert llm.engine.num_pages >= 4 * base.engine.num_pages - 1  # float32 -> 8 bit: 4x (2x from bf16)
    assert llm.engine.kv_scales is not None
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = IDS[:40]
    first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    hits = llm.engine.scheduler.prefix_cache_hits
    again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.scheduler.prefix_cache_hits > hits
    assert again == first
    want = base.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert first[:4] == want[:4]


def test_bad_kv_cache_dtype_names_the_parameter():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")


def test_preemption_with_an_8bit_cache_loses_nothing(tiny_llama_dir):
    """A pool far too small for the load, int8 cache: requests are preempted, their 8-bit pages recomputed, and the
    tokens are those of a pool that never preempts."""
    from conftest import TINY_ENGINE_OPTIONS
    from test_engine import assert_all_pages_free

    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(5, 40, 8)]
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    small = jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=34, kv_cache_dtype="int8", **TINY_ENGINE_OPTIONS)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert_all_pages_free(small.engine)
    roomy = jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=400, kv_cache_dtype="int8", **TINY_ENGINE_OPTIONS)
    ref = roomy.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
