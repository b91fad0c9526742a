"""The /openapi.json document: one JSON schema per request body and response, with this server's limits.

The schemas state what the handlers (protocol.py) accept, field by field, so a schema-driven fuzzer
(tests/test_server.py runs schemathesis) can aim inside the valid space as well as around it. Where a
bound depends on the loaded model (context length, vocabulary, n, logprobs) the live values are used;
before the engine is ready those bounds are simply left out.
"""

from __future__ import annotations

import re

from jaxinfer.sampling_params import FLOAT32_MAX, FLOAT32_TINY
from serving.protocol import MAX_STOP_LENGTH, MAX_STOP_STRINGS, Limits

MAX_LOGIT_BIAS = 100.0  # jaxinfer.sampling_params.MAX_LOGIT_BIAS_VALUE
MAX_TEMPERATURE = 100.0  # jaxinfer.sampling_params.MAX_TEMPERATURE
MAX_SEED = 2**63 - 1


# One server-sent event (what an SSE schema describes): `data` is a JSON chunk, an error object, or "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _int(minimum: int | None = None, maximum: int | None = None, **kw) -> dict:
    s = {"type": "integer", **kw}
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    return s


def _num(minimum: float, maximum: float | None = None, *, exclusive_min: bool = False, **kw) -> dict:
    s = {"type": "number", ("exclusiveMinimum" if exclusive_min else "minimum"): minimum, **kw}
    if maximum is not None:
        s["maximum"] = maximum
    return s


