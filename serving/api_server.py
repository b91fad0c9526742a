"""The OpenAI-compatible HTTP server (aiohttp): `jaxinfer serve`.

Routes are listed once, in `ROUTES`, which both registers them and generates /openapi.json (openapi.py).
Request bodies are parsed and validated in protocol.py; the engine runs in its own thread (async_engine.py).
Every error leaves as `{"error": {"message", "type", "param", "code"}}`; an unexpected exception is
logged here and the client only sees a generic 500.

Lifecycle: the HTTP server starts first and answers /health and /ready (503) while the engine thread
loads and compiles the model. SIGTERM (or SIGINT) stops admitting requests (/ready -> 503, new requests
-> 503), waits up to --shutdown-timeout for in-flight requests, aborts the rest and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import signal
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from aiohttp import web, web_protocol

from serving import protocol
from serving.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from serving.metrics import Metrics
from serving.openapi import openapi_spec
from serving.protocol import APIError, Limits, bad_request

logger = logging.getLogger("jaxinfer.serving")


@dataclass
class ServerConfig:
    model_name: str = "jaxinfer"
    api_key: str | None = None  # one key; api_keys for several (a request may present any of them)
    api_keys: tuple[str, ...] = ()
    max_n: int = 8
    max_body_size: int = 1 << 20
    max_queued_requests: int = 256
    max_queued_tokens: int | None = None  # prompt + max_tokens x n of the requests not started yet; None: no limit
    shutdown_timeout: float = 30.0
    step_timeout: float | None = None  # the watchdog: seconds an engine step may run (serving.AsyncEngine)
    chat_page: bool = True  # the browser chat at / (static files in serving/static; it calls /v1 like any client)


STATE = web.AppKey("state", object)


class ServerState:
    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.key_digests = key_digests(config)
        self.metrics = Metrics(engine)
        self.draining = False
        engine.on_output = self.metrics.on_output

    @property
    def ready(self) -> bool:
        return self.engine.is_ready and not self.draining

    @property
    def limits(self) -> Limits:
        e = self.engine.engine
        return Limits(self.config.max_n, e.ecfg.max_logprobs, e.max_model_len, e.cfg.vocab_size, e.ecfg.max_logit_bias)

    @property
    def tokenizer(self):
        tok = self.engine.engine.tokenizer
        if tok is None:
            raise bad_request("this model has no tokenizer; send token ids")
        return tok


def _state(request: web.Request) -> ServerState:
    return request.app[STATE]


def json_response(data, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=json.dumps(data, ensure_ascii=False), status=status,
                        content_type="application/json", headers=headers)


def error_response(e: APIError) -> web.Response:
    return json_response(e.body(), e.status, e.headers)


_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}


# -- middlewares ----------------------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler):
    state = _state(request)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        resp = await handler(request)
    except APIError as e:
        resp = error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = "request body too large" if e.status == 413 else (e.reason or "error")
        if e.status == 404:
            msg = f"no route for {request.method} {request.path}"
        resp = error_response(APIError(e.status, msg, _HTTP_TYPES.get(e.status, "invalid_request_error")))
    except (asyncio.CancelledError, ConnectionResetError):
        state.metrics.request_done(route, 499)
        raise
    except Exception:  # noqa: BLE001 - never a stack trace to the client
        logger.exception("unhandled error in %s %s", request.method, request.path)
        resp = error_response(APIError(500, "internal server error", "server_error"))
    state.metrics.request_done(route, resp.status)
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler):
    state = _state(request)
    if state.key_digests and request.path.startswith("/v1"):
        got = request.headers.get("Authorization", "")
        if not key_matches(got[7:] if got[:7].lower() == "bearer " else "", state.key_digests):
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
    return await handler(request)


def key_digests(config: ServerConfig) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k.encode()).digest() for k in (*config.api_keys, config.api_key) if k)


def key_matches(token: str, digests: tuple[bytes, ...]) -> bool:
    """Whether `token` is one of the keys, in time independent of which key, how much of one matched, or its length:
    fixed-length digests, each compared in constant time, no early exit."""
    mine = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(mine, d)
    return ok and bool(token)


# -- helpers --------------------------------------------------------------------------------------------------


async def read_json(request: web.Request) -> dict:
    cfg = _state(request).config
    if request.content_length is not None and request.content_length > cfg.max_body_size:
        raise APIError(413, f"request body is {request.content_length} bytes; the limit is {cfg.max_body_size}")
    if request.content_type != "application/json":
        raise bad_request(f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"request body is larger than the limit of {cfg.max_body_size} bytes") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    except RecursionError:  # the parser recurses once per level
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    protocol.check_text(body)
    return body


def require_ready(state: ServerState) -> None:
    if state.engine.stalled:
        raise APIError(503, "an engine step is not returning; retry later", "service_unavailable",
                       headers={"Retry-After": "5"})
    if state.engine.rebuilding:
        raise APIError(503, "the engine is being rebuilt after a fault", "service_unavailable",
                       headers={"Retry-After": "5"})
    if state.engine.error is not None:
        raise APIError(503, "the engine has failed; the server must be restarted", "service_unavailable")
    if not state.ready:
        what = "shutting down" if state.draining else "loading the model"
        raise APIError(503, f"the server is {what}", "service_unavailable", headers={"Retry-After": "5"})


def check_model(state: ServerState, body: dict) -> str:
    model = body.get("model")
    name = state.config.model_name
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, got {type(model).__name__}", "model")
    if model is not None and model != name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}",
                       "not_found_error", "model", "model_not_found")
    return name


def admit(state: ServerState, count: int, tokens: int = 0) -> None:
    """Overload: a request that could never be queued is a 400; one the queue cannot take now a 429 with
    Retry-After (bounded by requests and, with --max-queued-tokens, by their tokens: prompt + max_tokens x n).
    429, as TGI answers an overloaded queue: a busy server is the client's cue to back off, not a server error;
    503 stays for a server that is not ready (loading, draining, rebuilding, stalled)."""
    cap, tcap = state.config.max_queued_requests, state.config.max_queued_tokens
    if count > cap:  # could never be admitted: a client error, not a busy server
        raise bad_request(f"prompt: a batch of {count} prompts is more than this server queues at once ({cap}; "
                          f"its --max-queued-requests)", "prompt")
    if tcap is not None and tokens > tcap:
        raise bad_request(f"prompt: the request may need {tokens} tokens (prompts + max_tokens x n), more than this "
                          f"server queues at once ({tcap}; its --max-queued-tokens)", "prompt")
    if state.engine.num_queued + count > cap:
        raise APIError(429, f"too many queued requests (limit {cap}); retry later", "rate_limit_exceeded",
                       headers={"Retry-After": "1"})
    if tcap is not None and state.engine.num_queued_tokens + tokens > tcap:
        raise APIError(429, f"too many queued tokens (limit {tcap}); retry later", "rate_limit_exceeded",
                       headers={"Retry-After": "1"})


async def off_loop(fn, *args):
    """Tokenization can take long on big inputs: run it in the default thread pool, not on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def engine_error(e: BaseException) -> APIError:
    if isinstance(e, (EngineDeadError, RequestFailedError)):
        return APIError(500, str(e), "server_error")
    if isinstance(e, ValueError):
        return bad_request(str(e), protocol.param_of(str(e)))
    logger.error("request failed: %r", e)
    return APIError(500, "internal server error", "server_error")


