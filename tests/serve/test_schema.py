"""response_format json_schema: the schema grammar against the jsonschema package (every text it lets through
validates; what it writes, it accepts), its masks against a token-by-token check, and answers of the server
(schema.py)."""

from __future__ import annotations

import json
import random

import pytest
from conftest import run_all

from dsv3.serve import json_mode
from dsv3.serve.masks import Vocab
from dsv3.serve.scheduler import Sampling, Scheduler
from dsv3.serve.schema import SchemaError, compile_schema

jsonschema = pytest.importorskip("jsonschema")

SCALARS = ["string", "number", "integer", "boolean", "null"]


def schema_of(rng: random.Random, depth: int = 0) -> dict:
    """A random schema of the supported subset."""
    pick = rng.random()
    if depth < 3 and pick < 0.3:
        names = rng.sample(["a", "b", "c d", "tab\t", "x\"y", "n1"], rng.randint(0, 4))
        props = {k: schema_of(rng, depth + 1) for k in names}
        out = {"type": "object", "properties": props, "required": [k for k in names if rng.random() < 0.6]}
        if rng.random() < 0.3:
            out["additionalProperties"] = False
        return out
    if depth < 3 and pick < 0.45:
        out = {"type": "array", "items": schema_of(rng, depth + 1)}
        if rng.random() < 0.5:
            out["minItems"] = rng.randint(0, 2)
            out["maxItems"] = out["minItems"] + rng.randint(0, 2)
        return out
    if pick < 0.6:
        return {"enum": rng.sample(["red", "green", 1, 12, -3.5, True, None, "g"], rng.randint(1, 4))}
    if pick < 0.65:
        return {"const": rng.choice(["on", 7, False])}
    if pick < 0.7:
        return {"description": "anything"}  # no type: any JSON value
    if pick < 0.75:
        return {"type": rng.choice(["object", "array"])}  # any object / any array
    if pick < 0.8:
        return {"type": rng.sample(SCALARS, 2)}
    return {"type": rng.choice(SCALARS), "title": "t"}


def instance_of(rng: random.Random, s: dict):
    """A random value the grammar writes for schema s (declared properties in order, optional ones sometimes)."""
    if "enum" in s or "const" in s:
        return rng.choice(s["enum"]) if "enum" in s else s["const"]
    kinds = s.get("type", rng.choice(SCALARS + ["object", "array"]))
    kind = rng.choice(kinds) if isinstance(kinds, list) else kinds
    if kind == "object":
        if "properties" not in s:
            return {"k": [1, {"z": None}]} if rng.random() < 0.5 else {}
        return {k: instance_of(rng, v) for k, v in s["properties"].items()
                if k in s.get("required", []) or rng.random() < 0.5}
    if kind == "array":
        if "items" not in s:
            return [1, "two", {"3": [4]}][:rng.randint(0, 3)]
        lo, hi = s.get("minItems", 0), s.get("maxItems", 3)
        return [instance_of(rng, s["items"]) for _ in range(rng.randint(lo, hi))]
    return {"string": lambda: rng.choice(["", "a b", "é\"\\\n", "\U0001f600"]),
            "number": lambda: rng.choice([0, -1.5, 2e-7, 123456789, 1e300]),
            "integer": lambda: rng.choice([0, -7, 42, 10 ** 20]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[kind]()


def dumps(rng: random.Random, value) -> str:
    text = json.dumps(value, indent=rng.choice([None, 1, "\t"]), separators=rng.choice([None, (",", ":")]),
                      ensure_ascii=rng.random() < 0.5)
    return rng.choice(["", " "]) + text + rng.choice(["", "\n"])


def walk(g, text: str):
    st = g.start
    for c in text.encode():
        st = g.step(st, c)
        if st is None:
            return None
    return st


def valid(s: dict, text: str) -> bool:
    """The reference: json.loads reads the text and jsonschema accepts the value."""
    try:
        value = json.loads(text, parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return False
    return jsonschema.Draft202012Validator(s).is_valid(value)


def test_what_the_grammar_writes_it_accepts_and_jsonschema_too():
    rng = random.Random(0)
    for _ in range(300):
        s = schema_of(rng)
        g = compile_schema(s)
        for _ in range(3):
            text = dumps(rng, instance_of(rng, s))
            assert valid(s, text), (s, text)  # the generator's own check
            st = walk(g, text)
            assert st is not None and g.ends(st), f"{s}: {text!r} refused ({st})"


def test_every_text_the_grammar_lets_through_validates():
    """Soundness over mutated instances (a byte inserted, dropped or replaced): whatever the grammar calls complete,
    json.loads reads and jsonschema accepts."""
    rng = random.Random(1)
    alphabet = '{}[],:"\\ 0123456789.-eEtrufalsn abcdé'
    complete = refused = 0
    for _ in range(1500):
        s = schema_of(rng)
        g = compile_schema(s)
        text = dumps(rng, instance_of(rng, s))
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(text) + 1)
            op = rng.random()
            text = text[:i] + (rng.choice(alphabet) if op < 0.7 else "") + text[i + (op >= 0.35):]
        st = walk(g, text)
        if st is not None and g.ends(st):
            complete += 1
            assert valid(s, text), f"{s}: {text!r} let through"
        else:
            refused += 1
    assert complete > 200 and refused > 500, (complete, refused)


@pytest.mark.parametrize("s,text", [
    ({"type": "integer"}, "1.5"), ({"type": "integer"}, "1e3"), ({"type": "string"}, "1"),
    ({"enum": ["red", "green"]}, '"blue"'), ({"enum": [1, 12]}, "123"), ({"const": 7}, "8"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["a"]}, "{}"),
    ({"type": "object", "properties": {"a": {}, "b": {}}}, '{"b": 1, "a": 2}'),  # not in declared order
    ({"type": "object", "properties": {"a": {}}}, '{"a": 1, "a": 2}'),
    ({"type": "object", "properties": {"a": {}, "b": {}, "c": {}}, "required": ["b"]}, '{"c": 1}'),  # b skipped
    ({"type": "object", "properties": {"a": {}}}, '{"z": 1}'),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 2}, "[true]"),
    ({"type": "array", "items": {"type": "boolean"}, "maxItems": 1}, "[true, false]"),
    ({"type": "array", "items": {"type": "null"}}, "[null,]"),
    ({"type": "array", "items": {"type": "number"}}, "[-]"), ({"type": "array", "items": {"type": "number"}}, "[1.]"),
    ({"type": ["string", "null"]}, "true"),
])
def test_what_the_grammar_does_not_write_is_refused(s, text):
    """Invalid values, and valid ones outside what it writes (another order, an undeclared property)."""
    st = walk(compile_schema(s), text)
    assert st is None or not compile_schema(s).ends(st), text


