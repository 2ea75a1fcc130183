"""json_schema strings with pattern, format, minLength and maxLength (schema.py's "t" mode): exactly the JSON
strings jsonschema accepts, escapes and UTF-8 included; never a dead end; masks equal to a token-by-token check,
the counted split of masks.py included."""

from __future__ import annotations

import json
import random
import re

import pytest
from conftest import check_mask, run_all, walk, walk_at_random

from dsv3.serve.masks import Vocab
from dsv3.serve.schema import compile_schema

jsonschema = pytest.importorskip("jsonschema")

#: patterns the dialects read alike on the characters below (no line breaks under `.`, no \\w on non-ASCII)
SCHEMAS = [
    {"type": "string", "maxLength": 3},
    {"type": "string", "minLength": 2},
    {"type": "string", "minLength": 1, "maxLength": 2},
    {"type": "string", "pattern": "^[a-c]+$"},
    {"type": "string", "pattern": "b[0-9]"},
    {"type": "string", "pattern": "^(ab|é)*$", "minLength": 2, "maxLength": 5},
    {"type": "string", "pattern": "^a.c$"},
    {"type": "string", "pattern": "^[^\"\\\\]*\\\\?$", "maxLength": 4},
    {"type": "string", "pattern": "^😀+x?$", "minLength": 2},
    {"type": "string", "pattern": "^(a|bc){2,3}$", "maxLength": 4},
]
CHARS = ["a", "b", "c", "x", "1", "é", "😀", "\n", "\"", "\\", "/", " ", "\u2028", "€"]


def literal(rng: random.Random, value: str) -> str:
    """value as a JSON string, each character written in one of the ways JSON allows (surrogate pairs for astral
    characters, \\/ for a slash)."""
    out = []
    for ch in value:
        ways = [json.dumps(ch, ensure_ascii=False)[1:-1], json.dumps(ch)[1:-1]]
        if ch == "/":
            ways.append("\\/")
        out.append(rng.choice(ways))
    return '"' + "".join(out) + '"'


@pytest.mark.parametrize("s", SCHEMAS, ids=[json.dumps(s, ensure_ascii=False) for s in SCHEMAS])
def test_a_string_is_taken_exactly_where_jsonschema_takes_it(s):
    """Every way of writing every short string, and random longer ones: the grammar ends the value exactly where
    jsonschema accepts it."""
    rng, g, check = random.Random(0), compile_schema(s), jsonschema.Draft202012Validator(s)
    # ECMA-262's $ (what JSON Schema means) is the end; Python's also takes a line break before the end
    ecma = re.compile(s.get("pattern", "").replace("$", r"\Z"))
    values = [""] + [a + b for a in CHARS for b in [""] + CHARS]
    values += ["".join(rng.choices(CHARS, k=rng.randint(3, 7))) for _ in range(1500)]
    values += ["abab", "ééé", "ab1", "abé", "a😀c", "😀😀", "😀😀x", "abcbc", "bcbca", "a\\", "abc", "a c", "aéc", "a€c",
               "a/c", "a\"c", "😀x", "aa", "abc\n", "ab\n", "aabc"]
    taken = 0
    for value in values:
        text = literal(rng, value)
        st = walk(g, text)
        want = check.is_valid(value) and bool(ecma.search(value))
        assert (st is not None and g.ends(st)) == want, f"{text!r}: jsonschema says {want}"
        taken += want
    assert taken >= 5


@pytest.mark.parametrize("s", SCHEMAS, ids=[json.dumps(s, ensure_ascii=False) for s in SCHEMAS])
def test_no_string_it_lets_begin_is_a_dead_end(s):
    """Random byte walks over what the grammar allows (a byte at a time, any of 0-255): wherever it stands, some
    byte continues it or the value is whole, and every walk that ends gives a string jsonschema accepts."""
    rng, g = random.Random(1), compile_schema(s)
    check = jsonschema.Draft202012Validator(s)
    ended = walk_at_random(g, rng, lambda t: check.is_valid(json.loads(t)), bytes(range(256)), 150, 60,
                           likely=b'abcx01 "\\u\xc3\xa9\xf0\x9f\x98\x80de', stay=0.8)  # the text, mostly
    assert ended > 20


