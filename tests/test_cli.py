"""The `jaxinfer` command line: flags -> SamplingParams / EngineConfig, error handling, --help, and end to end.

The end-to-end tests never load the default model (too slow here): they run a tiny random Llama whose
vocabulary matches the default model's tokenizer, saved beside it, so the chat template is the real one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from jaxinfer import cli
from jaxinfer.config import EngineConfig
from jaxinfer.sampling_params import SamplingParams


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: argument errors must be caught before that."""

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "build_llm", forbidden)


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


# -- flags -> SamplingParams / EngineConfig ------------------------------------------------------------------


def test_sampling_flags_map_onto_sampling_params():
    args = parse(
        "generate", "hi", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "5", "--min-p", "0.1",
        "--max-tokens", "7", "--min-tokens", "2", "--seed", "3", "--stop", "a", "--stop", "b c",
        "--stop-token-id", "5", "--stop-token-id", "6", "--repetition-penalty", "1.1", "--presence-penalty", "0.5",
        "--frequency-penalty", "-0.5", "-n", "2", "--logprobs", "3", "--ignore-eos",
    )
    assert cli.sampling_params_from_args(args) == SamplingParams(
        n=2, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, max_tokens=7, min_tokens=2, seed=3, stop=["a", "b c"],
        stop_token_ids=[5, 6], repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, logprobs=3,
        ignore_eos=True,
    )


def test_sampling_defaults_per_command():
    chat = cli.sampling_params_from_args(parse("chat"))
    assert (chat.temperature, chat.top_p, chat.max_tokens, chat.n) == (0.0, 1.0, 512, 1)
    gen = cli.sampling_params_from_args(parse("generate", "x"))
    assert gen.greedy and (gen.top_p, gen.max_tokens, gen.n, gen.stop, gen.logprobs) == (1.0, 128, 1, [], None)


def test_engine_flags_map_onto_engine_config():
    args = parse(
        "generate", "x", "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "32",
        "--token-buckets", "1,4,16,64", "--seq-buckets", "1, 8", "--decode-buckets", "2,4", "--page-size", "8",
        "--kv-cache-memory", "64MiB",
        "--dtype", "bfloat16", "--load-format", "dummy", "--compilation-cache-dir", "/tmp/cc", "--no-compilation-cache",
        "--no-prefix-caching", "--no-async-scheduling", "--engine-seed", "7", "--quiet", "--model", "some/dir",
    )
    opts = cli.engine_options_from_args(args)
    assert opts == dict(
        max_model_len=512, max_num_seqs=8, max_num_batched_tokens=32, token_buckets=(1, 4, 16, 64), seq_buckets=(1, 8),
        decode_buckets=(2, 4), page_size=8, kv_cache_memory="64MiB", dtype="bfloat16", load_format="dummy", compilation_cache_dir="/tmp/cc",
        use_compilation_cache=False, seed=7, show_progress=False, enable_prefix_caching=False, async_scheduling=False,
    )
    cfg = EngineConfig.from_options(**opts)
    assert not cfg.enable_prefix_caching and EngineConfig().enable_prefix_caching
    assert not cfg.async_scheduling and EngineConfig().async_scheduling
    assert cfg.kv_cache_memory == 64 << 20 and cfg.token_budget == 32 and cfg.buckets()[-1] == (64, 8, False)
    assert args.model == "some/dir"


