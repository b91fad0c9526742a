"""Tier 2: our logits and greedy tokens against HF transformers (PyTorch, CPU, fp32)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxinfer
from jaxinfer import compile_guard
from hf_models import FAMILIES, TINY_ENGINE_OPTIONS_FOR_FAMILY, hf_greedy, make_hf_model, sequence_logits
from jaxinfer.config import ModelConfig
from jaxinfer.weights import SafetensorsSource, load_params

REL_TOL = 1e-4


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(request.param, d)
    return request.param, d, model


def test_family_logits_match_hf(family):
    name, d, model = family
    cfg = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    params = load_params(cfg, SafetensorsSource(d), "hf", jnp.float32, show_progress=False)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 40)  # longer than mistral's window (24)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    for impl in ("reference", "xla"):
        assert rel_err(sequence_logits(params, cfg, ids, impl=impl), ref) < REL_TOL, (name, impl)


def test_family_greedy_matches_hf_generate(family):
    name, d, model = family
    llm = jaxinfer.LLM(str(d), **TINY_ENGINE_OPTIONS_FOR_FAMILY)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 17, 30)]
    with compile_guard.forbid_compiles():
        outs = llm.generate(prompts, jaxinfer.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, 32), name


def test_default_model_logits_match_hf(default_llm, default_hf_model):
    eng = default_llm.engine
    ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ours = sequence_logits(eng.runner.params, eng.cfg, ids, page_size=16)
    with torch.no_grad():
        ref = default_hf_model(torch.tensor(ids)[None]).logits[0].numpy()
    assert rel_err(ours, ref) < REL_TOL


def test_default_model_greedy_matches_hf_generate(default_llm, default_hf_model):
    tok = default_llm.tokenizer
    convs = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    outs = default_llm.chat(convs, jaxinfer.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    for c, o in zip(convs, outs):
        assert o.outputs[0].token_ids == hf_greedy(default_hf_model, tok.apply_chat_template(c), 40)
    assert "Paris" in outs[0].outputs[0].text
