"""Tier 3: the engine end to end — batch invariance, seeded sampling, sampling features, page accounting,
bad input, and no compilation after warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxinfer
from conftest import DEFAULT_MODEL_OPTIONS, TINY_ENGINE_OPTIONS
from hf_models import hf_greedy
from jaxinfer import SamplingParams, compile_guard

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
]


def run_staggered(engine, prompts, params, arrive_every: int = 2) -> dict[str, list[int]]:
    """Submit prompts one by one, a new one every `arrive_every` steps, then run to completion."""
    pending = list(enumerate(prompts))
    ids, done, step = {}, {}, 0
    while pending or engine.has_unfinished():
        if pending and step % arrive_every == 0:
            i, p = pending.pop(0)
            ids[engine.add_request(p, params[i] if isinstance(params, list) else params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
    return done


def assert_all_pages_free(engine):
    """Nothing runs and nothing leaked: every page is free, or cached with no reference (evictable)."""
    s = engine.scheduler
    assert not s.running and not s.waiting
    alloc = s.allocator
    assert all(rc == 0 for rc in alloc.ref_counts)
    assert alloc.num_free == alloc.num_pages and alloc.num_evictable == alloc.num_cached
    alloc.check_invariants()
    assert sorted(s._free_slots) == list(range(engine.ecfg.max_num_seqs))


# -- batch invariance ---------------------------------------------------------------------------------------


def test_batch_invariance_default_model(default_llm):
    """Each prompt gives the same greedy tokens alone and inside a continuous batch with staggered arrivals."""
    eng = default_llm.engine
    prompts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    with compile_guard.forbid_compiles():
        alone = [default_llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        together = run_staggered(eng, prompts, GREEDY, arrive_every=3)
    for i in range(len(prompts)):
        assert together[i].outputs[0].token_ids == alone[i], QUESTIONS[i]
    assert_all_pages_free(eng)


def test_default_model_answers_chat(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert "Paris" in comp.text
    assert comp.finish_reason == "stop" and comp.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in comp.text
    assert out.metrics.ttft is not None and out.metrics.ttft > 0
    # the prompt as the model saw it (the rendered template), as vLLM reports it
    assert out.prompt.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in out.prompt
    assert default_llm.tokenizer.encode(out.prompt, add_special_tokens=False) == out.prompt_token_ids


def test_tpot_is_per_output_when_n_outputs_decode_together():
    from jaxinfer.request import RequestMetrics

    m = RequestMetrics(arrival_time=0.0, first_scheduled_time=0.0, first_token_time=1.0, finished_time=3.0,
                       num_prompt_tokens=4, num_generated_tokens=20, longest_output=5)
    assert m.tpot == pytest.approx(2.0 / 4)  # 4 steps after the first token, not 19


def test_generate_api_default_model(default_llm):
    outs = jaxinfer.generate(["The sky is", "One, two, three,"], SamplingParams(temperature=0, max_tokens=8),
                             **DEFAULT_MODEL_OPTIONS)
    assert jaxinfer.llm.shared_llm(None, **DEFAULT_MODEL_OPTIONS) is default_llm
    assert len(outs) == 2 and all(len(o.outputs[0].token_ids) <= 8 and o.outputs[0].text for o in outs)


# -- seeded sampling ------------------------------------------------------------------------------------------


def test_seed_gives_same_text_whatever_else_is_in_the_batch(default_llm):
    eng = default_llm.engine
    prompt = "Tell me a story about a dragon."
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = default_llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, seed=s, max_tokens=20, ignore_eos=True) for s in range(4)]
    mixed = run_staggered(eng, ["Hello there", "Count to ten:", prompt, "Once upon a time", "Why is the sea blue?"],
                          [others[0], others[1], seeded, others[2], others[3]], arrive_every=1)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = default_llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24,
                                                               ignore_eos=True), use_tqdm=False)[0]
    assert other_seed.outputs[0].token_ids != alone
    assert_all_pages_free(eng)


# -- sampling features through the engine ---------------------------------------------------------------------


def test_stop_strings_do_not_leak(default_llm):
    base = default_llm.generate(["The first five letters of the alphabet are"],
                                SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    out = default_llm.generate(["The first five letters of the alphabet are"],
                               SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert stop not in c.text and text.startswith(c.text) and len(c.text) == text.index(stop)
    kept = default_llm.generate(["The first five letters of the alphabet are"],
                                SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]
    # Until min_tokens the stop string is plain text (as vLLM): here the output runs to max_tokens.
    late = default_llm.generate(["The first five letters of the alphabet are"],
                                SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop],
                                               min_tokens=32), use_tqdm=False)[0].outputs[0]
    assert late.text == text and late.finish_reason == "length"
    # The stop string completed by the last token max_tokens allows: a stop, as vLLM reports it.
    ids = base.outputs[0].token_ids
    n = next(i for i in range(1, len(ids) + 1) if stop in default_llm.tokenizer.decode(ids[:i]))
    last = default_llm.generate(["The first five letters of the alphabet are"],
                                SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop=[stop]),
                                use_tqdm=False)[0].outputs[0]
    assert (last.finish_reason, last.stop_reason, last.text) == ("stop", stop, c.text)


def test_stop_token_ids_max_tokens_min_tokens(default_llm):
    prompt = default_llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    free = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] == 2
    # A stop token id taken from the free run ends the output right there.
    tok = free.token_ids[1]
    c = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tok]),
                             use_tqdm=False)[0].outputs[0]
    assert c.token_ids == free.token_ids[:2] and c.finish_reason == "stop" and c.stop_reason == tok
    # min_tokens suppresses EOS until reached.
    n = len(free.token_ids) + 5
    c = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n + 10, min_tokens=n),
                             use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) >= n and 2 not in c.token_ids[: n - 1]
    c = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) == 3 and c.finish_reason == "length"


def test_min_tokens_needs_the_full_sampler_only_when_something_can_stop(default_llm):
    """min_tokens masks the request's stop tokens; with ignore_eos and no stop_token_ids there is nothing to mask,
    so the step keeps the cheap greedy sampler (benchmarks ask for ignore_eos + min_tokens)."""
    from jaxinfer.sampler import variant_for

    eng = default_llm.engine
    for params, want in ((dict(ignore_eos=True), "greedy"), (dict(), "full"),
                         (dict(ignore_eos=True, stop_token_ids=[5]), "full")):
        rid = eng.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=8, min_tokens=4, **params))
        try:
            _, md, _, _ = eng.runner.prepare(eng.scheduler.schedule())
            assert variant_for(md) == want, params
        finally:
            eng.abort(rid)
            while eng.has_unfinished():
                eng.step()


def test_logit_bias_and_n(default_llm):
    tok = default_llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = default_llm.generate(["My favourite fruit is"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                                        logit_bias={tok: 100.0}), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [tok] * 5
    # The bias belonged to that request only: the next one on the same slot is unaffected.
    out = default_llm.generate(["My favourite fruit is"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                               use_tqdm=False)[0]
    assert out.outputs[0].token_ids != [tok] * 5
    outs = default_llm.generate(["Pick a random animal:"], SamplingParams(n=3, temperature=1.0, max_tokens=12,
                                                                         ignore_eos=True, seed=7), use_tqdm=False)[0]
    assert [c.index for c in outs.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs.outputs}) > 1


def test_logprobs_match_hf(default_llm, default_hf_model):
    prompt = default_llm.tokenizer.apply_chat_template([{"role": "user", "content": "Name a planet."}])
    out = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, logprobs=5), use_tqdm=False)[0]
    c = out.outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(default_hf_model(torch.tensor(prompt)[None]).logits[0, -1], -1).numpy()
    first = c.logprobs[0]
    top5 = np.argsort(-ref)[:5].tolist()
    assert set(first) == set(top5) | {c.token_ids[0]}
    for t, lp in first.items():
        assert abs(lp.logprob - ref[t]) < 1e-3
    assert first[c.token_ids[0]].rank == 1 and first[top5[1]].rank == 2
    # a sampled token outside the top k still gets its rank in the model's distribution (as vLLM)
    banned = {t: -100.0 for t in top5}  # logit bias steers the draw; ranks are of the raw distribution
    b = default_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=2, logit_bias=banned),
                             use_tqdm=False)[0].outputs[0]
    tok = b.token_ids[0]
    assert b.logprobs[0][tok].rank == 1 + int(np.sum(ref > ref[tok])) > 5
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids)))


# -- tiny model: HF parity under chunked prefill and preemption ---------------------------------------------


def test_chunked_prefill_matches_hf(tiny_llm, tiny_llama_dir):
    """Prompts longer than the 64-token step budget are split across steps and still match HF."""
    model = tiny_llama_dir[1]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, n).tolist() for n in (70, 100, 3)]
    outs = tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, 20)
    assert_all_pages_free(tiny_llm.engine)


def test_preemption_loses_nothing(tiny_llama_dir):
    """A pool far too small for the load: requests are preempted and recomputed, outputs stay exact. Its decode
    steps also take the decode-only row counts (decode_buckets 2 and 8 beside the seq buckets 1, 4, 16)."""
    llm = jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=34, decode_buckets=(2, 8), **TINY_ENGINE_OPTIONS)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(5, 40, 12)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=30, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.5) for i in range(len(prompts))]
    used, pick = [], llm.engine.runner.bucket_for
    llm.engine.runner.bucket_for = lambda *a, **k: used.append(pick(*a, **k)) or used[-1]
    with compile_guard.forbid_compiles():
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert {(2, 2, True), (8, 8, True)} <= set(used) and not {b for b in used if not b[2] and b[1] in (2, 8)}
    assert_all_pages_free(llm.engine)
    roomy = jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=400, **TINY_ENGINE_OPTIONS)
    ref = roomy.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert all(len(o.outputs[0].token_ids) == 30 for o in outs)


def test_abort_frees_pages_and_spares_others(tiny_llm):
    eng = tiny_llm.engine
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, 20).tolist() for _ in range(6)]
    ref = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    finals = {}
    for step in range(200):
        if step == 3:
            eng.abort(ids[1])
            eng.abort(ids[4])
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        if not eng.has_unfinished():
            break
    assert finals[ids[1]].outputs[0].finish_reason == "abort" and finals[ids[4]].outputs[0].finish_reason == "abort"
    for i in (0, 2, 3, 5):
        assert finals[ids[i]].outputs[0].token_ids == ref[i].outputs[0].token_ids
    assert_all_pages_free(eng)


# -- no compile after warm-up ---------------------------------------------------------------------------------


def test_no_compile_after_warmup_varied_workload(tiny_llm):
    eng = tiny_llm.engine
    rng = np.random.default_rng(8)
    kinds = [
        SamplingParams(temperature=0, max_tokens=5),
        SamplingParams(temperature=0.7, top_k=5, max_tokens=9, seed=1),
        SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, max_tokens=3),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=-0.5, max_tokens=7),
        SamplingParams(temperature=0.5, logit_bias={3: 5.0, 7: -100}, min_tokens=4, max_tokens=6, logprobs=3),
        SamplingParams(n=3, temperature=0.9, max_tokens=4, stop_token_ids=[11]),
        SamplingParams(temperature=0, max_tokens=2, logprobs=0, ignore_eos=True),
    ]
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(1, 110, 30)]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    with compile_guard.forbid_compiles():
        outs = run_staggered(eng, prompts, params, arrive_every=1)
    assert len(outs) == len(prompts)
    assert_all_pages_free(eng)


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, params, param_name", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1, 2, 300], SamplingParams(), "prompt"),
    ([1, -1], SamplingParams(), "prompt"),
    ([1] * 128, SamplingParams(), "prompt"),
    ([1, 2], SamplingParams(max_tokens=500), "max_tokens"),
    ([1, 2], SamplingParams(logprobs=21), "logprobs"),
    ([1, 2], SamplingParams(logit_bias={256: 1.0}), "logit_bias"),
    ([1, 2], SamplingParams(stop_token_ids=[999]), "stop_token_ids"),
    (None, SamplingParams(), "prompt"),
])
def test_bad_input_raises_value_error_naming_parameter(tiny_llm, prompt, params, param_name):
    eng = tiny_llm.engine
    with pytest.raises(ValueError, match=param_name):
        eng.add_request(prompt, params)
    assert not eng.has_unfinished()


def test_bad_priority_params_and_prompts_are_refused_and_the_engine_goes_on(tiny_llm):
    eng = tiny_llm.engine
    for priority in ("high", None, 1.5, True):
        with pytest.raises(ValueError, match="priority"):
            eng.add_request([1, 2], GREEDY, priority=priority)
    with pytest.raises(ValueError, match="params"):
        eng.add_request([1, 2], {"max_tokens": 3})
    changed = SamplingParams(max_tokens=5)
    changed.max_tokens = 0  # after construction: checked again when queued
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request([1, 2], changed)
    for prompts in (5, None, b"hi"):
        with pytest.raises(ValueError, match="prompts"):
            tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not eng.has_unfinished()
    out = tiny_llm.generate([np.int64(1), np.int64(2)], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 2
    assert_all_pages_free(eng)


def test_bad_request_in_a_batch_runs_nothing(tiny_llm):
    with pytest.raises(ValueError, match="prompt"):
        tiny_llm.generate([[1, 2, 3], [4, 5, 999]], GREEDY, use_tqdm=False)
    assert_all_pages_free(tiny_llm.engine)
    assert not tiny_llm.engine.has_unfinished()


@pytest.mark.parametrize("option,value", [
    ("max_num_seqs", 0), ("max_num_seqs", "4"), ("max_num_batched_tokens", -5), ("max_model_len", 0),
    ("num_pages", 0), ("max_logprobs", -1), ("max_logit_bias", -1), ("kv_cache_memory", "abc"), ("seed", "x"),
    ("async_scheduling", "no"), ("seq_buckets", (0, 4)), ("token_buckets", ("a",)), ("compile_threads", -1),
])
def test_bad_engine_option_values_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        jaxinfer.LLM(None, **{option: value})


def test_bad_engine_options():
    with pytest.raises(ValueError, match="max_num_seqs"):
        jaxinfer.LLM(None, max_num_seqs=0)
    with pytest.raises(ValueError, match="unknown engine option"):
        jaxinfer.LLM(None, max_num_sequences=4)


def test_huge_top_k_means_no_filter(tiny_llm):
    """top_k beyond the vocabulary (any int is valid) filters nothing and must not break the step."""
    p = [1, 2, 3, 4]
    big = tiny_llm.generate([p], SamplingParams(temperature=1.0, top_k=2**40, seed=3, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0]
    off = tiny_llm.generate([p], SamplingParams(temperature=1.0, top_k=0, seed=3, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0]
    assert big.outputs[0].token_ids == off.outputs[0].token_ids
    assert_all_pages_free(tiny_llm.engine)


def test_prompt_logprobs_match_hf_across_chunks_and_cache(tiny_llm, tiny_llama_dir):
    """prompt_logprobs: for every prompt token after the first, its logprob given the tokens before it, its
    rank and the top-k, as HF computes them; a 100-token prompt runs in two chunks (64-token budget), and the
    same prompt again (whose pages are now in the prefix cache) still computes every position."""
    model = tiny_llama_dir[1]
    prompt = np.random.default_rng(11).integers(0, 256, 100).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(prompt)[None]).logits[0].float(), -1).numpy()  # [L, V]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, ignore_eos=True)
    for _ in range(2):
        out = tiny_llm.generate([prompt, prompt[:1]], params, use_tqdm=False)
        plp = out[0].prompt_logprobs
        assert len(plp) == 100 and plp[0] is None and out[1].prompt_logprobs == [None]
        for pos in range(1, 100):
            row, tok = ref[pos - 1], prompt[pos]
            entry = plp[pos]
            assert abs(entry[tok].logprob - row[tok]) < 1e-4
            assert entry[tok].rank == 1 + int(np.sum(row > row[tok]))
            top3 = np.argsort(-row)[:3].tolist()
            assert set(entry) == set(top3) | {tok}
            for t in top3:
                assert abs(entry[t].logprob - row[t]) < 1e-4
        assert out[0].outputs[0].token_ids == hf_greedy(model, prompt, 2)
    # n = 2: one child collects them (computing the whole prompt), its sibling reads its pages from the cache
    hits = tiny_llm.engine.scheduler.prefix_cache_hits
    two = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, n=2,
                                                     ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in two.outputs] == [out[0].outputs[0].token_ids] * 2 and two.prompt_logprobs[0] is None
    for pos in range(1, 100):
        assert abs(two.prompt_logprobs[pos][prompt[pos]].logprob - plp[pos][prompt[pos]].logprob) < 1e-5
    assert tiny_llm.engine.scheduler.prefix_cache_hits > hits


def test_prompt_logprobs_above_the_cap_are_refused(tiny_llm):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        tiny_llm.generate([[1, 2, 3]], SamplingParams(prompt_logprobs=10_000), use_tqdm=False)


def test_async_stop_discards_the_extra_token_and_its_logprobs(tiny_llm):
    """With async scheduling a request that stops on a token has one more token computed (launched before
    the stop was seen); it never reaches the output, nor do its logprobs."""
    prompt = np.random.default_rng(12).integers(0, 256, 9).tolist()
    free = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    toks = free[0].outputs[0].token_ids
    stop_at = min(i for i, t in enumerate(toks) if i >= 1 and t not in toks[:i])  # well before max_tokens
    assert stop_at < 8
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[toks[stop_at]], logprobs=1)
    assert tiny_llm.engine.ecfg.async_scheduling
    out = tiny_llm.generate([prompt, prompt[:5]], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[: stop_at + 1] and out.finish_reason == "stop" and out.stop_reason == toks[stop_at]
    assert len(out.logprobs) == len(out.token_ids)


def test_a_reused_request_id_is_not_reported_from_the_old_requests_discarded_row(tiny_llm):
    """Async scheduling: the step after a token stop still computes the stopped request's next token (discarded).
    A new request reusing the id must not be reported by that step with the old row's (empty) state."""
    eng = tiny_llm.engine
    prompt = np.random.default_rng(13).integers(0, 256, 7).tolist()
    free = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    toks = free[0].outputs[0].token_ids
    stop_at = min(i for i, t in enumerate(toks) if i >= 1 and t not in toks[:i])
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[toks[stop_at]])
    eng.add_request(prompt, params, request_id="reused")
    while True:
        outs = {o.request_id: o for o in eng.step()}
        if "reused" in outs and outs["reused"].finished:
            break
    assert eng._inflight is not None  # the stopped request's extra token is still on the device
    eng.add_request(prompt, params, request_id="reused")
    assert "reused" not in {o.request_id for o in eng.step()}
    final = None
    while eng.has_unfinished():
        for o in eng.step():
            final = o if o.request_id == "reused" else final
    assert final.finished and final.outputs[0].token_ids == toks[: stop_at + 1]


