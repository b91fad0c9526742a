"""Speculative decoding with a draft model (speculative_config method "draft_model") on tiny random Llamas: the same
tokens as the target alone (greedy and seeded, beside penalties, min_tokens, n > 1, logprobs, preemption and prefix
hits); the target as its own draft accepts every draft; a draft with another vocabulary is refused; no compile after
warm-up; every page freed."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer
from conftest import TINY_ENGINE_OPTIONS
from jaxinfer import SamplingParams, compile_guard
from test_engine import assert_all_pages_free
from test_spec_engine import assert_same_outputs, ids_of, run, spec_delta


def _draft(path, k: int = 3) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k, "disable_by_batch_size": 64}


@pytest.fixture(scope="module")
def one_layer_draft(tiny_llama_dir, tmp_path_factory):
    """The tiny target's first layer (with its embeddings, final norm and head) as a 1-layer draft checkpoint: the
    same vocabulary, often the same next token, often not."""
    import transformers

    d = tmp_path_factory.mktemp("tiny_draft")
    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_llama_dir[0]), num_hidden_layers=1)
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def draft_llm(tiny_llama_dir, one_layer_draft):
    """The tiny target with the 1-layer draft, a KV pool small enough that busy batches preempt (buckets as tiny_llm's,
    so the two compute the same logits)."""
    return jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=40, speculative_config=_draft(one_layer_draft),
                        **TINY_ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def self_draft_llm(tiny_llama_dir):
    """The tiny target proposing for itself (fewer buckets: less to compile)."""
    opts = {**TINY_ENGINE_OPTIONS, "token_buckets": (4, 16), "seq_buckets": (1, 4), "max_num_seqs": 4}
    return jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=80, speculative_config=_draft(tiny_llama_dir[0]), **opts)


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(m)).tolist() for m in rng.integers(5, 24, n)]


def test_same_tokens_as_the_target_alone(tiny_llm, draft_llm, monkeypatch):
    """Staggered arrivals on a small KV pool (preemption, prefix-cache hits): greedy and seeded requests (top-k /
    top-p / min-p, logit_bias, logprobs, n = 2) speculating beside requests with penalties or min_tokens (never given
    drafts); every output is the target's alone, drafts were rejected and accepted, and the pages all come back."""
    eng = draft_llm.engine
    loops = _prompts(3, 8)
    prompts = loops + [loops[0] + loops[1][:5], loops[2]]  # the last two share a cached prefix with earlier ones
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=8, seed=1, max_tokens=36, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, seed=2, max_tokens=30, ignore_eos=True, presence_penalty=0.5,
                       frequency_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=12, stop_token_ids=[7]),
        SamplingParams(n=2, temperature=0.5, top_p=0.8, seed=3, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0, logit_bias={5: 2.0, 9: -1.0}),
        SamplingParams(temperature=0.3, seed=4, max_tokens=40, ignore_eos=True, min_p=0.1),
        SamplingParams(temperature=1.0, seed=5, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
    ]
    want, _, _ = run(tiny_llm.engine, prompts, params, arrive_every=2)
    drafted = []
    propose_batch = eng.scheduler.propose_batch

    def spy(reqs, limits):
        drafts = propose_batch(reqs, limits)
        assert [len(d) for d in drafts] == limits  # the draft model proposes as many as asked
        for r, d in zip(reqs, drafts):
            assert all(0 <= t < eng.cfg.vocab_size for t in d)
            drafted.append((r.params, len(r.output_token_ids)))
        return drafts

    monkeypatch.setattr(eng.scheduler, "propose_batch", spy)
    before = eng.stats()
    with compile_guard.forbid_compiles():
        got, _, _ = run(eng, prompts, params, arrive_every=2)
    assert_same_outputs(got, want)
    d = spec_delta(eng, before)
    assert 0 < d["spec_accepted_tokens"] < d["spec_draft_tokens"]  # some drafts kept, some replaced
    s = eng.stats()
    assert s["preemptions"] > before["preemptions"] and s["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert not [p for p, n in drafted if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty]
    assert not [(p, n) for p, n in drafted if n < p.min_tokens]
    assert any(p.min_tokens for p, n in drafted)  # ... but once past min_tokens, it speculates
    assert any(not p.greedy for p, n in drafted) and any(p.logit_bias for p, n in drafted)
    assert_all_pages_free(eng)


def test_the_target_as_its_own_draft_accepts_every_draft(tiny_llm, self_draft_llm):
    """Drafting with the target's own weights draws, at every position, the token the target draws there (greedy,
    and seeded with the same noise): every draft is accepted, which holds only if the draft cache, its positions and
    the sampling keys line up with the target's. The tokens are the target's alone."""
    eng = self_draft_llm.engine
    prompts = _prompts(7, 6)
    for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                   SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_tokens=30, ignore_eos=True)):
        want, _, _ = run(tiny_llm.engine, prompts, params)
        before = eng.stats()
        with compile_guard.forbid_compiles():
            got, _, steps = run(eng, prompts, params)
        assert ids_of(got) == ids_of(want), params
        d = spec_delta(eng, before)
        assert d["spec_draft_tokens"] > 0 and d["spec_accepted_tokens"] == d["spec_draft_tokens"], (params, d)
        assert steps < 30, params  # 1 + k tokens a step once prompts are in
    s = eng.stats()
    assert s["spec_acceptance_rate"] == 1.0 and s["spec_acceptance_per_position"] == [1.0, 1.0, 1.0]
    assert_all_pages_free(eng)


