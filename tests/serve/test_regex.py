"""regex.py's automata against Python's `re` (what jsonschema validates `pattern` with) and its formats against
Python's own parsers of dates, times, UUIDs and addresses."""

from __future__ import annotations

import datetime
import ipaddress
import random
import re
import urllib.parse
import uuid

import pytest

from dsv3.serve.regex import FORMATS, Pattern, PatternError

PATTERNS = [r"a", r"^a", r"a$", r"^ab*c$", r"^(ab|c)+$", r"^[a-c]{2,3}$", r"^\d{3}-\d{2}$", r"x?y*z+",
            r"^[^a-c]*$", r"^\w+\s\W?$", r"^(?:a|b)(?P<n>c|)\1?$".replace(r"\1?", ""), r"^.{0,2}$", r"a|^b$|c",
            r"^\S+$", r"^[\d_-]+\.?$", r"^(a{2}|b{1,})*$", r"^[.*+?]{1,2}$", r"\t-\x41\u0062", r"^a{2,}$",
            r"^(?<w>[a-z])+[A-Z]?$", r"^[-a]+[b-]$", r"^\D\w*$", r"^[^\W\d]+$", r"^a{3}?$", r"^(|a)b$", r"\{a\}|x{0,2}"]
ASCII = "abcAZ019_- .*+?\t\\xy{},"


def test_matches_what_python_re_searches_on_ascii():
    """Exactly Python's answer on ASCII text (no line breaks: there `.` and `$` differ between the dialects), over
    every short string of a few letters and random longer ones."""
    rng = random.Random(0)
    for src in PATTERNS:
        p, ref = Pattern(src), re.compile(src.replace("(?<", "(?P<"))  # ECMA-262's group names, Python's
        texts = [""] + ["".join(rng.choices(ASCII, k=rng.randint(1, 8))) for _ in range(1500)]
        texts += [a + b + c for a in "abcxyz1_-A " for b in "abc1" for c in ["", "c", "zz", "A"]]
        for text in texts:
            assert p.matches(text) == bool(ref.search(text)), f"{src!r} on {text!r}: ours {p.matches(text)}"


def test_beyond_ascii_it_matches_a_subset_of_python_and_ecma():
    """On other characters the dialects differ (\\w, \\d, \\s and `.` of Python are wider than ECMA-262's): whatever
    the automaton takes, Python takes too, and `.` and \\S never take a line terminator (ECMA-262)."""
    rng = random.Random(1)
    alphabet = "aé٣\u00a0\u2028\r\x1cß_1 \U0001f600"
    for src in [r"^\w+$", r"^\W+$", r"^\d\D$", r"^\s\S*$", r"^.+$", r"^[^a]+$", r"é|ß", r"^[\u00e0-\u00ff]+$",
                r"^[^\d\s]+$", r"^[^\W]$", r"^[^\S]+$", r"[^\D]"]:
        p, ref = Pattern(src), re.compile(src)
        seen = 0
        for _ in range(3000):
            text = "".join(rng.choices(alphabet, k=rng.randint(1, 4)))
            if p.matches(text):
                seen += 1
                assert ref.search(text), f"{src!r} took {text!r}, Python does not"
        assert seen, src
    assert not Pattern(r"^.$").matches("\u2028") and not Pattern(r"^\S$").matches("\ufeff")
    assert not Pattern(r"^\D$").matches("٣") and not Pattern(r"^\W$").matches("é")


@pytest.mark.parametrize("src,word", [
    ("(a", "')'"), ("a)", "unbalanced"), (r"(a)\1", "backreference"), ("(?=a)", "lookaround"), ("(?i)a", "flags"),
    ("a**", "quantifier after"), ("*a", "quantifies nothing"), ("a^b", "start"), ("a$b", "end"), (r"\bx", "boundary"),
    (r"\p{L}", "Unicode properties"), ("[a", "']'"), ("[z-a]", "out of order"), (r"[\d-z]", "between classes"),
    ("a{3,2}", "below"), (r"[^\s\S]", "no character"), ("a{5000}", "states"), ("[[:alpha:]]", "POSIX"),
    ("\\", "trailing"), (r"\u12", "hex digits"), ("x{,2}", "count"), ("{a}", "literal brace"), ("a{2}{3}", "after"),
])
def test_what_it_does_not_follow_is_refused_by_name(src, word):
    with pytest.raises(PatternError, match=re.escape(word)):
        Pattern(src)


