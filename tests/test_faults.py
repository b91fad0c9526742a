"""Faults inside an engine step: attributed to the request that causes them (it alone finishes with finish_reason
'error'), survived when transient, and nothing else lost: the other requests' tokens are exactly those of a run
without the fault, and every page is freed. Faults are injected through Engine.fault_hook (test-only)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer import SamplingParams
from jaxinfer import engine as engine_mod
from test_engine import assert_all_pages_free


def _requests():
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (9, 30, 17, 5, 40, 12)]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=16, ignore_eos=True, repetition_penalty=1.2)
              for i in range(len(prompts))]
    return prompts, params


def _drain(eng, max_steps=500):
    """Step until nothing is left; the final output of each request that finished, by id."""
    finals = {}
    for _ in range(max_steps):
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        if not eng.has_unfinished():
            break
    return finals


def _run(eng, prompts, params):
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    return ids, _drain(eng)


@pytest.fixture
def eng(tiny_llm):
    e = tiny_llm.engine
    faults = e.num_step_faults
    yield e
    e.fault_hook = None
    assert not e._suspects
    assert_all_pages_free(e)
    e.num_step_faults = faults


@pytest.fixture
def reference(tiny_llm):
    prompts, params = _requests()
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_a_fault_caused_by_one_request_fails_it_alone(eng, reference):
    prompts, params = _requests()
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]

    def hook(batch):
        if any(r.group_id == ids[2] for r in batch.requests):
            raise RuntimeError("injected: this request breaks its step")

    eng.fault_hook = hook
    finals = _drain(eng)
    failed = finals[ids[2]]
    assert failed.outputs[0].finish_reason == "error" and "injected" in failed.error
    for i, rid in enumerate(ids):
        if i != 2:
            assert finals[rid].error is None and finals[rid].outputs[0].finish_reason == "length"
            assert finals[rid].outputs[0].token_ids == reference[i], i
    assert eng.num_step_faults >= 2  # the batch's fault, then the culprit's own step run alone


def test_a_transient_fault_loses_nothing(eng, reference):
    prompts, params = _requests()
    launches = []

    def hook(batch):
        launches.append(len(batch))
        if len(launches) == 4:
            raise RuntimeError("injected: one step fails once")

    eng.fault_hook = hook
    ids, finals = _run(eng, prompts, params)
    assert eng.num_step_faults == 1
    assert [finals[rid].outputs[0].token_ids for rid in ids] == reference
    assert all(finals[rid].error is None for rid in ids)


def test_a_request_whose_text_fails_ends_alone(eng, reference, monkeypatch):
    """Its tokens' text or logprobs failing (e.g. a tokenizer bug on its tokens) fails that request only."""
    prompts, params = _requests()
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    add_token = eng._add_token

    def broken(req, *args, **kwargs):
        if req.group_id == ids[4] and len(req.output_token_ids) >= 3:
            raise RuntimeError("injected: detokenizer broke")
        return add_token(req, *args, **kwargs)

    monkeypatch.setattr(eng, "_add_token", broken)
    finals = _drain(eng)
    assert finals[ids[4]].outputs[0].finish_reason == "error" and "detokenizer broke" in finals[ids[4]].error
    for i, rid in enumerate(ids):
        if i != 4:
            assert finals[rid].outputs[0].token_ids == reference[i]
    assert eng.num_step_faults == 0  # the step itself was fine


def test_nan_logits_fail_that_request_alone(eng, reference):
    """A NaN in one request's logits (injected at its 4th step) ends it with an error naming the cause, no token
    drawn from them; the others' tokens are a clean run's."""
    prompts, params = _requests()
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    seen = []

    def hook(batch):
        mine = [r for r in batch.requests if r.group_id == ids[1]]
        seen.extend(mine)
        return mine if len(seen) == 4 else None

    eng.fault_hook = hook
    finals = _drain(eng)
    failed = finals[ids[1]]
    assert failed.outputs[0].finish_reason == "error" and "not finite" in failed.error
    assert failed.outputs[0].token_ids == reference[1][: len(failed.outputs[0].token_ids)]
    assert len(failed.outputs[0].token_ids) < 16 and -1 not in failed.outputs[0].token_ids
    for i, rid in enumerate(ids):
        if i != 1:
            assert finals[rid].error is None and finals[rid].outputs[0].token_ids == reference[i], i


def test_faults_without_progress_give_up(eng):
    """A fault in every step (a device that is gone): each request run alone fails, and after MAX_FAULTS_IN_A_ROW
    faults with no step completed the engine raises, for its owner to rebuild it (serving.AsyncEngine does);
    aborting what was left frees every page."""
    rng = np.random.default_rng(12)
    n = engine_mod.MAX_FAULTS_IN_A_ROW + 4

    def hook(batch):
        raise RuntimeError("injected: the device is gone")

    eng.fault_hook = hook
    ids = [eng.add_request(rng.integers(0, 256, 8).tolist(), SamplingParams(max_tokens=4)) for _ in range(n)]
    with pytest.raises(RuntimeError, match="device is gone"):
        for _ in range(2 * n):
            eng.step()
    assert eng.num_step_faults == engine_mod.MAX_FAULTS_IN_A_ROW + 1
    eng.fault_hook = None
    eng._suspects.clear()
    eng._faults_in_a_row = 0
    for rid in ids:
        eng.abort(rid)
    while eng.has_unfinished():
        eng.step()
