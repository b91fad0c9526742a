"""The reliability table's bad-input and security rows (benchmarks/reliability.py).

fuzz_json      hand-made hostile bodies on every JSON route: lone surrogates (escaped and as raw bytes), bytes that
               are not UTF-8, NULs, nesting 1,000 and 100,000 deep, numbers past float64 and int64, a 10 MB body,
               every prefix of a valid body, wrong types in every field, wrong content types, and seeded random
               byte mutations of valid bodies. Each must get a non-5xx answer within a time limit; a 4xx must be the
               OpenAI error shape with no path or traceback in it.
schemathesis   bodies from /openapi.json inside the schema (positive: status and body must be ones the document
               lists) and outside it (negative), on every route, and the stateful phase along the document's links.
corrupt_files  the default model's GGUF and a small safetensors checkpoint, truncated, with bytes of the header and
               tables overwritten (0xFF runs: huge counts and lengths; random bytes), loaded the way the engine
               loads them: each loads or is a ValueError naming the file, in bounded time.
security       API keys (a key file and the environment; missing, wrong and each right key), the HTTP parser's
               errors (oversized headers, a bad request line: JSON, no echo, no versions), a compilation cache
               directory others can write (refused: the server warns and compiles), and tampered or planted
               program and cache files (never unpickled: the server compiles and gives the same tokens).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from reliability_load import error_shaped, served

C, CH, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"


def _valid_bodies(model: str) -> dict[str, dict]:
    return {C: {"model": model, "prompt": "hello there", "max_tokens": 2},
            CH: {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2},
            TOK: {"prompt": "hello there"},
            DETOK: {"tokens": [1, 2, 3]}}


_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "min_p", "n", "stream", "stream_options", "stop", "stop_token_ids", "logprobs", "top_logprobs", "echo",
           "seed", "logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
           "min_tokens", "user", "tokens", "add_special_tokens", "parse_special_tokens", "priority", "best_of",
           "response_format", "tools", "chat_template", "add_generation_prompt", "suffix"]
_VALUES = [None, True, False, -1, 0, 1.5, -1e308, 2**64, "x", "", [], {}, [None], [[]], {"a": None}, ["x"] * 3]


def hostile_bodies(model: str, seed: int = 0, mutations: int = 200) -> list[tuple[str, str, bytes, dict]]:
    """(route, what, raw body, extra headers) cases."""
    rng = np.random.default_rng(seed)
    valid = _valid_bodies(model)
    cases: list[tuple[str, str, bytes, dict]] = []
    for route, body in valid.items():
        raw = json.dumps(body).encode()
        text_field = "prompt" if "prompt" in body else None

        def with_text(s: str, _body=body, _route=route) -> bytes:  # s: JSON string source text, escapes kept
            if _route == CH:
                return (json.dumps({**_body, "messages": [{"role": "user", "content": "@@"}]})
                        .replace('"@@"', s).encode("utf-8", "surrogatepass"))
            if _route == DETOK:
                return json.dumps({"tokens": [1], "model": "@@"}).replace('"@@"', s).encode("utf-8", "surrogatepass")
            return json.dumps({**_body, text_field: "@@"}).replace('"@@"', s).encode("utf-8", "surrogatepass")

        for what, s in [("escaped lone high surrogate", r'"\ud800"'), ("escaped lone low surrogate", r'"a\udfffb"'),
                        ("escaped reversed pair", r'"\udc00\ud800"'), ("escaped NUL", r'"a\u0000b"'),
                        ("long escaped run", '"' + r"\ud83d" * 5000 + '"')]:
            cases.append((route, what, with_text(s), {}))
        for what, b in [("raw 0xff 0xfe", b"\xff\xfe"), ("overlong slash", b"\xc0\xaf"),
                        ("raw surrogate bytes", b"\xed\xa0\x80"), ("raw NUL", b"a\x00b"), ("cut multibyte", b"\xe2\x82"),
                        ("raw 0x80", b"\x80\x80")]:
            cases.append((route, what, with_text('"@@"').replace(b"@@", b), {}))
        for depth in (1000, 100_000):
            cases.append((route, f"array nesting {depth}", b"[" * depth + b"]" * depth, {}))
            cases.append((route, f"object nesting {depth}", b'{"a":' * depth + b"1" + b"}" * depth, {}))
            cases.append((route, f"nesting {depth} inside a field",
                          raw[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}", {}))
        for num in (b"1e999", b"-1e999", b"1e-400", b"9" * 400, b"-" + b"9" * 5000, b"NaN", b"Infinity", b"-Infinity",
                    b"18446744073709551616", b"0.0000000000000000000000001", b"1.0e+309"):
            for field in ("max_tokens", "temperature", "seed", "n", "top_p"):
                cases.append((route, f"{field} = {num[:12].decode()}", raw[:-1] + b', "' + field.encode() + b'": ' + num
                               + b"}", {}))
            cases.append((route, f"token id {num[:12].decode()}", json.dumps({**body, "tokens": [1]} if route == DETOK
                          else {**body, "prompt": [1]} if route in (C, TOK) else body).encode()
                          .replace(b"[1]", b"[" + num + b"]"), {}))
        cases.append((route, "10 MB string", with_text(json.dumps("word " * 2_000_000)), {}))
        cases.append((route, "10 MB of spaces", b" " * 10_000_000 + raw, {}))
        for cut in range(len(raw)):
            cases.append((route, f"prefix of {cut} bytes", raw[:cut], {}))
        for extra in (b"null", b"[]", b'"text"', b"123", b"true", raw + b" trailing", raw + raw, b"\xef\xbb\xbf" + raw,
                      b"/* c */" + raw, raw.replace(b"{", b'{"model": 1, ', 1), b"{" + b'"a": 1,' * 100_000 + b'"b": 2}'):
            cases.append((route, f"not one JSON object: {extra[:16]!r}", extra, {}))
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/json; charset=latin-1", ""):
            cases.append((route, f"content type {ctype!r}", raw, {"Content-Type": ctype}))
        for field in _FIELDS:
            for value in _VALUES:
                cases.append((route, f"{field} = {json.dumps(value)[:20]}", json.dumps({**body, field: value}).encode(),
                              {}))
        for i in range(mutations):
            b = bytearray(raw)
            for _ in range(int(rng.integers(1, 4))):
                op, pos = int(rng.integers(0, 3)), int(rng.integers(0, max(1, len(b))))
                if op == 0 and b:
                    b[pos % len(b)] = int(rng.integers(0, 256))
                elif op == 1:
                    b[pos:pos] = bytes([int(rng.integers(0, 256))])
                elif b:
                    del b[pos % len(b)]
            cases.append((route, f"mutation {i}", bytes(b), {}))
    return cases


_LEAKS = re.compile(r"Traceback|File \"|/site-packages/|/usr/|/home/|/root/|/tmp/|0x[0-9a-f]{8,}")


def fuzz_json(url: str, headers: dict, model: str, seed: int = 0, mutations: int = 200, timeout: float = 30.0,
              sample: int | None = None, long_limit: float = 900.0) -> dict:
    """Every hostile body once (or a seeded `sample` of them): status counts by class, 5xx, hangs, 4xx bodies that
    are not the OpenAI error shape or leak a path, and whether the server still answers afterwards.

    A body can be a valid request that decodes for minutes (a mutated "max_tokens" key leaves the budget at the rest
    of the context, and unknown fields are ignored, as vLLM does): an answer that takes longer than `timeout` is
    waited for while the server makes progress (counted as long-running; given up after `long_limit`); a hang is a
    request left unanswered by a server that stopped making progress."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Pending

    import httpx

    cases = hostile_bodies(model, seed, mutations)
    if sample is not None and sample < len(cases):
        keep = np.random.default_rng(seed).choice(len(cases), sample, replace=False)
        cases = [cases[i] for i in sorted(keep)]
    counts: dict[str, int] = {}
    bad: list[str] = []
    hangs = long_running = 0
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(1)
    c, probe = httpx.Client(timeout=None), httpx.Client(timeout=10)
    try:
        for route, what, raw, extra in cases:
            h = {**headers, "Content-Type": "application/json", **extra}
            if not h["Content-Type"]:
                del h["Content-Type"]
            fut = pool.submit(c.post, url + route, content=raw, headers=h)
            r, waited = None, 0.0
            try:
                while r is None:
                    try:
                        r = fut.result(timeout=timeout)
                    except Pending:
                        waited += timeout
                        if waited < long_limit and _progressing(probe, url):
                            continue
                        if waited < long_limit:
                            hangs += 1
                            bad.append(f"{route} {what}: no answer in {waited:g} s from a server making no progress")
                        c.close()  # the connection goes: the server aborts the request
                        c = httpx.Client(timeout=None)
                        break
            except httpx.TransportError as e:
                counts["connection error"] = counts.get("connection error", 0) + 1
                bad.append(f"{route} {what}: {type(e).__name__}")
                continue
            long_running += waited > 0
            if r is None:
                continue
            cls = f"{r.status_code // 100}xx"
            counts[cls] = counts.get(cls, 0) + 1
            if r.status_code >= 500:
                bad.append(f"{route} {what}: {r.status_code} {r.text[:120]}")
            elif r.status_code >= 400 and (not error_shaped(r.text) or _LEAKS.search(r.text)):
                bad.append(f"{route} {what}: {r.status_code} body {r.text[:120]!r}")
        alive = probe.get(url + "/health").status_code == 200 and httpx.post(
            url + C, json=_valid_bodies(model)[C], headers=headers, timeout=60).status_code == 200
    finally:
        c.close()
        probe.close()
        pool.shutdown(wait=False)
    return dict(tried=len(cases), statuses=counts, server_errors=counts.get("5xx", 0), hangs=hangs,
                long_running=long_running, bad=len(bad), examples=bad[:8], alive_after=alive,
                seconds=round(time.perf_counter() - t0, 1))


