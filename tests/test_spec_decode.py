"""Speculative decoding, host side: the n-gram proposer, greedy acceptance, the config's validation."""

import pytest

from jaxinfer.spec_decode import DISABLE_BY_BATCH_SIZE, SpeculativeConfig, accept_greedy, ngram_propose


def test_ngram_proposes_what_followed_the_latest_occurrence():
    #        0  1  2  3  4  5  6  7  8  9
    toks = [5, 1, 2, 3, 9, 1, 2, 3, 4, 1, 2]
    # suffix [1, 2] (n = 2; [4, 1, 2] never occurred before) last occurred at 5: then 3, 4, 1, 2
    assert ngram_propose(toks, k=3, n_max=3, n_min=2) == [3, 4, 1]
    assert ngram_propose(toks, k=10, n_max=3, n_min=2) == [3, 4, 1, 2]  # runs up to the end
    # the longest suffix wins: [9, 1, 2] occurred once, at 4, followed by 3
    assert ngram_propose([9, 1, 2, 3, 7, 1, 2, 8, 9, 1, 2], k=1, n_max=3, n_min=1) == [3]
    assert ngram_propose([1, 2, 3, 4], k=2, n_max=3, n_min=1) == []  # nothing repeats
    assert ngram_propose([7], k=2, n_max=3, n_min=1) == []
    assert ngram_propose([7, 7], k=2, n_max=3, n_min=1) == [7]
    assert ngram_propose([1, 2, 3, 9, 2, 3], k=2, n_max=4, n_min=3) == []  # only a 2-gram matches


def test_accept_greedy_keeps_the_targets_tokens():
    assert accept_greedy([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all accepted, plus the bonus token
    assert accept_greedy([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # stops at the first difference, with the target's
    assert accept_greedy([4, 5, 6], [1, 5, 6, 7]) == [1]
    assert accept_greedy([], [3]) == [3]


def test_speculative_config_validation():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5,
                                     "prompt_lookup_min": 2})
    assert c.num_speculative_tokens == 3 and SpeculativeConfig.from_dict(None) is None
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"method": "medusa"})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=5, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="unknown keys"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_spec_tokens": 2})
    d = SpeculativeConfig.from_dict({"model": "/ckpt/draft", "num_speculative_tokens": 2})  # vLLM: model alone
    assert d.method == "draft_model" and d.model == "/ckpt/draft"
    with pytest.raises(ValueError, match="speculative_config.model"):
        SpeculativeConfig.from_dict({"method": "draft_model"})
    with pytest.raises(ValueError, match="EAGLE head checkpoint's path"):
        SpeculativeConfig.from_dict({"method": "eagle"})
    with pytest.raises(ValueError, match="method eagle3 needs the EAGLE head checkpoint's path"):
        SpeculativeConfig.from_dict({"method": "eagle3"})
    with pytest.raises(ValueError, match="quantization applies to method draft_model"):
        SpeculativeConfig.from_dict({"method": "eagle", "model": "/ckpt/eagle", "quantization": "int8"})
    with pytest.raises(ValueError, match="apply to methods draft_model, eagle and eagle3"):
        SpeculativeConfig.from_dict({"method": "ngram", "model": "/ckpt/draft"})
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="disable_by_batch_size"):
            SpeculativeConfig(disable_by_batch_size=bad)
    assert SpeculativeConfig(disable_by_batch_size=7).max_speculating_batch("cpu") == 7
    assert SpeculativeConfig().max_speculating_batch("cpu") == DISABLE_BY_BATCH_SIZE["cpu"]
    assert SpeculativeConfig().max_speculating_batch("rocm") == DISABLE_BY_BATCH_SIZE["gpu"]
    from jaxinfer.config import EngineConfig

    with pytest.raises(ValueError, match="speculative_config.quantization"):
        EngineConfig(speculative_config={"model": "/ckpt/draft", "quantization": "int3"})


# -- the scheduler with drafts, without a model (test_scheduler.py's mock: token at position i is 1000 + i) -------


