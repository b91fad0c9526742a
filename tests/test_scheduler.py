"""The scheduler and page allocator without a model: a mock runner whose outputs are known by hand."""

from __future__ import annotations

import random

import pytest

from jaxinfer.page_allocator import OutOfPages, PageAllocator
from jaxinfer.request import Request
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler


def make_request(i: int, prompt_len: int, max_tokens: int, arrival: float | None = None, priority: int = 0) -> Request:
    return Request(request_id=f"r{i}", prompt_token_ids=list(range(1, prompt_len + 1)), seed=i,
                   params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens=max_tokens,
                   arrival_time=float(i if arrival is None else arrival), priority=priority)


def mock_token(req: Request) -> int:
    """The 'model': the next token is a function of how many tokens the sequence holds (checkable by hand)."""
    return 1000 + req.num_tokens


def run(sched: Scheduler, max_steps: int = 10_000):
    steps = []
    while sched.has_unfinished() and len(steps) < max_steps:
        batch = sched.schedule()
        assert len(batch) <= sched.max_num_seqs and batch.num_tokens <= sched.token_budget
        for req in batch.requests:  # every scheduled request holds pages for what it will have computed
            assert len(req.pages) * sched.page_size >= req.num_computed_tokens + batch.num_new_tokens[batch.requests.index(req)]
        sampled = [mock_token(r) if batch.samples(i) else None for i, r in enumerate(batch.requests)]
        sched.update(batch, sampled)
        sched.allocator.check_invariants()
        steps.append(batch)
    return steps


def expected_output(prompt_len: int, max_tokens: int) -> list[int]:
    return [1000 + prompt_len + k for k in range(max_tokens)]


def test_chunked_prefill_splits_long_prompts_and_decodes_first():
    sched = Scheduler(num_pages=100, page_size=4, max_num_seqs=4, token_budget=8, max_model_len=200)
    a, b = make_request(0, 3, 5), make_request(1, 20, 2)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert first.num_new_tokens == [3, 5] and first.reset == [True, True]
    sched.update(first, [mock_token(a), None])  # b's first chunk samples nothing
    second = sched.schedule()
    assert second.requests == [a, b] and second.num_new_tokens == [1, 7]  # a's decode first, then b's next chunk
    run(sched)
    assert a.output_token_ids == expected_output(3, 5) and b.output_token_ids == expected_output(20, 2)
    assert sched.allocator.num_free == 100


def test_preemption_recomputes_youngest_and_loses_nothing():
    sched = Scheduler(num_pages=10, page_size=4, max_num_seqs=8, token_budget=64, max_model_len=64)
    reqs = [make_request(i, 6, 12) for i in range(5)]  # each needs 5 pages at the end; 10 pages hold 2
    for r in reqs:
        sched.add(r)
    run(sched)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == expected_output(6, 12) and r.finish_reason == "length"
    assert sched.allocator.num_free == 10 and sorted(sched._free_slots) == list(range(8))


def test_priority_runs_first():
    sched = Scheduler(num_pages=100, page_size=4, max_num_seqs=1, token_budget=16, max_model_len=64)
    low, high = make_request(0, 4, 2, priority=5), make_request(1, 4, 2, priority=0)
    sched.add(low)
    sched.add(high)
    assert sched.schedule().requests == [high]


def test_finish_frees_pages_and_slots_while_waiting_or_running():
    sched = Scheduler(num_pages=20, page_size=4, max_num_seqs=2, token_budget=16, max_model_len=64)
    a, b, c = make_request(0, 5, 4), make_request(1, 5, 4), make_request(2, 5, 4)
    for r in (a, b, c):
        sched.add(r)
    batch = sched.schedule()
    assert batch.requests == [a, b]  # c waits: two sequence slots
    sched.finish(a, "abort")
    sched.finish(c, "abort")
    sched.update(batch, [mock_token(a), mock_token(b)])  # a's token arrives after its abort: ignored
    assert a.output_token_ids == [] and a.finish_reason == "abort" and c.finish_reason == "abort"
    run(sched)
    assert b.output_token_ids == expected_output(5, 4)
    assert sched.allocator.num_free == 20


def test_prompt_larger_than_the_cache_is_refused():
    sched = Scheduler(num_pages=4, page_size=4, max_num_seqs=2, token_budget=16, max_model_len=64)
    with pytest.raises(ValueError, match="KV pages"):
        sched.add(make_request(0, 16, 1))


def test_random_workload_keeps_invariants():
    rng = random.Random(0)
    sched = Scheduler(num_pages=24, page_size=4, max_num_seqs=6, token_budget=16, max_model_len=80)
    reqs = []
    for i in range(40):
        r = make_request(i, rng.randint(1, 30), rng.randint(1, 20))
        reqs.append(r)
        sched.add(r)
        if rng.random() < 0.5:
            batch = sched.schedule()
            sched.update(batch, [mock_token(q) if batch.samples(j) else None for j, q in enumerate(batch.requests)])
        if rng.random() < 0.1:
            sched.finish(rng.choice(reqs), "abort")
    run(sched)
    for r in reqs:
        if r.finish_reason != "abort":
            assert r.output_token_ids == expected_output(r.num_prompt_tokens, r.max_tokens)
    assert sched.allocator.num_free == 24


def test_page_allocator_property():
    rng = random.Random(1)
    alloc = PageAllocator(32)
    held: list[list[int]] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(1, 6)
            try:
                held.append(alloc.allocate(n))
            except OutOfPages:
                assert alloc.num_free < n
        elif op < 0.6 and held:
            pages = rng.choice(held)
            alloc.share(pages)
            held.append(list(pages))
        elif held:
            alloc.free(held.pop(rng.randrange(len(held))))
        alloc.check_invariants()
        refs = {}
        for pages in held:
            for p in pages:
                refs[p] = refs.get(p, 0) + 1
        assert all(alloc.ref_counts[p] == refs.get(p, 0) for p in range(32))
    for pages in held:
        alloc.free(pages)
    assert alloc.num_free == 32
    with pytest.raises(ValueError):
        alloc.free([0])
