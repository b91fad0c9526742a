"""Speculative decoding (n-gram) through the engine: the same tokens as without it, greedy and seeded, with stops,
max_tokens, logprobs, streaming, n > 1, penalties beside it, preemption and the prefix cache; no compile after
warm-up; every page freed."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

import jaxinfer
from conftest import DEFAULT_MODEL_OPTIONS, TINY_ENGINE_OPTIONS
from jaxinfer import RequestOutputKind, SamplingParams, compile_guard
from test_engine import assert_all_pages_free

# drafts at every batch size here (the CPU's default turns them off past one running request)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
         "disable_by_batch_size": 64}

COPY_TEXT = ("Fix the typos in this paragraph and repeat it: The quick brown fox jumpd over the lazy dog. The dog was "
             "not amused, and it barkd at the fox for a long tyme. Then the fox ran away into the forrest.")


@pytest.fixture(scope="module")
def spec_llm():
    """The default model with n-gram speculation (fewer sequence buckets than default_llm: less to compile)."""
    return jaxinfer.LLM(None, **{**DEFAULT_MODEL_OPTIONS, "max_num_seqs": 4, "seq_buckets": (1, 4),
                                 "speculative_config": NGRAM})


@pytest.fixture(scope="module")
def tiny_spec_llm(tiny_llama_dir):
    """The tiny random model with speculation and a KV pool small enough that busy batches preempt."""
    return jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=40, speculative_config=NGRAM, **TINY_ENGINE_OPTIONS)


def run(engine, prompts, params, kind=RequestOutputKind.FINAL_ONLY, arrive_every: int = 0):
    """Submit the prompts (all at once, or one every `arrive_every` steps), step to the end. Returns (the final
    output per prompt, every output per prompt, steps)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    pending, ids, outs, steps = list(range(len(prompts))), {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and (not arrive_every or steps % arrive_every == 0):
            i = pending.pop(0)
            ids[engine.add_request(prompts[i], dataclasses.replace(params[i], output_kind=kind))] = i
            if arrive_every:
                break
        for o in engine.step():
            outs.setdefault(ids[o.request_id], []).append(o)
        steps += 1
    return [outs[i][-1] for i in range(len(prompts))], [outs[i] for i in range(len(prompts))], steps


def spec_delta(engine, before: dict) -> dict:
    now = engine.stats()
    return {k: now[k] - before[k] for k in ("spec_draft_tokens", "spec_accepted_tokens")}


def ids_of(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def assert_same_outputs(got, want):
    """The same tokens and finish reasons, and the target's logprobs of every appended token."""
    assert ids_of(got) == ids_of(want)
    for g, w in zip(got, want):
        for a, b in zip(g.outputs, w.outputs):
            assert a.finish_reason == b.finish_reason
            if a.logprobs is not None:
                assert [x[t].logprob for x, t in zip(a.logprobs, a.token_ids)] == pytest.approx(
                    [x[t].logprob for x, t in zip(b.logprobs, b.token_ids)], abs=1e-4)


# -- the default model ------------------------------------------------------------------------------------------


def _count_decode_steps(engine, monkeypatch) -> collections.Counter:
    """request id -> how many of the engine's scheduled steps sampled a token of it (its decode steps)."""
    steps, schedule = collections.Counter(), engine.scheduler.schedule

    def counted(*a, **kw):
        batch = schedule(*a, **kw)
        for r, sample in zip(batch.requests, batch.sample):
            steps[r.group_id] += bool(sample)
        return batch

    monkeypatch.setattr(engine.scheduler, "schedule", counted)
    return steps


def test_same_tokens_as_without_speculation_greedy_and_seeded(default_llm, spec_llm, monkeypatch):
    """Greedy, seeded (top-k / top-p / min-p / logit_bias, logprobs) and unseeded sampling on a copy-heavy prompt
    and two others, together in one batch: the tokens are those of the engine without speculation, drafts were
    accepted, and the copy-heavy request took fewer steps than tokens."""
    eng = spec_llm.engine
    steps_of = _count_decode_steps(eng, monkeypatch)
    tok = eng.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": COPY_TEXT}]),
               tok.apply_chat_template([{"role": "user", "content": "Repeat exactly: one two three four five six."}]),
               "Hello, my name is"]
    fox = tok.encode(" fox", add_special_tokens=False)[0]
    cases = [
        SamplingParams(temperature=0, max_tokens=48),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, seed=7, max_tokens=40, logprobs=2,
                       logit_bias={fox: 1.5}),
        SamplingParams(temperature=0.6, max_tokens=32),  # unseeded: each request's seed is drawn at admission
    ]
    for params in cases:
        default_llm.engine._rng = np.random.default_rng(11)  # the same draws for unseeded requests in both engines
        eng._rng = np.random.default_rng(11)
        want, _, _ = run(default_llm.engine, prompts, params)
        before = eng.stats()
        steps_of.clear()
        with compile_guard.forbid_compiles():
            got, _, _ = run(eng, prompts, params)
        assert ids_of(got) == ids_of(want), params
        d = spec_delta(eng, before)
        assert d["spec_accepted_tokens"] > 0 and d["spec_draft_tokens"] >= d["spec_accepted_tokens"], params
        assert 0 < steps_of[got[0].request_id] < len(got[0].outputs[0].token_ids), params
        for g, w in zip(got, want):
            assert g.outputs[0].text == w.outputs[0].text and g.outputs[0].finish_reason == w.outputs[0].finish_reason
            if params.logprobs is not None:  # the target's logprobs of every appended token
                lg, lw = g.outputs[0].logprobs, w.outputs[0].logprobs
                assert len(lg) == len(lw) == len(g.outputs[0].token_ids)
                for a, b in zip(lg, lw):
                    assert list(a) == list(b)  # the token, then the same top alternatives
                    assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-4)
    s = eng.stats()
    assert len(s["spec_acceptance_per_position"]) == 3 and s["spec_proposed_per_position"][0] == s["spec_verify_runs"]
    assert s["spec_accepted_per_position"][0] >= s["spec_accepted_per_position"][2]  # a later draft needs the earlier
    assert_all_pages_free(eng)