def _spec_run(sched, max_spec_tokens: int, wrong_at: int | None = 1, max_steps: int = 10_000):
    """Step to the end with a proposer whose drafts are the true continuation except at index `wrong_at`; returns
    the batches. Checks the draft limits and that no page with an unverified position reaches the prefix cache."""
    from test_scheduler import mock_token

    def propose(req):
        drafts = [1000 + req.num_tokens + j for j in range(5)]
        if wrong_at is not None:
            drafts[wrong_at] = 7
        return drafts

    add_drafts = sched._add_drafts

    def add_drafts_checked(batch):  # drafts take free pages or none: they never preempt a request
        preemptions, running = sched.num_preemptions, list(sched.running)
        add_drafts(batch)
        assert sched.num_preemptions == preemptions and sched.running == running

    sched.propose, sched.max_spec_tokens, sched._add_drafts = propose, max_spec_tokens, add_drafts_checked
    steps = []
    while sched.has_unfinished() and len(steps) < max_steps:
        batch = sched.schedule()
        if batch.num_drafts:
            assert batch.num_tokens <= min(sched.token_budget, max_spec_tokens)
        sampled = []
        for i, (req, start, drafts) in enumerate(zip(batch.requests, batch.start, batch.drafts)):
            assert len(req.pages) * sched.page_size >= req.num_computed_tokens == start + batch.num_new_tokens[i]
            if drafts:
                assert len(req.output_token_ids) + len(drafts) + 1 <= req.max_tokens
                sampled.append(accept_greedy(drafts, [1000 + start + 1 + j for j in range(len(drafts) + 1)]))
            else:
                sampled.append(mock_token(req) if batch.samples(i) else None)
        sched.update(batch, sampled)
        sched.allocator.check_invariants()
        for req, drafts in zip(batch.requests, batch.drafts):
            if drafts and not req.is_finished:  # rolled back to the verified tokens; the last one's K/V is not in
                assert req.num_computed_tokens == req.num_tokens - 1
                assert req.num_registered_pages * sched.page_size <= req.num_tokens - 1
        steps.append(batch)
    return steps


