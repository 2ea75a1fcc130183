"""Tokens to text as they are generated: incremental detokenization and stop strings.

A token's text is known only in context (byte-level BPE splits a UTF-8 character over tokens; a
tokenizer may merge spaces), so the text so far is the decode of every generated token, and what a
new token adds is the difference. Text that may still become a stop string is held back, so a stream
never shows any part of the stop text. Before an answer's `min_tokens` (vLLM's), stop strings are not looked
for and nothing is held; after, a stop counts in the text not yet sent (sent text is never taken back).
"""

from __future__ import annotations

#: decode only the last tokens (plus what they extend): a long answer does not cost O(n) per token
WINDOW = 16


class TextStream:
    def __init__(self, decode, stops: tuple[str, ...] = ()):
        self.decode = decode  # list[int] -> str
        self.stops = tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.text = ""  # the final text so far (stop text cut off)
        self.raw = ""  # the decode of every token (up to a stop)
        self.sent = 0  # characters of self.text already returned
        self.floor = 0  # a stop string begins at or after this (the text sent while stops could not end it)
        self._base = 0  # tokens[:_base] are decoded into _base_text and never change
        self._base_text = ""

    def _decoded(self) -> str:
        tail = self.decode(self.tokens[self._base:])
        if len(self.tokens) - self._base > WINDOW and not tail.endswith("\ufffd"):
            # settle the older tokens: their text no longer depends on what follows
            keep = self.tokens[self._base:-WINDOW]
            settled = self.decode(keep)
            if tail.startswith(settled) and not settled.endswith("\ufffd"):
                self._base += len(keep)
                self._base_text += settled
                tail = tail[len(settled):]
        return self._base_text + tail

    def add(self, token: int, may_stop: bool = True) -> tuple[str, bool]:
        """Append a generated token: (text to send now, stopped). After a stop, the text is final. With may_stop
        False (the answer is still short of its min_tokens) no stop string ends it and no text is held."""
        self.tokens.append(token)
        text = self.raw = self._decoded()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            text = text[:-1]
        if not may_stop:
            self.text = text
            piece = self._take(len(text))
            self.floor = self.sent
            return piece, False
        # search from just before what was already final: a stop may straddle the old and new text
        start = max(self.floor, self.sent - max((len(s) for s in self.stops), default=0))
        cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.raw = text[:cut]
            return self._take(len(self.text)), True
        self.text = text
        return self._take(len(text) - self._held(text)), False

    def finish(self) -> str:
        """The rest of the text at the end of the stream: what was held back for a stop string that never came, and
        an incomplete last character as the tokenizer decodes it (so the whole equals tokenizer.decode)."""
        self.text = self.raw
        return self._take(len(self.text))

    def _held(self, text: str) -> int:
        """Characters at the end of text that begin some stop string."""
        held = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out


def offsets(decode, ids: list[int]) -> list[int]:
    """Where each token's text starts in decode(ids), found incrementally (a token that ends in the middle of a
    UTF-8 character adds its text with the next one)."""
    stream, out, at = TextStream(decode), [], 0
    for t in ids:
        out.append(at)
        at += len(stream.add(t)[0])
    return out
