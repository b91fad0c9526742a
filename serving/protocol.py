"""OpenAI request bodies -> validated (prompts, SamplingParams); engine outputs -> OpenAI response bodies.

Everything here is pure (no aiohttp, no engine): `APIError` carries the HTTP status and the OpenAI error
fields, and the server turns it into `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

from jaxinfer.request import Logprob
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


_PARAM = re.compile(r"^([a-z_]+)(?:\[[^\]]*\])?:?\s")


def param_of(message: str) -> str | None:
    """SamplingParams / engine messages start with the field name: 'top_p must be ...', 'prompt: ...'."""
    m = _PARAM.match(message)
    return m.group(1) if m else None


@dataclass
class Limits:
    max_n: int
    max_logprobs: int
    max_model_len: int
    vocab_size: int
    max_logit_bias: int  # the engine's EngineConfig.max_logit_bias


# Request fields that ask for something this server does not do: refused (400) rather than ignored, which
# would hand back unconstrained text where the client counts on a tool call or a JSON document.
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def flag(body: dict, field: str) -> bool:
    """An optional boolean field (null: false)."""
    v = body.get(field)
    if v is not None and not isinstance(v, bool):
        raise bad_request(f"{field} must be a boolean", field)
    return bool(v)


def check_text(body: dict, depth_limit: int = 64) -> None:
    """Every string of a request must be text that UTF-8 can carry: JSON's escapes can spell a lone UTF-16 surrogate
    ("\\ud800"), which no tokenizer takes. Refused with the field's path; so is nesting deeper than `depth_limit`
    (no field of the API nests that deep)."""
    stack = [(body, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > depth_limit:
            raise bad_request(f"the request body is nested more than {depth_limit} levels deep", path.split(".")[0] or None)
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{path or 'the body'} is not valid Unicode text (a lone surrogate)",
                                  path.split(".")[0].split("[")[0] or None) from None
        elif isinstance(v, dict):
            stack.extend((x, f"{path}.{k}" if path else str(k), depth + 1) for k, x in v.items())
            for k in v:  # keys are strings too
                if isinstance(k, str):
                    stack.append((k, path or "the body", depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def refuse_unsupported(body: dict) -> None:
    """Fields that ask for what this server does not do are refused on every route (each API defines only some of
    them; sent to the other, they are no less unsupported)."""
    def refuse(field: str, what: str):
        raise bad_request(f"{field}: {what} is not supported by this server", field)

    if body.get("tools"):
        refuse("tools", "tool calling")
    if body.get("tool_choice") not in (None, "none", "auto"):  # "auto" with no tools: nothing to call
        refuse("tool_choice", "tool calling")
    if body.get("functions"):
        refuse("functions", "function calling")
    if body.get("function_call") not in (None, "none", "auto"):
        refuse("function_call", "function calling")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        refuse("response_format", "a response format other than {\"type\": \"text\"} (JSON mode, JSON schema)")
    if body.get("modalities") not in (None, ["text"]):
        refuse("modalities", "output other than text")
    if body.get("suffix"):
        refuse("suffix", "a suffix (insertion)")
    best_of = body.get("best_of")
    if best_of is not None and (not isinstance(best_of, int) or isinstance(best_of, bool)):
        raise bad_request("best_of must be an integer", "best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        refuse("best_of", "best_of other than n (returning the best of more samples)")
    for field in _GUIDED:
        if body.get(field) is not None:
            refuse(field, "guided decoding")


def max_tokens_field(body: dict, chat: bool) -> str:
    """The field that bounds the output: chat's max_completion_tokens unless absent or null (vLLM), else max_tokens."""
    return "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"


def sampling_params(body: dict, limits: Limits, chat: bool) -> SamplingParams:
    """Build and validate SamplingParams from a request body (both endpoints)."""
    refuse_unsupported(body)
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, int) and not isinstance(n, bool) and n > limits.max_n:
        raise bad_request(f"n must be <= {limits.max_n} on this server, got {n}", "n")
    if chat:
        max_tokens = body.get(max_tokens_field(body, chat))
        if body.get("logprobs"):
            logprobs = body.get("top_logprobs") or 0
        else:
            if body.get("top_logprobs") not in (None, 0):
                raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
            logprobs = None
        if body.get("logprobs") not in (None, True, False):
            raise bad_request("logprobs must be a boolean", "logprobs")
        param_name = "top_logprobs"
    else:
        max_tokens = body.get("max_tokens", 16)
        logprobs = body.get("logprobs")
        param_name = "logprobs"
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs > limits.max_logprobs:
        raise bad_request(f"{param_name} must be <= {limits.max_logprobs}, got {logprobs}", param_name)
    stop = body.get("stop")
    if isinstance(stop, list):
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    for s in [stop] if isinstance(stop, str) else (stop if isinstance(stop, list) else []):
        if isinstance(s, str) and len(s) > MAX_STOP_LENGTH:
            raise bad_request(f"stop strings may be at most {MAX_STOP_LENGTH} characters, got {len(s)}", "stop")
    fields = dict(
        n=n, temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0),
        min_p=body.get("min_p", 0.0), seed=body.get("seed"), presence_penalty=body.get("presence_penalty", 0.0),
        frequency_penalty=body.get("frequency_penalty", 0.0), repetition_penalty=body.get("repetition_penalty", 1.0),
        logit_bias=body.get("logit_bias"), stop=stop, stop_token_ids=body.get("stop_token_ids"),
        max_tokens=max_tokens, min_tokens=body.get("min_tokens", 0), ignore_eos=body.get("ignore_eos", False),
        logprobs=logprobs, skip_special_tokens=body.get("skip_special_tokens", True),
        include_stop_str_in_output=body.get("include_stop_str_in_output", False),
    )
    defaults = SamplingParams()
    fields = {k: (getattr(defaults, k) if v is None and k not in ("seed", "max_tokens", "logprobs") else v)
              for k, v in fields.items()}
    try:
        # DELTA: each step hands the server only what is new, so a step's cost does not grow with the outputs.
        params = SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)
        params.validate_for_model(limits.vocab_size, limits.max_logprobs, limits.max_logit_bias)
    except (ValueError, TypeError) as e:
        msg = str(e)
        p = param_of(msg)
        if p == "max_tokens":
            p = max_tokens_field(body, chat)
        if chat and p == "logprobs":
            p = "top_logprobs"
        raise bad_request(msg, p) from None
    return params


