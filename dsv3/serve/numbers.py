"""JSON Schema's minimum, maximum, exclusiveMinimum, exclusiveMaximum and a whole multipleOf as a question schema.py
asks a byte at a time: can the number written so far still end within the bounds?

A bounded number is written without an exponent and with at most DIGITS digits (leading zeros counted), so what it
can still become is a few arithmetic progressions (more integer digits, then a fraction as fine as the digits left
allow), each tested against the bounds exactly (fractions.Fraction): a number never starts that cannot end in bounds.
Bounds are taken as the shortest decimal of their float (0.1 is 1/10), and DIGITS is 15: two decimals of at most 15
significant digits never round to one double, so a number strictly inside an exclusive bound stays strictly inside
it for validators that compare doubles (jsonschema, pydantic) too. A multipleOf q (a whole number) keeps, of each
progression, the terms that q divides: themselves a progression (a linear congruence), empty or not. Only whole
q: validators divide doubles, and 0.07 / 0.01 is not 7 in doubles, so for q = 0.01 they disagree with the decimals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

#: at most this many digits in a bounded number
DIGITS = 15


def exact(value) -> Fraction:
    """A schema's number as the decimal it was written as (a float's shortest repr)."""
    return Fraction(value) if isinstance(value, int) else Fraction(repr(float(value)))


@dataclass(frozen=True)
class Bounds:
    """lo/hi: the bounds (None: none), open where exclusive; integer: only integers are written (no fraction)."""

    lo: Fraction | None = None
    hi: Fraction | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    multiple: int | None = None  # multipleOf: a whole number >= 1

    def holds(self, v: Fraction) -> bool:
        return (self.lo is None or v > self.lo or (v == self.lo and not self.lo_open)) and \
            (self.hi is None or v < self.hi or (v == self.hi and not self.hi_open)) and \
            (self.multiple is None or (v / self.multiple).denominator == 1)

    def _grid(self, base: Fraction, step: Fraction, count: int, neg: bool) -> bool:
        """Some base + m * step (0 <= m < count), negated where neg, lies within the bounds."""
        lo, hi, lo_open, hi_open = self.lo, self.hi, self.lo_open, self.hi_open
        if neg:
            lo, hi, lo_open, hi_open = (None if hi is None else -hi), (None if lo is None else -lo), hi_open, lo_open
        first, last = 0, count - 1
        if lo is not None:
            t = (lo - base) / step
            first = max(first, math.ceil(t) + (lo_open and t == math.ceil(t)))
        if hi is not None:
            t = (hi - base) / step
            last = min(last, math.floor(t) - (hi_open and t == math.floor(t)))
        if self.multiple is not None:  # the terms q divides: m = m0, m0 + period, ...
            hit = _divisible(base / self.multiple, step / self.multiple)
            if hit is None:
                return False
            m0, period = hit
            first += (m0 - first) % period
        return first <= last

    def reach(self, p: str) -> bool:
        """Some number written on from p (a prefix of -?(0|[1-9][0-9]*)(.[0-9]+)?) ends within the bounds."""
        neg = p.startswith("-")
        body = p[1:] if neg else p
        if not body:
            return any(self.reach(p + d) for d in "0123456789")
        whole, dot, frac = body.partition(".")
        left = DIGITS - len(whole) - len(frac)
        if left < 0 or (dot and not frac and left == 0):
            return False
        if dot:  # the fraction goes on: base, then a grid as fine as the digits left
            base = int(whole) + Fraction(int(frac or "0"), 10 ** len(frac))
            return self._grid(base, Fraction(1, 10 ** (len(frac) + left)), 10 ** left, neg)
        d = int(whole)
        if whole == "0":  # no more integer digits
            return self._grid(Fraction(0), Fraction(1) if self.integer else Fraction(1, 10 ** left),
                              1 if self.integer else 10 ** left, neg)
        if self.integer:  # j more digits: d * 10^j .. (d + 1) * 10^j - 1
            return any(self._grid(Fraction(d * 10 ** j), Fraction(1), 10 ** j, neg) for j in range(left + 1))
        return any(self._grid(Fraction(d * 10 ** j), Fraction(1, 10 ** (left - j)), 10 ** left, neg)
                   for j in range(left + 1))

    def step(self, p: str, c: int) -> str | None:
        """The prefix after byte c, where c continues the number's syntax and it can still end in bounds."""
        body = p[1:] if p.startswith("-") else p
        if 0x30 <= c <= 0x39:
            if body == "0":  # no digit after a leading zero
                return None
        elif c != 0x2E or self.integer or not body or "." in body:
            return None
        nxt = p + chr(c)
        return nxt if self.reach(nxt) else None

    def ends(self, p: str) -> bool:
        """The number may end here: whole (a digit last) and within the bounds."""
        return p[-1:].isdigit() and self.holds(Fraction(p))


def _divisible(c: Fraction, a: Fraction) -> tuple[int, int] | None:
    """(m0, period): c + m * a is an integer exactly where m = m0 (mod period), 0 <= m0 < period; None: nowhere."""
    scale = math.lcm(c.denominator, a.denominator)
    C, A = int(c * scale), int(a * scale)  # c + m a integer  <=>  C + m A = 0 (mod scale)
    g = math.gcd(A, scale)
    if C % g:
        return None
    period = scale // g
    return ((-C // g) * pow(A // g, -1, period)) % period if period > 1 else 0, period