def test_scheduler_verifies_drafts_and_rolls_back_rejected_ones():
    from test_scheduler import expected_output, make_request

    from jaxinfer.scheduler import Scheduler

    for wrong_at, per_step in ((None, 6), (1, 2), (0, 1)):  # all 5 drafts right (+1), the second wrong, the first
        sched = Scheduler(num_pages=100, page_size=4, max_num_seqs=4, token_budget=64, max_model_len=200)
        reqs = [make_request(i, 5 + 3 * i, 30) for i in range(3)]
        for r in reqs:
            sched.add(r)
        steps = _spec_run(sched, 64, wrong_at)
        for r in reqs:
            assert r.output_token_ids == expected_output(r.num_prompt_tokens, 30)
        assert len(steps) == 1 + -(-29 // per_step)  # the prompt step, then per_step tokens a step
        assert all(rc == 0 for rc in sched.allocator.ref_counts)


def test_scheduler_drafts_stay_within_budget_pages_and_max_tokens():
    from test_scheduler import expected_output, make_request

    from jaxinfer.scheduler import Scheduler

    # A pool that barely holds the load (preemptions) and a small step budget.
    sched = Scheduler(num_pages=10, page_size=4, max_num_seqs=4, token_budget=16, max_model_len=64)
    reqs = [make_request(i, 4 + i, 9 + 3 * i) for i in range(6)]
    for r in reqs:
        sched.add(r)
    steps = _spec_run(sched, max_spec_tokens=10, wrong_at=None)
    assert all(r.output_token_ids == expected_output(r.num_prompt_tokens, r.max_tokens) for r in reqs)
    assert any(b.num_drafts for b in steps) and sched.num_preemptions > 0
    assert all(rc == 0 for rc in sched.allocator.ref_counts)


def test_scheduler_batch_proposer_gets_pages_before_it_runs():
    """A draft model proposes for all of a step's rows at once (propose_batch) and writes the drafts' K/V as it
    runs: their pages are taken first, the limits keep within the budget, max_tokens and draft_len (0: none), and a
    request admitted in the same step gets none. The outputs are those without speculation."""
    from test_scheduler import expected_output, make_request

    from jaxinfer.scheduler import Scheduler

    calls = []

    def propose_batch(reqs, limits):
        for r, n in zip(reqs, limits):
            assert n >= 1 and len(r.pages) * sched.page_size >= r.num_computed_tokens + n  # pages for its drafts
        calls.append(limits)
        return [[1000 + r.num_tokens + j for j in range(n)] for r, n in zip(reqs, limits)]

    sched = Scheduler(num_pages=12, page_size=4, max_num_seqs=4, token_budget=16, max_model_len=64,
                      propose_batch=propose_batch, draft_len=lambda r: 0 if r.request_id == "r1" else 3)
    reqs = [make_request(i, 4 + i, 9 + 3 * i) for i in range(5)]
    for r in reqs:
        sched.add(r)
    steps = _spec_run(sched, max_spec_tokens=12, wrong_at=None)
    assert all(r.output_token_ids == expected_output(r.num_prompt_tokens, r.max_tokens) for r in reqs)
    assert calls and max(max(c) for c in calls) == 3
    for b in steps:
        for req, drafts, reset in zip(b.requests, b.drafts, b.reset):
            assert not (drafts and (req.request_id == "r1" or reset))
    assert any(len(d) == 3 for b in steps for d in b.drafts)
    assert all(rc == 0 for rc in sched.allocator.ref_counts)


def test_speculative_config_reaches_the_engine_config_from_the_cli():
    from jaxinfer import cli
    from jaxinfer.config import EngineConfig

    for command in (["generate", "x"], ["serve"], ["bench", "throughput"]):
        args = cli.build_parser().parse_args(command + ["--speculative-config", '{"num_speculative_tokens": 2}'])
        opts = cli.engine_options_from_args(args)
        assert opts == {"speculative_config": {"num_speculative_tokens": 2}}, command
    e = EngineConfig.from_options(**opts, token_buckets=(4, 16, 64), seq_buckets=(1, 4, 16))
    assert e.speculative_config == SpeculativeConfig(num_speculative_tokens=2)
    # verify buckets: b sequences of 1 + 2 tokens for each seq bucket b, sampling at every token
    assert e.verify_sizes() == [3, 12, 48] and {(3, 3, False), (12, 12, False), (48, 48, False)} <= set(e.buckets())
    assert EngineConfig.from_options(token_buckets=(4, 16, 64)).verify_sizes() == []
    for bad, key in (({"method": "eagle"}, "method"), ({"num_speculative_tokens": "3"}, "num_speculative_tokens"),
                     ({"prompt_lookup_min": 0}, "prompt_lookup_min"), ("ngram", "must be a dict")):
        with pytest.raises(ValueError, match=key):
            EngineConfig.from_options(speculative_config=bad)
    assert cli.main(["generate", "x", "--speculative-config", "{not json"]) == cli.EXIT_USAGE


def test_spec_decode_counters_reach_prometheus():
    """Engine.stats()' speculation counters -> the server's step snapshot -> /metrics."""
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from serving.async_engine import AsyncEngine
    from serving.metrics import Metrics

    stats = {"running": 1, "waiting": 0, "pages_used": 3, "pages_total": 10, "spec_draft_tokens": 9,
             "spec_accepted_tokens": 5, "spec_proposed_per_position": [4, 3, 2], "spec_accepted_per_position": [3, 1, 1]}
    ae = AsyncEngine(lambda: None)
    ae.engine = SimpleNamespace(stats=lambda: stats, num_compiles_since_ready=0)
    ae._snapshot()
    body, _ = Metrics(SimpleNamespace(stats=ae.stats, num_queued=0, is_ready=True)).render()
    got = {(s.name, s.labels.get("position")): s.value
           for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert got[("jaxinfer_spec_decode_draft_tokens_total", None)] == 9
    assert got[("jaxinfer_spec_decode_accepted_tokens_total", None)] == 5
    assert [got[("jaxinfer_spec_decode_drafts_per_position_total", str(j))] for j in range(3)] == [4, 3, 2]
    assert [got[("jaxinfer_spec_decode_accepted_per_position_total", str(j))] for j in range(3)] == [3, 1, 1]