def check_context(num_prompt: int, params: SamplingParams, limits: Limits, param: str = "max_tokens") -> None:
    if num_prompt >= limits.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {limits.max_model_len} tokens, but the prompt has "
            f"{num_prompt} tokens", "prompt" if param == "max_tokens" else "messages")
    if params.max_tokens is not None and num_prompt + params.max_tokens > limits.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {limits.max_model_len} tokens; the prompt has {num_prompt} "
            f"tokens and {param}={params.max_tokens} more were requested ({num_prompt + params.max_tokens} in all)",
            param)


def completion_prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    """The `prompt` field as a list of prompts: strings or token-id lists (never empty)."""
    p = body.get("prompt")
    if p is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(_is_tok(t) for t in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        prompts = p
    elif isinstance(p, list) and not p:
        raise bad_request("prompt must not be empty", "prompt")
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids, or a list of those",
                          "prompt")
    for x in prompts:
        if isinstance(x, str):
            if not x:
                raise bad_request("prompt must not be empty", "prompt")
        else:
            if not x:
                raise bad_request("prompt must not be empty", "prompt")
            if not all(_is_tok(t) for t in x):
                raise bad_request("prompt token ids must be integers", "prompt")
            bad = [t for t in x if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})", "prompt")
    return prompts


def _is_tok(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def chat_messages(body: dict) -> list[dict]:
    if body.get("chat_template") is not None:
        raise bad_request("request-supplied chat templates are not supported", "chat_template")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", "messages")
        if m["role"] not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role: {m['role']!r} is not one of {sorted(CHAT_ROLES)}", "messages")
        if m.get("content") is None and m["role"] != "assistant":  # an assistant turn may carry only tool calls
            raise bad_request(f"messages[{i}].content is required for role {m['role']!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
        # OpenAI's "developer" is the system turn of newer models; chat templates know "system"
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


# -- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _top(pos: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, lp) for t, lp in pos.items() if lp.rank is not None and lp.rank <= k),
                  key=lambda x: x[1].rank)[:k]


def _top_and_chosen(pos: dict[int, Logprob], tok: int, k: int, decode) -> dict[str, float]:
    """The legacy completions `top_logprobs` entry: the k most likely tokens and always the chosen one (so up to
    k + 1 of them, as the OpenAI completions API documents and vLLM returns)."""
    out = {(lp.decoded_token or decode(t)): lp.logprob for t, lp in _top(pos, k)}
    out.setdefault(pos[tok].decoded_token or decode(tok), pos[tok].logprob)
    return out


def completion_logprobs(c_logprobs: list[dict[int, Logprob]], token_ids: list[int], k: int,
                        offset: int, decode) -> dict:
    """The legacy completions logprobs object for tokens [start:] of one choice."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos_text = offset
    for tok, pos in zip(token_ids, c_logprobs):
        lp = pos[tok]
        s = lp.decoded_token if lp.decoded_token is not None else decode(tok)
        tokens.append(s)
        token_lps.append(lp.logprob)
        tops.append(_top_and_chosen(pos, tok, k, decode) if k else None)
        offsets.append(pos_text)
        pos_text += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(p_logprobs: list[dict[int, Logprob] | None] | None, prompt_ids: list[int], k: int,
                    decode) -> dict:
    """The completions logprobs object for an echoed prompt: the first token has no logprob (null)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos_text = 0
    for i, tok in enumerate(prompt_ids):
        pos = p_logprobs[i] if p_logprobs else None
        s = decode(tok)
        tokens.append(s)
        token_lps.append(None if pos is None else pos[tok].logprob)
        tops.append(None if pos is None or not k else _top_and_chosen(pos, tok, k, decode))
        offsets.append(pos_text)
        pos_text += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def text_end(lp: dict | None) -> int:
    """Where the text of a logprobs object's tokens ends (0 for none): the next token's text_offset."""
    if not lp or not lp["tokens"]:
        return 0
    return lp["text_offset"][-1] + len(lp["tokens"][-1])


def join_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(c_logprobs: list[dict[int, Logprob]], token_ids: list[int], k: int, decode,
                  token_bytes=None) -> dict:
    """The chat logprobs object; `bytes` are each token's own bytes (token_bytes), which for a token holding part
    of a UTF-8 character differ from its decoded text (a replacement character)."""
    def entry(t: int, lp: Logprob) -> dict:
        s = lp.decoded_token if lp.decoded_token is not None else decode(t)
        return {"token": s, "logprob": lp.logprob,
                "bytes": list(token_bytes(t) if token_bytes is not None else s.encode("utf-8"))}

    return {"content": [{**entry(tok, pos[tok]), "top_logprobs": [entry(t, lp) for t, lp in _top(pos, k)]}
                        for tok, pos in zip(token_ids, c_logprobs)]}

