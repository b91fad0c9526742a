"""The scheduler and page allocator without a model: a mock runner whose outputs are known by hand."""

from __future__ import annotations

import random

import pytest

from jaxinfer.page_allocator import OutOfPages, PageAllocator, page_hash
from jaxinfer.request import Request
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler


def make_request(i: int, prompt_len: int, max_tokens: int, arrival: float | None = None, priority: int = 0) -> Request:
    # Distinct prompts: equal ones admitted together would wait for each other's pages (prefix sharing).
    return Request(request_id=f"r{i}", prompt_token_ids=list(range(1000 * i + 1, 1000 * i + prompt_len + 1)), seed=i,
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
        for req, n, start in zip(batch.requests, batch.num_new_tokens, batch.start):
            # every scheduled request holds pages for what it will have computed ...
            assert len(req.pages) * sched.page_size >= start + n == req.num_computed_tokens
            # ... and the pages it writes are its own: never shared, never in the prefix cache
            for page in {req.pages[pos // sched.page_size] for pos in range(start, start + n)}:
                assert sched.allocator.ref_counts[page] == 1 and not sched.allocator.is_cached(page)
        sampled = [mock_token(r) if batch.samples(i) else None for i, r in enumerate(batch.requests)]
        sched.update(batch, sampled)
        sched.allocator.check_invariants()
        steps.append(batch)
    return steps


def expected_output(prompt_len: int, max_tokens: int) -> list[int]:
    return [1000 + prompt_len + k for k in range(max_tokens)]


def test_mixed_step_token_budget_bounds_steps_that_carry_decodes():
    """With decodes running, a step holds at most mixed_step_token_budget tokens: the decodes, then prompt chunks in
    what is left (running chunks and newly admitted prompts alike); a step without decodes keeps the whole budget.
    Every request still gets its exact output."""
    sched = Scheduler(num_pages=200, page_size=4, max_num_seqs=4, token_budget=32, max_model_len=400,
                      mixed_step_token_budget=8)
    a, b = make_request(0, 3, 40), make_request(1, 3, 40)
    sched.add(a)
    sched.add(b)
    sched.update(sched.schedule(), [mock_token(a), mock_token(b)])  # both prompts in: both decode from now on
    long, later = make_request(2, 100, 3), make_request(3, 50, 2)
    sched.add(long)
    step = sched.schedule()
    assert step.requests == [a, b, long] and step.num_new_tokens == [1, 1, 6]  # 8 - 2 decodes
    sched.update(step, [mock_token(a), mock_token(b), None])
    sched.add(later)
    step = sched.schedule()
    assert step.requests == [a, b, long] and step.num_new_tokens == [1, 1, 6]  # the running chunk took the room
    sched.update(step, [mock_token(a), mock_token(b), None])
    steps = run(sched)
    for batch in steps:
        decodes = sum(n == 1 for n in batch.num_new_tokens)
        if decodes:
            assert batch.num_tokens <= max(8, decodes + 1)
    assert max(batch.num_tokens for batch in steps) == 8  # no step with decodes took the whole budget of 32
    for req, (p, m) in ((a, (3, 40)), (b, (3, 40)), (long, (100, 3)), (later, (50, 2))):
        assert req.output_token_ids == expected_output(p, m)
    alone = Scheduler(num_pages=200, page_size=4, max_num_seqs=4, token_budget=32, max_model_len=400,
                      mixed_step_token_budget=8)
    c = make_request(4, 100, 1)
    alone.add(c)
    assert alone.schedule().num_new_tokens == [32]  # no decodes: the whole budget


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
    sched.update(second, [mock_token(a), None])
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


# -- prefix caching ---------------------------------------------------------------------------------------


def make_prompt_request(i: int, prompt: list[int], max_tokens: int, arrival: float | None = None) -> Request:
    return Request(request_id=f"p{i}", prompt_token_ids=list(prompt), seed=i,
                   params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens=max_tokens,
                   arrival_time=float(i if arrival is None else arrival))


def admit_alone(sched: Scheduler, req: Request) -> int:
    """Add req, run its first step alone, and return the tokens it got from the prefix cache."""
    sched.add(req)
    batch = sched.schedule()
    assert batch.requests == [req] and batch.reset == [True]
    hit = batch.start[0]
    assert batch.num_new_tokens == [min(req.num_tokens - hit, sched.token_budget)]
    sched.update(batch, [mock_token(req) if batch.samples(0) else None])
    return hit


def test_prefix_cache_hits_full_pages_only_and_computes_the_rest():
    sched = Scheduler(num_pages=64, page_size=4, max_num_seqs=4, token_budget=64, max_model_len=128)
    base = list(range(100, 120))  # 20 tokens: 5 full pages
    first = make_prompt_request(0, base, 3)
    assert admit_alone(sched, first) == 0
    run(sched)
    assert sched.allocator.num_cached == 5  # the 6th page (outputs) is never full: 20 + 2 computed tokens
    cases = [
        (base[:13] + [7, 8, 9], 12),  # prefix ends mid-page: only the 3 full pages before it
        (base[:8] + [1], 8),  # prefix ends on a page boundary
        (base[:18], 16),  # entirely cached, not page-aligned: all its full pages
        (base, 16),  # entirely cached and page-aligned: the last page is recomputed for its logits
        ([5] + base, 0),  # same tokens, shifted: nothing
    ]
    for i, (prompt, hit) in enumerate(cases, start=1):
        req = make_prompt_request(i, prompt, 4)
        assert admit_alone(sched, req) == hit, prompt
        assert req.num_cached_tokens == hit
        run(sched)
        assert req.output_token_ids == expected_output(len(prompt), 4)
        sched.allocator.check_invariants()
    assert sched.prefix_cache_hits == 12 + 8 + 16 + 16
    assert sched.prefix_cache_queries == 20 + sum(len(p) for p, _ in cases)
    assert sched.allocator.num_free == 64 and sched.allocator.num_used == 0


def test_cache_extra_key_separates_equal_tokens():
    sched = Scheduler(num_pages=64, page_size=4, max_num_seqs=4, token_budget=64, max_model_len=128)
    a, b, c = (make_prompt_request(i, list(range(1, 18)), 2) for i in range(3))
    b.cache_extra = c.cache_extra = "lora-1"
    assert admit_alone(sched, a) == 0
    run(sched)
    assert admit_alone(sched, b) == 0
    run(sched)
    assert admit_alone(sched, c) == 16


def test_prefix_caching_off_never_hits():
    sched = Scheduler(num_pages=64, page_size=4, max_num_seqs=4, token_budget=64, max_model_len=128,
                      enable_prefix_caching=False)
    for i in range(3):
        assert admit_alone(sched, make_prompt_request(i, list(range(1, 18)), 2)) == 0
        run(sched)
    assert sched.allocator.num_cached == 0 and sched.prefix_cache_hit_rate == 0.0
    assert sched.allocator.num_free == 64


def test_shared_prefixes_under_eviction_and_preemption_lose_nothing():
    """A pool too small for the load, prompts sharing prefixes: pages are evicted, requests preempted
    (and readmitted through the cache), outputs stay exact, nothing leaks."""
    rng = random.Random(2)
    sched = Scheduler(num_pages=16, page_size=4, max_num_seqs=6, token_budget=12, max_model_len=64)
    stems = [[rng.randint(1, 50) for _ in range(rng.randint(3, 14))] for _ in range(4)]
    reqs = []
    for i in range(40):
        prompt = rng.choice(stems)[: rng.randint(1, 14)] + [rng.randint(1, 50) for _ in range(rng.randint(0, 6))]
        r = make_prompt_request(i, prompt or [1], rng.randint(1, 20))
        reqs.append(r)
        sched.add(r)
        if rng.random() < 0.6:
            batch = sched.schedule()
            sched.update(batch, [mock_token(q) if batch.samples(j) else None for j, q in enumerate(batch.requests)])
            sched.allocator.check_invariants()
    run(sched)
    assert sched.num_preemptions > 0 and sched.allocator.num_evictions > 0 and sched.prefix_cache_hits > 0
    for r in reqs:
        assert r.output_token_ids == expected_output(r.num_prompt_tokens, r.max_tokens)
    assert sched.allocator.num_free == 16 and all(rc == 0 for rc in sched.allocator.ref_counts)


def test_page_allocator_with_prefix_cache_property():
    """Random allocate / share / free / cache / lookup against a model of ref counts, the hash map and the
    LRU order of unreferenced cached pages (evicted oldest first, only when the free list is empty)."""
    rng = random.Random(3)
    N = 16
    alloc = PageAllocator(N)
    held: list[list[int]] = []
    cached: dict[bytes, int] = {}  # the model's hash -> page
    lru: list[int] = []  # the model's unreferenced cached pages, least recently freed first
    free_count = N  # never-cached free pages
    hashes = [page_hash(None, [k]) for k in range(24)]

    def refs():
        out = [0] * N
        for pages in held:
            for p in pages:
                out[p] += 1
        return out

    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            n = rng.randint(1, 4)
            if n > free_count + len(lru):
                with pytest.raises(OutOfPages):
                    alloc.allocate(n)
            else:
                from_free = min(n, free_count)
                evicted = lru[: n - from_free]
                pages = alloc.allocate(n)
                assert pages[from_free:] == evicted  # LRU order, free pages first
                del lru[: n - from_free]
                free_count -= from_free
                cached = {h: p for h, p in cached.items() if p not in evicted}
                held.append(pages)
        elif op < 0.45 and held:
            pages = rng.choice(held)
            alloc.share(pages)
            held.append(list(pages))
        elif op < 0.65 and held:  # register a referenced page
            p, h = rng.choice(rng.choice(held)), rng.choice(hashes)
            ok = alloc.cache_page(p, h)
            assert ok == (h not in cached and p not in cached.values())
            if ok:
                cached[h] = p
        elif op < 0.75:  # look up a chain and take its pages (a cache hit)
            chain = rng.sample(hashes, rng.randint(1, 3))
            pages = alloc.lookup(chain)
            expect = []
            for h in chain:
                if h not in cached:
                    break
                expect.append(cached[h])
            assert pages == expect
            if pages and len(set(pages)) == len(pages):
                alloc.share(pages)
                lru = [p for p in lru if p not in pages]
                held.append(pages)
        elif held:
            pages = held.pop(rng.randrange(len(held)))
            alloc.free(pages)
            r = refs()
            for p in reversed(pages):
                if r[p] == 0 and p not in lru:
                    if p in cached.values():
                        lru.append(p)
                    elif p not in alloc._free:
                        raise AssertionError(f"page {p} not freed")
            free_count = N - sum(1 for x in r if x) - len(lru)
        alloc.check_invariants()
        assert alloc.ref_counts == refs()
        assert list(alloc._evictable) == lru
        assert alloc.num_free == free_count + len(lru) and alloc.num_cached == len(cached)
    assert alloc.num_evictions > 20
    for pages in held:
        alloc.free(pages)
    assert alloc.num_free == N and alloc.num_evictable == alloc.num_cached
    alloc.clear_cache()
    alloc.check_invariants()
    assert alloc.num_free == N and alloc.num_cached == 0 and alloc.lookup(hashes) == []
    with pytest.raises(ValueError):
        alloc.free([0])


@pytest.mark.parametrize("budget", [64, 8])
def test_requests_admitted_together_compute_a_shared_prompt_once(budget):
    """n > 1 children (or equal prompts arriving together): the first computes the prompt, the others wait
    until its full pages are cached and then compute only the rest. Caching off: all start at once."""
    for caching in (True, False):
        sched = Scheduler(num_pages=64, page_size=4, max_num_seqs=8, token_budget=budget, max_model_len=128,
                          enable_prefix_caching=caching)
        prompt = list(range(50, 71))  # 21 tokens: 5 full pages, then 1 token
        reqs = [make_prompt_request(i, prompt, 3, arrival=0.0) for i in range(4)]
        other = make_prompt_request(4, [7] * 9, 3, arrival=0.0)  # unrelated: not held back
        for r in reqs + [other]:
            sched.add(r)
        first = sched.schedule()
        if caching:
            assert first.requests == [reqs[0], other][: 1 + (budget > 21)]
        else:
            assert first.requests[:2] == reqs[: 1 + (budget > 21)]
        sched.update(first, [mock_token(r) if first.samples(i) else None for i, r in enumerate(first.requests)])
        steps = [first] + run(sched)
        prefill = sum(n for b in steps for r, n, in zip(b.requests, b.num_new_tokens) if r in reqs) - 3 * 4 + 4
        for r in reqs:
            assert r.output_token_ids == expected_output(21, 3)
        if caching:
            assert [r.num_cached_tokens for r in reqs] == [0, 20, 20, 20]
            assert prefill == 21 + 3 * 1  # the prompt computed once, plus each child's last token
            assert sched.prefix_cache_hits == 3 * 20
        else:
            assert prefill == 4 * 21 and sched.prefix_cache_hits == 0
        assert sched.allocator.num_free == 64


# ---------------------------------------------------------------------------------------------
# Async scheduling: step N+1 is scheduled before step N's tokens are known (engine.py)


def run_async(sched: Scheduler, max_steps: int = 10_000) -> int:
    """Schedule each step while the one before is still 'on the device'; its tokens arrive afterwards."""
    inflight, steps = None, 0
    while (sched.has_unfinished() or inflight) and steps < max_steps:
        batch = sched.schedule()
        for req, n, start in zip(batch.requests, batch.num_new_tokens, batch.start):
            assert len(req.pages) * sched.page_size >= start + n == req.num_computed_tokens
            # only a one-token decode may start at a token the host has not seen yet
            assert start + n <= req.num_tokens or (n == 1 and start == req.num_tokens)
        if inflight is not None:
            sched.update(inflight, [mock_token(r) if inflight.samples(i) else None for i, r in enumerate(inflight.requests)])
            sched.allocator.check_invariants()
        inflight = batch if len(batch) else None
        steps += 1
    return steps


def test_async_scheduling_gives_the_same_tokens_and_frees_everything():
    rng = random.Random(2)
    for pages in (200, 24):  # plenty, and few enough to preempt
        sched = Scheduler(num_pages=pages, page_size=4, max_num_seqs=6, token_budget=16, max_model_len=80)
        reqs = [make_request(i, rng.randint(1, 30), rng.randint(1, 20)) for i in range(30)]
        for r in reqs:
            sched.add(r)
        run_async(sched)
        for r in reqs:
            assert r.output_token_ids == expected_output(r.num_prompt_tokens, r.max_tokens), r.request_id
            assert r.finish_reason == "length" and r.num_pending == 0
        assert sched.allocator.num_free == pages and sorted(sched._free_slots) == list(range(6))
    assert sched.num_preemptions > 0


def test_async_scheduling_discards_the_token_after_a_stop():
    sched = Scheduler(num_pages=100, page_size=4, max_num_seqs=4, token_budget=32, max_model_len=80)
    a = make_request(0, 5, 20)
    a.params = SamplingParams(max_tokens=20)
    a.eos_token_ids = frozenset({1000 + 5 + 3})  # its 4th output token
    b, one = make_request(1, 7, 6), make_request(2, 3, 1)  # one: a single token, its prefill's
    for r in (a, b, one):
        sched.add(r)
    run_async(sched)
    assert a.output_token_ids == expected_output(5, 4) and a.finish_reason == "stop"
    assert b.output_token_ids == expected_output(7, 6) and one.output_token_ids == expected_output(3, 1)
    assert sched.allocator.num_free == 100
