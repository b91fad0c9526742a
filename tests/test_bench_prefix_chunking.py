"""benchmarks/prefix_chunking.py --smoke on the tiny model: the script runs, its checks hold, its JSON is whole."""

from __future__ import annotations

import json

from conftest import bench_module


def test_prefix_chunking_smoke(tiny_llama_dir, tmp_path, capsys):
    mod = bench_module("prefix_chunking")
    out = tmp_path / "pc.json"
    report = mod.main(["--smoke", "--model", str(tiny_llama_dir[0]), "--json-out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    ctx = report["context"]
    assert ctx["argv"][1:] == ["--smoke", "--model", str(tiny_llama_dir[0]), "--json-out", str(out)]
    assert ctx["jax_version"] and ctx["backend"] == "cpu" and "date" in ctx and "loadavg_end" in ctx
    assert report["compiles_while_measured"] == 0
    off, on = report["shared_prefix"]
    assert not off["prefix_caching"] and off["hit_rate"] == 0 and off["tokens_computed"] == off["tokens_if_uncached"]
    assert on["prefix_caching"] and on["hit_rate"] > 0.5 and on["tokens_computed"] < off["tokens_computed"]
    assert on["output_tokens"] == off["output_tokens"] == 4 * 4
    whole, chunked = report["long_arrivals"]
    assert not whole["chunked"] and chunked["chunked"] and whole["itl_samples"] > 0 and chunked["itl_samples"] > 0
    assert whole["tokens_computed"] == chunked["tokens_computed"]
    out_lines = capsys.readouterr().out.splitlines()
    assert any("ITL p99" in line for line in out_lines) and out_lines[-1].startswith("compiles while measured: 0")
