"""EAGLE's draft head (jaxinfer/eagle.py) against the same head written in PyTorch from HF's Llama pieces: its
features and logits over a paged cache, loading the public checkpoint layout, and clear errors for the wrong one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import TINY
from jaxinfer.attention import make_attention_fn
from jaxinfer.config import ModelConfig
from jaxinfer.eagle import eagle_forward, eagle_logits, load_eagle
from jaxinfer.model import AttentionMetadata, init_kv_cache
from jaxinfer.weights import SafetensorsSource, load_params


def make_eagle_head(path, target_cfg: dict, own_embed: bool, fc_bias: bool, seed: int = 0):
    """A random EAGLE-1 head saved in the public layout; returns the torch module computing its features:
    (token ids [T], features [T, D]) -> [T, D]. It is HF's one-layer Llama with the layer's input norm and the final
    norm taken out, fed fc([embedding, feature])."""
    import safetensors.torch
    import transformers

    cfg = transformers.LlamaConfig(**{**target_cfg, "num_hidden_layers": 1})
    cfg.torch_dtype = "float32"
    torch.manual_seed(seed)
    llama = transformers.LlamaModel(cfg).eval()
    fc = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=fc_bias)
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    llama.layers[0].input_layernorm = torch.nn.Identity()
    llama.norm = torch.nn.Identity()
    tensors = {k: v for k, v in llama.state_dict().items() if "input_layernorm" not in k and not k.startswith("norm")}
    if not own_embed:
        del tensors["embed_tokens.weight"]
    tensors.update({f"fc.{k}": v for k, v in fc.state_dict().items()})
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    cfg.to_json_file(str(path / "config.json"))

    def features(ids, feats, embed_weight):
        with torch.no_grad():
            emb = torch.nn.functional.embedding(torch.tensor(ids), embed_weight)
            x = fc(torch.cat([emb, torch.tensor(feats)], dim=-1))[None]
            return llama(inputs_embeds=x).last_hidden_state[0].numpy()

    return features, llama.embed_tokens.weight.detach()


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    d, model = tiny_llama_dir
    cfg = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
    return cfg, load_params(cfg, SafetensorsSource(d), "hf", jnp.float32, show_progress=False), model


def run_head(params, target_params, cfg, ids, feats, page_size: int = 4):
    """The head over one sequence of T positions in one step, pages shuffled (as tests/hf_models.sequence_logits)."""
    T = len(ids)
    n = -(-T // page_size)
    perm = np.random.default_rng(0).permutation(n + 3)[:n].astype(np.int32)
    kv = init_kv_cache(cfg, n + 3, page_size, jnp.float32)
    pos = np.arange(T, dtype=np.int32)
    meta = AttentionMetadata(slot_mapping=perm[pos // page_size] * page_size + pos % page_size,
                             page_tables=perm[None, :], kv_lens=np.array([T], np.int32),
                             cu_q_lens=np.array([0, T], np.int32), num_seqs=np.array(1, np.int32))
    attn = make_attention_fn(cfg, "xla")

    @jax.jit
    def f(params, target_params, ids, feats, kv, meta):
        x, kv = eagle_forward(params, target_params, cfg, ids, feats, pos, kv, meta, attn)
        return x, eagle_logits(target_params, x)

    x, logits = f(params, target_params, jnp.asarray(ids, jnp.int32), jnp.asarray(feats), kv, meta)
    return np.asarray(x), np.asarray(logits)


@pytest.mark.parametrize("own_embed,fc_bias", [(True, True), (False, False)])
def test_eagle_head_matches_torch(target, tmp_path, own_embed, fc_bias):
    tcfg, tparams, tmodel = target
    features, head_embed = make_eagle_head(tmp_path / "eagle", {**TINY, "rope_theta": 10000.0}, own_embed, fc_bias)
    cfg, params = load_eagle(str(tmp_path / "eagle"), tcfg, jnp.float32)
    assert (params.embed is not None) == own_embed and (params.fc_bias is not None) == fc_bias
    rng = np.random.default_rng(1)
    ids = rng.integers(0, tcfg.vocab_size, 21)
    feats = rng.standard_normal((21, tcfg.hidden_size)).astype(np.float32)
    embed = head_embed if own_embed else tmodel.model.embed_tokens.weight.detach()
    want = features(ids, feats, embed)
    got, logits = run_head(params, tparams, cfg, ids, feats)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    with torch.no_grad():
        want_logits = tmodel.lm_head(torch.tensor(want)).numpy()  # the target's head, no final norm
    assert np.abs(logits - want_logits).max() / np.abs(want_logits).max() < 1e-4


def test_eagle_checkpoint_errors_name_the_problem(target, tmp_path):
    tcfg = target[0]
    make_eagle_head(tmp_path / "ok", {**TINY, "rope_theta": 10000.0}, True, True)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="convert a PyTorch checkpoint"):
        load_eagle(str(tmp_path / "bin"), tcfg, jnp.float32)
    with pytest.raises(ValueError, match="no config.json"):
        load_eagle(str(tmp_path / "nothing"), tcfg, jnp.float32)
    make_eagle_head(tmp_path / "wide", {**TINY, "hidden_size": 96, "rope_theta": 10000.0}, True, False)
    with pytest.raises(ValueError, match="hidden_size 96, the target's is 64"):
        load_eagle(str(tmp_path / "wide"), tcfg, jnp.float32)
    with pytest.raises(ValueError, match="no tensor 'fc.weight'"):
        load_eagle(str(target_dir_of(tmp_path, tcfg)), tcfg, jnp.float32)


def target_dir_of(tmp_path, tcfg):
    """A plain one-layer Llama checkpoint (not an EAGLE head) of the target's width."""
    from hf_models import make_hf_model

    d = tmp_path / "plain"
    make_hf_model("llama", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    return d