def test_masks_of_constrained_strings_are_the_tokens_that_continue_them():
    """A vocabulary of letters, words, escapes, whole and split UTF-8 characters and closers: the mask at every
    byte of answers equals a token-by-token check, for counted strings (masks.py's split: the count-free mask
    cut by each token's characters), patterns, and both, also inside an object and a tool's arguments."""
    rng = random.Random(2)
    pieces = [None, None] + [bytes((b,)) for b in range(256)]
    pieces += [w.encode() for w in ["ab", "abc", "é", "😀", "\\n", "\\u00e9", "\\ud83d", "\\ude00", "\", ", "\"}",
                                    "b1", "a b", "éé", "ab\"", "x\\\"", "\\\\", "€€€"]]
    pieces += ["é".encode()[:1], "😀".encode()[:2], "😀".encode()[2:], "€".encode()[1:], b"a\xed\xa0", b"\xe0\x80",
               b"\xf4\x90", b"\xc0\x80", b"\xed\x9f\xbf", b"\xf0\x9f", b"\x98\x80a", b"b\xff"]
    pieces += [bytes(rng.choices(b"abc1 \"\\", k=rng.randint(2, 5))) for _ in range(200)]
    v = Vocab(list(dict.fromkeys(pieces)), [1])
    schemas = SCHEMAS + [{"type": "object", "properties": {"s": SCHEMAS[2], "t": SCHEMAS[5]}, "required": ["s"]},
                         {"type": "array", "items": SCHEMAS[0], "maxItems": 2}]
    for s in schemas:
        g = compile_schema(s)
        value = {"type": "object"} == {"type": s["type"]} and {"s": "é", "t": "abé"} or \
            (["ab", "😀"] if s["type"] == "array" else None)
        texts = [json.dumps(value, ensure_ascii=False), json.dumps(value)] if value is not None else \
            [literal(rng, x) for x in ["ab", "abab", "é😀", "a\nc", "b1", "😀😀x", "abc", "\\", "abéab"]]
        for text in texts:
            st = g.start
            for c in text.encode():
                check_mask(v, g, st, f"{s} {text!r}")
                st = g.step(st, c)
                if st is None:
                    break


def test_sampled_answers_to_a_pydantic_model_with_formats_patterns_and_bounds_validate(engine):
    """The demo model (random weights) samples answers to a pydantic model with datetime, date, UUID, a URL, a
    pattern, lengths and number bounds, through the scheduler: every answer that ends is one pydantic itself
    accepts (its own validators: Python's date parsing, Rust's regex and URL parser)."""
    import datetime as dt
    import uuid

    pydantic = pytest.importorskip("pydantic")

    from dsv3.serve.scheduler import Sampling, Scheduler

    class Booking(pydantic.BaseModel):
        code: str = pydantic.Field(pattern=r"^[A-Z]{2}\d{2}$")
        name: str = pydantic.Field(min_length=1, max_length=6)
        day: dt.date
        at: dt.datetime
        ref: uuid.UUID
        seats: int = pydantic.Field(ge=1, le=9)
        price: float = pydantic.Field(gt=0, lt=100)
        site: pydantic.AnyUrl  # format uri, minLength 1
        tag: str = pydantic.Field(pattern=r"^[a-z]+$", max_length=5)
        labels: set[str] = pydantic.Field(max_length=3)  # uniqueItems

    schema = Booking.model_json_schema()
    schema["properties"]["site"]["maxLength"] = 40  # as HttpUrl's 2083, shorter: the random model's URLs end
    g = compile_schema(schema)
    tok = engine.tokenizer
    quick = {tok.token_id(t): 4.0 for t in ('"',)}  # strings end soon
    quick |= {i: -100.0 for i in range(tok.vocab_size) if (b := tok.token_bytes(i)) and not b.strip()}
    s = Scheduler(engine, max_batch=4, eos_ids=tuple(engine.cfg.eos_token_ids))
    prompt = tok.encode("A booking, as JSON:")
    got = run_all(s, engine, [(str(i), prompt, Sampling(300, temperature=1.0, seed=i, logit_bias=quick, grammar=g))
                              for i in range(8)])
    ended = 0
    for a in got.values():
        text = tok.decode(a.tokens)
        if a.finish == "stop":
            ended += 1
            Booking.model_validate_json(text)
        else:
            assert walk(g, text) is not None, text
    assert ended >= 4, [(a.finish, tok.decode(a.tokens)) for a in got.values()]