async def sse_start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False) builds one of these per call


def sse_event(data) -> str:
    return f"data: {data if isinstance(data, str) else _ENCODER.encode(data)}\n\n"


async def sse_send(resp: web.StreamResponse, data) -> None:
    await resp.write(sse_event(data).encode())


# -- /v1/completions and /v1/chat/completions --------------------------------------------------------------------


class _Choice:
    """One choice's state across the engine's DELTA outputs: how much text / how many tokens came so far (and,
    without streaming, the pieces themselves)."""

    __slots__ = ("text", "tokens", "finish", "stop_reason", "first", "shift", "token_text", "pieces", "token_ids",
                 "logprobs")

    def __init__(self):
        self.text, self.tokens, self.finish, self.first = 0, 0, None, True
        self.stop_reason = None  # vLLM's field: the stop string or stop token id that ended the choice
        self.shift = 0  # echo + logprobs: the completion's text offsets start after the prompt's tokens
        # ... and run over the tokens' own text, as without streaming (not over the text sent so far, which
        # lags while a possible stop string is held back)
        self.token_text = 0
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = None

    def add(self, c) -> None:
        """Keep a DELTA CompletionOutput's new text, tokens and logprobs (the non-streaming response)."""
        self.pieces.append(c.text)
        self.token_ids += c.token_ids
        if c.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += c.logprobs
        if c.finish_reason:
            self.finish, self.stop_reason = c.finish_reason, c.stop_reason