def _progressing(c, url: str, wait: float = 3.0) -> bool:
    """The server answers /health at once and generates tokens (its counter moves within `wait` seconds)."""
    import httpx

    def generated() -> float:
        text = c.get(url + "/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("jaxinfer_generation_tokens_total"))

    try:
        if c.get(url + "/health", timeout=5).status_code != 200:
            return False
        before = generated()
        time.sleep(wait)
        return generated() > before
    except httpx.HTTPError:
        return False


def schemathesis_run(url: str, key: str | None, positive: int = 60, negative: int = 60, stateful: int = 60) -> dict:
    """schemathesis on every route of /openapi.json (both generation modes), then its stateful phase along the
    links: calls made, statuses by class, 5xx, and conformance failures (positive mode: the status and the body
    must be ones the document lists)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = {"calls": 0, "statuses": {}, "server_errors": 0, "failures": 0, "no_answer": 0, "examples": []}

    def call(case):
        try:
            return case.call(base_url=url, headers=headers, timeout=120)
        except Exception as e:  # noqa: BLE001 - no answer in time, or a broken connection: counted, not shrunk
            out["no_answer"] += 1
            if len(out["examples"]) < 5:
                out["examples"].append(f"{case.method} {case.path}: {type(e).__name__}")
            return None

    def record(case, response, checks):
        if response is None:
            return
        out["calls"] += 1
        cls = f"{response.status_code // 100}xx"
        out["statuses"][cls] = out["statuses"].get(cls, 0) + 1
        out["server_errors"] += response.status_code >= 500
        try:
            case.validate_response(response, checks=checks)
        except Exception as e:  # noqa: BLE001 - a failed check is a count and an example, not the end of the run
            out["failures"] += 1
            if len(out["examples"]) < 5:
                out["examples"].append(f"{case.method} {case.path}: {str(e).splitlines()[0][:160]}")

    opts = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    negative_checks = [not_a_server_error]
    for mode, n, checks in (("positive", positive, [not_a_server_error, status_code_conformance,
                                                    response_schema_conformance]),
                            ("negative", negative, negative_checks)):
        for op in (o.ok() for o in schema.get_all_operations()):
            if mode == "negative" and not len(op.body):
                continue

            def fuzz(case):
                if fuzz.checks is not negative_checks:
                    _short(case)
                record(case, call(case), fuzz.checks)

            fuzz.checks = checks
            given(op.as_strategy(generation_mode=GenerationMode(mode)))(settings(max_examples=n, **opts)(fuzz))()

    class Machine(schema.as_state_machine()):  # its calls' budgets are cut as above, so every one is answered
        def get_call_kwargs(self, case):
            return {"base_url": url, "headers": headers, "timeout": 120}

        def before_call(self, case):
            _short(case)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            record(case, response, [not_a_server_error])

    before = out["calls"]
    Machine.run(settings=settings(max_examples=stateful, stateful_step_count=6, **opts))
    out["stateful_calls"] = out["calls"] - before
    return out


def _short(case, most: int = 8) -> None:
    """A valid body's token budget cut to `most` (still valid): schemathesis draws max_tokens up to the model's
    context, or leaves it out (the rest of the context), minutes of decoding each on a CPU, and the budget is not
    what is being tested."""
    if isinstance(case.body, dict) and case.path in (C, CH):
        keys = [k for k in ("max_tokens", "max_completion_tokens") if k in case.body]
        for key in keys:
            if isinstance(case.body[key], int) and case.body[key] > most:
                case.body[key] = most
        if not keys or all(case.body[k] is None for k in keys):
            case.body["max_tokens"] = most


def _overwrite(good: bytes, rng, end: int, trial: int) -> bytes:
    bad = bytearray(good)
    for pos in rng.integers(4, end, size=int(rng.integers(1, 5))):
        width = int(rng.integers(1, 9))
        bad[pos:pos + width] = (b"\xff" * width if trial % 2 else rng.integers(0, 256, width).astype(np.uint8).tobytes())
    return bytes(bad)


def corrupt_files(gguf_path: str, trials: int = 40, seed: int = 0, limit_s: float = 60.0) -> dict:
    """Broken copies of `gguf_path` and of a small safetensors checkpoint, each loaded as the engine loads it
    (`jaxinfer.loader.load_model`: config, tokenizer, weights): counts of loaded / ValueError naming the file /
    anything else, and the slowest load."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from jaxinfer.config import EngineConfig
    from jaxinfer.loader import load_model

    rng = np.random.default_rng(seed)
    ecfg = EngineConfig.from_options(show_progress=False)
    res = {"tried": 0, "loaded": 0, "value_error": 0, "other": 0, "slowest_s": 0.0, "examples": []}
    tmp = Path(tempfile.mkdtemp(prefix="jaxinfer-corrupt-"))

    def attempt(path: Path, load):
        res["tried"] += 1
        t0 = time.perf_counter()
        try:
            load(path)
            res["loaded"] += 1
        except ValueError as e:
            if path.name in str(e):
                res["value_error"] += 1
            else:
                res["other"] += 1
                res["examples"].append(f"{path.name}: ValueError without the file's name: {str(e)[:120]}")
        except Exception as e:  # noqa: BLE001 - what the table counts as a crash
            res["other"] += 1
            if len(res["examples"]) < 8:
                res["examples"].append(f"{path.name}: {type(e).__name__}: {str(e)[:120]}")
        res["slowest_s"] = max(res["slowest_s"], round(time.perf_counter() - t0, 2))

    try:
        good = Path(gguf_path).read_bytes()
        import gguf

        reader = gguf.GGUFReader(gguf_path)
        data_start = int(reader.data_offset)  # the header, key/values and tensor table end here
        load_gguf = lambda p: load_model(str(p), ecfg, jnp.float32)  # noqa: E731
        for i, frac in enumerate(np.linspace(0.0, 1.0, 12, endpoint=False)[1:].tolist() + [0.999]):
            p = tmp / f"truncated{i}.gguf"
            cut = int(frac * (data_start if i % 2 else len(good)))
            p.write_bytes(good[:cut])
            attempt(p, load_gguf)
            p.unlink()
        for trial in range(trials):
            p = tmp / f"overwritten{trial}.gguf"
            p.write_bytes(_overwrite(good, rng, data_start, trial))
            attempt(p, load_gguf)
            p.unlink()
        # A small HF checkpoint: config.json and one safetensors file.
        ck = tmp / "ckpt"
        ck.mkdir()
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "vocab_size": 256, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
        (ck / "config.json").write_text(json.dumps(cfg))
        r = np.random.default_rng(1)
        tensors = {"model.embed_tokens.weight": r.standard_normal((256, 64), np.float32),
                   "model.norm.weight": np.ones(64, np.float32)}
        for layer in range(2):
            pre = f"model.layers.{layer}."
            tensors.update({pre + "input_layernorm.weight": np.ones(64, np.float32),
                            pre + "post_attention_layernorm.weight": np.ones(64, np.float32),
                            pre + "self_attn.q_proj.weight": r.standard_normal((64, 64), np.float32),
                            pre + "self_attn.k_proj.weight": r.standard_normal((32, 64), np.float32),
                            pre + "self_attn.v_proj.weight": r.standard_normal((32, 64), np.float32),
                            pre + "self_attn.o_proj.weight": r.standard_normal((64, 64), np.float32),
                            pre + "mlp.gate_proj.weight": r.standard_normal((128, 64), np.float32),
                            pre + "mlp.up_proj.weight": r.standard_normal((128, 64), np.float32),
                            pre + "mlp.down_proj.weight": r.standard_normal((64, 128), np.float32)})
        save_file(tensors, str(ck / "model.safetensors"))
        st_good = (ck / "model.safetensors").read_bytes()
        header_end = 8 + int.from_bytes(st_good[:8], "little")
        load_ck = lambda p: load_model(str(p.parent), ecfg, jnp.float32)  # noqa: E731
        load_model(str(ck), ecfg, jnp.float32)  # the intact checkpoint loads
        for i, frac in enumerate(np.linspace(0.0, 1.0, 12, endpoint=False)[1:].tolist()):
            (ck / "model.safetensors").write_bytes(st_good[:int(frac * (header_end if i % 2 else len(st_good)))])
            attempt(ck / "model.safetensors", load_ck)
        for trial in range(trials):
            (ck / "model.safetensors").write_bytes(_overwrite(st_good, rng, header_end, trial))
            attempt(ck / "model.safetensors", load_ck)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


# -- security -----------------------------------------------------------------------------------------------------


def _raw_http(url: str, raw: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(raw)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


class _Planted:
    """A pickle that creates a file when loaded: if it ever exists, a planted program was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def security(serve_args: list[str], model: str, workdir: str) -> dict:
    """Each check: (what was done, what happened, refused as specified: bool)."""
    import httpx

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    # API keys: two in a file, one in the environment; the document and the probes stay open.
    keyfile = work / "keys"
    keyfile.write_text("key-one\nkey-two\n")
    keyfile.chmod(0o600)
    with served([*serve_args, "--api-key-file", str(keyfile)], env={"JAXINFER_API_KEY": "key-env"},
                log_path=str(work / "serve-keys.log")) as (_, url, _):
        got = {k: httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {k}"} if k else {}).status_code
               for k in ("", "wrong", "key-on", "key-one", "key-two", "key-env")}
        shape = error_shaped(httpx.get(url + "/v1/models").text)
        ok = got == {"": 401, "wrong": 401, "key-on": 401, "key-one": 200, "key-two": 200, "key-env": 200} and shape
        rows.append(("API keys (file and environment)", f"no key / wrong / a key's prefix: {got['']} / {got['wrong']} / "
                     f"{got['key-on']}; each of the 3 keys: {got['key-one']}, {got['key-two']}, {got['key-env']}",
                     ok))
        big = _raw_http(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"A" * 20000 + b"\r\n\r\n")
        line = _raw_http(url, b"GET /v1/models<script>HTTP/1.1 \x01\r\n\r\n")
        ok = all(r.split(b" ", 2)[1].startswith(b"4") and b'"error"' in r and b"AAAAAAAA" not in r
                 and b"<script>" not in r and b"Python" not in r and b"aiohttp" not in r for r in (big, line))
        rows.append(("oversized header, bad request line", f"{big.split(b' ', 2)[1].decode()} / "
                     f"{line.split(b' ', 2)[1].decode()}, JSON error, nothing echoed, no versions", ok))
        r = httpx.post(url + CH, headers={"Authorization": "Bearer key-one"},
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                             "chat_template": "{{ 7 * 7 }}"})
        rows.append(("a chat template sent in a request", f"{r.status_code} ({r.json()['error']['param']})",
                     r.status_code == 400))

    # A compilation cache directory others can write: not used (warned), the server compiles and serves.
    shared = work / "shared-cache"
    shared.mkdir(exist_ok=True)
    shared.chmod(0o777)
    with served([*serve_args, "--compilation-cache-dir", str(shared)],
                log_path=str(work / "serve-shared.log")) as (_, url, log):
        status = httpx.post(url + C, json={"model": model, "prompt": "hi", "max_tokens": 2}).status_code
    text = Path(log).read_text()
    written = sorted(p.name for p in shared.iterdir())
    rows.append(("compilation cache directory writable by others", f"warned: {'writable by' in text}; files written "
                 f"there: {len(written)}; served: {status}", "writable by" in text and not written and status == 200))

    # Tampered and planted files in a private cache: never unpickled; the server compiles and gives the same tokens.
    private = work / "private-cache"
    shutil.rmtree(private, ignore_errors=True)
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    with served([*serve_args, "--compilation-cache-dir", str(private)],
                log_path=str(work / "serve-private1.log")) as (_, url, _):
        want = httpx.post(url + C, json=body).json()["choices"][0]["text"]
    programs = sorted(private.glob("executables/*/*.jxe"))
    entries = sorted(private.glob("*-cache"))
    marker = work / "planted-ran"
    marker.unlink(missing_ok=True)
    for i, f in enumerate(programs):
        if i % 2:
            data = bytearray(f.read_bytes())
            data[-1] ^= 1
            f.write_bytes(bytes(data))
        else:
            f.write_bytes(pickle.dumps(_Planted(str(marker))))
    for f in entries:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    with served([*serve_args, "--compilation-cache-dir", str(private)],
                log_path=str(work / "serve-private2.log")) as (_, url, log):
        got = httpx.post(url + C, json=body).json()["choices"][0]["text"]
    text = Path(log).read_text()
    rows.append(("tampered / planted program and cache files", f"{len(programs)} program files ({(len(programs) + 1) // 2}"
                 f" replaced by a pickle that writes a file when loaded, the rest with a flipped byte) and "
                 f"{len(entries)} cache entries flipped: planted pickle ran: {marker.exists()}; warned: "
                 f"{'signature does not match' in text}; same tokens: {got == want}",
                 bool(programs) and not marker.exists() and got == want))
    return dict(rows=[dict(check=a, result=b, refused_as_specified=c) for a, b, c in rows])