def test_the_draft_cache_holds_every_computed_position(self_draft_llm, monkeypatch):
    """The target as its own draft: at every position a request has computed, the draft cache holds the target's K/V,
    though steps whose every row carries drafts leave the draft forward out (the next proposal writes the missing
    last draft), and a row that runs without drafts right after such a step has it filled first: here a second
    request arrives, the batch passes the speculation limit, and the first decodes without drafts for a while."""
    eng = self_draft_llm.engine
    r = eng.runner
    monkeypatch.setattr(eng, "_max_spec_batch", 1)
    calls = {"forward": 0, "fill": 0}
    for name, key in (("_launch_draft", "forward"), ("_fill_drafts", "fill")):
        def counted(*a, _f=getattr(r, name), _k=key):
            calls[_k] += 1
            return _f(*a)
        monkeypatch.setattr(r, name, counted)
    a, b = _prompts(21, 2)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    (req,) = eng._groups[eng.add_request(a, params)]
    while len(req.output_token_ids) < 12:
        eng.step()
    skipped = calls["forward"]
    eng.step()  # alone, every draft accepted: this step's forward is left out
    assert calls["forward"] == skipped and req.draft_gap >= 0
    eng.add_request(b, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    eng.step()  # two running: no drafts; the first's missing draft is filled
    assert calls["fill"] == 1
    while len(req.output_token_ids) < 40:
        eng.step()

    def rows(kv, n):  # [n, L, K, H] keys and values of the request's first n positions
        S = r.page_size
        idx = [(req.pages[p // S], p % S) for p in range(n)]
        return [np.stack([np.asarray(layer[pg, :, off]) for pg, off in idx]) for layer in kv.k + kv.v]

    n = req.num_computed_tokens  # the last step left its forward out: its last draft waits for the next proposal
    assert req.draft_gap == n - 1
    for want, got in zip(rows(r.kv, n - 1), rows(r.draft.kv, n - 1)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    while eng.has_unfinished():
        eng.step()
    assert_all_pages_free(eng)


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama_dir, tmp_path):
    import transformers
    from hf_models import TINY

    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 300, "num_hidden_layers": 1})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(ValueError, match="speculative_config.model.*vocabulary of 300"):
        jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=40, speculative_config=_draft(tmp_path / "other"),
                     **TINY_ENGINE_OPTIONS)
    with pytest.raises(FileNotFoundError, match="speculative_config.model"):
        jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=40, speculative_config=_draft(tmp_path / "missing"),
                     **TINY_ENGINE_OPTIONS)
