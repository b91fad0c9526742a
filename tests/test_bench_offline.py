"""`jaxinfer bench throughput` and `jaxinfer bench latency`: lengths, flag errors, and short runs on the tiny model.

The runs use the tiny random Llama (no tokenizer: prompts are random ids anyway) with one (16, 4) bucket, so
each engine compiles in seconds; the --warm-start test runs the whole command in a fresh process, as a user
would, so its persistent compilation cache does not leak into this test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxinfer import bench_offline, cli
from jaxinfer.bench_offline import draw_lengths, lengths_from_args

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--token-buckets", "16", "--seq-buckets", "4", "--max-num-seqs", "4", "--max-model-len", "64",
              "--page-size", "4", "--kv-cache-memory", "4MiB", "--quiet"]


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


# -- lengths ------------------------------------------------------------------------------------------------------


def test_random_lengths_are_uniform_in_range_and_seeded():
    kw = dict(input_len=100, output_len=20, range_ratio=0.25, seed=5)
    ins, outs = draw_lengths(2000, **kw)
    assert (ins, outs) == draw_lengths(2000, **kw)
    assert (ins, outs) != draw_lengths(2000, **{**kw, "seed": 6})
    assert min(ins) == 75 and max(ins) == 125 and abs(np.mean(ins) - 100) < 2
    assert min(outs) == 15 and max(outs) == 25
    assert draw_lengths(4, input_len=7, output_len=3) == ([7] * 4, [3] * 4)  # range ratio 0: exact lengths
    # --input-lens-seed moves the input lengths alone
    ins2, outs2 = draw_lengths(2000, **kw, input_lens_seed=9)
    assert ins2 != ins and outs2 == outs


def test_sharegpt_like_lengths_are_seeded_long_tailed_and_clipped():
    kw = dict(dataset="sharegpt-like", input_len=bench_offline.SHAREGPT_INPUT_MEDIAN,
              output_len=bench_offline.SHAREGPT_OUTPUT_MEDIAN, seed=3)
    ins, outs = draw_lengths(4000, **kw)
    assert (ins, outs) == draw_lengths(4000, **kw) and ins != draw_lengths(4000, **{**kw, "seed": 4})[0]
    assert 80 <= np.median(ins) <= 96 and 205 <= np.median(outs) <= 245
    assert 140 <= np.mean(ins) <= 185 and 300 <= np.mean(outs) <= 380  # ShareGPT's means: ~161 and ~338
    assert max(ins) > 8 * np.median(ins) and min(ins) >= 1 and min(outs) >= 1  # a long tail
    ins, outs = draw_lengths(4000, **kw, max_model_len=512)
    assert max(ins) == 511 and all(1 <= o and i + o <= 512 for i, o in zip(ins, outs))


def test_input_len_range_is_numpys_integers_draw():
    args = parse("bench", "throughput", "--input-len-range", "128,1025", "--seed", "1234", "--num-prompts", "300")
    ins, _ = lengths_from_args(args, max_model_len=None)
    assert ins == np.random.default_rng(1234).integers(128, 1025, size=300).tolist()
    args = parse("bench", "latency", "--input-len-range", "128,1025", "--input-lens-seed", "7", "--batch-size", "9")
    assert lengths_from_args(args, None)[0] == np.random.default_rng(7).integers(128, 1025, size=9).tolist()


# -- flags ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["throughput", "latency"])
def test_help_lists_the_flags(mode, capsys):
    assert cli.main(["bench", mode, "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--input-len", "--output-len", "--range-ratio", "--dataset", "--input-len-range", "--seed",
                 "--input-lens-seed", "--ignore-eos", "--json-out", "--warm-start", "--token-buckets", "--load-format"):
        assert flag in out, flag
    assert ("--num-prompts" if mode == "throughput" else "--num-iters-warmup") in out
    assert "--startup-only" not in out


BAD = [
    (["--input-len", "60", "--output-len", "10", "--max-model-len", "64"],
     "--input-len + --output-len: prompts of up to 60 tokens plus up to 10 output tokens (70) exceed the context "
     "of 64 tokens (--max-model-len)"),
    (["--input-len", "40", "--output-len", "10", "--range-ratio", "0.5", "--max-model-len", "64"],
     "--input-len + --output-len: prompts of up to 60 tokens plus up to 15"),
    (["--input-len-range", "10,60", "--output-len", "8", "--max-model-len", "64"], "--input-len-range + --output-len"),
    (["--range-ratio", "1"], "--range-ratio: must be in [0, 1)"),
    (["--input-len-range", "9,9"], "argument --input-len-range: expected LO,HI"),
    (["--dataset", "sharegpt-like", "--input-len-range", "1,9"], "--input-len-range: draws uniform input lengths"),
    (["--warm-start", "--no-compilation-cache"], "--warm-start: a warm start loads programs"),
    (["--dataset", "sharegpt"], "argument --dataset: no dataset file is read here; sharegpt-like"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
]


@pytest.mark.parametrize("extra,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_exit_2_naming_the_flag(extra, expected, capsys, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("an engine was built")

    monkeypatch.setattr(bench_offline, "build_engine", forbidden)
    monkeypatch.setattr(bench_offline, "startup_in_fresh_process", forbidden)
    assert cli.main(["bench", "throughput", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err


def test_compiles_while_measured_are_a_warning():
    report = {"results": {"compiles_while_measured": 2, "requests_stopped_early": 3, "preemptions": 0},
              "startup": {"compilation_cache": True, "this_process": {"cache_files_before": 0}}}
    warning, early = bench_offline.notes_for(report)
    assert warning.startswith("warning: 2 compilation(s) while measured") and "--ignore-eos" in early


# -- runs on the tiny model ---------------------------------------------------------------------------------------


def test_throughput_makes_exactly_the_asked_tokens(tiny_llama_dir, tmp_path, capsys):
    out_json = tmp_path / "tp.json"
    rc = cli.main(["bench", "throughput", "--model", str(tiny_llama_dir[0]), "--num-prompts", "6", "--input-len", "8",
                   "--output-len", "5", "--ignore-eos", "--json-out", str(out_json), "--no-compilation-cache",
                   *TINY_FLAGS])
    assert rc == 0
    rep = json.loads(out_json.read_text())
    r = rep["results"]
    assert r["num_requests"] == 6 and r["output_tokens"] == r["requested_output_tokens"] == 6 * 5
    assert r["prompt_tokens"] == 6 * 8 and r["requests_stopped_early"] == 0
    assert r["compiles_while_measured"] == 0 and r["elapsed_s"] > 0 and r["engine_steps"] >= 5
    assert r["speculation"] is None
    assert r["requests_per_s"] == pytest.approx(6 / r["elapsed_s"])
    assert r["total_tokens_per_s"] == pytest.approx((48 + 30) / r["elapsed_s"])
    ctx = rep["context"]
    assert ctx["date"] and ctx["jax_version"] and ctx["backend"] == "cpu" and ctx["devices"] and "git_commit" in ctx
    assert ctx["command"].startswith("jaxinfer bench throughput") and "--ignore-eos" in ctx["command"]
    assert rep["mode"] == "throughput" and rep["config"]["num_prompts"] == 6 and "batch_size" not in rep["config"]
    s = rep["startup"]["this_process"]
    assert s["total_s"] >= s["weights_s"] + s["kv_cache_s"] + s["compile_s"] and s["num_buckets"] == 2  # (16, 4) mixed + (4, 4) decode
    assert rep["startup"]["compilation_cache"] is False and "cold_process" not in rep["startup"]
    assert rep["workload"]["input_lens"] == [8] * 6 and rep["engine_config"]["max_model_len"] == 64
    out = capsys.readouterr().out
    assert out.lstrip().startswith("jaxinfer bench throughput") and "output tok/s" in out and "this process" in out


def test_throughput_reports_speculation(tiny_llama_dir, tmp_path, capsys):
    out_json = tmp_path / "tp.json"
    spec = ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2, '
            '"disable_by_batch_size": 8}')
    rc = cli.main(["bench", "throughput", "--model", str(tiny_llama_dir[0]), "--num-prompts", "4", "--input-len", "8",
                   "--output-len", "24", "--ignore-eos", "--json-out", str(out_json), "--no-compilation-cache",
                   "--speculative-config", spec, *TINY_FLAGS])
    assert rc == 0
    r = json.loads(out_json.read_text())["results"]
    sp = r["speculation"]
    assert r["output_tokens"] == 4 * 24 and r["compiles_while_measured"] == 0
    assert len(sp["proposed_per_position"]) == 2 and sp["draft_tokens"] == sum(sp["proposed_per_position"]) > 0
    assert 0 <= sp["accepted_tokens"] == sum(sp["accepted_per_position"]) <= sp["draft_tokens"]
    assert sp["proposed_per_position"][0] == sp["verify_runs"] >= sp["proposed_per_position"][1]
    assert sp["off_steps"] == 0  # 4 requests, disable_by_batch_size 8: every step may speculate
    out = capsys.readouterr().out
    assert "speculative decoding while measured" in out and "0 steps past disable_by_batch_size" in out


def test_latency_reports_percentiles(tiny_llama_dir, tmp_path, capsys):
    out_json = tmp_path / "lat.json"
    rc = cli.main(["bench", "latency", "--model", str(tiny_llama_dir[0]), "--batch-size", "3", "--num-iters-warmup",
                   "1", "--num-iters", "3", "--input-len", "8", "--output-len", "6", "--range-ratio", "0.5",
                   "--ignore-eos", "--json-out", str(out_json), "--no-compilation-cache", *TINY_FLAGS])
    assert rc == 0
    rep = json.loads(out_json.read_text())
    r = rep["results"]
    assert r["batch_size"] == 3 and r["num_iters"] == 3 and r["num_iters_warmup"] == 1
    assert len(r["iteration_latencies_s"]) == 3 and r["compiles_while_measured"] == 0
    for key in ("latency_s", "ttft_ms", "tpot_ms"):
        assert set(r[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"], (key, r[key])
    assert r["ttft_ms"]["mean"] < r["latency_s"]["mean"] * 1e3
    w = rep["workload"]
    assert all(4 <= i <= 12 for i in w["input_lens"]) and all(3 <= o <= 9 for o in w["output_lens"])
    table = capsys.readouterr().out
    assert "batch latency s" in table and "TTFT ms" in table and "TPOT ms" in table


def test_warm_start_measures_cold_and_warm_in_fresh_processes(tiny_llama_dir, tmp_path):
    cache, out_json = tmp_path / "xla", tmp_path / "warm.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "jaxinfer", "bench", "throughput", "--model", str(tiny_llama_dir[0]),
                        "--num-prompts", "3", "--input-len", "8", "--output-len", "4", "--ignore-eos", "--warm-start",
                        "--compilation-cache-dir", str(cache), "--json-out", str(out_json), *TINY_FLAGS],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out_json.read_text())
    s = rep["startup"]
    cold, warm, this = s["cold_process"], s["warm_process"], s["this_process"]
    assert s["compilation_cache"] and s["cache_dir"] == str(cache)
    assert cold["cache_files_before"] == 0 and cold["cache_files_after"] > 0  # the cold start filled the cache
    assert warm["cache_files_before"] == this["cache_files_before"] == cold["cache_files_after"]
    assert warm["cache_files_after"] == warm["cache_files_before"]  # nothing new: all loaded from the cache
    for x in (cold, warm):
        assert x["num_buckets"] == 2 and x["process_wall_s"] > x["total_s"] > 0
        assert set(x) >= {"weights_s", "kv_cache_s", "compile_s", "other_s"}
    assert rep["results"]["output_tokens"] == 12 and rep["results"]["compiles_while_measured"] == 0
    assert "cold, fresh process" in r.stdout and "warm, fresh process" in r.stdout
