"""Traffic-adaptive buckets (`adaptive_buckets=True`, `--adaptive-buckets`): step shapes learned from the traffic.

A step runs in the smallest compiled (T, B) bucket that holds it, and pays for the bucket's T tokens: a 300-token
prompt chunk in a 1024-token bucket computes 724 tokens of padding, 20 decoding sequences in a 32-row decode bucket
compute 12 rows of padding. The engine records the (tokens, rows) of the steps it serves (`ShapeLog`: the last
`window` prompt-carrying steps and the last `window` decode steps); every `window` steps of either kind, `propose`
picks the buckets that would have saved the most padded tokens on that window: mixed buckets of a new token size
(with the rows of the bucket those steps use now), decode buckets of a new row count (rounded to a quarter of a power
of two, at most `max_new` programs over the engine's life, each worth at least `MIN_GAIN` of the window's computed
tokens). The runner lowers and compiles them in a background thread while the traffic keeps the buckets it has (a
step never waits for a compile): a decode bucket with its sampler programs for that row count. The engine adds
them between two steps. The learned buckets are saved beside the engine's compiled programs (`LEARNED`, in its
executables.py folder), so the next start with the same configuration compiles or loads them with the rest.
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from pathlib import Path

LEARNED = "adaptive_buckets.json"
MIN_GAIN = 0.02  # a new bucket must save this share of the window's computed tokens


def round_up(t: int) -> int:
    """t rounded up to a quarter step between powers of two (300 -> 320, 1100 -> 1280): a bucket serves a band."""
    if t <= 8:
        return t
    q = 1 << max(0, int(math.log2(t)) - 2)
    return -(-t // q) * q


class ShapeLog:
    """The (tokens, rows, decode) of the last `window` steps that carried prompt tokens and of the last `window`
    decode steps."""

    def __init__(self, window: int):
        self.window = window
        self.shapes: deque[tuple[int, int, bool]] = deque(maxlen=window)
        self.decodes: deque[tuple[int, int, bool]] = deque(maxlen=window)
        self.since = [0, 0]  # steps of each kind (mixed, decode) recorded since the last proposal

    def record(self, num_tokens: int, rows: int, decode: bool = False) -> None:
        (self.decodes if decode else self.shapes).append((num_tokens, rows, decode))
        self.since[decode] += 1

    def due(self) -> bool:
        return max(self.since) >= self.window

    def take(self) -> Counter:
        self.since = [0, 0]
        return Counter(self.shapes) + Counter(self.decodes)


def _best(buckets, t: int, rows: int, decode: bool = False):
    """The bucket the runner would pick for a step of t tokens and `rows` rows of that kind (None: none holds it)."""
    return next(((T, B) for T, B, d in buckets if d == decode and T >= t and B >= rows), None)


def _computed(shapes: Counter, buckets) -> int:
    return sum(_best(buckets, *s)[0] * n for s, n in shapes.items() if _best(buckets, *s))


def propose(shapes: Counter, buckets: list[tuple[int, int, bool]], max_new: int) -> list[tuple[int, int, bool]]:
    """Up to `max_new` buckets that minimise the computed tokens of `shapes` ({(tokens, rows, decode): steps}) given
    `buckets`, each saving >= MIN_GAIN of the total: mixed buckets (T, B, False) with B the rows of the bucket their
    steps use now, and decode buckets (B, B, True) of a new row count."""
    current = sorted(buckets)
    total = _computed(shapes, current)
    chosen: list[tuple[int, int, bool]] = []
    while len(chosen) < max_new and total:
        now = _computed(shapes, current)
        cands = set()
        for t, r, d in shapes:
            held = _best(current, t, r, d)
            if held is None:
                continue
            if not d and r <= round_up(t) < held[0]:
                cands.add((round_up(t), held[1], False))
            elif d and round_up(r) < held[1]:
                cands.add((round_up(r), round_up(r), True))
        if not cands:
            break
        gain, cand = max((now - _computed(shapes, sorted(current + [c])), c) for c in sorted(cands))
        if gain < MIN_GAIN * total:
            break
        chosen.append(cand)
        current = sorted(current + [cand])
    return chosen


def padded_share(shapes: Counter, buckets) -> float:
    """Padding tokens / computed tokens of `shapes` in `buckets`."""
    comp = _computed(shapes, buckets)
    used = sum(s[0] * n for s, n in shapes.items() if _best(buckets, *s))
    return 1 - used / comp if comp else 0.0


def load_learned(folder: Path | None) -> list[tuple[int, int, bool]]:
    """The buckets learned by an earlier run of this configuration ([] if none or unreadable)."""
    if folder is None:
        return []
    try:
        return [(int(b[0]), int(b[1]), bool(b[2]) if len(b) > 2 else False)
                for b in json.loads((folder / LEARNED).read_text())["buckets"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return []


def save_learned(folder: Path | None, learned: list[tuple[int, int, bool]]) -> None:
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (LEARNED + ".tmp")
        tmp.write_text(json.dumps({"buckets": [[T, B, d] for T, B, d in sorted(learned)]}))
        tmp.replace(folder / LEARNED)
    except OSError:
        pass  # a read-only cache: the next start learns them again
