"""Per-request sampling parameters (host side, no jax).

`SamplingParams` mirrors the OpenAI / vLLM request fields. It is validated once, when the request is
built, so that everything downstream (scheduler, metadata packing, the jitted sampler) can trust the
values. Checks that need the model (vocab size, server caps) live in `validate_for_model`, called by
the engine when the request is admitted. Error messages name the offending parameter, because the
server returns them verbatim to the client as a 400.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass

# Temperatures below this are treated as greedy (as vLLM does): dividing by ~0 only produces inf/NaN.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MAX_LOGIT_BIAS_VALUE = 100.0
# The sampler divides / multiplies logits by repetition_penalty in float32: it must be a normal float32 there.
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def _is_int(value) -> bool:
    # bool is an int subclass; `top_k=True` is a client bug, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shown(value) -> str:
    """A value for an error message: its repr, cut short (an integer of thousands of digits is not echoed)."""
    if _is_int(value) and abs(value) >= 10**30:
        return f"an integer of about 10^{int(abs(value).bit_length() * math.log10(2))}"
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _finite_float(name: str, value, requirement: str) -> float:
    try:
        if _is_real(value) and math.isfinite(value):
            return float(value)
    except OverflowError:  # an integer past float64's range
        pass
    raise ValueError(f"{name} must be a finite number {requirement}, got {_shown(value)}")


def _int(name: str, value, requirement: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer {requirement}, got {_shown(value)}")
    return int(value)


class RequestOutputKind(enum.Enum):
    """Which `Engine.step()` calls report a request (as vLLM's RequestOutputKind).

    CUMULATIVE: every step that made progress, with everything generated so far.
    DELTA: every step that made progress, with only what is new since the last output: the new token ids,
      text and logprobs (cumulative_logprob stays the running total; prompt_logprobs come once, complete,
      with the first output token of completion 0); a step with nothing new gives no output. A step's cost
      then does not grow with the outputs' length (what the server streams).
    FINAL_ONLY: only the step that finishes it; what offline generation needs, and it spares the host a
      RequestOutput per running request per step (at 512 running requests, a third of the host's step time).
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled (normalised to 0)
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # str keys (as JSON sends them) become ints; {} -> None
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives to return; 0 = only the sampled token's logprob
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (no prefix-cache hit)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.n = _int("n", self.n, ">= 1")
        if self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")

        req = f">= 0 and <= {MAX_TEMPERATURE}"
        self.temperature = _finite_float("temperature", self.temperature, req)
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a finite number {req}, got {self.temperature}")

        self.top_p = _finite_float("top_p", self.top_p, "in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a finite number in (0, 1], got {self.top_p}")

        self.top_k = _int("top_k", self.top_k, ">= 0, or -1 to disable")
        if self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0, or -1 to disable, got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0

        self.min_p = _finite_float("min_p", self.min_p, "in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be a finite number in [0, 1], got {self.min_p}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _finite_float(name, getattr(self, name), "in [-2, 2]")
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a finite number in [-2, 2], got {value}")
            setattr(self, name, value)

        req = f"> 0 (float32: {FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g})"
        self.repetition_penalty = _finite_float("repetition_penalty", self.repetition_penalty, req)
        if not FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX:
            raise ValueError(f"repetition_penalty must be a finite number {req}, got {self.repetition_penalty}")

        if self.seed is not None:
            # Any int is accepted; the metadata builder reduces it to uint32.
            self.seed = _int("seed", self.seed, "or null")

        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, ">= 1 or null")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be an integer >= 1 or null, got {self.max_tokens}")

        self.min_tokens = _int("min_tokens", self.min_tokens, ">= 0")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, max_tokens={self.max_tokens}"
            )

        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                value = _int(name, getattr(self, name), ">= 0 or null")
                if value < 0:
                    raise ValueError(f"{name} must be an integer >= 0 or null, got {value}")
                setattr(self, name, value)

        self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {_shown(self.output_kind)}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {_shown(getattr(self, name))}")

    @staticmethod
    def _normalise_logit_bias(logit_bias) -> dict[int, float] | None:
        if logit_bias is None:
            return None
        if not isinstance(logit_bias, dict):
            raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(logit_bias).__name__}")
        out: dict[int, float] = {}
        for key, value in logit_bias.items():
            if _is_int(key):
                token = int(key)
            elif isinstance(key, str) and key.strip().lstrip("+-").isdigit():
                token = int(key)  # the OpenAI API sends token ids as JSON object keys, i.e. strings
            else:
                raise ValueError(f"logit_bias keys must be integer token ids, got {_shown(key)}")
            if token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {_shown(key)}")
            bias = _finite_float(f"logit_bias[{token}]", value, f"in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]")
            if abs(bias) > MAX_LOGIT_BIAS_VALUE:
                raise ValueError(
                    f"logit_bias[{token}] must be a finite number in "
                    f"[-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}], got {bias}"
                )
            out[token] = bias
        # An empty mapping means no bias; normalising lets the host test `is None` only.
        return out or None

    @staticmethod
    def _normalise_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {_shown(s)}")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(stop_token_ids) -> list[int]:
        if stop_token_ids is None:
            return []
        if not isinstance(stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {type(stop_token_ids).__name__}")
        for t in stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must contain only integers >= 0, got {_shown(t)}")
        return [int(t) for t in stop_token_ids]

    def validate_for_model(self, vocab_size: int, max_logprobs: int, max_logit_bias: int) -> None:
        """Checks that depend on the model and on server caps; raises ValueError naming the field."""
        if self.logit_bias is not None:
            if len(self.logit_bias) > max_logit_bias:
                raise ValueError(
                    f"logit_bias may hold at most {max_logit_bias} entries, got {len(self.logit_bias)}"
                )
            for token in self.logit_bias:
                if not 0 <= token < vocab_size:
                    raise ValueError(f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})")
        for token in self.stop_token_ids:
            if not 0 <= token < vocab_size:
                raise ValueError(f"stop_token_ids entry {token} is outside the vocabulary [0, {vocab_size})")
        if len(self.stop_token_ids) > vocab_size:
            raise ValueError(f"stop_token_ids has more entries than the vocabulary ({vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) > max_logprobs:
                raise ValueError(f"{name} must be <= {max_logprobs}, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
