"""Automatic prefix caching end to end on the tiny model: outputs are exactly those of a run without caching
(and of HF), whatever the chunking, the sampling parameters or the memory pressure."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

import jaxinfer
from conftest import TINY_ENGINE_OPTIONS
from hf_models import hf_greedy
from jaxinfer import SamplingParams, compile_guard
from test_engine import assert_all_pages_free

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@contextlib.contextmanager
def caching_off(llm):
    """Prefix caching switched off in the engine's scheduler (what `enable_prefix_caching=False` sets up):
    the same compiled steps, and no second engine to build. Pages cached before stay, unused."""
    sched = llm.engine.scheduler
    sched.enable_prefix_caching = False
    try:
        yield llm
    finally:
        sched.enable_prefix_caching = True


@contextlib.contextmanager
def token_budget(llm, n: int | None):
    """Run with a per-step token budget of n (the chunk size of a lone prefill); None leaves it."""
    sched = llm.engine.scheduler
    old = sched.token_budget
    sched.token_budget = n or old
    try:
        yield
    finally:
        sched.token_budget = old


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    """Prompts over one 40-token stem (page size 4), fresh per seed so earlier runs leave no cache behind."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 40).tolist()
    tail = lambda n: rng.integers(0, 256, n).tolist()  # noqa: E731
    return [
        base,  # warms the cache
        base[:13] + tail(10),  # shared prefix ends mid-page
        base[:8] + tail(5),  # shared prefix ends on a page boundary
        base[:38],  # entirely cached, not page-aligned
        base,  # entirely cached and page-aligned: its last page is recomputed
        base + tail(7),
        tail(20),  # unrelated
    ]


@functools.lru_cache(maxsize=None)
def hf_reference(model, prompt: tuple[int, ...]) -> list[int]:
    return hf_greedy(model, list(prompt), MAX_TOKENS)


def tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def generate_after_warmup(llm, prompts, params, one_by_one: bool = False):
    """The first prompt alone (its pages get cached), then the others together, or one by one."""
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    if one_by_one:
        rest = [o for p in prompts[1:] for o in llm.generate([p], params, use_tqdm=False)]
    else:
        rest = llm.generate(prompts[1:], params, use_tqdm=False)
    return first + rest


@pytest.mark.parametrize("chunk", [1, 7, 64, "whole"])
def test_greedy_same_with_and_without_cache_and_as_hf(tiny_llm, tiny_llama_dir, chunk):
    prompts = shared_prefix_prompts(seed={1: 11, 7: 12, 64: 13, "whole": 14}[chunk])
    budget = None if chunk == "whole" else chunk
    before = tiny_llm.engine.stats()
    with compile_guard.forbid_compiles(), token_budget(tiny_llm, budget):
        cached = generate_after_warmup(tiny_llm, prompts, GREEDY, one_by_one=chunk == "whole")
        after = tiny_llm.engine.stats()
        with caching_off(tiny_llm):
            uncached = generate_after_warmup(tiny_llm, prompts, GREEDY, one_by_one=chunk == "whole")
    assert tokens(cached) == tokens(uncached)
    for p, out in zip(prompts, tokens(cached)):
        assert out == hf_reference(tiny_llama_dir[1], tuple(p))
    # base[:13]: 12, base[:8]: 8, base[:38]: 36, base: 36, base + tail: 40 at least (more once the
    # batch-mates' pages are in); with a budget of 1 each prompt also finds its predecessors' pages.
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= 12 + 8 + 36 + 36 + 40
    assert_all_pages_free(tiny_llm.engine)


def test_penalties_seeds_and_n_same_with_and_without_cache(tiny_llm):
    """Penalties read the sampler history, which must hold the cached prompt tokens that never entered a step."""
    prompts = shared_prefix_prompts(seed=21)
    kinds = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=2.0),
        SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True, repetition_penalty=1.5,
                       presence_penalty=0.8, frequency_penalty=0.6),
        SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
    ]
    before = tiny_llm.engine.stats()["prefix_cache_hits"]
    for params in kinds:
        with compile_guard.forbid_compiles():
            cached = generate_after_warmup(tiny_llm, prompts, params)
            hits = tiny_llm.engine.stats()["prefix_cache_hits"]
            with caching_off(tiny_llm):
                uncached = generate_after_warmup(tiny_llm, prompts, params)
        assert tokens(cached) == tokens(uncached), params
    assert hits > before
    assert_all_pages_free(tiny_llm.engine)


