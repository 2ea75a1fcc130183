"""json_schema uniqueItems (schema.py): arrays of scalars whose items differ as JSON Schema compares them (1 is 1.0,
"a" is "\\u0061", true is not 1): exactly what jsonschema accepts; never a dead end (few values: a comma only while
one is left; "0" where 0 is written cannot begin); masks equal to a token-by-token check."""

from __future__ import annotations

import json
import random

import pytest
from conftest import check_mask, walk, walk_at_random

from dsv3.serve.masks import Vocab
from dsv3.serve.schema import SchemaError, compile_schema

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 4},
    {"type": "array", "items": {"type": "number"}, "uniqueItems": True},
    {"type": "array", "items": {"enum": ["x", "y", 3, 3.0, True]}, "uniqueItems": True, "minItems": 1},
    {"type": "array", "items": {"type": ["boolean", "null"]}, "uniqueItems": True, "minItems": 2},
    {"type": "array", "items": {"type": ["string", "integer", "boolean"]}, "uniqueItems": True},
    {"$defs": {"C": {"enum": ["red", "blue"]}}, "type": "array", "items": {"$ref": "#/$defs/C"},
     "uniqueItems": True},
    {"type": "array", "uniqueItems": False, "items": {"type": "integer"}},
]
ITEMS = ['"a"', '"\\u0061"', '"b"', '"ab"', "0", "-0", "0.0", "1", "1.0", "1e0", "10", "true", "false", "null",
         '"x"', '"y"', "3", "3.0", '"red"', '"blue"', "-7", "2.5"]


@pytest.mark.parametrize("s", SCHEMAS, ids=[json.dumps(s) for s in SCHEMAS])
def test_an_array_is_taken_exactly_where_jsonschema_takes_it(s):
    """Arrays of 0-4 items drawn from a pool with equal values written differently: the grammar ends the array
    exactly where jsonschema accepts it (items written as the grammar writes them: an integer without fraction)."""
    rng, g, check = random.Random(0), compile_schema(s), jsonschema.Draft202012Validator(s)
    taken = 0
    kinds = s["items"].get("type", [])
    integer = "integer" in kinds and "number" not in kinds
    for _ in range(1500):
        items = rng.choices(ITEMS, k=rng.randint(0, 4))
        text = "[" + rng.choice([",", ", "]).join(items) + "]"
        fraction = any(("." in i or "e" in i) and i[0] in "-0123456789" for i in items)
        want = check.is_valid(json.loads(text)) and not (integer and fraction)
        st = walk(g, text)
        assert (st is not None and g.ends(st)) == want, f"{text}: jsonschema says {want}"
        taken += want
    assert taken >= 3


@pytest.mark.parametrize("s", SCHEMAS, ids=[json.dumps(s) for s in SCHEMAS])
def test_no_array_it_lets_begin_is_a_dead_end(s):
    rng, g, check = random.Random(1), compile_schema(s), jsonschema.Draft202012Validator(s)
    ended = walk_at_random(g, rng, lambda t: check.is_valid(json.loads(t)), b'[]-0123456789.,e "abtrufalsnxyd',
                           300, 60)
    assert ended > 30


@pytest.mark.parametrize("s,word", [
    ({"type": "array", "items": {"type": "object"}, "uniqueItems": True}, "strings, numbers"),
    ({"type": "array", "items": {"type": "string", "maxLength": 2}, "uniqueItems": True}, "lengths"),
    ({"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "uniqueItems": True}, "enum"),
    ({"type": "array", "items": {"enum": [1, 1.0, "a"]}, "uniqueItems": True, "minItems": 3}, "minItems 3"),
    ({"type": "array", "uniqueItems": True}, "strings, numbers"),
    ({"type": "array", "uniqueItems": "yes"}, "boolean"),
])
def test_unique_items_it_cannot_keep_are_refused_by_name(s, word):
    with pytest.raises(SchemaError, match=word):
        compile_schema(s)


def test_masks_of_unique_items_are_the_tokens_that_continue_them():
    pieces = [None, None] + [bytes((b,)) for b in range(256)]
    pieces += [b'"a"', b'"a', b'a"', b'", "', b"0,", b"0]", b"1,", b"10", b"true", b"true,", b"null", b"-0", b"3.0",
               b'"x"', b'"y",', b", ", b"],"]
    v = Vocab(list(dict.fromkeys(pieces)), [1])
    for s, text in [(SCHEMAS[0], '["a", "b", "ab"]'), (SCHEMAS[1], "[0, 1, 10]"), (SCHEMAS[3], '["x", 3, true]'),
                    (SCHEMAS[5], '["a", true, 0, "t"]')]:
        g = compile_schema(s)
        st = g.start
        for c in text.encode():
            check_mask(v, g, st, f"{s} {text!r}")
            st = g.step(st, c)
        assert g.ends(st), text


def test_items_are_compared_as_the_answers_text_reads_them():
    """Strings take bytes that are not UTF-8 as they come; the answer's text reads each such byte as U+FFFD, so two
    of them make equal items."""
    g = compile_schema(SCHEMAS[0])

    def run(data: bytes):
        st = g.start
        for c in data:
            st = g.step(st, c)
            if st is None:
                return None
        return st

    assert g.ends(run(b'["\xb2", "x"]')) and run(b'["\xb2", "\xb3"]') is None
