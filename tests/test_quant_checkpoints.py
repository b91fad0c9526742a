"""Quantized checkpoints written by the real tools (auto-round, llm-compressor / compressed-tensors, GPTQModel,
transformers' FP8; tests/fixtures/quant, made by make_fixtures.py there): our unpacked weights equal each tool's own
float32 dequantization bit for bit, and our logits equal HF transformers' (PyTorch fp32) run on those weights."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import hf_greedy, sequence_logits
from jaxinfer import quant
from jaxinfer.config import EngineConfig
from jaxinfer.loader import describe_quantization, load_model
from jaxinfer.quant_formats import QuantFormat, QuantizedSafetensorsSource
from jaxinfer.weights import SafetensorsSource

FIXTURES = Path(__file__).parent / "fixtures" / "quant"
FOLDERS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").is_file())
IDS = [5, 17, 300, 42, 7, 7, 99, 260, 1, 128, 64, 33, 250, 12, 3, 319, 200, 150, 90, 11]


def _source(name):
    d = FIXTURES / name
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    return QuantizedSafetensorsSource(SafetensorsSource(d), QuantFormat(qc))


def test_every_format_has_a_fixture():
    methods = {json.loads((FIXTURES / n / "config.json").read_text())["quantization_config"]["quant_method"]
               for n in FOLDERS}
    assert methods == {"gptq", "awq", "auto-round", "compressed-tensors", "fp8"}
    assert len(FOLDERS) >= 18


@pytest.mark.parametrize("name", FOLDERS)
def test_unpacked_weights_equal_the_tools_dequantization(name):
    src = _source(name)
    ref = np.load(FIXTURES / name / "reference.npz")
    assert len(ref.files) == 14  # 7 linears x 2 layers, all quantized
    for key in ref.files:
        h = src.get(key)
        assert isinstance(h, quant.HostQuant), key
        np.testing.assert_array_equal(h.dequantize(), ref[key], err_msg=key)
        w = quant.to_device_form(h, (h.q.shape[1],))  # the device form (packed) dequantizes the same
        np.testing.assert_array_equal(np.asarray(quant.dequantize(w)), ref[key], err_msg=key)


def _hf_model(name):
    """HF LlamaForCausalLM (fp32) on the tool's dequantized weights; for W8A8 checkpoints each quantized linear's
    input is quantized per token first, as the format prescribes (torch's own int8 rounding / float8_e4m3fn)."""
    import torch
    import transformers

    d = FIXTURES / name
    cfg = transformers.AutoConfig.from_pretrained(FIXTURES / "base")
    model = transformers.LlamaForCausalLM(cfg).eval()
    src = SafetensorsSource(d)
    state = {k: torch.from_numpy(np.array(src.get(k), np.float32)) for k in model.state_dict() if k in src.keys()}
    state.update({k: torch.from_numpy(v) for k, v in np.load(d / "reference.npz").items()})
    model.load_state_dict(state, strict=True)
    fmt = QuantFormat(json.loads((d / "config.json").read_text())["quantization_config"])
    act, group, static = getattr(fmt, "act", None), getattr(fmt, "act_group", 0), getattr(fmt, "static", False)
    if fmt.method == "fp8":
        act, group = "fp8", 128
    if act:
        top = 127 if act == "int8" else 448

        def fake_quant(scale, module, args):
            x = args[0].to(torch.float32)
            shape = x.shape
            x = x.reshape(*shape[:-1], -1, group or shape[-1])
            if scale is None:
                amax = x.abs().amax(-1, keepdim=True)
                scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
            x = torch.clamp(x / scale, -top, top)
            x = torch.round(x) if act == "int8" else x.to(torch.float8_e4m3fn).to(torch.float32)
            return ((x * scale).reshape(shape),)

        for n, m in model.named_modules():
            if n.endswith("_proj"):
                # static scales: q/k/v (and gate/up) share one input, and take the largest of their scales
                scale = None
                if static:
                    fused = ("q_proj", "k_proj", "v_proj") if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj") else (
                        ("gate_proj", "up_proj") if n.split(".")[-1] in ("gate_proj", "up_proj") else (n.split(".")[-1],))
                    parent = n.rsplit(".", 1)[0]
                    scale = max(float(np.asarray(src.get(f"{parent}.{f}.input_scale")).max()) for f in fused)
                m.register_forward_pre_hook(functools.partial(fake_quant, scale))
    return model


@pytest.mark.parametrize("name", FOLDERS)
def test_logits_match_hf_on_the_dequantized_weights(name):
    import torch

    m = load_model(str(FIXTURES / name), EngineConfig(show_progress=False), jnp.float32)
    assert quant.is_quantized(m.params.layers[1].w_down) and not quant.is_quantized(m.params.lm_head)
    assert describe_quantization(m.params) != "none"
    ours = sequence_logits(m.params, m.cfg, IDS)
    with torch.no_grad():
        ref = _hf_model(name)(torch.tensor(IDS)[None]).logits[0].numpy()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-3, err
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3 * np.abs(ref).max()  # greedy tokens where no near-tie makes it arbitrary
    assert clear.sum() >= len(IDS) // 2
    np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("name", ["autoround_gptq_w4_sym_g32", "gptqmodel_w4_g32_actorder_v1", "llmc_w8a8_int8"])
def test_engine_greedy_matches_hf(name):
    """The engine end to end (buckets, paged cache, sampler) on a quantized checkpoint: HF's greedy tokens."""
    import jaxinfer
    from hf_models import TINY_ENGINE_OPTIONS_FOR_FAMILY

    llm = jaxinfer.LLM(str(FIXTURES / name), **TINY_ENGINE_OPTIONS_FOR_FAMILY)
    out = llm.generate([IDS[:9]], jaxinfer.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(_hf_model(name), IDS[:9], 12)


def test_unsupported_configs_name_the_field(tmp_path):
    for qc, field in [({"quant_method": "gptq", "bits": 3, "group_size": 128}, "quantization_config.bits"),
                      ({"quant_method": "squeezellm"}, "quantization_config.quant_method"),
                      ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "quantization_config.version"),
                      ({"quant_method": "fp8", "activation_scheme": "static"}, "quantization_config.activation_scheme")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            QuantFormat(qc)
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = json.loads((FIXTURES / "autoround_gptq_w4_sym_g32" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bits"):
        load_model(str(d), EngineConfig(show_progress=False), jnp.float32)
    with pytest.raises(ValueError, match="gptq checkpoint"):
        load_model(str(FIXTURES / "autoround_gptq_w4_sym_g32"), EngineConfig(quantization="int8", show_progress=False),
                   jnp.float32)


def test_none_dequantizes_a_quantized_checkpoint():
    name = "autoround_awq_w4_asym_g64"
    q = load_model(str(FIXTURES / name), EngineConfig(show_progress=False), jnp.float32)
    d = load_model(str(FIXTURES / name), EngineConfig(quantization="none", show_progress=False), jnp.float32)
    assert describe_quantization(d.params) == "none"
    assert not any(quant.is_quantized(x) for x in jax.tree_util.tree_leaves(d.params, is_leaf=quant.is_quantized))
    np.testing.assert_allclose(sequence_logits(q.params, q.cfg, IDS), sequence_logits(d.params, d.cfg, IDS),
                               rtol=1e-5, atol=1e-5)