async def _run(request: web.Request, *, chat: bool) -> web.StreamResponse:
    state = _state(request)
    body = await read_json(request)
    require_ready(state)
    model = check_model(state, body)
    limits = state.limits
    if chat:
        messages = protocol.chat_messages(body)
        params = protocol.sampling_params(body, limits, chat=True)
        try:
            ids = await off_loop(state.tokenizer.apply_chat_template, messages, True,
                                 protocol.flag(body, "parse_special_tokens"))
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors are the client's messages' fault
            raise bad_request(f"messages could not be rendered with the chat template: {e}", "messages") from None
        prompts_ids, prompt_texts = [ids], [None]
        k = params.logprobs
        protocol.check_context(len(ids), params, limits,
                               protocol.max_tokens_field(body, chat=True))
    else:
        prompts = protocol.completion_prompts(body, limits.vocab_size)
        params = protocol.sampling_params(body, limits, chat=False)
        echo = protocol.flag(body, "echo")
        if echo and params.logprobs is not None:  # the prompt's tokens get logprobs too (first one: null)
            params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
        prompts_ids, prompt_texts = [], []
        parse_special = protocol.flag(body, "parse_special_tokens")  # text is text unless asked
        for p in prompts:
            if isinstance(p, str):
                prompts_ids.append(await off_loop(state.tokenizer.encode, p, True, parse_special))
                prompt_texts.append(p)
            else:
                prompts_ids.append(list(p))
                prompt_texts.append((await off_loop(state.tokenizer.decode, p)) if echo else None)
        for ids in prompts_ids:
            protocol.check_context(len(ids), params, limits)
        k = params.logprobs
    if any(not ids for ids in prompts_ids):
        raise bad_request("prompt must not be empty", "prompt")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    if opts is not None and not stream:  # as vLLM
        raise bad_request("stream_options can only be given when stream is true", "stream_options")
    include_usage = protocol.flag(opts or {}, "include_usage")
    priority = body.get("priority")  # vLLM's extension: lower runs first
    priority = 0 if priority is None else priority
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise bad_request("priority must be an integer (lower runs first)", "priority")
    admit(state, len(prompts_ids), sum(len(ids) + params.n * (params.max_tokens if params.max_tokens is not None
                                                                else limits.max_model_len - len(ids))
                                       for ids in prompts_ids))

    decode = state.engine.engine.tokenizer.decode if state.engine.engine.tokenizer else str
    tok_decode = lambda t: decode([t], skip_special_tokens=False)  # noqa: E731
    tok_bytes = state.engine.engine.tokenizer.token_bytes if state.engine.engine.tokenizer else None
    rid_base = protocol.new_id("chatcmpl" if chat else "cmpl")
    created = protocol.now()
    n = params.n
    reqs = [(f"{rid_base}-{i}", ids, params) for i, ids in enumerate(prompts_ids)]
    index_of = {rid: i for i, (rid, _, _) in enumerate(reqs)}
    obj = "chat.completion" if chat else "text_completion"
    num_prompt = sum(len(ids) for ids in prompts_ids)
    echo = (not chat) and protocol.flag(body, "echo")
    pending: list[str] = []  # streaming: SSE chunks not written yet

    async def flush() -> None:  # one write for the chunks of all the outputs that were waiting
        if pending:
            data = "".join(pending).encode()
            pending.clear()
            await resp.write(data)

    gen = state.engine.generate(reqs, priority, on_idle=flush if stream else None)

    prompt_lps: dict[str, list] = {}  # request id -> its prompt logprobs (DELTA: in its first output only)
    if not stream:
        got: dict[tuple[int, int], _Choice] = {}
        async with contextlib.aclosing(gen):
            try:
                async for out in gen:
                    pi = index_of[out.request_id]
                    if out.prompt_logprobs is not None:
                        prompt_lps[out.request_id] = out.prompt_logprobs
                    for c in out.outputs:
                        got.setdefault((pi, c.index), _Choice()).add(c)
            except (ValueError, EngineDeadError, RequestFailedError) as e:
                raise engine_error(e) from None
        choices, completion_tokens = [], 0
        for (pi, ci), cur in sorted(got.items()):
            rid, text = reqs[pi][0], "".join(cur.pieces)
            completion_tokens += len(cur.token_ids)
            idx = pi * n + ci
            if chat:
                lp = (protocol.chat_logprobs(cur.logprobs, cur.token_ids, k, tok_decode, tok_bytes)
                      if k is not None else None)
                choices.append({"index": idx, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": cur.finish, "stop_reason": cur.stop_reason})
            else:
                prefix = prompt_texts[pi] if echo else ""
                head = (protocol.prompt_logprobs(prompt_lps.get(rid), prompts_ids[pi], k, tok_decode)
                        if echo and k is not None else None)
                lp = (protocol.completion_logprobs(cur.logprobs, cur.token_ids, k, protocol.text_end(head), tok_decode)
                      if k is not None else None)
                if head is not None:
                    lp = protocol.join_logprobs(head, lp)
                choices.append({"index": idx, "text": prefix + text, "logprobs": lp, "finish_reason": cur.finish,
                                "stop_reason": cur.stop_reason})
        return json_response({"id": rid_base, "object": obj, "created": created, "model": model,
                              "choices": choices, "usage": protocol.usage(num_prompt, completion_tokens)})

    # streaming
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    # Every chunk is {"id", "object", "created", "model", "choices": [choice]}: its text up to the choice, once
    chunk_head = (f'data: {_ENCODER.encode({"id": rid_base, "object": chunk_obj, "created": created, "model": model})[:-1]}'
                  ', "choices": [')
    cursors: dict[tuple[int, int], _Choice] = {}
    completion_tokens = 0
    resp = None
    async with contextlib.aclosing(gen):
        try:
            async for out in gen:
                if resp is None:
                    resp = await sse_start(request)
                pi = index_of[out.request_id]
                if out.prompt_logprobs is not None:
                    prompt_lps[out.request_id] = out.prompt_logprobs
                for c in out.outputs:  # DELTA: c holds this step's new text, tokens and logprobs
                    cur = cursors.setdefault((pi, c.index), _Choice())
                    if cur.finish is not None:
                        continue
                    text, new_toks = c.text, c.token_ids
                    lps = c.logprobs if (k is not None and c.logprobs is not None and (cur.tokens or new_toks)) else None
                    if not text and not new_toks and not c.finish_reason and not cur.first:
                        continue
                    if echo and k is not None and cur.first and not new_toks and not c.finish_reason:
                        continue  # the echoed prompt's logprobs are complete once its first token is out
                    idx = pi * n + c.index
                    choice: dict = {"index": idx}
                    if chat:
                        delta = {"role": "assistant", "content": text} if cur.first else {"content": text}
                        choice["delta"] = delta
                        choice["logprobs"] = (protocol.chat_logprobs(lps, new_toks, k, tok_decode, tok_bytes)
                                              if lps is not None else None)
                    else:
                        prefix = prompt_texts[pi] if (echo and cur.first) else ""
                        choice["text"] = prefix + text
                        head = None
                        if echo and cur.first and k is not None:
                            head = protocol.prompt_logprobs(prompt_lps.get(out.request_id), out.prompt_token_ids, k,
                                                            tok_decode)
                            cur.shift = protocol.text_end(head)
                        choice["logprobs"] = (protocol.completion_logprobs(lps, new_toks, k, cur.shift + cur.token_text,
                                                                           tok_decode) if lps is not None else None)
                        if choice["logprobs"] and choice["logprobs"]["tokens"]:
                            cur.token_text = protocol.text_end(choice["logprobs"]) - cur.shift
                        if head is not None:
                            choice["logprobs"] = protocol.join_logprobs(
                                head, choice["logprobs"] or protocol.completion_logprobs([], [], k, 0, tok_decode))
                    choice["finish_reason"] = c.finish_reason
                    choice["stop_reason"] = c.stop_reason if c.finish_reason else None
                    cur.first = False
                    cur.text += len(text)
                    cur.tokens += len(new_toks)
                    if c.finish_reason:
                        cur.finish = c.finish_reason
                        completion_tokens += cur.tokens
                    pending.append(f"{chunk_head}{_ENCODER.encode(choice)}]}}\n\n")
        except (ValueError, EngineDeadError, RequestFailedError) as e:
            err = engine_error(e)
            if resp is None:
                raise err from None
            await flush()  # the chunks before the error
            await sse_send(resp, err.body())
            await sse_send(resp, "[DONE]")
            return resp
    await flush()
    if include_usage:
        await sse_send(resp, {"id": rid_base, "object": chunk_obj, "created": created, "model": model,
                              "choices": [], "usage": protocol.usage(num_prompt, completion_tokens)})
    await sse_send(resp, "[DONE]")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, chat=True)


# -- the other routes ---------------------------------------------------------------------------------------------


def _model_card(state: ServerState) -> dict:
    card = {"id": state.config.model_name, "object": "model", "created": protocol.now(), "owned_by": "jaxinfer"}
    if state.engine.engine is not None:
        card["max_model_len"] = state.engine.engine.max_model_len
        card["quantization"] = state.engine.engine.quantization
    return card


async def models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [_model_card(_state(request))]})


