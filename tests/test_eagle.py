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


def speculate_and_check(tiny_llm, eng, monkeypatch, prompts, params, arrive_every: int, reference) -> list:
    """Run prompts / params (arriving every `arrive_every` steps) on the speculating engine `eng` and on `tiny_llm`'s
    plain one: the same outputs, no compile after warm-up, drafts proposed, pages all freed; and the drafts proposed
    inside the batch to greedy requests equal `reference(tokens, n)` (the head's greedy continuation from scratch)
    for >= 90% of them (eight of them checked: the references run op by op). Returns (tokens, drafts) seen."""
    from jaxinfer import compile_guard
    from test_engine import assert_all_pages_free
    from test_spec_engine import assert_same_outputs, run

    want, _, _ = run(tiny_llm.engine, prompts, params, arrive_every=arrive_every)
    seen = []
    propose = eng.scheduler.propose_batch

    def spy(reqs, limits):
        out = propose(reqs, limits)
        seen.extend((r.prompt_token_ids + r.output_token_ids, d) for r, d in zip(reqs, out) if r.params.greedy)
        return out

    monkeypatch.setattr(eng.scheduler, "propose_batch", spy)
    before = eng.stats()["spec_draft_tokens"]
    with compile_guard.forbid_compiles():
        got, _, _ = run(eng, prompts, params, arrive_every=arrive_every)
    assert_same_outputs(got, want)
    assert eng.stats()["spec_draft_tokens"] > before and len(seen) > 20
    agree = total = 0
    for tokens, drafts in seen[:: max(1, len(seen) // 8)]:
        ref = reference(tokens, len(drafts))
        agree += sum(a == b for a, b in zip(drafts, ref))
        total += len(drafts)
    assert agree >= 0.9 * total, (agree, total)
    assert_all_pages_free(eng)
    return seen


def test_eagle_speculation_keeps_the_targets_tokens_and_proposes_the_heads_drafts(tiny_llm, eagle_llm, monkeypatch):
    """Greedy and seeded requests together: the same tokens as the engine without speculation, no compile after
    warm-up, pages all freed; and the drafts proposed inside the batch are the head's own greedy continuation
    computed from scratch (features of the right positions, the right next tokens), for >= 90% of them."""
    from jaxinfer import SamplingParams

    eng = eagle_llm.engine
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (9, 23, 14, 40)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=26, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]
    d = eng.runner.draft
    speculate_and_check(tiny_llm, eng, monkeypatch, prompts, params, 3,
                        lambda tokens, n: reference_drafts(eng.runner.params, eng.cfg, d.params, d.cfg, tokens, n))


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


# -- EAGLE-3 -----------------------------------------------------------------------------------------------------


def make_eagle3_head(path, target_cfg: dict, aux_ids, draft_vocab: int | None = None, own_embed: bool = False,
                     norm_before_residual: bool = False, prefix: str = "midlayer.", seed: int = 0):
    """A random EAGLE-3 head saved in the public layout; returns (torch function (token ids [T], the target's three
    hidden states [T, 3D] or, fused=True, the head's own input [T, D], embedding weight) -> (output [T, D], logits
    over the target's vocabulary [T, V], -inf outside the draft vocabulary), the fc weight). Written from the
    EAGLE-3 definition with HF's rotary embedding, independent of jaxinfer's layers."""
    import safetensors.torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(**{**target_cfg, "num_hidden_layers": 1})
    D, N, K, F, V = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size
    H = D // N
    Vd = draft_vocab or V
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape, s=0.1: (s * torch.randn(*shape, generator=g)).float()  # noqa: E731
    t = {"fc.weight": w(D, 3 * D), "norm.weight": 1 + w(D), "lm_head.weight": w(Vd, D, s=0.3)}
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        t[f"{prefix}{n}.weight"] = 1 + w(D)
    for n, (o, i) in {"self_attn.q_proj": (N * H, 2 * D), "self_attn.k_proj": (K * H, 2 * D),
                      "self_attn.v_proj": (K * H, 2 * D), "self_attn.o_proj": (D, N * H), "mlp.gate_proj": (F, D),
                      "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}.items():
        t[f"{prefix}{n}.weight"] = w(o, i, s=0.3)
    ids = torch.arange(V)
    if Vd != V:
        ids = torch.sort(torch.randperm(V, generator=g)[:Vd]).values
        t["d2t"] = (ids - torch.arange(Vd)).long()
        t["t2d"] = torch.zeros(V, dtype=torch.bool).index_fill(0, ids, True)
    if own_embed:
        t["embed_tokens.weight"] = w(V, D, s=1.0)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(t, str(path / "model.safetensors"))
    conf = {**cfg.to_dict(), "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": Vd,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_ids)}}
    if norm_before_residual:
        conf["norm_before_residual"] = True
    (path / "config.json").write_text(json.dumps(conf))
    rope = LlamaRotaryEmbedding(cfg)
    eps = cfg.rms_norm_eps

    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * t[name]

    def head(tokens, hidden, embed_weight, fused: bool = False):
        with torch.no_grad():
            T = len(tokens)
            hidden = torch.tensor(hidden)
            h = hidden if fused else hidden @ t["fc.weight"].T
            e = torch.nn.functional.embedding(torch.tensor(tokens), t.get("embed_tokens.weight", embed_weight))
            gn = rms(h, f"{prefix}hidden_norm.weight")
            x = torch.cat([rms(e, f"{prefix}input_layernorm.weight"), gn], dim=-1)
            q, k, v = (x @ t[f"{prefix}self_attn.{n}_proj.weight"].T for n in "qkv")
            q, k, v = q.view(1, T, N, H).transpose(1, 2), k.view(1, T, K, H).transpose(1, 2), v.view(1, T, K, H).transpose(1, 2)
            cos, sin = rope(v, torch.arange(T)[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            y = (gn if norm_before_residual else h) + o.transpose(1, 2).reshape(T, N * H) @ t[f"{prefix}self_attn.o_proj.weight"].T
            m = rms(y, f"{prefix}post_attention_layernorm.weight")
            m = (torch.nn.functional.silu(m @ t[f"{prefix}mlp.gate_proj.weight"].T) * (m @ t[f"{prefix}mlp.up_proj.weight"].T))
            out = y + m @ t[f"{prefix}mlp.down_proj.weight"].T
            logits = torch.full((T, V), -torch.inf)
            logits[:, ids] = rms(out, "norm.weight") @ t["lm_head.weight"].T
            return out.numpy(), logits.numpy()

    return head


def run_head3(params, target_params, cfg, spec, ids, hidden, vocab_size: int, fuse: bool, page_size: int = 4):
    """The EAGLE-3 head over one sequence of T positions in one step, pages shuffled (as run_head)."""
    from jaxinfer.eagle import eagle3_forward, eagle3_fuse, eagle3_logits

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
    def f(params, target_params, ids, hidden, kv, meta):
        h = eagle3_fuse(params, hidden) if fuse else hidden
        x, kv = eagle3_forward(params, target_params, cfg, spec, ids, h, pos, kv, meta, attn)
        return x, eagle3_logits(params, cfg, vocab_size, x)

    x, logits = f(params, target_params, jnp.asarray(ids, jnp.int32), jnp.asarray(hidden), kv, meta)
    return np.asarray(x), np.asarray(logits)


@pytest.mark.parametrize("draft_vocab,own_embed,norm_before_residual,prefix",
                         [(None, False, False, "midlayer."), (200, True, True, "layers.0.")])
def test_eagle3_head_matches_torch(target, tmp_path, draft_vocab, own_embed, norm_before_residual, prefix):
    """Its output and logits (draft vocabulary mapped through d2t, -inf elsewhere) from the target's three hidden
    states (fc fused), and from its own output fed back (no fc), against the torch definition."""
    from jaxinfer.eagle import load_eagle3

    tcfg, tparams, tmodel = target
    head = make_eagle3_head(tmp_path / "e3", {**TINY, "rope_theta": 10000.0}, (1, 0, 1), draft_vocab, own_embed,
                            norm_before_residual, prefix)
    cfg, params, spec = load_eagle3(str(tmp_path / "e3"), tcfg, jnp.float32)
    assert spec.aux_layers == (1, 0, 1) and spec.norm_before_residual == norm_before_residual
    assert (params.embed is not None) == own_embed and (params.token_ids is not None) == bool(draft_vocab)
    embed = tmodel.model.embed_tokens.weight.detach()
    rng = np.random.default_rng(2)
    ids = rng.integers(0, tcfg.vocab_size, 19)
    for fused, width in ((False, 3), (True, 1)):
        hidden = rng.standard_normal((19, width * tcfg.hidden_size)).astype(np.float32)
        want, want_logits = head(ids, hidden, embed, fused=fused)
        got, logits = run_head3(params, tparams, cfg, spec, ids, hidden, tcfg.vocab_size, fuse=not fused)
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        finite = np.isfinite(want_logits)
        assert (np.isfinite(logits) == finite).all() and finite.sum() == 19 * (draft_vocab or tcfg.vocab_size)
        assert np.abs(logits[finite] - want_logits[finite]).max() / np.abs(want_logits[finite]).max() < 1e-4


def test_forward_returns_the_residual_stream_entering_the_asked_layers(target):
    """model.forward's aux_layers: the input of layer i is HF's hidden_states[i] (the embedding for i = 0)."""
    from jaxinfer.model import forward

    tcfg, tparams, tmodel = target
    ids = np.random.default_rng(3).integers(0, tcfg.vocab_size, 11)
    T = len(ids)
    kv = init_kv_cache(tcfg, 4, 4, jnp.float32)
    pos = np.arange(T, dtype=np.int32)
    meta = AttentionMetadata(slot_mapping=pos, page_tables=np.arange(4, dtype=np.int32)[None],
                             kv_lens=np.array([T], np.int32), cu_q_lens=np.array([0, T], np.int32),
                             num_seqs=np.array(1, np.int32))
    h, _, aux = forward(tparams, tcfg, jnp.asarray(ids), pos, kv, meta, make_attention_fn(tcfg, "xla"), (1, 0, 1))
    with torch.no_grad():
        hs = tmodel(torch.tensor(ids)[None], output_hidden_states=True).hidden_states
    want = np.concatenate([hs[1][0].numpy(), hs[0][0].numpy(), hs[1][0].numpy()], axis=-1)
    assert aux.shape == (T, 3 * tcfg.hidden_size)
    assert np.abs(np.asarray(aux) - want).max() / np.abs(want).max() < 1e-4


def test_eagle3_checkpoint_errors_name_the_problem(target, tmp_path):
    from jaxinfer.eagle import load_eagle3

    tcfg = target[0]
    make_eagle3_head(tmp_path / "e3", {**TINY, "rope_theta": 10000.0}, (1, 0, 1), 200)
    make_eagle_head(tmp_path / "e1", {**TINY, "rope_theta": 10000.0}, True, True)
    with pytest.raises(ValueError, match="an EAGLE-3 head's layout; give it speculative_config method 'eagle3'"):
        load_eagle(str(tmp_path / "e3"), tcfg, jnp.float32)
    with pytest.raises(ValueError, match="an EAGLE-1 head's layout; give it speculative_config method 'eagle'"):
        load_eagle3(str(tmp_path / "e1"), tcfg, jnp.float32)
    conf = json.loads((tmp_path / "e3" / "config.json").read_text())
    conf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 2]
    (tmp_path / "e3" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"reads the target's layers \(0, 1, 2\); an EAGLE-3 head reads three of its 2"):
        load_eagle3(str(tmp_path / "e3"), tcfg, jnp.float32)
    del conf["eagle_config"]  # the default, (2, L // 2, L - 3), does not fit a 2-layer target either
    (tmp_path / "e3" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"layers \(2, 1, -1\)"):
        load_eagle3(str(tmp_path / "e3"), tcfg, jnp.float32)


@pytest.fixture(scope="module")
def eagle3_llm(tiny_llama_dir, tmp_path_factory):
    import jaxinfer
    from conftest import TINY_ENGINE_OPTIONS

    d = tmp_path_factory.mktemp("eagle3_head")
    make_eagle3_head(d, {**TINY, "rope_theta": 10000.0}, (1, 0, 1), draft_vocab=200, seed=5)
    spec = {"method": "eagle3", "model": str(d), "num_speculative_tokens": 3, "disable_by_batch_size": 64}
    return jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=60, speculative_config=spec,
                        **{**TINY_ENGINE_OPTIONS, **SMALL_BUCKETS})


