"""JSON Schema's `pattern` and `format` as automata over characters: what schema.py's strings step through.

A pattern compiles to an NFA over Unicode code points (Thompson's construction: every state it holds can still reach
the end, so a non-empty set of states can always be finished). A state of the automaton is the frozenset of NFA
states the characters so far lead to (subset construction, lazily, a step at a time and memoized): two compilations
of one pattern have equal states, so masks cached by (grammar, state) stay right.

The language is the intersection of ECMA-262's (what JSON Schema specifies) with Python's and Rust's (what jsonschema
and pydantic validate with), so what the grammar writes passes all three: `.` is any character but the line
terminators (\\n \\r U+2028 U+2029), \\d \\w \\s are their ASCII sets, and \\D \\W \\S leave out every character any
of the three counts as a digit, word character or space. A pattern matches anywhere in the string unless a top-level
alternative starts with ^ / ends with $.

Written: literals and escapes (\\n \\t \\r \\f \\v \\0 \\xHH \\uHHHH, escaped punctuation), `.`, classes with
ranges and negation, \\d \\D \\w \\W \\s \\S (in classes too), groups (...) (?:...) (?<name>...) (?P<name>...),
alternation, the quantifiers * + ? {n} {n,} {n,m} (their lazy forms too: the same language), ^ and $ at the ends of
the pattern's top-level alternatives. Anything else (backreferences, lookaround, \\b, flags, anchors inside) is a
`PatternError` that names it.
"""

from __future__ import annotations

import functools
import unicodedata
from bisect import bisect_right

MAX_CP = 0x10FFFF
#: at most this many NFA states (a{1000} is 1000 of them): beyond, a pattern is refused
MAX_STATES = 4000

Ranges = tuple  # ((lo, hi), ...) inclusive, sorted, disjoint, not adjacent


class PatternError(ValueError):
    """The pattern uses what the automaton does not follow, or is not a regular expression."""


def _norm(pairs) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(pairs):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _negate(r: Ranges) -> Ranges:
    out, at = [], 0
    for lo, hi in r:
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= MAX_CP:
        out.append((at, MAX_CP))
    return tuple(out)


def _of(chars: str) -> Ranges:
    return _norm((ord(c), ord(c)) for c in chars)


DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = ((0x09, 0x0D), (0x20, 0x20))
ANY = ((0, MAX_CP),)
DOT = _negate(_of("\n\r\u2028\u2029"))


@functools.cache
def _unicode(kind: str) -> Ranges:
    """Every code point one of ECMA-262, Python or Rust counts as a digit ("d"), word character ("w") or space
    ("s"): what \\D, \\W and \\S leave out (scanned once, ~0.3 s)."""
    marks = ("Mn", "Mc", "Me", "Nd", "Pc")  # Rust's \\w adds marks and connector punctuation to letters and digits
    test = {"d": lambda c: chr(c).isdecimal(),
            "w": lambda c: chr(c).isalnum() or unicodedata.category(chr(c)) in marks or c in (0x200C, 0x200D),
            "s": lambda c: chr(c).isspace() or c in (0x1680, 0x180E, 0xFEFF)}[kind]
    base = {"d": DIGIT, "w": WORD, "s": SPACE}[kind]
    return _norm(list(base) + [(c, c) for c in range(MAX_CP + 1) if test(c)])


def _class(letter: str, wide: bool) -> Ranges:
    """\\d \\w \\s and their negations: the characters every dialect takes, or (wide: inside a negated class,
    whose complement must again be what every dialect takes) those any dialect takes."""
    low = letter.lower()
    base = {"d": DIGIT, "w": WORD, "s": SPACE}[low]
    if letter == low:
        return _unicode(low) if wide else base
    return _negate(base) if wide else _negate(_unicode(low))


_SIMPLE = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}
_PUNCT = frozenset("^$\\.*+?()[]{}|/-")