async def model(request: web.Request) -> web.Response:
    state = _state(request)
    check_model(state, {"model": request.match_info["model"]})
    return json_response(_model_card(state))


async def health(request: web.Request) -> web.Response:
    state = _state(request)
    if state.engine.rebuilding:  # alive, not ready: /ready says 503 until the new engine is up
        return json_response({"status": "rebuilding", "error": str(state.engine.error)})
    if state.engine.stalled:  # alive, not ready while a step runs past --step-timeout
        return json_response({"status": "stalled"})
    if state.engine.error is not None:
        return json_response({"status": "failed", "error": str(state.engine.error)}, 503)
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = _state(request)
    if state.ready:
        return json_response({"status": "ready"})
    status = ("stalled" if state.engine.stalled else "rebuilding" if state.engine.rebuilding
              else "failed" if state.engine.error
              else "draining" if state.draining else "loading")
    return json_response({"status": status}, 503)


async def metrics(request: web.Request) -> web.Response:
    body, ctype = _state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def tokenize(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    require_ready(state)
    tok = state.tokenizer
    add_special = body.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise bad_request("add_special_tokens must be a boolean", "add_special_tokens")
    parse_special = protocol.flag(body, "parse_special_tokens")
    if "messages" in body:
        messages = protocol.chat_messages(body)
        try:
            ids = await off_loop(tok.apply_chat_template, messages, True, parse_special)
        except Exception as e:  # noqa: BLE001
            raise bad_request(f"messages could not be rendered with the chat template: {e}", "messages") from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string (or send messages)", "prompt")
        ids = await off_loop(tok.encode, prompt, add_special, parse_special)
    return json_response({"tokens": ids, "count": len(ids), "max_model_len": state.engine.engine.max_model_len})


async def detokenize(request: web.Request) -> web.Response:
    state = _state(request)
    body = await read_json(request)
    require_ready(state)
    tokens = body.get("tokens")
    vocab = state.engine.engine.cfg.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad_request("tokens must be a list of integer token ids", "tokens")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})", "tokens")
    text = await off_loop(state.tokenizer.decode, tokens, False)
    return json_response({"prompt": text})


