"""Traffic-adaptive buckets: the proposal (sizes that save the most padded tokens, within the budget), and the engine
learning them while it serves: the new programs compile in a background thread while steps go on with the buckets
they have (a step never waits for a compile), are added between two steps, give the same tokens, pad less, count as
no compile after ready, and are remembered by the next start of the same configuration."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest

from conftest import TINY_ENGINE_OPTIONS
from jaxinfer import adaptive_buckets as ab
from jaxinfer import compile_guard

BUCKETS = [(4, 1, False), (16, 1, False), (16, 4, False), (64, 4, False), (64, 16, False), (256, 16, False),
           (1, 1, True), (4, 4, True), (16, 16, True)]


def test_round_up_keeps_quarter_steps():
    assert [ab.round_up(t) for t in (3, 8, 9, 100, 112, 113, 300, 1100)] == [3, 8, 10, 112, 112, 128, 320, 1280]


def test_propose_picks_the_sizes_that_save_most():
    shapes = Counter({(100, 1, False): 50, (140, 2, False): 30, (20, 1, False): 10})
    new = ab.propose(shapes, BUCKETS, 4)
    assert new[0] == (160, 16, False)  # 80 steps in the 256-token bucket: 160 takes them all
    assert (112, 16, False) in new and all(b[1] == 16 or b[0] <= 64 for b in new)
    assert ab.padded_share(shapes, sorted(BUCKETS + new)) < 0.15 < 0.5 < ab.padded_share(shapes, BUCKETS)
    assert ab.propose(shapes, BUCKETS, 1) == [new[0]]  # the budget
    assert ab.propose(Counter({(64, 4, False): 99, (63, 4, False): 1}), BUCKETS, 4) == []  # not worth a program
    assert ab.propose(Counter({(250, 16, False): 5}), BUCKETS, 4) == []  # 256 already fits (round_up(250) == 256)


def test_propose_decode_row_counts():
    """Decode steps of 10-12 rows pad to the 16-row decode bucket: a 12-row one takes them (quarter steps: 10 -> 10,
    11 -> 12), a second 10-row one if it saves enough; one-row steps pad nothing; mixed and decode compete on one
    budget, by the tokens they save."""
    shapes = Counter({(12, 12, True): 60, (11, 11, True): 20, (10, 10, True): 20, (1, 1, True): 400})
    new = ab.propose(shapes, BUCKETS, 4)
    assert new == [(12, 12, True), (10, 10, True)]
    assert ab.padded_share(shapes, sorted(BUCKETS + new)) < ab.padded_share(shapes, BUCKETS)
    mixed = Counter({(100, 1, False): 50}) + shapes
    assert ab.propose(mixed, BUCKETS, 1) == [(112, 16, False)]  # 50 * 144 tokens saved beat 80 * 4 + ...
    log = ab.ShapeLog(3)
    for _ in range(2):
        log.record(12, 12, True)
    assert not log.due()
    log.record(12, 12, True)
    assert log.due() and log.take() == Counter({(12, 12, True): 3}) and not log.due()


def test_learned_sizes_round_trip(tmp_path):
    ab.save_learned(tmp_path / "f", [(112, 16, False), (40, 4, False), (3, 3, True)])
    assert ab.load_learned(tmp_path / "f") == [(3, 3, True), (40, 4, False), (112, 16, False)]
    (tmp_path / "f" / ab.LEARNED).write_text('{"buckets": [[40, 4]]}')  # written before decode buckets were learned
    assert ab.load_learned(tmp_path / "f") == [(40, 4, False)]
    (tmp_path / "f" / ab.LEARNED).write_text("{broken")
    assert ab.load_learned(tmp_path / "f") == [] and ab.load_learned(None) == []


OPTS = {**TINY_ENGINE_OPTIONS, "max_num_seqs": 4, "seq_buckets": (1, 4), "num_pages": 160}
PROMPTS = [np.random.default_rng(i).integers(0, 256, 36 + i % 5).tolist() for i in range(24)]  # 36-40 tokens: 64


def serve(eng, prompts, during=None):
    """Each prompt alone (a new one as the last finishes): one prompt step each, then decodes."""
    from jaxinfer.sampling_params import SamplingParams

    out, slow = [], []
    for p in prompts:
        rid = eng.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while eng.has_unfinished():
            t = time.monotonic()
            for o in eng.step():
                if o.finished and o.request_id == rid:
                    out.append(o.outputs[0].token_ids)
            slow.append(time.monotonic() - t)
            if during:
                during()
    return out, slow


def test_engine_learns_buckets_beside_serving(tiny_llama_dir, tmp_path, monkeypatch):
    from jaxinfer.engine import Engine
    from jaxinfer.runner import ModelRunner

    d = str(tiny_llama_dir[0])
    plain, _ = serve(Engine(d, **OPTS), PROMPTS)
    cache = tmp_path / "cache"
    learning = {**OPTS, "adaptive_buckets": True, "adaptive_window": 8, "adaptive_max_buckets": 2,
                "use_compilation_cache": True, "compilation_cache_dir": str(cache)}
    eng = Engine(d, **learning)
    assert (40, 4, False) not in eng.runner.buckets

    compiling = threading.Event()
    real = ModelRunner.compile_buckets

    def slow_compile(self, buckets, state):  # a compile that takes long: serving must not wait for it
        compiling.set()
        time.sleep(3)
        out = real(self, buckets, state)
        compiling.clear()
        return out

    monkeypatch.setattr(ModelRunner, "compile_buckets", slow_compile)
    steps_while_compiling = []
    background = compile_guard.background_count()
    got, step_seconds = serve(eng, PROMPTS, during=lambda: steps_while_compiling.append(compiling.is_set()))
    assert got == plain  # the same tokens while the compile runs
    assert sum(steps_while_compiling) >= 10  # steps ran while the compile slept and worked ...
    assert max(step_seconds) < 1.5  # ... none waited for it
    assert (40, 4, False) not in eng.runner.buckets
    deadline = time.monotonic() + 120
    while not eng._adaptive["future"].done() and time.monotonic() < deadline:
        time.sleep(0.1)

    # the next step adds it (36-40 tokens -> 40); prompts of that size then pad less: 36-40 of 40 tokens, not of 64
    before = eng.runner.tokens_scheduled, eng.runner.tokens_computed
    again_out, _ = serve(eng, PROMPTS[:4])
    assert again_out == plain[:4]  # the same tokens from the new bucket
    assert (40, 4, False) in eng.runner.buckets and eng.stats()["adaptive_buckets_added"] == 1
    sched, comp = eng.runner.tokens_scheduled - before[0], eng.runner.tokens_computed - before[1]
    assert comp - sched == 40 * 4 - sum(len(p) for p in PROMPTS[:4])  # one-sequence decode steps pad nothing
    assert eng.num_compiles_since_ready == 0 and compile_guard.background_count() > background

    # the next start of this configuration compiles the learned bucket with the rest
    again = Engine(d, **learning)
    assert (40, 4, False) in again.runner.buckets and (40, 4, False) in again.runner.compiled
    assert again.stats()["adaptive_buckets_added"] == 1


def test_engine_learns_a_decode_row_count(tiny_llama_dir, tmp_path):
    """Three sequences decoding together pad to the 4-row decode bucket; the engine learns a 3-row one (its forward
    program and its sampler programs, compiled beside serving), decodes in it with the same tokens and no compile
    after ready, and the next start compiles it (samplers too) with the rest."""
    from jaxinfer.engine import Engine
    from jaxinfer.sampling_params import SamplingParams

    d = str(tiny_llama_dir[0])
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=1, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)]

    def run(eng):
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
        return [done[i] for i in ids]

    plain = run(Engine(d, **OPTS))
    learning = {**OPTS, "adaptive_buckets": True, "adaptive_window": 8, "use_compilation_cache": True,
                "compilation_cache_dir": str(tmp_path / "cache")}
    eng = Engine(d, **learning)
    assert run(eng) == plain
    deadline = time.monotonic() + 120
    while eng._adaptive["future"] is not None and time.monotonic() < deadline:
        eng._adapt()  # between steps, as step() does
        time.sleep(0.05)
    assert (3, 3, True) in eng.runner.buckets
    assert {(3, v) for v in ("greedy", "random", "full")} <= set(eng.runner.compiled_samplers)
    used, pick = [], eng.runner.bucket_for
    eng.runner.bucket_for = lambda *a, **k: used.append(pick(*a, **k)) or used[-1]
    assert run(eng) == plain  # greedy, seeded and logprob rows from the 3-row programs
    assert used.count((3, 3, True)) >= 30 and (4, 4, True) not in used  # every 3-row decode step, no padded row
    assert eng.num_compiles_since_ready == 0
    again = Engine(d, **learning)
    assert (3, 3, True) in again.runner.buckets and (3, "greedy") in again.runner.compiled_samplers
    assert run(again) == plain


def test_adaptive_buckets_options():
    from jaxinfer.config import EngineConfig

    for bad, match in ((dict(adaptive_window=0), "adaptive_window"), (dict(adaptive_max_buckets=1.5), "adaptive_max"),
                       (dict(adaptive_buckets="yes"), "adaptive_buckets"),
                       (dict(adaptive_buckets=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
                        "not with speculative decoding")):
        with pytest.raises(ValueError, match=match):
            EngineConfig.from_options(**bad)