class _Parser:
    """Pattern text -> a tree: ("c", ranges), ("seq", parts), ("alt", parts), ("rep", part, lo, hi | None)."""

    def __init__(self, src: str):
        self.s, self.i = src, 0

    def fail(self, what: str):
        raise PatternError(f"pattern {self.s!r}: {what} (at {self.i})")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def top(self):
        """The whole pattern: each top-level alternative as (anchored at the start, tree, anchored at the end)."""
        out = []
        while True:
            start = self.peek() == "^"
            self.i += start
            tree, end = self.seq(top=True)
            out.append((start, tree, end))
            if self.peek() != "|":
                break
            self.i += 1
        if self.i < len(self.s):
            self.fail(f"unbalanced {self.peek()!r}")
        return out

    def alt(self):
        parts = [self.seq()[0]]
        while self.peek() == "|":
            self.i += 1
            parts.append(self.seq()[0])
        return parts[0] if len(parts) == 1 else ("alt", parts)

    def seq(self, top: bool = False):
        parts, end = [], False
        while self.peek() not in ("", "|", ")"):
            if self.peek() == "$":
                self.i += 1
                if top and self.peek() in ("", "|"):
                    end = True
                    break
                self.fail("$ only at the end of the pattern or of a top-level alternative")
            if self.peek() == "^":
                self.fail("^ only at the start of the pattern or of a top-level alternative")
            atom = self.atom()
            parts.append(self.quantified(atom))
        return ("seq", parts), end

    def quantified(self, atom):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{":
                lo, hi = self.bounds()
            else:
                return atom
            if self.peek() == "?":  # lazy: the same strings
                self.i += 1
            if self.peek() in ("*", "+", "?", "{"):
                self.fail("a quantifier after a quantifier (possessive or nested without a group)")
            atom = ("rep", atom, lo, hi)

    def bounds(self):
        """{n}, {n,} or {n,m} at the cursor. Any other '{' is refused: ECMA-262 reads "x{,2}" as text where Python
        reads a count, and Rust refuses it."""
        close = self.s.find("}", self.i)
        body = self.s[self.i + 1:close] if close > 0 else ""
        lo, comma, hi = body.partition(",")
        if not (lo.isascii() and lo.isdigit()) or not (hi == "" or (hi.isascii() and hi.isdigit())):
            self.fail("'{' opens no {n}, {n,} or {n,m} count; a literal brace is written \\{")
        out = (int(lo), None if comma and not hi else int(hi) if hi else int(lo))
        if out[1] is not None and out[1] < out[0]:
            self.fail(f"{{{body}}}: the upper bound is below the lower")
        self.i = close + 1
        return out

    def atom(self):
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.s.startswith("?P<", self.i) or (self.s.startswith("?<", self.i)
                                                      and self.s[self.i + 2:self.i + 3] not in ("=", "!")):
                close = self.s.find(">", self.i)
                if close < 0:
                    self.fail("a group name without its '>'")
                self.i = close + 1
            elif self.peek() == "?":
                self.fail("lookaround, flags and other (?...) groups are not followed")
            tree = self.alt()
            if self.peek() != ")":
                self.fail("a group without its ')'")
            self.i += 1
            return tree
        if c in ("*", "+", "?", "{"):
            self.fail(f"{c!r} quantifies nothing" + (" (a literal brace is written \\{)" if c == "{" else ""))
        if c == ")":
            self.fail("unbalanced ')'")
        self.i += 1
        if c == ".":
            return ("c", DOT)
        if c == "[":
            return ("c", self.klass())
        if c == "\\":
            return ("c", self.escape(in_class=False))
        return ("c", ((ord(c), ord(c)),))

    def escape(self, in_class: bool, wide: bool = False) -> Ranges:
        c = self.peek()
        if not c:
            self.fail("a trailing backslash")
        self.i += 1
        if c in "dDwWsS":
            return _class(c, wide)
        if c in _SIMPLE:
            return ((_SIMPLE[c],) * 2,)
        if c == "b" and in_class:
            return ((8, 8),)
        if c == "0" and not self.peek().isdigit():
            return ((0, 0),)
        if c in ("x", "u"):
            n = 2 if c == "x" else 4
            digits = self.s[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"\\{c} needs {n} hex digits")
            self.i += n
            v = int(digits, 16)
            return ((v, v),)
        if c in _PUNCT or not (c.isascii() and c.isalnum()):
            return ((ord(c), ord(c)),)
        what = {"b": "\\b (a word boundary)", "B": "\\B", "p": "\\p{...} (Unicode properties)", "P": "\\P{...}",
                "k": "\\k<name> (a backreference)", "c": "\\c (control letters)"}.get(c)
        if c.isdigit():
            what = f"\\{c} (a backreference)"
        self.fail(f"{what or chr(92) + c} is not followed")

    def klass(self) -> Ranges:
        neg = self.peek() == "^"
        self.i += neg
        pairs, first = [], True
        while True:
            c = self.peek()
            if not c:
                self.fail("a class without its ']'")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.member(neg)
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.member(neg)
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    self.fail("a range between classes")
                if hi[0][0] < lo[0][0]:
                    self.fail("a range out of order")
                pairs.append((lo[0][0], hi[0][0]))
            else:
                pairs.extend(lo)
        out = _norm(pairs)
        return _negate(out) if neg else out

    def member(self, wide: bool) -> Ranges:
        c = self.peek()
        self.i += 1
        if c == "\\":
            return self.escape(in_class=True, wide=wide)
        if c == "[" and self.peek() in (":", "=", "."):
            self.fail("POSIX classes ([:alpha:]) and nested sets are not followed")
        return ((ord(c), ord(c)),)


class Pattern:
    """A pattern's automaton: `start`, `step(state, code point)` (None: no string from here matches),
    `accepts(state)`. States are frozensets of NFA states."""

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise PatternError(f"a pattern is a string, got {source!r}")
        self.source = source
        self.eps: list[list[int]] = []  # per NFA state: its epsilon moves
        self.moves: list[tuple | None] = []  # per NFA state: (ranges, next) or None
        branches = []
        for start, tree, end in _Parser(source).top():
            any_run = ("rep", ("c", ANY), 0, None)
            branches.append(("seq", ([] if start else [any_run]) + [tree] + ([] if end else [any_run])))
        s, self.final = self._build(("alt", branches))
        self.start = self._closure((s,))
        cuts = {0, MAX_CP + 1}
        for m in self.moves:
            for lo, hi in m[0] if m else ():
                cuts.update((lo, hi + 1))
        self.cuts = sorted(cuts)  # the code points split into runs no move tells apart
        self.reps = list(self.runs())  # one code point of each
        self._memo: dict = {}

    def __eq__(self, other) -> bool:
        return isinstance(other, Pattern) and other.source == self.source

    def __hash__(self) -> int:
        return hash(("pattern", self.source))

    def __repr__(self) -> str:
        return f"Pattern({self.source!r})"

    def _new(self) -> int:
        if len(self.eps) >= MAX_STATES:
            raise PatternError(f"pattern {self.source!r}: more than {MAX_STATES} states (large {{n,m}} counts); "
                               "use a smaller count or maxLength")
        self.eps.append([])
        self.moves.append(None)
        return len(self.eps) - 1

    def _build(self, tree) -> tuple[int, int]:
        """A fragment (entry, exit) for the tree; the exit has no moves yet."""
        kind = tree[0]
        if kind == "c":
            if not any(lo <= 0xD7FF or hi >= 0xE000 for lo, hi in tree[1]):
                raise PatternError(f"pattern {self.source!r}: a class no character of a JSON string is in")
            s, e = self._new(), self._new()
            self.moves[s] = (tree[1], e)
            return s, e
        if kind == "seq":
            s = e = self._new()
            for part in tree[1]:
                a, b = self._build(part)
                self.eps[e].append(a)
                e = b
            return s, e
        if kind == "alt":
            s, e = self._new(), self._new()
            for part in tree[1]:
                a, b = self._build(part)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        _, part, lo, hi = tree
        s = e = self._new()
        for _ in range(lo):
            a, b = self._build(part)
            self.eps[e].append(a)
            e = b
        if hi is None:  # a loop: part any number of times more
            a, b = self._build(part)
            self.eps[e].append(a)
            self.eps[b].append(a)
            out = self._new()
            self.eps[e].append(out)
            self.eps[b].append(out)
            return s, out
        out = self._new()  # up to hi - lo more, each optional only after the one before: x{0,3} = (x(x(x)?)?)?
        for _ in range(hi - lo):
            a, b = self._build(part)
            self.eps[e].append(a)
            self.eps[e].append(out)
            e = b
        self.eps[e].append(out)
        return s, out

    def _closure(self, states) -> frozenset:
        """The states the epsilon moves reach, keeping only those that decide what follows (a character move, or the
        end): sets that differ only in epsilon states are one state, so a loop (x+ after its first x, x{2,} after its
        second) returns to the same state and masks.py can take such a run whole."""
        seen, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(q for q in seen if self.moves[q] is not None or q == self.final)

    def step(self, st: frozenset, cp: int) -> frozenset | None:
        run = bisect_right(self.cuts, cp) - 1
        key = (st, run)
        if key not in self._memo:
            nxt = [m[1] for q in st if (m := self.moves[q]) is not None and _has(m[0], cp)]
            self._memo[key] = self._closure(nxt) if nxt else None
        return self._memo[key]

    def accepts(self, st: frozenset) -> bool:
        return self.final in st

    def runs(self, lo: int = 0, hi: int = MAX_CP):
        """One code point of each run the automaton tells apart within [lo, hi], surrogates left out (a JSON
        string writes none)."""
        i = bisect_right(self.cuts, lo) - 1
        while i < len(self.cuts) - 1 and self.cuts[i] <= hi:
            a, b = max(self.cuts[i], lo), min(self.cuts[i + 1] - 1, hi)
            for x, y in ((a, min(b, 0xD7FF)), (max(a, 0xE000), b)):
                if x <= y:
                    yield x
                    break
            i += 1

    def matches(self, text: str) -> bool:
        st = self.start
        for ch in text:
            st = self.step(st, ord(ch))
            if st is None:
                return False
        return self.accepts(st)


def _has(r: Ranges, cp: int) -> bool:
    i = bisect_right(r, (cp, MAX_CP + 1)) - 1
    return i >= 0 and r[i][0] <= cp <= r[i][1]


_YEAR = "(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"({_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|{_YEAR}-(0[13-9]|1[0-2])-(29|30)"
         f"|{_YEAR}-(0[13578]|1[02])-31|{_LEAP}-02-29)")
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
# RFC 4291's text forms of an IPv6 address, "::" in each place it may stand (no embedded IPv4, no zone)
_H = "[0-9a-fA-F]{1,4}"
_IPV6 = "|".join([f"({_H}:){{7}}{_H}", f"({_H}:){{1,7}}:", f"({_H}:){{1,6}}:{_H}"]
                 + [f"({_H}:){{1,{k}}}(:{_H}){{1,{7 - k}}}" for k in range(5, 1, -1)]
                 + [f"{_H}:(:{_H}){{1,6}}", f":((:{_H}){{1,7}}|:)"])
# a domain label: letters and digits, single hyphens inside (no "--": "xn--" would be read as punycode)
_LABEL = "[A-Za-z0-9]+(-[A-Za-z0-9]+)*"
# RFC 3339's duration (Appendix A), numbers of at most 5 digits (a timedelta holds them): "P1Y2M", "PT30M", "P2W"
_N = "[0-9]{1,5}"
_DUR_DATE = f"({_N}Y({_N}M({_N}D)?)?|{_N}M({_N}D)?|{_N}D)"
_DUR_TIME = f"T({_N}H({_N}M({_N}S)?)?|{_N}M({_N}S)?|{_N}S)"
_PCHAR = "([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
# a host by name (its last label starts with a letter: WHATWG URL parsers read a numeric last label as IPv4) or IPv4
_HOST = f"(({_LABEL}\\.)*[A-Za-z][A-Za-z0-9]*(-[A-Za-z0-9]+)*|{_OCTET}(\\.{_OCTET}){{3}})"
#: the formats followed, as patterns: each writes a subset of what the format allows (a real calendar date with a
#: year from 1, times with seconds below 60 and an offset, lowercase-free; e-mail addresses with a dot-atom local part
#: and a domain ending in letters; absolute URIs with a host, no user info, a port below 10000), so jsonschema's,
#: pydantic's and Python's own parsers take what they write
FORMATS = {
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}T{_TIME}$",
    "uuid": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "ipv4": f"^{_OCTET}(\\.{_OCTET}){{3}}$",
    "ipv6": f"^({_IPV6})$",
    "email": f"^[A-Za-z0-9_%+-]+(\\.[A-Za-z0-9_%+-]+)*@({_LABEL}\\.)+[A-Za-z]{{2,}}$",
    "duration": f"^P({_DUR_DATE}({_DUR_TIME})?|{_DUR_TIME}|{_N}W)$",
    "uri": f"^[A-Za-z][A-Za-z0-9+.-]*://{_HOST}(:[1-9][0-9]{{0,3}})?(/{_PCHAR}*)*(\\?({_PCHAR}|[/?])*)?"
           f"(#({_PCHAR}|[/?])*)?$",
}