async def openapi(request: web.Request) -> web.Response:
    state = _state(request)
    return json_response(openapi_spec(ROUTES, state.limits if state.engine.engine is not None else None))


# (method, path, handler, summary, takes a JSON body)
ROUTES = [
    ("POST", "/v1/completions", completions, "Text completion (OpenAI legacy completions API)", True),
    ("POST", "/v1/chat/completions", chat_completions, "Chat completion through the model's chat template", True),
    ("GET", "/v1/models", models, "The model this server serves", False),
    ("GET", "/v1/models/{model}", model, "The model card, if this server serves that model", False),
    ("POST", "/tokenize", tokenize, "Text or chat messages -> token ids", True),
    ("POST", "/detokenize", detokenize, "Token ids -> text", True),
    ("GET", "/health", health, "Liveness: 200 unless the engine has failed", False),
    ("GET", "/ready", ready, "Readiness: 503 while loading, compiling, draining, or after an engine failure", False),
    ("GET", "/metrics", metrics, "Prometheus metrics", False),
    ("GET", "/openapi.json", openapi, "This document", False),
]


# -- app and process ---------------------------------------------------------------------------------------------


def build_app(engine: AsyncEngine, config: ServerConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=config.max_body_size)
    app[STATE] = ServerState(engine, config)
    app.on_response_prepare.append(_server_header)
    for method, path, handler, _, _ in ROUTES:
        app.router.add_route(method, path, handler)
    if config.chat_page:
        app.router.add_get("/", chat_page)
        app.router.add_static("/static/", STATIC)
    return app


