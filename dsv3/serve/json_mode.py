"""response_format {"type": "json_object"}: the answer is one JSON object (RFC 8259), token by token.

A byte-level automaton tracks where the answer stands in the grammar (`State`); before each token is sampled,
the tokens whose bytes cannot continue a JSON object from there are masked and EOS waits for the object to
close (masks.py computes the masks for any grammar of this kind; tools.py's tool calls embed this one for their
arguments).

Insignificant whitespace is bounded (MAX_WS bytes in a row): a model that keeps emitting newlines would
otherwise run to max_tokens inside a valid document. Bytes of 0x80 and up inside strings are taken as they
are (UTF-8 is the tokenizer's business; an invalid sequence decodes to U+FFFD, still valid JSON text).
"""

from __future__ import annotations

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
NUMBER_ENDS = frozenset((1, 2, 4, 7))
_LITERALS = {ord("t"): "Lrue", ord("f"): "Lalse", ord("n"): "Lull"}

#: (open containers as a string of '{' and '[', mode, aux). Modes: 'B' before the object, 'K' after '{' (a key or
#: '}'), 'k' after ',' in an object (a key), 'C' after a key (':'), 'V' a value, 'W' after '[' (a value or ']'),
#: 'A' after a value (',' or the closer), 'E' the object closed; aux counts whitespace in a row there. 's'/'S'
#: inside a key/value string: aux 0 plain, 1 after a backslash, 2..5 hex digits of a \\u escape still to come
#: (aux - 1). 'N' in a number (aux: its progress, above). 'L...' in true/false/null: the bytes still to come.
State = tuple

START: State = ("", "B", 0)


def number_step(aux: int, c: int) -> int | None:
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
        nxt = number_step(aux, c)
        if nxt is not None:
            return (stack, "N", nxt)
        if aux not in NUMBER_ENDS:
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


class JsonObject:
    """The grammar of masks.py for one JSON object: bytes by `step`, no special token inside, EOS once closed."""

    start = START

    def step(self, st: State, c: int) -> State | None:
        return step(st, c)

    def special(self, st: State, token: int) -> State | None:
        return None

    def ends(self, st: State) -> bool:
        return complete(st)

    def free(self, st: State) -> bool:
        return False

    def in_string(self, st: State) -> bool:
        return in_string(st)


def in_string(st: State) -> bool:
    """Inside a string, past any escape: a byte other than a quote, backslash or control byte leaves st as it is."""
    return st[1] in ("s", "S") and st[2] == 0


#: the json_object grammar (stateless: one for every request)
JSON_OBJECT = JsonObject()