def test_stops_and_max_tokens_inside_an_accepted_run(default_llm, spec_llm):
    """A step that appends several tokens: max_tokens, a stop token id or a stop string reached at one of its
    middle tokens ends the output there, as without speculation; streamed deltas carry several tokens a step."""
    eng = spec_llm.engine
    prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": COPY_TEXT}])
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    with compile_guard.forbid_compiles():
        (final,), (deltas,), _ = run(eng, [prompt], greedy, kind=RequestOutputKind.DELTA)
    ref = [t for o in deltas for t in o.outputs[0].token_ids]
    assert "".join(o.outputs[0].text for o in deltas) == default_llm.generate(
        [prompt], greedy, use_tqdm=False)[0].outputs[0].text
    sizes = [len(o.outputs[0].token_ids) for o in deltas]  # one delta per step
    assert max(sizes) >= 3 and len(sizes) < len(ref)
    # token positions in the middle of a multi-token step whose token appears nowhere before
    middles, n = [], 0
    for size in sizes:
        middles += [p for p in range(n, n + size - 1) if ref[p] not in ref[:p]]
        n += size
    assert middles
    p = middles[0]
    text_to = lambda i: eng.tokenizer.decode(ref[: i + 1])  # noqa: E731
    stop = next((text_to(q)[-3:] for q in middles if text_to(q)[-3:].strip() and text_to(q)[-3:] not in text_to(q - 1)),
                None)
    assert stop is not None
    cases = [dict(max_tokens=p + 1), dict(stop_token_ids=[ref[p]]), dict(stop=[stop]),
             dict(stop=[stop], include_stop_str_in_output=True)]
    for kw in cases:
        params = dataclasses.replace(greedy, **kw)
        want = default_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        with compile_guard.forbid_compiles():
            got = run(eng, [prompt], params)[0][0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason), kw
        assert len(got.token_ids) < len(ref)
    assert run(eng, [prompt], dataclasses.replace(greedy, max_tokens=p + 1))[0][0].outputs[0].token_ids == ref[: p + 1]
    assert_all_pages_free(eng)


# -- the tiny random model ------------------------------------------------------------------------------------


