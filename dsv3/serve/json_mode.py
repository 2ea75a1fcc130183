"""response_format {"type": "json_object"}: the answer is one JSON object (RFC 8259), token by token.

A byte-level automaton tracks where the answer stands in the grammar (`State`); before each token is sampled,
the tokens whose bytes cannot continue a JSON object from there are masked (`JsonVocab.allowed`), and EOS is
allowed only once the object is closed. The mask is computed by walking the vocabulary as a trie (the tokens
sorted by their bytes: a prefix that breaks the grammar rules out every token that starts with it), so a state
costs its viable prefixes, not the vocabulary; inside a string, where any token without a quote, backslash or
control byte is fine, those tokens come as one precomputed mask. Masks are cached by state.

Insignificant whitespace is bounded (MAX_WS bytes in a row): a model that keeps emitting newlines would
otherwise run to max_tokens inside a valid document. Bytes of 0x80 and up inside strings are taken as they
are (UTF-8 is the tokenizer's business; an invalid sequence decodes to U+FFFD, still valid JSON text).
"""

from __future__ import annotations

import functools
from bisect import bisect_left

import torch

#: at most this many whitespace bytes in a row between tokens of the grammar
MAX_WS = 64
#: at most this many containers open at once
MAX_DEPTH = 64

_WS = frozenset(b" \t\n\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_DIGIT = frozenset(b"0123456789")
# a number's progress: 0 after '-', 1 a leading 0, 2 integer digits, 3 after '.', 4 fraction digits, 5 after
# 'e', 6 after the exponent's sign, 7 exponent digits; it may end (the next byte belongs to what follows) in 1/2/4/7
_NUMBER_ENDS = frozenset((1, 2, 4, 7))
_LITERALS = {ord("t"): "Lrue", ord("f"): "Lalse", ord("n"): "Lull"}

#: (open containers as a string of '{' and '[', mode, aux). Modes: 'B' before the object, 'K' after '{' (a key or
#: '}'), 'k' after ',' in an object (a key), 'C' after a key (':'), 'V' a value, 'W' after '[' (a value or ']'),
#: 'A' after a value (',' or the closer), 'E' the object closed; aux counts whitespace in a row there. 's'/'S'
#: inside a key/value string: aux 0 plain, 1 after a backslash, 2..5 hex digits of a \\u escape still to come
#: (aux - 1). 'N' in a number (aux: its progress, above). 'L...' in true/false/null: the bytes still to come.
State = tuple

START: State = ("", "B", 0)


def _number(aux: int, c: int) -> int | None:
    """A number's progress after byte c (None: c does not continue it)."""
    if c in _DIGIT:
        return (1 if c == 0x30 else 2, None, 2, 4, 4, 7, 7, 7)[aux]  # no digit after a leading 0
    if c == 0x2E:
        return 3 if aux in (1, 2) else None
    if c in (0x65, 0x45):
        return 5 if aux in (1, 2, 4) else None
    return 6 if aux == 5 and c in (0x2B, 0x2D) else None


def _close(stack: str) -> State:
    stack = stack[:-1]
    return (stack, "A", 0) if stack else ("", "E", 0)


def _value(stack: str, c: int) -> State | None:
    if c == 0x22:
        return (stack, "S", 0)
    if c in (0x7B, 0x5B):
        if len(stack) >= MAX_DEPTH:
            return None
        return (stack + chr(c), "K" if c == 0x7B else "W", 0)
    if c == 0x2D:
        return (stack, "N", 0)
    if c in _DIGIT:
        return (stack, "N", 1 if c == 0x30 else 2)
    if c in _LITERALS:
        return (stack, _LITERALS[c], 0)
    return None


def step(st: State, c: int) -> State | None:
    """The state after byte c, or None where c cannot continue a JSON object."""
    stack, mode, aux = st
    if mode in ("s", "S"):
        if aux == 0:
            if c == 0x22:
                return (stack, "C" if mode == "s" else "A", 0)
            if c == 0x5C:
                return (stack, mode, 1)
            return None if c < 0x20 else st
        if aux == 1:
            return (stack, mode, 0) if c in _ESCAPES else (stack, mode, 5) if c == 0x75 else None
        return (stack, mode, 0 if aux == 2 else aux - 1) if c in _HEX else None
    if mode == "N":
        nxt = _number(aux, c)
        if nxt is not None:
            return (stack, "N", nxt)
        if aux not in _NUMBER_ENDS:
            return None
        mode, aux = "A", 0  # the number ended: c is what follows it
    elif mode[0] == "L":
        if c != ord(mode[1]):
            return None
        return (stack, "L" + mode[2:], 0) if len(mode) > 2 else (stack, "A", 0)
    if c in _WS:
        return (stack, mode, aux + 1) if aux < MAX_WS else None
    if mode == "B":
        return ("{", "K", 0) if c == 0x7B else None
    if mode in ("K", "k"):
        if c == 0x22:
            return (stack, "s", 0)
        return _close(stack) if c == 0x7D and mode == "K" else None
    if mode == "C":
        return (stack, "V", 0) if c == 0x3A else None
    if mode in ("V", "W"):
        if c == 0x5D and mode == "W":
            return _close(stack)
        return _value(stack, c)
    if mode == "A":
        if c == 0x2C:
            return (stack, "k" if stack[-1] == "{" else "V", 0)
        return _close(stack) if c == (0x7D if stack[-1] == "{" else 0x5D) else None
    return None  # 'E': only whitespace after the object


def advance(st: State | None, data: bytes) -> State | None:
    """The state after `data`, or None where it breaks the grammar somewhere."""
    for c in data:
        if st is None:
            return None
        st = step(st, c)
    return st


def complete(st: State | None) -> bool:
    """The object is closed: the answer may end here."""
    return st is not None and st[1] == "E"


def _plain(data: bytes) -> bool:
    """Inside a string, these bytes leave it as it was whatever they are: no quote, backslash or control byte."""
    return all(c >= 0x20 and c not in (0x22, 0x5C) for c in data)


class _Trie:
    """Tokens sorted by their bytes: a node is a range of them sharing a prefix (no objects per node)."""

    def __init__(self, items: list[tuple[bytes, int]]):
        items.sort()
        self.keys = [b for b, _ in items]
        self.ids = [t for _, t in items]

    def walk(self, st: State, out: list[int]) -> None:
        """Append every token whose bytes continue st (depth first; a breaking prefix prunes its subtree)."""
        keys, todo = self.keys, [(0, len(self.keys), 0, st)]
        while todo:
            lo, hi, depth, s = todo.pop()
            while lo < hi and len(keys[lo]) == depth:  # tokens that end here (they sort first)
                out.append(self.ids[lo])
                lo += 1
            while lo < hi:
                c = keys[lo][depth]
                end = hi if c == 255 else bisect_left(keys, keys[lo][:depth] + bytes((c + 1,)), lo, hi)
                nxt = step(s, c)
                if nxt is not None:
                    todo.append((lo, end, depth + 1, nxt))
                lo = end


class JsonVocab:
    """A vocabulary's tokens as JSON mode sees them: `allowed(state)` is the mask of tokens that may come next.

    token_bytes: each token's bytes (None for special tokens: never inside the answer); eos_ids: the tokens that
    end it, allowed once the object is closed; device: where the masks are used (each is copied there once, when
    its state is first met, not at every step)."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids, device: torch.device | str = "cpu"):
        self.vocab, self.device = len(token_bytes), device
        self.bytes = [b or b"" for b in token_bytes]  # what a token adds to the answer's bytes
        self.eos = sorted(t for t in eos_ids if 0 <= t < self.vocab)
        usable = [(b, t) for t, b in enumerate(token_bytes) if b]
        plain = [t for b, t in usable if _plain(b)]
        self.plain = torch.zeros(self.vocab, dtype=torch.bool)
        self.plain[plain] = True
        self.everything = _Trie(usable)
        self.others = _Trie([(b, t) for b, t in usable if not _plain(b)])  # what plain strings do not cover

    @classmethod
    def of(cls, tokenizer, eos_ids, vocab: int, device: torch.device | str = "cpu") -> JsonVocab:
        """From the checkpoint's tokenizer; ids past its vocabulary (the model's padding rows) are never allowed."""
        n = min(vocab, tokenizer.vocab_size)
        pieces = [None if t in tokenizer.special_ids else tokenizer.token_bytes(t) for t in range(n)]
        return cls(pieces + [None] * (vocab - n), eos_ids, device)

    @functools.lru_cache(maxsize=256)
    def allowed(self, st: State) -> torch.Tensor:
        """[V] bool: the tokens that may follow state st (read-only: shared between callers)."""
        ids: list[int] = []
        if st[1] in ("s", "S") and st[2] == 0:
            mask = self.plain.clone()
            self.others.walk(st, ids)
        else:
            mask = torch.zeros(self.vocab, dtype=torch.bool)
            self.everything.walk(st, ids)
        if complete(st):
            ids += self.eos
        if not ids and not mask.any():  # a vocabulary without the bytes to go on: let the answer end
            ids = list(self.eos)
        mask[ids] = True
        return mask.to(self.device)
