"""The host-side form of a request, and what the engine hands back to users."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from jaxinfer.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely, in the model's own distribution; None when unknown
    decoded_token: str | None = None


@dataclass
class Request:
    """One sequence being generated. A user request with n > 1 becomes n of these sharing a group id."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # uint32; drawn by the engine when the user gave none
    max_tokens: int  # resolved: params.max_tokens or what the context leaves
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    group_id: str = ""
    index: int = 0  # position among the n outputs of its group
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # per prompt position (0: None), if asked
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache, or will be once the scheduled steps ran
    num_pending: int = 0  # tokens sampled in scheduled steps whose ids the host has not read yet
    pages: list[int] = field(default_factory=list)
    cache_extra: object = None  # hashed into every page with the tokens: whatever else changes K/V (LoRA id)
    page_hashes: list[bytes] = field(default_factory=list)  # of the full pages of known tokens, grown lazily
    num_registered_pages: int = 0  # leading pages of `pages` already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    slot: int | None = None  # row of the on-device sampler state while running
    draft_gap: int = -1  # a draft model's: the position whose K/V its cache may lack (runner._plan_draft); -1: none
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None  # why it failed (finish_reason 'error': a fault in its step, its text or logprobs)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0  # of the output tokens, kept as their logprobs arrive (when asked for)
    # What DELTA outputs have handed out: output tokens, detokenizer text pieces, and whether the finish.
    num_reported_tokens: int = 0
    num_reported_pieces: int = 0
    finish_reported: bool = False
    prompt_logprobs_reported: bool = False

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end this request: its EOS ids (unless ignore_eos) and its stop_token_ids. min_tokens
        masks exactly these until the output is long enough."""
        eos = [] if self.params.ignore_eos else sorted(self.eos_token_ids)
        return eos + list(self.params.stop_token_ids or [])

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_prompt_tokens: int
    num_generated_tokens: int  # all n outputs together
    longest_output: int = 0  # tokens of the longest of them (they decode side by side); 0: unknown

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first output token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (of one output: n > 1 outputs decode side by side)."""
        n = self.longest_output or self.num_generated_tokens
        if self.finished_time is None or self.first_token_time is None or n < 2:
            return None
        return (self.finished_time - self.first_token_time) / (n - 1)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # per prompt token; the first is None
    error: str | None = None  # set when one of its sequences failed (finish_reason 'error'): what went wrong