def test_penalties_n_and_preemption_beside_speculating_requests(tiny_llm, tiny_spec_llm, monkeypatch):
    """Staggered arrivals on a small KV pool (preemption, prefix-cache hits): speculating requests next to ones with
    penalties or min_tokens (never given drafts), n = 2 and logprobs; every output equals the engine's without
    speculation, and the pages all come back."""
    eng = tiny_spec_llm.engine
    rng = np.random.default_rng(3)
    loops = [(rng.integers(0, 256, 6).tolist() * 4)[: int(n)] for n in rng.integers(12, 30, 8)]
    prompts = loops + [loops[0] + loops[1][:5], loops[2]]  # the last two share a cached prefix with earlier ones
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=8, seed=1, max_tokens=36, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, seed=2, max_tokens=30, ignore_eos=True, presence_penalty=0.5,
                       frequency_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=12, stop_token_ids=[7]),
        SamplingParams(n=2, temperature=0.5, top_p=0.8, seed=3, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.3, seed=4, max_tokens=40, ignore_eos=True, min_p=0.1),
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
    ]
    want, _, _ = run(tiny_llm.engine, prompts, params, arrive_every=2)
    drafted = []
    propose = eng.scheduler.propose

    def spy(req):
        drafts = propose(req)
        if drafts:
            drafted.append((req.params, len(req.output_token_ids)))
        return drafts

    monkeypatch.setattr(eng.scheduler, "propose", spy)
    monkeypatch.setattr(eng, "_drafts_likely", lambda: True)  # every step may carry drafts (none runs behind)
    before = eng.stats()
    with compile_guard.forbid_compiles():
        got, _, _ = run(eng, prompts, params, arrive_every=2)
    assert_same_outputs(got, want)
    assert spec_delta(eng, before)["spec_accepted_tokens"] > 0
    assert eng.stats()["preemptions"] > before["preemptions"] and eng.stats()["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert not [p for p, n in drafted if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty]
    assert not [(p, n) for p, n in drafted if n < p.min_tokens]
    assert any(p.min_tokens for p, n in drafted)  # ... but once past min_tokens, it speculates
    assert_all_pages_free(eng)


def test_speculation_turns_off_past_disable_by_batch_size(tiny_llm, tiny_spec_llm, monkeypatch):
    """With more requests running than disable_by_batch_size, steps carry no drafts and run behind the host (async
    scheduling: a step launched while the one before is in flight); at or below it, they speculate again. The tokens
    are the engine's without speculation throughout."""
    eng = tiny_spec_llm.engine
    monkeypatch.setattr(eng, "_max_spec_batch", 2)
    prompts = [(list(range(20 + 3 * i, 26 + 3 * i)) * 4)[: 14 + i] for i in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=12 + 6 * i, ignore_eos=True) for i in range(5)]
    want, _, _ = run(tiny_llm.engine, prompts, params)
    running_when_drafted, overlapped = [], []
    propose, launch = eng.scheduler.propose, eng.runner.launch

    def spy_propose(req):
        running_when_drafted.append(len(eng.scheduler.running))
        return propose(req)

    def spy_launch(*a, **kw):
        overlapped.append(eng._inflight is not None)
        return launch(*a, **kw)

    monkeypatch.setattr(eng.scheduler, "propose", spy_propose)
    monkeypatch.setattr(eng.runner, "launch", spy_launch)
    before = eng.stats()
    with compile_guard.forbid_compiles():
        got, _, _ = run(eng, prompts, params)
    assert_same_outputs(got, want)
    after = eng.stats()
    assert after["spec_off_steps"] > before["spec_off_steps"] and any(overlapped)
    assert running_when_drafted and max(running_when_drafted) <= 2  # the longer requests speculate once alone
    assert after["spec_accepted_tokens"] > before["spec_accepted_tokens"]
    assert_all_pages_free(eng)


def test_ngram_steps_overlap_until_drafts_are_likely(tiny_llm, tiny_spec_llm, monkeypatch):
    """One stream with n-gram speculation: while the tokens the host knows end in no repeated n-gram, steps run
    behind the host (async scheduling, no drafts); a step carrying drafts always runs alone, after the tokens before
    it are read. The tokens are the engine's without speculation."""
    eng = tiny_spec_llm.engine
    prompt = [list(range(40, 60)), (list(range(20, 27)) * 4)[:24]]  # no repeated n-gram / one from the start
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want, _, _ = run(tiny_llm.engine, prompt, params, arrive_every=1000)
    launches, scheduled = [], []
    schedule, launch = eng.scheduler.schedule, eng.runner.launch

    def spy_schedule(*a, **kw):
        scheduled.append(schedule(*a, **kw))
        return scheduled[-1]

    def spy_launch(*a, **kw):
        launches.append((eng._inflight is not None, scheduled[-1].num_drafts))
        return launch(*a, **kw)

    monkeypatch.setattr(eng.scheduler, "schedule", spy_schedule)
    monkeypatch.setattr(eng.runner, "launch", spy_launch)
    before = eng.stats()
    with compile_guard.forbid_compiles():
        got, _, _ = run(eng, prompt, params, arrive_every=1000)  # one request at a time
    assert_same_outputs(got, want)
    assert eng.stats()["spec_off_steps"] == before["spec_off_steps"]  # speculation stayed on
    assert any(overlapped for overlapped, _ in launches)  # steps without likely drafts ran behind the host
    assert any(d for _, d in launches) and not any(overlapped and d for overlapped, d in launches)
    assert_all_pages_free(eng)