def test_prompt_logprobs_program_in_blocks_equals_whole(tiny_llm):
    """The prompt-logprobs program goes through long steps in row blocks (bounded temporaries); blocks,
    including a padded last one, give what one pass over all rows gives."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.runner import make_prompt_logprobs_fn

    eng = tiny_llm.engine
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.standard_normal((10, eng.cfg.hidden_size)), eng.runner.params.embed.dtype)
    targets = jnp.asarray(rng.integers(-1, eng.cfg.vocab_size, 10), jnp.int32)
    whole = make_prompt_logprobs_fn(eng.cfg, 3, block=16)(eng.runner.params, h, targets)
    blocks = jax.jit(make_prompt_logprobs_fn(eng.cfg, 3, block=4))(eng.runner.params, h, targets)
    for a, b in zip(whole, blocks):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


SMALL = dict(token_buckets=(4, 16), seq_buckets=(1, 4), max_num_seqs=4, max_model_len=64, page_size=16,
             show_progress=False, use_compilation_cache=False)


def test_kv_cache_shrinks_when_the_step_programs_do_not_fit(tiny_llama_dir, monkeypatch):
    """If XLA's memory analysis says the largest step would not fit beside the KV cache, the engine takes the
    missing pages off the cache and compiles again (once); an explicit num_pages is refused instead."""
    from jaxinfer.engine import Engine, device_bytes

    d, model = tiny_llama_dir
    calls = []

    def shortfall(self, abstract_kv):
        calls.append(self.num_pages)
        per_page = device_bytes(abstract_kv) // self.num_pages
        return 10 * per_page - 1 if len(calls) == 1 else 0  # 10 pages short, then fits

    monkeypatch.setattr(Engine, "_memory_shortfall", shortfall)
    llm = jaxinfer.LLM(str(d), kv_cache_memory="1MiB", **SMALL)
    eng = llm.engine
    assert calls[0] > 14 and calls == [calls[0], calls[0] - 10] and eng.num_pages == calls[0] - 10
    assert eng.runner.kv.k[0].shape[0] == eng.num_pages and eng.scheduler.allocator.num_free == eng.num_pages
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(model, p, 6)
    calls.clear()
    with pytest.raises(ValueError, match="num_pages"):
        jaxinfer.LLM(str(d), num_pages=24, **SMALL)


def test_peak_step_bytes_counts_the_logits(tiny_llm):
    """The step-memory estimate covers at least the largest forward program's logits [B, V] float32."""
    run = tiny_llm.engine.runner
    assert run.peak_step_bytes() >= max(b[1] for b in run.buckets) * tiny_llm.engine.cfg.vocab_size * 4