def reference_drafts3(target_params, tcfg, head, hcfg, spec, tokens: list[int], k: int) -> list[int]:
    """Greedy drafts of an EAGLE-3 head after `tokens`, from scratch (as reference_drafts): the target's three hidden
    states of every position but the last token's, fused, the head over all (next token, feature) pairs, then k
    times: draw from the head's own vocabulary, and feed (draft, the head's output)."""
    from jaxinfer.eagle import eagle3_forward, eagle3_fuse, eagle3_logits
    from jaxinfer.model import forward

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
    _, _, aux = forward(target_params, tcfg, jnp.asarray(tokens[: a + 1]), pos, kv, meta, attn_t, spec.aux_layers)
    feats = eagle3_fuse(head, aux)  # [a + 1, D]
    nxt = list(tokens[1 : a + 2])
    drafts = []
    for _ in range(k):
        kv, pos, meta = paged(hcfg, len(nxt))
        out, _ = eagle3_forward(head, target_params, hcfg, spec, jnp.asarray(nxt), feats, pos, kv, meta, attn_h)
        d = int(np.argmax(np.asarray(eagle3_logits(head, hcfg, tcfg.vocab_size, out[-1:]))[0]))
        drafts.append(d)
        nxt.append(d)
        feats = jnp.concatenate([feats, out[-1:]])
    return drafts


def test_eagle3_speculation_keeps_the_targets_tokens_and_proposes_the_heads_drafts(tiny_llm, eagle3_llm, monkeypatch):
    """As the EAGLE-1 test: the same tokens as without speculation (greedy and seeded), no compile after warm-up,
    pages freed, and the drafts proposed inside the batch are the head's greedy continuation from scratch (the
    target's hidden states of the configured layers, the draft vocabulary mapped), for >= 90% of them."""
    from jaxinfer import SamplingParams

    eng = eagle3_llm.engine
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (11, 25, 7, 33)]
    params = [SamplingParams(temperature=0, max_tokens=28, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=22, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=20, seed=8, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=26, ignore_eos=True)]
    d = eng.runner.draft
    seen = speculate_and_check(tiny_llm, eng, monkeypatch, prompts, params, 2, lambda tokens, n: reference_drafts3(
        eng.runner.params, eng.cfg, d.params, d.cfg, d.eagle3, tokens, n))
    allowed = set(np.asarray(d.params.token_ids).tolist())
    assert all(t in allowed for _, drafts in seen for t in drafts)  # drafts come from the draft vocabulary