@pytest.mark.parametrize("s,word", [
    ({"type": "string", "pattern": "^a"}, "pattern"), ({"type": "string", "format": "date"}, "format"),
    ({"anyOf": [{"type": "string"}]}, "anyOf"), ({"$ref": "#/$defs/x"}, "$ref"), ({"type": "text"}, "type"),
    ({"type": "integer", "minimum": 0}, "minimum"), ({"enum": [[1]]}, "enum"), ({"required": ["a"]}, "required"),
])
def test_what_the_grammar_cannot_promise_is_refused_by_name(s, word):
    with pytest.raises(SchemaError, match=word.replace("$", r"\$")):
        compile_schema(s)


def test_masks_are_the_tokens_that_continue_the_value():
    rng = random.Random(3)
    pieces = [None, None] + [bytes((b,)) for b in range(256)]
    pieces += [w.encode() for w in ['{"', '":', '"red"', '"re', 'd"', 'true', 'tr', 'null', '12', '1.', 'e+',
                                    '", "', '"a": ', '[]', '{}', '},', '],', ' "', '\n  ', '"é']]
    pieces += [bytes(rng.choices(b'{}[]":,0123456789.e- \nabcdrelutn', k=rng.randint(2, 4))) for _ in range(300)]
    v = Vocab(pieces, [1])
    for _ in range(20):
        s = schema_of(rng)
        g = compile_schema(s)
        states, st = {g.start}, g.start
        for c in dumps(rng, instance_of(rng, s)).encode():
            st = g.step(st, c)
            states.add(st)
        for st in states:
            want = {t for t in range(len(pieces)) if v.advance(g, st, t) is not None}
            got = set(v.allowed(g, st).nonzero().flatten().tolist())
            assert got == want, f"{s} at {st}: extra {sorted(got - want)[:5]}, missing {sorted(want - got)[:5]}"


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "color": {"enum": ["red", "green"]}},
          "required": ["age", "color"]}


def test_the_server_answers_what_the_schema_accepts(server, engine):
    close = {str(engine.tokenizer.token_id(t)): 6 for t in ('"', "}")}  # strings and the object end soon
    body = {"model": "demo", "messages": [{"role": "user", "content": "A person, as JSON"}], "max_tokens": 200,
            "temperature": 1.0, "seed": 2, "n": 3, "logit_bias": close,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    got, answer = server.request("POST", "/v1/chat/completions", body)
    assert got == 200, answer
    for choice in answer["choices"]:
        text = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            assert valid(PERSON, text), text
        else:
            assert walk(compile_schema(PERSON), text) is not None, (choice["finish_reason"], text)
    assert any(c["finish_reason"] == "stop" for c in answer["choices"]), answer
    bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "email"}}}}
    got, answer = server.request("POST", "/v1/chat/completions", bad)
    assert got == 400 and "format" in answer["error"]["message"], answer
    got, answer = server.request("POST", "/v1/chat/completions", {**body, "response_format": {"type": "json_schema"}})
    assert got == 400 and answer["error"]["param"] == "response_format", answer


def test_engine_schema_answers_are_the_schedulers(engine):
    """engine.generate(json=schema) (the static decode step, a mask a token) against the scheduler's json_schema:
    the same greedy tokens for a batch of two prompt lengths, and answers the schema accepts."""
    prompts = [engine.tokenizer.encode("A person:"), engine.tokenizer.encode("Describe someone as JSON, please.")]
    got = engine.generate(prompts, max_new_tokens=48, json=PERSON)
    s = Scheduler(engine, max_batch=2, eos_ids=tuple(engine.cfg.eos_token_ids))
    want = run_all(s, engine, [(str(i), p, Sampling(48, grammar=compile_schema(PERSON))) for i, p in enumerate(prompts)])
    assert got == [want[str(i)].tokens for i in range(2)]
    for ids, finish in zip(got, [want[str(i)].finish for i in range(2)]):
        text = engine.tokenizer.decode(ids)
        assert valid(PERSON, text) if finish == "stop" else walk(compile_schema(PERSON), text) is not None, text
    with pytest.raises(Exception, match="'pattern' is not enforced"):
        engine.generate(prompts, max_new_tokens=4, json={"type": "string", "pattern": "a"})


def test_json_object_is_the_schema_of_any_object():
    """The two grammars agree where they should: {"type": "object"} takes what json_object takes."""
    rng = random.Random(4)
    g = compile_schema({"type": "object"})
    for _ in range(200):
        text = dumps(rng, {"k": [1, {"z": None, "s": "é\""}], "n": rng.random()})
        assert g.ends(walk(g, text)) and json_mode.complete(json_mode.advance(json_mode.START, text.encode()))