def test_final_only_requests_report_once_when_finished(tiny_llm):
    """output_kind FINAL_ONLY: step() reports the request only in the step that finishes it (with its metrics);
    CUMULATIVE requests in the same steps are reported every step."""
    from jaxinfer import RequestOutputKind

    eng = tiny_llm.engine
    final = eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                      output_kind=RequestOutputKind.FINAL_ONLY))
    cumulative = eng.add_request([5, 6, 8], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    seen = {final: [], cumulative: []}
    while eng.has_unfinished():
        for o in eng.step():
            seen[o.request_id].append(o)
    assert len(seen[final]) == 1 and seen[final][0].finished and len(seen[final][0].outputs[0].token_ids) == 5
    m = seen[final][0].metrics
    assert m.first_token_time is not None and m.finished_time >= m.first_token_time
    assert len(seen[cumulative]) >= 5 and seen[cumulative][-1].finished
    assert [len(o.outputs[0].token_ids) for o in seen[cumulative]][-1] == 5
    # n > 1: one report with both completions; an aborted request: one report, finish_reason abort
    two = eng.add_request([5, 6, 9], SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=4, ignore_eos=True,
                                                    output_kind=RequestOutputKind.FINAL_ONLY))
    gone = eng.add_request([5, 6, 10], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                                                      output_kind=RequestOutputKind.FINAL_ONLY))
    seen = {two: [], gone: []}
    steps = 0
    while eng.has_unfinished():
        if steps == 2:
            eng.abort(gone)
        for o in eng.step():
            seen[o.request_id].append(o)
        steps += 1
    assert len(seen[two]) == 1 and [len(c.token_ids) for c in seen[two][0].outputs] == [4, 4]
    assert len(seen[gone]) == 1 and seen[gone][0].outputs[0].finish_reason == "abort"
    assert_all_pages_free(eng)
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="final")
    with pytest.raises(ValueError, match="sampling_params"):
        tiny_llm.generate([[1, 2]], {"max_tokens": 2}, use_tqdm=False)


