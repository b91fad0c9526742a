"""Traffic-adaptive buckets (`adaptive_buckets=True`, `--adaptive-buckets`): step shapes learned from the traffic.

A step runs in the smallest compiled (T, B) bucket that holds it, and pays for the bucket's T tokens: a 300-token
prompt chunk in a 1024-token bucket computes 724 tokens of padding. The engine records the (tokens, rows) of the
steps it serves (`ShapeLog`); every `window` prompt-carrying steps, `propose` picks the token sizes that would have
saved the most padded tokens on that window (rounded to a quarter of a power of two, at most `max_new` programs
over the engine's life, each worth at least `MIN_GAIN` of the window's computed tokens), the runner lowers and
compiles them in a background thread while the traffic keeps the buckets it has (a step never waits for a compile),
and the engine adds them between two steps. The learned sizes are saved beside the engine's compiled programs
(`LEARNED`, in its executables.py folder), so the next start with the same configuration compiles or loads them
with the rest. Decode steps keep the seq buckets (a new row count also needs its sampler programs).
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
    """The (tokens, rows) of the last `window` steps that carried prompt tokens (decode steps are not recorded)."""

    def __init__(self, window: int):
        self.window = window
        self.shapes: deque[tuple[int, int]] = deque(maxlen=window)
        self.since = 0  # steps recorded since the last proposal

    def record(self, num_tokens: int, rows: int) -> None:
        self.shapes.append((num_tokens, rows))
        self.since += 1

    def due(self) -> bool:
        return self.since >= self.window

    def take(self) -> Counter:
        self.since = 0
        return Counter(self.shapes)


def _best(buckets, t: int, rows: int):
    """The mixed bucket the runner would pick for t tokens and `rows` rows (None: none holds it)."""
    return next(((T, B) for T, B, d in buckets if not d and T >= t and B >= rows), None)


def propose(shapes: Counter, buckets: list[tuple[int, int, bool]], max_new: int) -> list[tuple[int, int, bool]]:
    """Up to `max_new` mixed buckets (T, B, False) that minimise the computed tokens of `shapes` ({(tokens, rows):
    steps}) given `buckets`; each with B the seq bucket its steps use now, each saving >= MIN_GAIN of the total."""
    current = sorted(buckets)
    total = sum(_best(current, t, r)[0] * n for (t, r), n in shapes.items() if _best(current, t, r))
    chosen: list[tuple[int, int, bool]] = []

    def computed(bs) -> int:
        return sum(_best(bs, t, r)[0] * n for (t, r), n in shapes.items() if _best(bs, t, r))

    while len(chosen) < max_new and total:
        now = computed(current)
        cands = set()
        for t, r in shapes:
            held = _best(current, t, r)
            if held is not None and r <= round_up(t) < held[0]:
                cands.add((round_up(t), held[1], False))
        if not cands:
            break
        gain, cand = max((now - computed(sorted(current + [c])), c) for c in sorted(cands))
        if gain < MIN_GAIN * total:
            break
        chosen.append(cand)
        current = sorted(current + [cand])
    return chosen


def padded_share(shapes: Counter, buckets) -> float:
    """Padding tokens / computed tokens of `shapes` in `buckets`."""
    comp = sum(_best(buckets, t, r)[0] * n for (t, r), n in shapes.items() if _best(buckets, t, r))
    used = sum(t * n for (t, r), n in shapes.items() if _best(buckets, t, r))
    return 1 - used / comp if comp else 0.0


def load_learned(folder: Path | None) -> list[tuple[int, int, bool]]:
    """The buckets learned by an earlier run of this configuration ([] if none or unreadable)."""
    if folder is None:
        return []
    try:
        return [(int(T), int(B), False) for T, B in json.loads((folder / LEARNED).read_text())["buckets"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def save_learned(folder: Path | None, learned: list[tuple[int, int, bool]]) -> None:
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (LEARNED + ".tmp")
        tmp.write_text(json.dumps({"buckets": [[T, B] for T, B, _ in sorted(learned)]}))
        tmp.replace(folder / LEARNED)
    except OSError:
        pass  # a read-only cache: the next start learns them again