def test_engine_config_preset_and_file_give_defaults_that_flags_override(tmp_path):
    opts = cli.engine_options_from_args(parse("generate", "x", "--engine-config", "h100-llama-3.1-8b"))
    assert opts["max_num_seqs"] == 512 and opts["token_buckets"] == [512, 2048, 8192] and "_comment" not in opts
    opts = cli.engine_options_from_args(parse("generate", "x", "--engine-config", "h100-llama-3.1-8b",
                                              "--max-model-len", "8192", "--seq-buckets", "1,256", "--max-num-seqs", "256"))
    assert opts["max_model_len"] == 8192 and opts["seq_buckets"] == (1, 256) and opts["max_num_seqs"] == 256
    assert opts["token_buckets"] == [512, 2048, 8192]  # the preset's, not overridden
    f = tmp_path / "mine.json"
    f.write_text('{"max_num_seqs": 4, "seq_buckets": [1, 4], "_note": "x"}')
    assert cli.engine_options_from_args(parse("generate", "x", "--engine-config", str(f))) == dict(
        max_num_seqs=4, seq_buckets=[1, 4])
    f.write_text('{"max_num_seq": 4}')
    with pytest.raises(cli.UsageError, match="--engine-config: unknown engine option"):
        cli.engine_options_from_args(parse("generate", "x", "--engine-config", str(f)))
    with pytest.raises(cli.UsageError, match="--engine-config: .*known presets: .*h100-llama-3.1-8b"):
        cli.engine_options_from_args(parse("generate", "x", "--engine-config", "nope"))


def test_unset_engine_flags_leave_engine_defaults():
    assert cli.engine_options_from_args(parse("generate", "x")) == {}
    # chat runs one conversation: single-sequence buckets unless the user says otherwise
    assert cli.chat_engine_options(parse("chat")) == dict(max_num_seqs=1, seq_buckets=(1,))
    assert cli.chat_engine_options(parse("chat", "--max-num-seqs", "4")) == dict(max_num_seqs=4)


def test_engine_flags_are_shared_with_bench():
    args = parse("bench", "--token-buckets", "4,16", "--quiet", "--no-peers", "--batch-size", "4")
    assert cli.engine_options_from_args(args) == dict(token_buckets=(4, 16), show_progress=False)
    assert (args.input_len, args.output_len, args.batch_size, args.no_peers) == (128, 128, 4, True)


# -- bad input: exit 2, one line naming the flag, no traceback ---------------------------------------------------

