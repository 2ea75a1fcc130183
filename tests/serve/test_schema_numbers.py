"""json_schema numbers with minimum, maximum, exclusiveMinimum, exclusiveMaximum and multipleOf (schema.py's "b" mode,
numbers.py): exactly the numbers jsonschema accepts among those written without an exponent in at most 15 digits;
never a dead end; masks equal to a token-by-token check."""

from __future__ import annotations

import json
import random

import pytest
from conftest import check_mask, walk, walk_at_random

from dsv3.serve.masks import Vocab
from dsv3.serve.schema import SchemaError, compile_schema

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "integer", "minimum": 10, "exclusiveMaximum": 200},
    {"type": "integer", "exclusiveMinimum": -7, "maximum": 7},
    {"type": "integer", "minimum": 0},
    {"type": "integer", "maximum": -20},
    {"type": "number", "minimum": 0.5, "maximum": 2.25},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": "number", "exclusiveMinimum": 0.1},
    {"type": "number", "minimum": -1.5, "exclusiveMaximum": -1.25},
    {"type": ["integer", "null"], "minimum": 3, "maximum": 3},
    {"minimum": 100, "maximum": 100.5},  # no type: numbers bounded, anything else free
    {"type": "number", "minimum": 7, "exclusiveMinimum": 7, "maximum": 9, "exclusiveMaximum": 12},
    {"type": "integer", "multipleOf": 5},
    {"type": "integer", "multipleOf": 7, "minimum": -20, "exclusiveMaximum": 30},
    {"type": "number", "multipleOf": 3, "maximum": 50},  # 3.0 and -0.0 are multiples too
    {"type": ["integer", "null"], "multipleOf": 4.0, "exclusiveMinimum": 2, "maximum": 11},
]


def numbers(rng: random.Random) -> list[str]:
    """JSON numbers without an exponent: short and long, signs, fractions, the bounds' neighbours."""
    out = [str(n) for n in range(-25, 26)] + ["0", "-0", "0.0", "-0.0", "200", "199", "100.5", "100.50", "0.1",
                                             "0.10000000000001", "0.25", "2.25", "2.250", "-1.25", "-1.2500001", "3"]
    out += [str(rng.randint(-10 ** rng.randint(1, 6), 10 ** rng.randint(1, 6))) for _ in range(300)]
    out += [f"{rng.uniform(-3, 3):.{rng.randint(1, 4)}f}" for _ in range(300)]
    out += [f"{rng.uniform(-250, 250):.{rng.randint(1, 3)}f}" for _ in range(200)]
    return out


@pytest.mark.parametrize("s", SCHEMAS, ids=[json.dumps(s) for s in SCHEMAS])
def test_a_number_is_taken_exactly_where_jsonschema_takes_it(s):
    """Alone and as an array's items (where the number ends at the byte after it)."""
    rng, g, check = random.Random(0), compile_schema(s), jsonschema.Draft202012Validator(s)
    integer = "integer" in s.get("type", []) and "number" not in s.get("type", [])
    ga = compile_schema({"type": "array", "items": s})
    taken = 0
    for text in numbers(rng):
        want = check.is_valid(json.loads(text)) and not ("." in text and integer)  # an integer is written as one
        st = walk(g, text)
        assert (st is not None and g.ends(st)) == want, f"{text}: jsonschema says {want}"
        st = walk(ga, f"[{text}, {text} ]")
        assert (st is not None and ga.ends(st)) == want, f"[{text}, {text} ]: jsonschema says {want}"
        taken += want
    assert taken >= 1


@pytest.mark.parametrize("s", SCHEMAS, ids=[json.dumps(s) for s in SCHEMAS])
def test_no_number_it_lets_begin_is_a_dead_end(s):
    """Random walks over the bytes the grammar allows inside an array of such numbers: wherever it stands some
    byte goes on or the array may end, and the arrays that end validate."""
    rng, g = random.Random(1), compile_schema({"type": "array", "items": s, "maxItems": 3})
    check = jsonschema.Draft202012Validator({"type": "array", "items": s, "maxItems": 3})
    ended = walk_at_random(g, rng, lambda t: check.is_valid(json.loads(t)), b"[]-0123456789., nul", 200, 80)
    assert ended > 50


