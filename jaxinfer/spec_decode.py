"""Speculative decoding, host side: proposers (plain Python / numpy, no jax), greedy acceptance, the config.

A proposer guesses a request's next k tokens; the target model scores the last known token and the k guesses in one
step (k + 1 query tokens of that sequence) and samples at each of those positions with that position's own key, and
the guesses are kept while each equals the token the target itself drew there, plus the target's draw at the first
difference (or after the last guess). So a step yields between 1 and k + 1 tokens, and every token appended is the
one the target alone samples at its position.

n-gram (prompt lookup, vLLM's "ngram" method): the last n tokens (n from prompt_lookup_max down to
prompt_lookup_min) are looked up earlier in the request's own tokens; the k tokens that followed the latest such
occurrence are the guess. Copy-heavy prompts (edit this text, quote the source) repeat long spans, so most
guesses hold there; on free chat little matches and nothing is proposed.

Draft model (vLLM's "draft_model" method): a second, smaller checkpoint with the target's vocabulary runs k
single-token decode steps for the speculating rows of a step (runner.py: one precompiled program per sequence bucket
and sampler variant) and samples each guess with the same sampling as the target at that position: its own logits,
the request's logit_bias, temperature, top-k, top-p and min-p, and Gumbel-max noise from the same key
fold_in(key(seed), position) (greedy rows: argmax). It keeps a paged KV cache of its own, with as many pages as the
target's and the same page size, so the scheduler's page ids and page tables serve both; every step the target runs
(prompt chunks, decodes, verifies) runs through the draft model too, so its cache holds the same positions, and
num_computed_tokens governs both (K/V of rejected positions in either cache is past it and is overwritten later).

Exactness. This is a coupling, not vLLM's rejection sampling: draft and target draw with the same noise, so where
their processed distributions are close they usually draw the same token and the guess is kept; where they are not,
the target's draw replaces the guess. The token emitted at each position is always the target's own draw with the
key of that position, computed from the target's logits given the tokens before it, which are themselves the
target's earlier draws: the output is token for token what the target alone gives for the same seed (greedy and
seeded alike), so its distribution is exactly the target's, whatever the draft proposes. (As exactly as a request
alone equals the same request in a batch: a verify step's logits can differ from a decode step's in the last bits.)
Requests with repetition / presence / frequency penalties, or short of min_tokens, get no drafts (see the engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# Past how many running requests verifying costs more than it saves, per backend (benchmarks/spec_replay.py; RESULTS.md
# "speculation's drop found and fixed"): CPU (default model, k = 3, acceptance 0.7) 1.63x at 1 request, 0.84x at 2;
# H100 (8B, k = 4) 1.49x at 32 requests, 1.13x at 48, 1.03x at 64 at acceptance 0.7, but 0.92x at 32 at acceptance
# 0.5: 32 keeps a margin. TPU: the GPU's, not measured.
DISABLE_BY_BATCH_SIZE = {"gpu": 32, "tpu": 32, "cpu": 1}


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config`: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2}, {"method": "draft_model", "model": PATH, "num_speculative_tokens": k} (a checkpoint
    sharing the target's tokenizer; "quantization" as the engine option of that name, for the draft's weights), or
    {"method": "eagle", "model": PATH, "num_speculative_tokens": k} (an EAGLE-1 head for the target, eagle.py), or
    {"method": "eagle3", ...} (an EAGLE-3 head)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None  # draft_model: the draft checkpoint (anything the engine loads)
    quantization: str | None = None  # draft_model: the draft's weights, as EngineConfig.quantization
    # a step carries drafts only while at most this many requests are running: past it, verifying costs more than
    # it saves (benchmarks/spec_replay.py measures where). None: the measured default of the backend
    # (`max_speculating_batch`); vLLM's key of the same name; a large value never turns speculation off
    disable_by_batch_size: int | None = None

    def __post_init__(self):
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            v = getattr(self, name)
            if v is None and name == "disable_by_batch_size":
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"speculative_config.{name} must be an integer, got {v!r}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError("speculative_config.disable_by_batch_size must be >= 1 (or None: the backend's "
                             f"default), got {self.disable_by_batch_size}")
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(SPECULATIVE_METHODS)}, "
                             f"got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("speculative_config.num_speculative_tokens must be in [1, 16], "
                             f"got {self.num_speculative_tokens}")
        if self.method in ("draft_model", "eagle", "eagle3"):
            if not isinstance(self.model, str) or not self.model:
                raise ValueError(f"speculative_config.model: method {self.method} needs the "
                                 f"{'draft' if self.method == 'draft_model' else 'EAGLE head'} checkpoint's path, "
                                 f"got {self.model!r}")
            if self.method in ("eagle", "eagle3") and self.quantization is not None:
                raise ValueError("speculative_config.quantization applies to method draft_model (an EAGLE head is "
                                 "loaded as it is)")
        elif self.model is not None or self.quantization is not None:
            raise ValueError(f"speculative_config.model / quantization apply to methods draft_model, eagle and eagle3, not "
                             f"{self.method!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    def max_speculating_batch(self, backend: str) -> int:
        """The most running requests with which a step still carries drafts (`disable_by_batch_size`)."""
        if self.disable_by_batch_size is not None:
            return int(self.disable_by_batch_size)
        return DISABLE_BY_BATCH_SIZE.get(backend, DISABLE_BY_BATCH_SIZE["gpu"])

    @staticmethod
    def from_dict(d: dict | None) -> "SpeculativeConfig | None":
        """From vLLM's dict form (or None: no speculation). Unknown keys are an error, naming them."""
        if d is None:
            return None
        if isinstance(d, SpeculativeConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}")
        known = set(SpeculativeConfig.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        if "model" in d and "method" not in d:  # as vLLM: a draft checkpoint alone means a draft model
            d = {**d, "method": "draft_model"}
        return SpeculativeConfig(**d)


def ngram_propose(tokens, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` of n_max..n_min
    tokens; [] when none occurs. tokens: the request's prompt and output ids, in order.

    One pass over the tokens finds the earlier occurrences of the last token (the ends of candidate matches); each
    longer suffix then only checks the candidates that matched the shorter one (the engine runs this for every
    speculating request before each of its steps, on the host, while the device waits)."""
    t = np.asarray(tokens, dtype=np.int64)
    L = len(t)
    ends = np.flatnonzero(t[:L - 1] == t[L - 1])  # ends of the matches of length 1, the suffix itself left out
    best = None
    for n in range(1, min(n_max, L - 1) + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[t[ends - (n - 1)] == t[L - n]]
        if not ends.size:
            break
        if n >= n_min:
            best = int(ends[-1])  # the latest occurrence of the longest match so far: recent text predicts best
    return [] if best is None else t[best + 1:best + 1 + k].tolist()


def accept_greedy(proposed: list[int], target: list[int]) -> list[int]:
    """The tokens a verify step yields: target[i] is the target's argmax after the last known token and the first i
    proposals (len(target) == len(proposed) + 1). Proposals are kept while they equal the target's token; the
    target's token at the first difference (or after the last proposal) ends the run."""
    out = []
    for p, t in zip(proposed, target):
        out.append(t)
        if p != t:
            return out
    out.append(target[len(proposed)])
    return out
