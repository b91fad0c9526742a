"""Incremental detokenization: token ids arrive a few at a time, text leaves as soon as it is final.

Two things make this harder than decoding each new token on its own:

* A character can span several tokens (byte-level BPE pieces, SentencePiece `<0xE2>` byte-fallback
  tokens). Decoding a partial character gives U+FFFD, which must never be streamed.
* A token's text can depend on its neighbours (SentencePiece drops the "▁" space of the first token in
  a decode, WordPiece joins "##" pieces).

Both are handled by the prefix / read-offset technique (from HF text-generation-inference and vLLM):
decode a short window made of a few already-emitted tokens (the prefix) plus the unread ones, and emit
what the window adds beyond the prefix's own text, once it no longer ends in U+FFFD. The window is
reset after each emission, so the cost per token stays O(window), not O(output length).

On top of that sits stop-string matching: text that could still be the start of a stop string is held
back, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxinfer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the first output tokens, so the first output token is decoded
# the way a full decode of prompt + output shows it (e.g. with its SentencePiece leading space).
_PROMPT_CONTEXT_TOKENS = 5
# A real partial character is at most 4 bytes, so a window whose end stays incomplete for this many
# tokens is carrying invalid bytes from the model; give up waiting and emit the U+FFFD as final, so a
# stream of garbage bytes cannot make each step cost O(length).
_MAX_UNREAD_TOKENS = 32


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas.

    add(ids) -> newly final text. flush() -> held-back text, to call once when the request ends for a
    reason other than a stop string. `text` is everything returned so far; `stopped_by` is the stop
    string that ended the output, or None. Stop strings wait for `min_tokens`, as stop token ids do (and as
    vLLM's detokenizer does): one that is complete by the min_tokens-th id is plain text; one that completes
    with a later id ends the output, even if it began before.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | str = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ):
        if isinstance(stop, str):
            stop = [stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop: tuple[str, ...] = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.stopped_by: str | None = None
        self.token_ids: list[int] = []  # every output id given to add()

        # Decode window: ids[prefix:read] were emitted and only give context; ids[read:] are unread.
        self._ids: list[int] = self._prompt_context(list(prompt_ids))
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        # Chars of the unread text already released while its end was still an incomplete character.
        self._unread_emitted = 0

        self._held = ""  # final text kept back because it may begin a stop string
        self._exempt = 0  # chars at the start of _held seen before min_tokens: no stop string may end in them
        self._pieces: list[str] = []
        self._text_cache: str | None = ""

    @property
    def text(self) -> str:
        """The output text returned so far (all deltas joined)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._pieces)
        return self._text_cache

    @property
    def num_pieces(self) -> int:
        """How many non-empty deltas `text` is made of (add / flush calls that returned text)."""
        return len(self._pieces)

    def text_since(self, piece: int) -> str:
        """The text of the deltas from number `piece` on (the part of `text` after the first `piece` deltas)."""
        return "".join(self._pieces[piece:])

    @property
    def finished(self) -> bool:
        return self.stopped_by is not None

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed newly sampled ids; returns the text that became final (possibly "")."""
        if self.stopped_by is not None:
            return ""  # nothing after a stop string is ever emitted
        token_ids = list(token_ids)
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        self._ids.extend(token_ids)
        return self._release(self._decode_unread(final=False), final=False)

    def flush(self) -> str:
        """Release everything held back: text that might have begun a stop string, and any trailing
        U+FFFD of an incomplete character (the model will not complete it now)."""
        if self.stopped_by is not None:
            return ""
        return self._release(self._decode_unread(final=True), final=True)

    # ------------------------------------------------------------------ decoding

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _prompt_context(self, prompt_ids: list[int]) -> list[int]:
        n = _PROMPT_CONTEXT_TOKENS
        # If the last few prompt tokens decode to nothing (all skipped special tokens), the first
        # output token would be decoded as the start of a text; reach back further for real text.
        while n < len(prompt_ids) and not self._decode(prompt_ids[-n:]):
            n *= 2
        return prompt_ids[-n:] if n < len(prompt_ids) else prompt_ids

    def _decode_unread(self, final: bool) -> str:
        """Text the unread tokens add that is now final; moves the window when the end is clean."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        unread = new_text[len(self._prefix_text) :]
        too_long = len(self._ids) - self._read_offset > _MAX_UNREAD_TOKENS

        if not final and not too_long and (not unread or unread.endswith(_REPLACEMENT)):
            # Incomplete character at the end (or nothing visible yet, e.g. a skipped special token,
            # which must not become the window's first token and hide the next token's leading
            # space). Whatever precedes the trailing U+FFFDs is already fixed, so release that.
            stable = unread.rstrip(_REPLACEMENT)
            if len(stable) <= self._unread_emitted:
                return ""
            delta = stable[self._unread_emitted :]
            self._unread_emitted = len(stable)
            return delta

        delta = unread[self._unread_emitted :]
        # The unread tokens become the next window's prefix; older ids are no longer needed.
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._unread_emitted = 0
        return delta

    # ------------------------------------------------------------------ stop strings

    def _release(self, new_text: str, final: bool) -> str:
        held = self._held + new_text
        out = held
        self._held = ""
        if self.stop:
            active = len(self.token_ids) > self.min_tokens
            exempt = self._exempt if active else len(held)
            hit = self._first_stop(held, exempt) if active else None
            if hit is not None:
                start, s = hit
                self.stopped_by = s
                out = held[: start + len(s)] if self.include_stop_str_in_output else held[:start]
            elif not final:
                keep = self._stop_prefix_len(held)
                if keep:
                    out, self._held = held[:-keep], held[-keep:]
                self._exempt = max(0, exempt - (len(held) - keep))
        if out:
            self._pieces.append(out)
            self._text_cache = None
        return out

    def _first_stop(self, text: str, min_end: int = 0) -> tuple[int, str] | None:
        """The stop string that completes first in `text` (earliest end) after its first `min_end` chars, and
        where it starts. Held-back text never contains the start of an earlier match, so searching only the
        held and new text finds every stop."""
        best = None
        for s in self.stop:
            i = text.find(s, max(0, min_end - len(s) + 1))
            if i >= 0 and (best is None or i + len(s) < best[0] + len(best[1])):
                best = (i, s)
        return best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