BAD = [
    (["generate", "x", "--top-p", "2"], "--top-p: top_p must be"),
    (["generate", "x", "--temperature", "-1"], "--temperature: temperature must be"),
    (["generate", "x", "--max-tokens", "0"], "--max-tokens: max_tokens must be"),
    (["generate", "x", "--min-tokens", "5", "--max-tokens", "2"], "--min-tokens: min_tokens must be <= max_tokens"),
    (["generate", "x", "-n", "0"], "-n: n must be"),
    (["generate", "x", "--presence-penalty", "3"], "--presence-penalty: presence_penalty"),
    (["generate", "x", "--logprobs", "-1"], "--logprobs: logprobs"),
    (["generate", "x", "--stop-token-id", "-3"], "--stop-token-id: stop_token_ids"),
    (["chat", "hi", "--top-k", "-2"], "--top-k: top_k must be"),
    (["chat", "hi", "--top-k", "abc"], "argument --top-k: invalid int value: 'abc'"),
    (["chat", "hi", "--repetition-penalty", "0"], "--repetition-penalty: repetition_penalty"),
    (["generate", "x", "--token-buckets", "1,4"], "--token-buckets"),
    (["generate", "x", "--seq-buckets", "1,4", "--max-num-seqs", "8"], "--seq-buckets"),
    (["generate", "x", "--token-buckets", "16,4"], "token_buckets must be"),
    (["generate", "x", "--decode-buckets", "8,64"], "--decode-buckets: decode_buckets must be"),
    (["generate", "x", "--token-buckets", "1,x"], "argument --token-buckets: expected comma-separated"),
    (["generate", "x", "--page-size", "12"], "--page-size: page_size must be a power of two"),
    (["generate", "x", "--page-size", "0"], "argument --page-size: must be >= 1"),
    (["generate", "x", "--max-num-batched-tokens", "1000"], "max_num_batched_tokens (1000) exceeds"),
    (["generate", "x", "--kv-cache-memory", "lots"], "argument --kv-cache-memory: expected a size"),
    (["generate", "x", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["generate", "x", "--load-format", "pickle"], "argument --load-format: invalid choice"),
    (["generate"], "the following arguments are required: PROMPT"),
    (["generate", ""], "PROMPT: must not be empty"),
    (["chat", " "], "MESSAGE: must not be empty"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    (["bench", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_bad_input_exits_2_with_one_clear_line(argv, expected, capsys, no_model):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err


def test_missing_model_is_an_error_not_a_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert cli.main(["generate", "x", "--model", missing, "--quiet", "--no-compilation-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing in err and err.count("\n") == 1


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_llm", interrupted)
    assert cli.main(["generate", "x"]) == 130
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["chat"], ["generate"], ["bench"]])
def test_help(argv, capsys, no_model):
    assert cli.main(argv + ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['jaxinfer'] + argv)}")
    assert "examples:" in out
    for flag in ({"chat": ["--system", "--temperature", "--max-num-seqs"], "generate": ["--json", "--chat", "--stop"],
                  "bench": ["--input-len", "--batch-size", "--no-peers", "--json-out", "--token-buckets"]}
                 .get(argv[0] if argv else "", ["chat", "generate", "bench"])):
        assert flag in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("jaxinfer ")


def test_python_m_jaxinfer():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", "x", "--top-p", "2"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --top-p: top_p must be a finite number in (0, 1], got 2.0"


# -- end to end on a tiny random model -------------------------------------------------------------------------

TINY_FLAGS = ["--token-buckets", "4,16", "--max-model-len", "128", "--kv-cache-memory", "4MiB", "--quiet",
              "--no-compilation-cache"]


class Recorder(io.StringIO):
    """stdout that remembers each write, to see the reply arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)

    def isatty(self):
        return False


@pytest.fixture(scope="module")
def streamed_chat(tiny_chat_model):
    """`jaxinfer chat MESSAGE` through the real load path; returns (llm, stdout recorder, exit code)."""
    built = {}
    real = cli.build_llm

    def keep(args, opts):
        built["llm"] = real(args, opts)
        return built["llm"]

    mp = pytest.MonkeyPatch()
    rec = Recorder()
    mp.setattr(cli, "build_llm", keep)
    mp.setattr("sys.stdout", rec)
    try:
        rc = cli.main(["chat", "Hello there!", "--model", tiny_chat_model, "--temperature", "0", "--max-tokens", "12",
                       "--ignore-eos", *TINY_FLAGS])
    finally:
        mp.undo()
    return built.get("llm"), rec, rc


def test_chat_streams_the_reply(streamed_chat):
    llm, rec, rc = streamed_chat
    assert rc == 0
    assert llm.engine.ecfg.max_num_seqs == 1 and llm.engine.ecfg.seq_buckets == (1,)
    assert llm.engine.num_compiles_since_ready == 0
    ref = llm.chat([{"role": "user", "content": "Hello there!"}], SamplingParams(temperature=0, max_tokens=12,
                                                                              ignore_eos=True), use_tqdm=False)[0]
    assert len(ref.outputs[0].token_ids) == 12
    assert rec.getvalue() == ref.outputs[0].text + "\n"
    pieces = [w for w in rec.writes if w]
    assert len(pieces) >= 3, pieces  # token by token, not all at the end


def test_chat_repl_keeps_history(streamed_chat, monkeypatch):
    llm, _, _ = streamed_chat
    seen = []
    real_template = llm.engine.tokenizer.apply_chat_template

    def spy(messages, *a, **k):
        seen.append([dict(m) for m in messages])
        return real_template(messages, *a, **k)

    monkeypatch.setattr(llm.engine.tokenizer, "apply_chat_template", spy)
    monkeypatch.setattr(cli, "build_llm", lambda args, opts: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n\n/reset\nsecond\nthird\n/exit\nnever\n"))
    rec = Recorder()
    monkeypatch.setattr("sys.stdout", rec)
    assert cli.main(["chat", "--system", "Be brief.", "--temperature", "0", "--max-tokens", "3", "--ignore-eos"]) == 0
    assert [[m["role"] for m in conv] for conv in seen] == [
        ["system", "user"], ["system", "user"], ["system", "user", "assistant", "user"]]
    assert [conv[-1]["content"] for conv in seen] == ["first", "second", "third"]
    second_reply = seen[2][2]["content"]  # the reply to "second" became history
    assert second_reply and second_reply + "\n" in rec.getvalue()
    assert rec.getvalue().endswith("\n") and rec.getvalue().count("\n") >= 3


def test_chat_repl_eof_quits(streamed_chat, monkeypatch, capsys):
    llm, _, _ = streamed_chat
    monkeypatch.setattr(cli, "build_llm", lambda args, opts: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["chat"]) == 0
    assert capsys.readouterr().out == ""


def test_generate_json(streamed_chat, monkeypatch, capsys):
    llm, _, _ = streamed_chat
    monkeypatch.setattr(cli, "build_llm", lambda args, opts: llm)
    assert cli.main(["generate", "Once upon a time", "The sky", "--max-tokens", "4", "--ignore-eos", "--logprobs", "2",
                     "-n", "2", "--temperature", "1", "--seed", "1", "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["prompt"] for d in docs] == ["Once upon a time", "The sky"]
    for d in docs:
        assert [c["index"] for c in d["outputs"]] == [0, 1]
        for c in d["outputs"]:
            assert len(c["token_ids"]) == 4 and c["finish_reason"] == "length"
            assert len(c["logprobs"]) == 4
            for pos, tok in zip(c["logprobs"], c["token_ids"]):
                assert pos[0]["token_id"] == tok and pos[0]["logprob"] <= 0 and 2 <= len(pos) <= 3
            assert c["cumulative_logprob"] == pytest.approx(sum(p[0]["logprob"] for p in c["logprobs"]), abs=1e-4)
        assert d["metrics"]["num_generated_tokens"] == 8 and d["metrics"]["ttft_s"] > 0


def test_generate_text_and_chat_flag(streamed_chat, monkeypatch, capsys):
    llm, _, _ = streamed_chat
    monkeypatch.setattr(cli, "build_llm", lambda args, opts: llm)
    assert cli.main(["generate", "Hi", "--chat", "--max-tokens", "5", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    ref = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                   use_tqdm=False)[0]
    assert out == ref.outputs[0].text + "\n"
    assert cli.main(["generate", "a", "b", "--max-tokens", "2", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- prompt 0 ---\n") and "\n--- prompt 1 ---\n" in out


def test_prompt_too_long_is_a_usage_error(streamed_chat, monkeypatch, capsys):
    llm, _, _ = streamed_chat
    monkeypatch.setattr(cli, "build_llm", lambda args, opts: llm)
    assert cli.main(["generate", "word " * 200]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PROMPT") or err.startswith("error: prompt:"), err
    assert not llm.engine.has_unfinished()


def test_bench_smoke(tiny_chat_model, tmp_path, capsys):
    """The whole bench on the tiny model, with the HF peer (llama.cpp needs a .gguf: skipped with a note)."""
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", tiny_chat_model, "--input-len", "8", "--output-len", "5", "--batch-size", "3",
                   "--max-num-seqs", "4", "--seq-buckets", "1,4", "--threads", "1", "--json-out", str(out_json),
                   *TINY_FLAGS])
    assert rc == 0
    table = capsys.readouterr().out
    rep = json.loads(out_json.read_text())
    ctx = rep["context"]
    assert ctx["backend"] == "cpu" and ctx["jax_version"] and ctx["cpu_count"] >= 1 and ctx["date"]
    assert "git_commit" in ctx and ctx["command"].startswith("jaxinfer")
    jx, hf, lc = rep["results"]
    assert jx["engine"] == "jaxinfer" and jx["compiles_while_measured"] == 0
    assert jx["single"]["output_tokens"] == 5 and jx["single"]["decode_tok_s"] > 0 and jx["single"]["ttft_s"] > 0
    runs = jx["single"]["runs_decode_tok_s"]  # --single-runs 3 (default): the reported one is the median
    assert len(runs) == 3 and jx["single"]["decode_tok_s"] == sorted(runs)[1]
    assert jx["batch"]["output_tokens"] == 15 and jx["batch"]["tok_s"] > 0
    assert set(jx["startup"]) >= {"weights_s", "kv_cache_s", "compile_s"}
    assert hf["engine"] == "HF transformers" and hf["single"]["output_tokens"] == 5 and hf["batch"]["output_tokens"] == 15
    assert lc["engine"] == "llama.cpp" and lc["skipped"]
    assert "jaxinfer" in table and "HF transformers" in table and "vs HF" in table
    assert table.rstrip().splitlines()[-1].startswith("note: llama.cpp skipped")


def test_bucket_sets_that_cannot_hold_every_step_are_refused():
    """Every step must fit a bucket: decode steps a (B, B) decode bucket, mixed steps a (T > B) one, so the
    largest token bucket must reach the seq bucket that holds max_num_seqs."""
    with pytest.raises(ValueError, match="largest token bucket"):
        EngineConfig(max_num_seqs=5, seq_buckets=(1, 4, 8), token_buckets=(4, 6))
    with pytest.raises(ValueError, match="largest seq bucket"):
        EngineConfig(max_num_seqs=9, seq_buckets=(1, 4, 8), token_buckets=(4, 64))
    cfg = EngineConfig(max_num_seqs=5, seq_buckets=(1, 4, 8), token_buckets=(4, 8))
    assert cfg.buckets() == [(1, 1, True), (4, 1, False), (4, 4, True), (8, 1, False), (8, 4, False),
                             (8, 8, False), (8, 8, True)]


def test_decode_buckets_add_decode_programs_only():
    """decode_buckets (vLLM's cudagraph_capture_sizes) add (B, B) decode buckets and no mixed ones; each must fit
    under the seq bucket that holds max_num_seqs."""
    base = EngineConfig(max_num_seqs=16, seq_buckets=(1, 4, 16), token_buckets=(4, 16, 64))
    cfg = dataclasses.replace(base, decode_buckets=(2, 8, 12))
    assert set(cfg.buckets()) - set(base.buckets()) == {(2, 2, True), (8, 8, True), (12, 12, True)}
    for bad in ((8, 2), (4, 32), (0,)):
        with pytest.raises(ValueError, match="decode_buckets"):
            dataclasses.replace(base, decode_buckets=bad)
    assert EngineConfig.from_options(decode_buckets=[2, 8]).decode_buckets == (2, 8)


def test_mixed_buckets_never_move_a_step_to_more_tokens():
    """Mixed buckets keep only B >= T / 16 (and the largest B below T): a mixed step may land on a larger B
    than with every (T, B) compiled, never on a larger T."""
    def smallest(buckets, n, s):
        return min((b for b in buckets if not b[2] and b[0] >= n and b[1] >= s), key=lambda b: (b[0], b[1]))

    rng = np.random.default_rng(0)
    for _ in range(200):
        seqs = tuple(sorted({1, *rng.choice([2, 4, 8, 16, 32, 64, 128, 256, 512], rng.integers(1, 5)).tolist()}))
        max_num_seqs = int(rng.integers(1, seqs[-1] + 1))
        max_b = next(b for b in seqs if b >= max_num_seqs)
        toks = tuple(sorted({max_b * 2, *rng.choice([4, 16, 64, 256, 1024, 4096], rng.integers(1, 4)).tolist()}))
        cfg = EngineConfig(max_num_seqs=max_num_seqs, seq_buckets=seqs, token_buckets=toks)
        every = [(t, b, False) for t in toks for b in seqs if b <= max_b and (b < t or b == t == toks[-1])]
        for n in range(2, toks[-1] + 1, max(1, toks[-1] // 97)):
            for s in range(1, min(n - 1, max_num_seqs) + 1, max(1, max_num_seqs // 7)):
                assert smallest(cfg.buckets(), n, s)[0] == smallest(every, n, s)[0], (cfg, n, s)


def test_warm_up_defaults_to_accelerators_only():
    assert not EngineConfig().warms_up("cpu") and EngineConfig().warms_up("gpu") and EngineConfig().warms_up("tpu")
    assert EngineConfig(warm_up=True).warms_up("cpu") and not EngineConfig(warm_up=False).warms_up("gpu")
    with pytest.raises(ValueError, match="warm_up"):
        EngineConfig(warm_up="no")
