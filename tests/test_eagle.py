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


# -- through the engine ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eagle_llm(tiny_llama_dir, tmp_path_factory):
    import jaxinfer
    from conftest import TINY_ENGINE_OPTIONS

    d = tmp_path_factory.mktemp("eagle_head")
    make_eagle_head(d, {**TINY, "rope_theta": 10000.0}, own_embed=False, fc_bias=True, seed=5)
    spec = {"method": "eagle", "model": str(d), "num_speculative_tokens": 3, "disable_by_batch_size": 64}
    return jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=60, speculative_config=spec,
                        **{**TINY_ENGINE_OPTIONS, **SMALL_BUCKETS})


SMALL_BUCKETS = dict(seq_buckets=(1, 4), max_num_seqs=4)  # fewer programs to compile


def reference_drafts(target_params, tcfg, head, hcfg, tokens: list[int], k: int) -> list[int]:
    """Greedy drafts of an EAGLE head after `tokens`, from scratch: the target's features of every position but the
    last token's, the head over all (next token, feature) pairs, then k times: draw, and feed (draft, feature)."""
    from jaxinfer.model import forward, rms_norm

    a = len(tokens) - 2
    attn_t, attn_h = make_attention_fn(tcfg, "xla"), make_attention_fn(hcfg, "xla")

    def paged(cfg, T):
        kv = init_kv_cache(cfg, T // 4 + 2, 4, jnp.float32)
        pos = np.arange(T, dtype=np.int32)
        meta = AttentionMetadata(slot_mapping=pos, page_tables=np.arange(T // 4 + 2, dtype=np.int32)[None],
                                 kv_lens=np.array([T], np.int32), cu_q_lens=np.array([0, T], np.int32),
                                 num_seqs=np.array(1, np.int32))
        return kv, pos, meta

    kv, pos, meta = paged(tcfg, a + 1)
    h, _ = forward(target_params, tcfg, jnp.asarray(tokens[: a + 1]), pos, kv, meta, attn_t)
    feats = rms_norm(h, target_params.final_norm, tcfg.rms_norm_eps)  # [a + 1, D]
    nxt = list(tokens[1 : a + 2])
    drafts = []
    for _ in range(k):
        kv, pos, meta = paged(hcfg, len(nxt))
        pred, _ = eagle_forward(head, target_params, hcfg, jnp.asarray(nxt), feats, pos, kv, meta, attn_h)
        d = int(np.argmax(np.asarray(eagle_logits(target_params, pred[-1:]))[0]))
        drafts.append(d)
        nxt.append(d)
        feats = jnp.concatenate([feats, pred[-1:]])
    return drafts


def test_eagle_speculation_keeps_the_targets_tokens_and_proposes_the_heads_drafts(tiny_llm, eagle_llm, monkeypatch):
    """Greedy and seeded requests together: the same tokens as the engine without speculation, no compile after
    warm-up, pages all freed; and the drafts proposed inside the batch are the head's own greedy continuation
    computed from scratch (features of the right positions, the right next tokens), for >= 90% of them."""
    from jaxinfer import SamplingParams, compile_guard
    from test_engine import assert_all_pages_free
    from test_spec_engine import assert_same_outputs, run

    eng = eagle_llm.engine
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (9, 23, 14, 40)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=26, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]
    want, _, _ = run(tiny_llm.engine, prompts, params, arrive_every=3)
    seen = []
    propose = eng.scheduler.propose_batch

    def spy(reqs, limits):
        out = propose(reqs, limits)
        seen.extend((r.prompt_token_ids + r.output_token_ids, d) for r, d in zip(reqs, out) if r.params.greedy)
        return out

    monkeypatch.setattr(eng.scheduler, "propose_batch", spy)
    before = eng.stats()["spec_draft_tokens"]
    with compile_guard.forbid_compiles():
        got, _, _ = run(eng, prompts, params, arrive_every=3)
    assert_same_outputs(got, want)
    assert eng.stats()["spec_draft_tokens"] > before and len(seen) > 20
    head, tparams = eng.runner.draft.params, eng.runner.params
    agree = total = 0
    for tokens, drafts in seen[:: max(1, len(seen) // 8)]:  # eight of them: the reference runs op by op
        ref = reference_drafts(tparams, eng.cfg, head, eng.runner.draft.cfg, tokens, len(drafts))
        agree += sum(a == b for a, b in zip(drafts, ref))
        total += len(drafts)
    assert agree >= 0.9 * total, (agree, total)
    assert_all_pages_free(eng)


def test_eagle_head_that_predicts_the_target_gets_its_drafts_accepted(tmp_path):
    """A one-layer target whose attention adds nothing (o_proj = 0) and whose final norm is all ones: its next token
    depends on the current token alone, through embedding -> MLP -> lm_head. An EAGLE head with that layer, fc
    passing the embedding through and no attention, predicts the target's (unnormed) feature of the next token, so
    its greedy drafts are the target's tokens: almost every draft is accepted, across verify steps that accept runs
    of several (the pairs and kept features of accepted rows are the ones the next proposal reads)."""
    import safetensors.torch
    import transformers

    import jaxinfer
    from conftest import TINY_ENGINE_OPTIONS
    from jaxinfer import SamplingParams

    cfg = transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 1, "rope_theta": 10000.0})
    torch.manual_seed(7)
    target = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        target.model.layers[0].self_attn.o_proj.weight.zero_()
        target.model.layers[0].post_attention_layernorm.weight.add_(0.1 * torch.randn(cfg.hidden_size))
    target.save_pretrained(tmp_path / "target", safe_serialization=True)
    layer = {f"layers.0.{k}": v for k, v in target.model.layers[0].state_dict().items() if "input_layernorm" not in k}
    D = cfg.hidden_size
    fc = torch.cat([torch.eye(D), torch.zeros(D, D)], dim=1)  # [emb, feature] -> emb
    (tmp_path / "head").mkdir()
    safetensors.torch.save_file({**{k: v.contiguous() for k, v in layer.items()}, "fc.weight": fc},
                                str(tmp_path / "head" / "model.safetensors"))
    cfg.to_json_file(str(tmp_path / "head" / "config.json"))
    with torch.no_grad():  # the target's next token after each token
        nxt = target(torch.arange(cfg.vocab_size)[:, None]).logits[:, -1].argmax(-1).tolist()
    spec = {"method": "eagle", "model": str(tmp_path / "head"), "num_speculative_tokens": 3, "disable_by_batch_size": 8}
    llm = jaxinfer.LLM(str(tmp_path / "target"), num_pages=60, speculative_config=spec,
                       **{**TINY_ENGINE_OPTIONS, **SMALL_BUCKETS})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 12, 30)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        want = [nxt[p[-1]]]
        while len(want) < 40:
            want.append(nxt[want[-1]])
        assert o.outputs[0].token_ids == want
    s = llm.engine.stats()
    assert s["spec_draft_tokens"] > 60 and s["spec_acceptance_rate"] > 0.9, s