@pytest.mark.parametrize("s,word", [
    ({"type": "integer", "minimum": 0.5, "maximum": 0.9}, "no integer"),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}, "no number"),
    ({"type": "number", "minimum": "3"}, "must be a number"), ({"type": "integer", "maximum": True}, "must be"),
    ({"type": "number", "multipleOf": 0.01}, "multipleOf 0.01 is not enforced"), ({"multipleOf": 0}, "whole"),
    ({"type": "integer", "multipleOf": 10, "minimum": 1, "maximum": 9}, "no integer"),
    ({"type": "number", "minimum": 1e20}, "at most 15 digits"),
])
def test_bounds_it_cannot_keep_are_refused_by_name(s, word):
    with pytest.raises(SchemaError, match=word):
        compile_schema(s)


def test_bounds_beside_other_types_and_enums():
    """Bounds apply to numbers only: a string schema with a minimum takes any string; an enum keeps the values
    within the bounds."""
    g = compile_schema({"type": "string", "minimum": 3})
    assert g.ends(walk(g, '"ab"'))
    g = compile_schema({"enum": [1, 5, 9, "x"], "minimum": 4, "maximum": 8})
    assert [t for t in ["1", "5", "9", '"x"'] if (st := walk(g, t)) is not None and g.ends(st)] == ["5", '"x"']


def test_masks_of_bounded_numbers_are_the_tokens_that_continue_them():
    pieces = [None, None] + [bytes((b,)) for b in range(256)]
    pieces += [str(n).encode() for n in range(300)] + [f"{n:02d}".encode() for n in range(10)]
    pieces += [b"1.", b".5", b"0.", b"-1", b"12,", b"9]", b"5.25", b"100.5", b", ", b"],", b"-0", b"1e3"]
    v = Vocab(list(dict.fromkeys(pieces)), [1])
    for s in SCHEMAS[:8:2] + SCHEMAS[5:6]:
        g = compile_schema({"type": "object", "properties": {"n": s, "m": {"type": "array", "items": s}},
                            "required": ["n", "m"]})
        rng = random.Random(json.dumps(s))
        good = [t for t in numbers(rng) if jsonschema.Draft202012Validator(s).is_valid(json.loads(t))
                and not ("." in t and s.get("type") == "integer")][:3]
        text = '{"n": %s, "m": [%s]}' % (good[0], ", ".join(good))
        st = g.start
        for c in text.encode():
            check_mask(v, g, st, f"{s} {text!r}")
            st = g.step(st, c)
        assert g.ends(st), text


@pytest.mark.parametrize("integer", [False, True])
def test_reach_is_what_brute_force_finds(monkeypatch, integer):
    """numbers.Bounds.reach against every number of at most 3 digits (DIGITS patched down): a prefix is reachable
    exactly where some number it begins lies within the bounds, open and closed, at random decimal bounds."""
    from fractions import Fraction

    from dsv3.serve import numbers as N

    monkeypatch.setattr(N, "DIGITS", 3)
    every = set()
    for whole in ["0"] + [str(i) for i in range(1, 1000)]:
        for frac in [""] + ([] if integer else [f"{i:0{n}d}" for n in (1, 2) for i in range(10 ** n)]):
            if len(whole) + len(frac) <= 3:
                for sign in ("", "-"):
                    every.add(sign + whole + ("." + frac if frac else ""))
    begins: dict[str, list[str]] = {}  # prefix -> the numbers it begins
    for t in every:
        for i in range(1, len(t) + 1):
            begins.setdefault(t[:i], []).append(t)
    rng = random.Random(5)
    for _ in range(20):
        pick = lambda: Fraction(rng.randint(-1500, 1500), rng.choice([1, 10, 100]))  # noqa: E731
        lo, hi = sorted((pick(), pick()))
        b = N.Bounds(lo if rng.random() < 0.8 else None, hi if rng.random() < 0.8 else None,
                     rng.random() < 0.5, rng.random() < 0.5, integer, rng.choice([None, None, 2, 3, 7, 40]))
        for p, ts in begins.items():
            want = any(b.holds(Fraction(t)) for t in ts)
            assert b.reach(p) == want, f"{b}: {p!r} reach {b.reach(p)}, brute force {want}"