def _sampling(lim: Limits | None) -> dict:
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM-style extras)."""
    vocab = lim.vocab_size - 1 if lim else None
    stop_str = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}
    return {
        "model": {"type": "string", "description": "must be the served model's name when given"},
        "max_tokens": _nullable(_int(1, lim.max_model_len if lim else None,
                                     description="tokens to generate; prompt + max_tokens <= the context length")),
        "n": _nullable(_int(1, lim.max_n if lim else None)),
        "temperature": _nullable(_num(0.0, MAX_TEMPERATURE)),
        "top_p": _nullable(_num(0.0, 1.0, exclusive_min=True)),
        "top_k": _nullable(_int(-1, description="0 or -1: disabled")),
        "min_p": _nullable(_num(0.0, 1.0)),
        "seed": _nullable(_int(-MAX_SEED - 1, MAX_SEED)),
        "priority": _nullable(_int(-MAX_SEED - 1, MAX_SEED, description="scheduling priority: lower runs first")),
        "presence_penalty": _nullable(_num(-2.0, 2.0)),
        "frequency_penalty": _nullable(_num(-2.0, 2.0)),
        "repetition_penalty": _nullable(_num(FLOAT32_TINY, FLOAT32_MAX, description="> 0, a normal float32")),
        "logit_bias": _nullable({"type": "object", "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                 "additionalProperties": _num(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS),
                                 **({"maxProperties": lim.max_logit_bias} if lim else {}),
                                 "description": "token id (as a string) -> bias added to its logit"}),
        "stop": _nullable({"anyOf": [stop_str, {"type": "array", "items": stop_str, "maxItems": MAX_STOP_STRINGS}]}),
        "stop_token_ids": _nullable({"type": "array", "items": _int(0, vocab)}),
        "min_tokens": _nullable(_int(0)),
        "ignore_eos": {"type": "boolean"},
        "skip_special_tokens": {"type": "boolean"},
        "include_stop_str_in_output": {"type": "boolean"},
        "parse_special_tokens": _PARSE_SPECIAL,
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
        "user": {"type": "string"},
    }


def completion_request(lim: Limits | None) -> dict:
    vocab = lim.vocab_size - 1 if lim else None
    ids = {"type": "array", "items": _int(0, vocab), "minItems": 1}
    text = {"type": "string", "minLength": 1}
    props = _sampling(lim)
    props.update({
        "prompt": {"anyOf": [text, ids, {"type": "array", "items": {"anyOf": [text, ids]}, "minItems": 1}],
                   "description": "a string, token ids, or a list of either (one completion group each)"},
        "max_tokens": _nullable(_int(1, lim.max_model_len if lim else None, default=16)),
        "logprobs": _nullable(_int(0, lim.max_logprobs if lim else None)),
        "echo": {"type": "boolean", "description": "prefix each choice with its prompt; with logprobs, the prompt's tokens get logprobs too (the first: null)"},
    })
    return {"type": "object", "required": ["prompt"], "properties": props}


_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool", "function"]},
        "content": _nullable({"anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
                "type": {"const": "text"}, "text": {"type": "string"}}}},
        ]}),
    },
}


def chat_request(lim: Limits | None) -> dict:
    props = _sampling(lim)
    props.update({
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_completion_tokens": _nullable(_int(1, lim.max_model_len if lim else None)),
        "logprobs": _nullable({"type": "boolean"}),
        "top_logprobs": _nullable(_int(0, lim.max_logprobs if lim else None,
                                       description="needs logprobs: true")),
    })
    return {"type": "object", "required": ["messages"], "properties": props}


_PARSE_SPECIAL = _nullable({"type": "boolean", "default": False,
                            "description": "read control-token text in the prompt or message content as control tokens "
                                           "(default: as plain text; only the chat template writes control tokens)"})


def tokenize_request(lim: Limits | None) -> dict:
    special = {"add_special_tokens": {"type": "boolean", "default": True}, "parse_special_tokens": _PARSE_SPECIAL}
    return {"oneOf": [
        {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}, **special}},
        {"type": "object", "required": ["messages"],
         "properties": {"messages": {"type": "array", "items": _MESSAGE, "minItems": 1}, **special}},
    ]}


def detokenize_request(lim: Limits | None) -> dict:
    vocab = lim.vocab_size - 1 if lim else None
    return {"type": "object", "required": ["tokens"],
            "properties": {"tokens": {"type": "array", "items": _int(0, vocab)}}}


# -- responses ------------------------------------------------------------------------------------------------

_STR = {"type": "string"}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: _int(0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", "abort", None]}


def _completion_like(obj: str, choice: dict) -> dict:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": _STR, "object": {"const": obj}, "created": _int(0), "model": _STR,
        "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"],
                                              "properties": {"index": _int(0), "finish_reason": _FINISH,
                                                             "stop_reason": {"type": ["string", "integer", "null"]},
                                                             **choice}}},
        "usage": _USAGE}}


_MODEL_CARD = {"type": "object", "required": ["id", "object"], "properties": {
    "id": _STR, "object": {"const": "model"}, "created": _int(0), "owned_by": _STR, "max_model_len": _int(1)}}

RESPONSES = {
    "/v1/completions": _completion_like("text_completion", {"text": _STR, "logprobs": {"type": ["object", "null"]}}),
    "/v1/chat/completions": _completion_like("chat.completion", {
        "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": _STR}},
        "logprobs": {"type": ["object", "null"]}}),
    "/v1/models": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _MODEL_CARD}}},
    "/v1/models/{model}": _MODEL_CARD,
    "/tokenize": {"type": "object", "required": ["tokens", "count", "max_model_len"], "properties": {
        "tokens": {"type": "array", "items": _int(0)}, "count": _int(0), "max_model_len": _int(1)}},
    "/detokenize": {"type": "object", "required": ["prompt"], "properties": {"prompt": _STR}},
    "/health": {"type": "object", "properties": {"status": _STR}},
    "/ready": {"type": "object", "properties": {"status": _STR}},
}
REQUESTS = {"/v1/completions": completion_request, "/v1/chat/completions": chat_request,
            "/tokenize": tokenize_request, "/detokenize": detokenize_request}

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {k: {"type": ["string", "null"]} for k in ("message", "type", "param", "code")}}}}

# What a response feeds into (OpenAPI links: clients, and schemathesis's stateful phase, follow them).
LINKS = {
    "/tokenize": {"Detokenize": {"operationId": "detokenize", "description": "the ids back to text",
                                 "requestBody": {"tokens": "$response.body#/tokens"}}},
    "/v1/models": {"ModelCard": {"operationId": "v1_models_model", "description": "one served model's card",
                                 "parameters": {"model": "$response.body#/data/0/id"}}},
}

# status -> when, for each kind of route
_ERRORS_BODY = {"400": "invalid request (the error names the param)", "404": "unknown model",
                "413": "request body too large", "503": "not ready: loading, draining, rebuilding, stalled or failed"}
_ERRORS_GENERATE = {**_ERRORS_BODY, "429": "the queue is full (Retry-After)",
                    "500": "the engine failed while running the request"}


def openapi_spec(routes, lim: Limits | None) -> dict:
    """`routes`: api_server.ROUTES, (method, path, handler, summary, takes a JSON body)."""
    err = {"content": {"application/json": {"schema": ERROR}}}
    paths: dict = {}
    for method, path, _, summary, has_body in routes:
        op_id = re.sub(r"[^A-Za-z0-9_]", "", path.strip("/").replace("/", "_").replace(".", "_"))
        ok: dict = {"description": "OK"}
        if path in RESPONSES:
            ok["content"] = {"application/json": {"schema": RESPONSES[path]}}
        if path.startswith("/v1/") and has_body:
            ok["content"]["text/event-stream"] = {"schema": _SSE_EVENT}  # with "stream": true
        if path == "/metrics":
            ok["content"] = {"text/plain": {"schema": _STR}}
        responses = {"200": ok}
        codes = _ERRORS_GENERATE if path.startswith("/v1/") and has_body else _ERRORS_BODY if has_body else {}
        if path in ("/health", "/ready"):
            codes = {"503": "not ready (loading, draining or failed), with the status"}
        if "{model}" in path:
            codes = {"404": "unknown model"}
        for code, why in codes.items():
            responses[code] = {"description": why, **(ok if path in ("/health", "/ready") else err)}
        if path.startswith("/v1"):
            responses["401"] = {"description": "missing or wrong API key (when the server has one)", **err}
        op = {"summary": summary, "operationId": op_id, "responses": responses}
        names = re.findall(r"{(\w+)}", path)
        if names:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": _STR} for n in names]
        if has_body:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": REQUESTS[path](lim)}}}
        if path.startswith("/v1"):
            op["security"] = [{"bearer": []}]
        if path in LINKS:
            ok["links"] = LINKS[path]
        paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.1.0", "info": {"title": "jaxinfer OpenAI-compatible API", "version": "0.1.0"},
            "paths": paths, "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