def test_drafts_step_is_launched_before_the_step_before_is_postprocessed(tiny_llm, tiny_spec_llm, monkeypatch):
    """A step carrying drafts is launched as soon as the tokens before it are appended: the host makes the text and
    outputs of the step before while the device runs it. A request ended there (its text failing, as a stop string
    would end it) has its row in that step discarded, and a fault while launching early is raised by the next step
    and attributed there (transient here: nothing lost). The other tokens are the engine's without speculation."""
    eng = tiny_spec_llm.engine
    prompts = [(list(range(30, 37)) * 4)[:26], (list(range(60, 65)) * 5)[:22], (list(range(90, 96)) * 4)[:20]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want, _, _ = run(tiny_llm.engine, prompts, params)
    drafts_in_flight, launched = [], []
    postprocess, add_token = eng._postprocess, eng._add_token

    def spy_postprocess(*a):
        drafts_in_flight.append(eng._inflight is not None and eng._inflight[0].num_drafts > 0)
        return postprocess(*a)

    def text_fails(req, *a, **kw):
        if req.prompt_token_ids == prompts[1] and len(req.output_token_ids) >= 6:
            raise RuntimeError("injected: its text failed")
        return add_token(req, *a, **kw)

    def hook(batch):
        launched.append(batch.num_drafts)
        if sum(map(bool, launched)) == 3 and batch.num_drafts and launched.count(-1) == 0:
            launched.append(-1)
            raise RuntimeError("injected: one launch fails")

    monkeypatch.setattr(eng, "_postprocess", spy_postprocess)
    monkeypatch.setattr(eng, "_add_token", text_fails)
    monkeypatch.setattr(eng, "fault_hook", hook)
    before = eng.stats()
    with compile_guard.forbid_compiles():
        got, _, _ = run(eng, prompts, params)
    assert any(drafts_in_flight)
    assert eng.stats()["step_faults"] == before["step_faults"] + 1
    failed = got[1].outputs[0]
    assert failed.finish_reason == "error" and "text failed" in got[1].error
    assert failed.token_ids == want[1].outputs[0].token_ids[: len(failed.token_ids)]
    assert ids_of([got[0], got[2]]) == ids_of([want[0], want[2]])
    assert spec_delta(eng, before)["spec_accepted_tokens"] > 0
    assert not eng._suspects
    assert_all_pages_free(eng)


def test_aborted_speculating_request_frees_its_pages(tiny_spec_llm):
    eng = tiny_spec_llm.engine
    prompt = (list(range(10, 16)) * 4)
    rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    other = eng.add_request(prompt[:-1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    before = eng.stats()["spec_draft_tokens"]
    finals = {}
    while eng.has_unfinished():
        if eng.stats()["spec_draft_tokens"] > before and rid not in finals:
            eng.abort(rid)
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o
    assert finals[rid].outputs[0].finish_reason == "abort" and len(finals[rid].outputs[0].token_ids) < 60
    assert len(finals[other].outputs[0].token_ids) == 10
    assert_all_pages_free(eng)


def test_token_frequencies_at_temperature_1_with_top_p_match_the_target(default_llm, spec_llm):
    """The distribution, not only seed-for-seed identity: N seeded samples with speculation and N with other seeds
    without it. At each output position the two token frequencies must pass a two-sample chi-square test at
    p > 0.001 (the seeds are fixed, so the test is deterministic; a wrong acceptance rule shifts the frequencies of
    positions after a draft). Drafts must have been proposed and accepted for the test to mean anything."""
    from collections import Counter

    from scipy.stats import chi2_contingency

    text = "the cat sat on the mat, " * 4
    prompt = spec_llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Repeat this: {text}"}])
    prompt += spec_llm.tokenizer.encode(text, add_special_tokens=False)  # the answer under way: copying is likely
    n = 160
    params = lambda seed: SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, seed=seed,  # noqa: E731
                                         ignore_eos=True)
    before = spec_llm.engine.stats()
    spec, _, _ = run(spec_llm.engine, [prompt] * n, [params(s) for s in range(n)])
    delta = spec_delta(spec_llm.engine, before)
    base, _, _ = run(default_llm.engine, [prompt] * n, [params(s) for s in range(n, 2 * n)])
    assert delta["spec_draft_tokens"] > 100 and delta["spec_accepted_tokens"] > 50, delta
    for pos in range(4):
        a = Counter(o.outputs[0].token_ids[pos] for o in spec)
        b = Counter(o.outputs[0].token_ids[pos] for o in base)
        tokens = sorted(set(a) | set(b))
        if len(tokens) < 2:
            continue
        p = chi2_contingency(np.array([[a[t] for t in tokens], [b[t] for t in tokens]])).pvalue
        assert p > 1e-3, (pos, p, a, b)
    assert_all_pages_free(spec_llm.engine)
