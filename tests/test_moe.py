"""Mixture-of-experts layers (Qwen3-MoE, Mixtral): the sorted grouped-matmul MLP against a per-token loop over its
experts, quantized experts, batch invariance (a token's routing and output never depend on its batch mates) and
the page accounting of an MoE engine; the parameter counts of the new model presets (MoE and Gemma 3). Logits and greedy tokens against HF transformers are in test_model_hf.py
(families "qwen3-moe" and "mixtral"); tensor parallelism on 8 host devices in test_tensor_parallel.py."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import compile_guard, model, quant
from jaxinfer.config import ModelConfig
from jaxinfer.model import LayerParams, moe_mlp, param_specs, route
from jaxinfer.weights import SafetensorsSource, load_params
from hf_models import TINY_ENGINE_OPTIONS_FOR_FAMILY, make_hf_model, sequence_logits
from test_engine import assert_all_pages_free, run_staggered

CFG = ModelConfig(arch="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=16, max_position_embeddings=128, num_experts=6, num_experts_per_tok=2,
                  moe_intermediate_size=24, norm_topk_prob=False)


def random_layer(cfg, seed=0) -> LayerParams:
    spec = param_specs(cfg).layers[0]
    rng = np.random.default_rng(seed)
    make = lambda s: None if s is None else jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32)  # noqa: E731
    return jax.tree_util.tree_map(make, spec, is_leaf=lambda x: x is None or hasattr(x, "contract"))


def loop_reference(lp: LayerParams, cfg, h: np.ndarray) -> np.ndarray:
    """The MLP as HF writes it: each token through each of its top-k experts, one at a time, in float64."""
    h64 = np.asarray(h, np.float64)
    logits = h64 @ np.asarray(lp.router, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(h64)
    gu_all, down_all = np.asarray(lp.experts_gate_up, np.float64), np.asarray(lp.experts_down, np.float64)
    for t in range(h.shape[0]):
        top = np.argsort(-p[t], kind="stable")[:cfg.num_experts_per_tok]
        w = p[t, top] / (p[t, top].sum() if cfg.norm_topk_prob else 1.0)
        for e, we in zip(top, w):
            gu = np.einsum("d,dcf->cf", h64[t], gu_all[e])
            act = gu[0] / (1 + np.exp(-gu[0])) * gu[1]
            out[t] += we * (act @ down_all[e])
    return out


@pytest.fixture(params=["grouped", "gathered"])
def moe_form(request, monkeypatch):
    """Both forms of the MoE MLP on a CPU: the sorted grouped matmul, and the per-token gather of few-token steps."""
    monkeypatch.setattr(model, "MOE_GATHER_MAX_PAIRS_PER_EXPERT",
                        {jax.default_backend(): 0 if request.param == "grouped" else 1000})
    return request.param


@pytest.mark.parametrize("normalize", [False, True])
def test_moe_mlp_matches_a_loop_over_experts(normalize, moe_form):
    cfg = dataclasses.replace(CFG, norm_topk_prob=normalize)
    lp = random_layer(cfg)
    h = np.random.default_rng(1).normal(size=(37, cfg.hidden_size)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda lp, h: moe_mlp(lp, cfg, h))(lp, h))
    ref = loop_reference(lp, cfg, h)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_route_picks_the_top_k_and_normalises():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0], [5.0, 5.0, -1.0, 0.0]])
    w, e = route(logits, 2, normalize=True)
    assert e.tolist() == [[1, 3], [0, 1]]  # a tie goes to the lower expert id
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    w2, _ = route(logits, 2, normalize=False)
    p = np.asarray(jax.nn.softmax(logits, -1))
    np.testing.assert_allclose(np.asarray(w2), np.take_along_axis(p, np.asarray(e), -1), rtol=1e-6)


def test_quantized_experts_match_their_dequantized_weights(moe_form):
    """int8 and int4 expert stacks (as on-the-fly quantization leaves them) give the MLP of their dequantized
    weights: quantized experts plug in through the same grouped matmul."""
    lp = random_layer(CFG, seed=2)
    h = np.random.default_rng(3).normal(size=(19, CFG.hidden_size)).astype(np.float32)
    specs = param_specs(CFG).layers[0]
    for quantize in (quant.quantize_int8, quant.quantize_int4):
        leaves = {}
        for name in ("experts_gate_up", "experts_down"):
            spec = getattr(specs, name)
            dense = np.moveaxis(np.asarray(getattr(lp, name)), 1, -1)  # [E, *out, I]
            hq = quantize(dense.reshape(-1, dense.shape[-1]))
            hq = dataclasses.replace(hq, **{k: getattr(hq, k).reshape(*dense.shape[:-1], -1)
                                            for k in ("q", "scales", "zeros") if getattr(hq, k) is not None})
            leaves[name] = quant.to_device_form(hq, (spec.shape[1],))
        qlp = dataclasses.replace(lp, **leaves)
        deq = dataclasses.replace(lp, **{k: jnp.moveaxis(quant.dequantize(w), -1, 1) for k, w in leaves.items()})
        got = np.asarray(moe_mlp(qlp, CFG, jnp.asarray(h)))
        want = np.asarray(moe_mlp(deq, CFG, jnp.asarray(h)))
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, quantize.__name__
        assert np.abs(want - loop_reference(deq, CFG, h)).max() / np.abs(want).max() < 1e-5
        assert np.abs(want - loop_reference(lp, CFG, h)).max() > 0  # the weights did change


@pytest.fixture(scope="module")
def moe_llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3moe")
    make_hf_model("qwen3-moe", d)
    return d, jaxinfer.LLM(str(d), **TINY_ENGINE_OPTIONS_FOR_FAMILY)


def test_moe_batch_invariance(moe_llm):
    """Each prompt gives the same greedy tokens alone and inside a continuous batch with staggered arrivals (its
    routing never depends on its batch mates); every page comes back."""
    _, llm = moe_llm
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 11, 26, 40)]
    greedy = jaxinfer.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with compile_guard.forbid_compiles():
        alone = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        together = run_staggered(llm.engine, prompts, greedy, arrive_every=2)
    for i in range(len(prompts)):
        assert together[i].outputs[0].token_ids == alone[i]
    assert_all_pages_free(llm.engine)


def test_moe_on_the_fly_int8_close_to_float(moe_llm):
    """int8 weights for the experts (the router stays float): logits within int8's error of the float model's."""
    d, _ = moe_llm
    cfg = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    src = SafetensorsSource(d)
    f32 = load_params(cfg, src, "hf", jnp.float32, show_progress=False)
    q8 = load_params(cfg, src, "hf", jnp.float32, show_progress=False, quantization="int8")
    moe = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    assert quant.is_quantized(q8.layers[moe].experts_gate_up) and not quant.is_quantized(q8.layers[moe].router)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, 24)
    a, b = sequence_logits(f32, cfg, ids), sequence_logits(q8, cfg, ids)
    assert np.abs(a - b).max() / np.abs(a).max() < 0.03


def test_expert_parallel_config_and_errors():
    from jaxinfer.model import tensor_parallel_config

    ep = tensor_parallel_config(dataclasses.replace(CFG, num_heads=4, num_kv_heads=2), 2, expert_parallel=True)
    assert ep.expert_parallel and param_specs(ep).layers[0].experts_down.axes == ("expert", None, "embed")
    tp = tensor_parallel_config(dataclasses.replace(CFG, num_heads=4, num_kv_heads=2), 2)
    assert not tp.expert_parallel and param_specs(tp).layers[0].experts_down.axes == (None, "moe_mlp", "embed")
    with pytest.raises(ValueError, match=r"num_experts \(6\) with expert parallelism"):
        tensor_parallel_config(dataclasses.replace(CFG, num_heads=4), 4, expert_parallel=True)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(24\)"):
        tensor_parallel_config(dataclasses.replace(CFG, num_heads=16, num_kv_heads=16), 16)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        dataclasses.replace(CFG, num_experts_per_tok=7)


@pytest.mark.parametrize("preset, total, active", [("qwen3-30b-a3b", 30.5e9, 3.35e9), ("mixtral-8x7b", 46.7e9, 12.9e9),
                                                   ("gemma-3-1b", 1.0e9, 1.0e9), ("gemma-3-4b", 3.88e9, 3.88e9),
                                                   ("gemma-3-27b", 27.0e9, 27.0e9)])
def test_new_presets_have_the_published_sizes(preset, total, active):
    """The dummy-weight presets' parameter counts, all and active per token, as published for those models (Gemma 3
    4B and 27B: their text decoders)."""
    import math

    from jaxinfer.model import is_spec

    cfg = ModelConfig.from_preset(preset)
    specs = param_specs(cfg)
    n = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(specs, is_leaf=is_spec))
    experts = sum(math.prod(s.shape) for lp in specs.layers for s in (lp.experts_gate_up, lp.experts_down) if s)
    assert abs(n / total - 1) < 0.01
    share = cfg.num_experts_per_tok / cfg.num_experts if cfg.num_experts else 1.0
    assert abs((n - experts + experts * share) / active - 1) < 0.01


def test_gather_form_is_bounded_by_pairs_and_bytes(monkeypatch):
    """The per-token gather is taken for few (token, expert) pairs per expert only, and never for a copy of the
    gathered experts larger than MOE_GATHER_MAX_BYTES (a large model's experts on a CPU)."""
    monkeypatch.setattr(model, "MOE_GATHER_MAX_PAIRS_PER_EXPERT", {jax.default_backend(): 2})
    assert model._gathers_experts(8, 2, 8, 1000)  # 16 pairs, 2 per expert
    assert not model._gathers_experts(9, 2, 8, 1000)  # 18 pairs
    assert not model._gathers_experts(1, 8, 128, model.MOE_GATHER_MAX_BYTES // 4)  # 8 experts' copy: twice the cap
    assert model._gathers_experts(1, 8, 128, model.MOE_GATHER_MAX_BYTES // 8)