STATIC = Path(__file__).resolve().parent / "static"
# The page's own files only: no inline script or style, no other origin (the API is this server's /v1)
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


async def chat_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


SERVER_HEADER = "jaxinfer"  # no versions of Python or aiohttp for a scanner to match against


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers.update(PAGE_HEADERS)


class _Protocol(web_protocol.RequestHandler):
    """aiohttp's connection handler, whose own errors (a malformed request line, oversized headers: raised while
    parsing, before any route or middleware runs) leave as plain text echoing the request's bytes; here they leave
    in the API's error shape, with a fixed message per status."""

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        super().handle_error(request, status, exc, message)  # logs, and refuses once a response has started
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        kind = "server_error" if status >= 500 else _HTTP_TYPES.get(status, "invalid_request_error")
        resp = web.Response(status=status, text=json.dumps(APIError(status, f"malformed HTTP request: {phrase}" if
                                                                     status < 500 else phrase, kind).body()),
                            content_type="application/json", headers={"Server": SERVER_HEADER})
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class _AppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # only __call__ differs: each connection gets a _Protocol
        return server


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving on host:port (0: any free port); returns the runner and the bound port."""
    runner = _AppRunner(app, handler_cancellation=True, access_log=None)  # cancel = client gone: abort
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the only way to learn port 0's choice
    return runner, bound


async def drain(app: web.Application, timeout: float) -> None:
    """Stop admitting, wait up to `timeout` s for in-flight requests, then abort what is left."""
    state: ServerState = app[STATE]
    state.draining = True
    deadline = time.monotonic() + timeout
    while state.engine.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for rid in list(state.engine._streams):  # noqa: SLF001
        state.engine.abort(rid)
    deadline = time.monotonic() + 5
    while state.engine.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def serve(engine_factory, config: ServerConfig, host: str, port: int) -> int:
    engine = AsyncEngine(engine_factory, step_timeout=config.step_timeout)
    app = build_app(engine, config)
    runner, bound = await start_server(app, host, port)
    logger.warning("jaxinfer serving %r on http://%s:%d (loading the model)", config.model_name, host, bound)
    engine.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready_task = asyncio.ensure_future(engine.wait_ready())
    ready_task.add_done_callback(
        lambda t: logger.warning("engine ready" if not t.exception() else f"engine failed: {t.exception()}"))
    await stop.wait()
    logger.warning("shutting down: draining for up to %.0f s", config.shutdown_timeout)
    await drain(app, config.shutdown_timeout)
    await runner.cleanup()
    await engine.stop()
    return 0