def sample(p: Pattern, rng: random.Random, longest: int = 60) -> str:
    """A random string the automaton takes: a walk over its runs, stopping where it accepts."""
    st, out = p.start, []
    while not (p.accepts(st) and (rng.random() < 0.3 or len(out) >= longest)):
        nxt = [(cp, q) for cp in p.runs() if (q := p.step(st, cp)) is not None]
        if not nxt:  # the end of an anchored pattern
            break
        cp, st = rng.choice(nxt)
        out.append(chr(cp))
    return "".join(out)


def uri(text: str) -> None:
    """An absolute URI with a host: Python's split finds its parts, and pydantic's URL parser (Rust's url crate)
    takes it where pydantic is installed."""
    parts = urllib.parse.urlsplit(text)
    assert parts.scheme and parts.hostname and text[len(parts.scheme):].startswith("://"), text
    try:
        import pydantic
    except ImportError:
        return
    pydantic.TypeAdapter(pydantic.AnyUrl).validate_python(text)


def duration(text: str) -> None:
    """RFC 3339's duration: pydantic's timedelta parser takes it where pydantic is installed."""
    assert text.startswith("P") and len(text) > 1, text
    try:
        import pydantic
    except ImportError:
        return
    pydantic.TypeAdapter(datetime.timedelta).validate_python(text)


CHECKS = {"date": datetime.date.fromisoformat, "uri": uri, "duration": duration, "time": datetime.time.fromisoformat,
          "date-time": datetime.datetime.fromisoformat, "uuid": uuid.UUID, "ipv4": ipaddress.IPv4Address,
          "ipv6": lambda s: ipaddress.IPv6Address(s) if "%" not in s else 1 / 0,
          "email": lambda s: re.fullmatch(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}", s) or 1 / 0}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_writes_what_pythons_parser_reads(fmt):
    """Soundness: random strings of the format's automaton parse (a real calendar date, leap days included, a time
    with its offset, a UUID, an address); completeness over values: dates and times Python writes are taken."""
    rng, p = random.Random(2), Pattern(FORMATS[fmt])
    for _ in range(300):
        CHECKS[fmt](sample(p, rng))
    if fmt in ("date", "date-time", "time"):
        start = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc)
        for day in [0, 58, 59, 365 * 399 + 96 + 58, 738579, 730119, 2923 * 1000 - 1] + \
                [rng.randrange(3_000_000) for _ in range(300)]:
            moment = start + datetime.timedelta(days=day, seconds=rng.randrange(86400))
            text = {"date": moment.date().isoformat(), "time": moment.timetz().isoformat(),
                    "date-time": moment.isoformat()}[fmt].replace("+00:00", rng.choice(["Z", "+00:00", "-09:30"]))
            assert p.matches(text), text
        for bad in ["2023-02-29", "1900-02-29", "2021-04-31", "0000-01-01", "2021-13-01", "2021-1-01"]:
            assert not Pattern(FORMATS["date"]).matches(bad), bad
        assert Pattern(FORMATS["date"]).matches("2000-02-29") and Pattern(FORMATS["date"]).matches("2024-02-29")
    if fmt == "uuid":
        assert all(p.matches(str(uuid.UUID(int=rng.getrandbits(128)))) for _ in range(50))
    if fmt == "duration":
        for text in ["P1D", "PT1H", "P1Y2M3DT4H5M6S", "PT30M", "P2W", "P1M", "PT0S", "P1DT2H"]:
            assert p.matches(text), text
            duration(text)
        for bad in ["P", "PT", "P1DT", "P1Y3D", "P1H", "PT1D", "P1W2D", "P1.5D", "1D"]:  # RFC 3339's grammar
            assert not p.matches(bad), bad
    if fmt == "uri":
        for text in ["https://example.com", "http://127.0.0.1:8080/a/b?x=1&y=%20#top", "ftp://a-b.c.org/~x/",
                     "https://x.io/p@q:r/!$&'()*+,;=?/?#/?"]:
            assert p.matches(text), text
            uri(text)
        for bad in ["http://", "example.com", "http://a b", "http://1.2.3.4.5", "http://x.io:99999", "http://x/%zz",
                    "http://xn--abc.com", "http://a.1"]:
            assert not p.matches(bad), bad
    if fmt == "ipv6":
        for a in [ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice([0, 64, 100, 128])) for _ in range(300)]:
            for text in (a.exploded, a.compressed):
                assert "." in text or p.matches(text), text
        for bad in ["1:2:3:4:5:6:7:8:9", "12345::", "1::2::3", ":1", "1:::2", "::1%eth0", "g::1"]:
            assert not p.matches(bad), bad
    if fmt == "ipv4":
        assert all(p.matches(str(ipaddress.IPv4Address(rng.getrandbits(32)))) for _ in range(300))
        assert not p.matches("01.2.3.4") and not p.matches("256.1.1.1")
