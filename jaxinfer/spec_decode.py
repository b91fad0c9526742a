"""Speculative decoding, host side: proposers (plain Python / numpy, no jax) and greedy acceptance.

A proposer looks at a request's tokens (prompt, then outputs) and guesses the next k; the target model scores
the last known token and the k guesses in one step (k + 1 query tokens of that sequence), and the longest prefix
of guesses that the target itself would have produced is kept, plus the target's own next token. So the output is
exactly the target's, and a step yields between 1 and k + 1 tokens.

n-gram (prompt lookup, vLLM's "ngram" method): the last n tokens (n from prompt_lookup_max down to
prompt_lookup_min) are looked up earlier in the request's own tokens; the k tokens that followed the latest such
occurrence are the guess. Copy-heavy prompts (edit this text, quote the source) repeat long spans, so most
guesses hold there; on free chat little matches and nothing is proposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPECULATIVE_METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config`: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2}."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self):
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"speculative_config.{name} must be an integer, got {v!r}")
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(SPECULATIVE_METHODS)}, "
                             f"got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("speculative_config.num_speculative_tokens must be in [1, 16], "
                             f"got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

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
        return SpeculativeConfig(**d)


def ngram_propose(tokens, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` of n_max..n_min
    tokens; [] when none occurs. tokens: the request's prompt and output ids, in order."""
    t = np.asarray(tokens, dtype=np.int64)
    L = len(t)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        # windows starting at 0 .. L - n - 1: every occurrence but the suffix itself
        win = np.lib.stride_tricks.sliding_window_view(t[:L - 1], n)
        hits = np.flatnonzero((win == t[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: recent text predicts best
            return t[start:start + k].tolist()
    return []


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