def test_hit_rate(tiny_llm):
    prompts = shared_prefix_prompts(seed=31)
    for on in (True, False):
        before = tiny_llm.engine.stats()
        with contextlib.nullcontext() if on else caching_off(tiny_llm):
            generate_after_warmup(tiny_llm, prompts, GREEDY)
        after = tiny_llm.engine.stats()
        queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
        hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
        if on:
            assert queries == sum(len(p) for p in prompts) and 0 < hits < queries
            assert 0 < after["prefix_cache_hit_rate"] < 1 and after["pages_cached"] > 0
        else:
            assert queries == hits == 0


def test_small_pool_evicts_and_preempts_and_loses_nothing(tiny_llama_dir, tiny_llm):
    """A pool far too small for the load: cached pages are evicted, requests preempted and readmitted
    through the cache (outputs included); every request completes exactly as in an unconstrained run."""
    opts = {**TINY_ENGINE_OPTIONS, "token_buckets": (16, 64), "seq_buckets": (16,)}  # fewer shapes to compile
    llm = jaxinfer.LLM(str(tiny_llama_dir[0]), num_pages=34, **opts)
    rng = np.random.default_rng(41)
    stems = [rng.integers(0, 256, 30).tolist() for _ in range(3)]
    prompts = [stems[i % 3][: int(rng.integers(6, 31))] + rng.integers(0, 256, int(rng.integers(0, 8))).tolist()
               for i in range(14)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=30, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.5, frequency_penalty=0.3) for i in range(len(prompts))]
    with compile_guard.forbid_compiles():
        outs = llm.generate(prompts[:3], params[:3], use_tqdm=False) + llm.generate(prompts[3:], params[3:], use_tqdm=False)
        with caching_off(tiny_llm):
            ref = [o for p, sp in zip(prompts, params) for o in tiny_llm.generate([p], sp, use_tqdm=False)]
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_evictions"] > 0 and stats["prefix_cache_hits"] > 0
    assert tokens(outs) == tokens(ref)
    assert all(len(t) == 30 for t in tokens(outs))
    assert_all_pages_free(llm.engine)


@pytest.mark.parametrize("budget", [None, 8])
def test_n_children_compute_their_prompt_once(tiny_llm, budget):
    """An n=4 request: the first child computes the prompt, the other three take its full pages from the
    cache (even when they are admitted in the same step); outputs equal a run with caching off."""
    prompt = np.random.default_rng(51 if budget is None else 52).integers(0, 256, 30).tolist()  # 7 full pages
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.2)
    before = tiny_llm.engine.stats()
    with compile_guard.forbid_compiles(), token_budget(tiny_llm, budget):
        cached = tiny_llm.generate([prompt], params, use_tqdm=False)
        after = tiny_llm.engine.stats()
        with caching_off(tiny_llm):
            uncached = tiny_llm.generate([prompt], params, use_tqdm=False)
    assert tokens(cached) == tokens(uncached) and len(set(map(tuple, tokens(cached)))) > 1
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == 4 * 30
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 3 * 28  # 7 pages each for children 1-3
    assert_all_pages_free(tiny_llm.engine)


def test_long_hits_reach_the_device_page_table_ahead_of_the_step(tiny_llm):
    """A cache hit of more pages than a step's input has room for (T / page_size + B entries) goes to the device's
    page table through the runner's own program before the step: same tokens as without the cache."""
    run = tiny_llm.engine.runner
    prompts = shared_prefix_prompts(seed=21)
    calls = []
    write = run._write_pages
    run._write_pages = lambda *a: (calls.append(len(a[0])), write(*a))
    try:
        with compile_guard.forbid_compiles(), token_budget(tiny_llm, 1):
            cached = generate_after_warmup(tiny_llm, prompts, GREEDY, one_by_one=True)
            with caching_off(tiny_llm):
                uncached = generate_after_warmup(tiny_llm, prompts, GREEDY, one_by_one=True)
    finally:
        run._write_pages = write
    assert calls  # only when a step's input had no room for them
    assert tokens(cached) == tokens(uncached)
    assert_all_pages_free(tiny_llm.engine)