def test_delta_outputs_add_up_to_the_cumulative_ones(default_llm):
    """output_kind DELTA (what the server streams): each output holds only what is new; joined per choice they
    are the CUMULATIVE request's final output (text, ids, logprobs, finish), prompt logprobs come once, and
    no output is empty."""
    from jaxinfer import RequestOutputKind

    eng = default_llm.engine
    short = "The first five letters of the alphabet are"
    long = "Once upon a time, there was a long story that went on and on. " * 12 + short  # > 1 step's 64 tokens
    assert len(default_llm.tokenizer.encode(long)) > 2 * 64

    def run(kind, prompt=short, **kw):
        rid = eng.add_request(prompt, SamplingParams(output_kind=kind, **kw))
        outs = []
        while eng.has_unfinished():
            outs += [o for o in eng.step() if o.request_id == rid]
        return outs

    sampled = dict(prompt=long, temperature=0.8, seed=5, n=2, max_tokens=12, ignore_eos=True, logprobs=2,
                   prompt_logprobs=1)
    cum = run(RequestOutputKind.CUMULATIVE, **sampled)[-1]
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    text = run(RequestOutputKind.CUMULATIVE, **greedy)[-1].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    stopped = run(RequestOutputKind.CUMULATIVE, stop=[stop], **greedy)[-1]
    assert stopped.outputs[0].finish_reason == "stop"
    for ref, kw in ((cum, sampled), (stopped, dict(stop=[stop], **greedy))):
        deltas = run(RequestOutputKind.DELTA, **kw)
        assert deltas[-1].finished and not any(o.finished for o in deltas[:-1]) and all(o.outputs for o in deltas)
        assert [o.prompt_logprobs is not None for o in deltas] == [ref.prompt_logprobs is not None] + [False] * (len(deltas) - 1)
        assert deltas[0].prompt_logprobs == ref.prompt_logprobs
        for c in ref.outputs:
            parts = [d for o in deltas for d in o.outputs if d.index == c.index]
            assert all(p.token_ids or p.text or p.finish_reason for p in parts)
            assert "".join(p.text for p in parts) == c.text and [t for p in parts for t in p.token_ids] == c.token_ids
            assert [p.finish_reason for p in parts][-1] == c.finish_reason and [p.finish_reason for p in parts[:-1]] == [None] * (len(parts) - 1)
            if c.logprobs is not None:
                assert [x for p in parts for x in p.logprobs] == c.logprobs
                assert parts[-1].cumulative_logprob == pytest.approx(c.cumulative_logprob)
                assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids)))
    assert_all_pages_free(eng)


def test_min_tokens_suppresses_stop_ids_beyond_one_set_row_call(tiny_llama_dir):
    """set_row takes max_logit_bias ids per call: a longer stop set goes in several calls, none of it lost."""
    d, _ = tiny_llama_dir
    llm = jaxinfer.LLM(str(d), max_logit_bias=4, **SMALL)
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    first = free.outputs[0].token_ids[0]
    stops = [t for t in range(llm.engine.cfg.vocab_size) if t != first][:9] + [first]  # `first` in the third call
    c = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=stops,
                                         min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) >= 5 and not set(c.token_ids[:4]) & set(stops)
    # The next request on that sampler row starts from a cleared row: `first` is no longer suppressed.
    c = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stops[0]],
                                         min_tokens=1), use_tqdm=False)[0].outputs[0]
    assert c.token_ids[0] == first
