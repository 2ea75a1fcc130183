"""response_format json_schema: the schema grammar against the jsonschema package (every text it lets through
validates; what it writes, it accepts), its masks against a token-by-token check, and answers of the server
(schema.py)."""

from __future__ import annotations

import datetime
import json
import random

import pytest
from conftest import check_mask, client, run_all, walk

from dsv3.serve import json_mode
from dsv3.serve.masks import Vocab
from dsv3.serve.scheduler import Sampling, Scheduler
from dsv3.serve.schema import SchemaError, compile_schema

jsonschema = pytest.importorskip("jsonschema")

SCALARS = ["string", "number", "integer", "boolean", "null"]
# jsonschema's format checks where it has them; date-time and time by Python's parser (jsonschema needs a package
# for them that the test environment lacks)
FORMATS = jsonschema.FormatChecker()
FORMATS.checks("date-time")(lambda s: not isinstance(s, str) or bool(datetime.datetime.fromisoformat(s).tzinfo))
FORMATS.checks("time")(lambda s: not isinstance(s, str) or bool(datetime.time.fromisoformat(s).tzinfo))


def schema_of(rng: random.Random, depth: int = 0) -> dict:
    """A random schema of the supported subset; at the top, sometimes with $defs that its parts $ref."""
    if depth == 0 and rng.random() < 0.25:
        return {"$defs": {"D": schema_of(rng, 2)}, "type": "object", "required": ["x"],
                "properties": {"x": {"$ref": "#/$defs/D"}, "y": {"anyOf": [{"$ref": "#/$defs/D"}, {"type": "null"}]},
                               "z": {"type": "array", "items": {"allOf": [{"$ref": "#/$defs/D"}], "title": "d"}}}}
    pick = rng.random()
    if depth < 3 and pick < 0.08:
        return {"anyOf": [schema_of(rng, depth + 1) for _ in range(rng.randint(1, 3))], "default": None}
    if depth < 3 and pick < 0.11:  # keys of a schema: propertyNames, or patternProperties' one pattern
        names, _ = rng.choice(KEYS)
        if rng.random() < 0.5:
            return {"type": "object", "patternProperties": {names["pattern"]: schema_of(rng, depth + 1)}} \
                if "pattern" in names else {"type": "object", "propertyNames": names}
        return {"type": "object", "propertyNames": names,
                "additionalProperties": rng.choice([True, {"type": rng.choice(SCALARS)}, schema_of(rng, depth + 1)])}
    if depth < 3 and pick < 0.14:
        more = rng.choice([False, {"type": rng.choice(SCALARS)}, schema_of(rng, depth + 1)])
        out = {"type": "object", "additionalProperties": more}
        if more is not False and rng.random() < 0.6:  # any keys, counted
            least = rng.randint(0, 1)
            return {**out, "minProperties": least, **({"maxProperties": least + rng.randint(0, 2)}
                                                     if rng.random() < 0.7 else {})}
        return out if rng.random() < 0.5 else {**out, "properties": {"a": {"type": "integer"}}}
    if pick < 0.18:
        out = {"type": "array", "minItems": rng.randint(0, 2)}
        return {**out, "maxItems": out["minItems"] + rng.randint(0, 2)} if rng.random() < 0.5 else out
    if pick < 0.22:  # the type narrows the enum
        return {"type": rng.sample(SCALARS, 2), "enum": ["red", 1, 2.5, True, None, "g"]}
    if depth < 3 and pick < 0.3:
        names = rng.sample(["a", "b", "c d", "tab\t", "x\"y", "n1"], rng.randint(0, 4))
        props = {k: schema_of(rng, depth + 1) for k in names}
        out = {"type": "object", "properties": props, "required": [k for k in names if rng.random() < 0.6]}
        if rng.random() < 0.3:
            out["additionalProperties"] = False
        return out
    if depth < 3 and pick < 0.34:  # a tuple: items by position, then items of one schema, any, or none
        out = {"type": "array", "prefixItems": [schema_of(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
        rest = rng.choice([None, False, {"type": rng.choice(SCALARS)}])
        if rest is not None:
            out["items"] = rest
        if rng.random() < 0.5:
            out["minItems"] = rng.randint(0, len(out["prefixItems"]))
        return out
    if depth < 3 and pick < 0.45:
        out = {"type": "array", "items": schema_of(rng, depth + 1)}
        if rng.random() < 0.5:
            out["minItems"] = rng.randint(0, 2)
            out["maxItems"] = out["minItems"] + rng.randint(0, 2)
        return out
    if pick < 0.52:
        return rng.choice(STRINGS)
    if depth < 3 and pick < 0.55:  # alternatives no value meets twice: types apart, or a discriminated union
        if rng.random() < 0.5:
            return {"oneOf": [{"type": t} for t in rng.sample(["string", "integer", "null", "array"], 2)] +
                    [{"enum": [True]}]}
        return {"oneOf": [{"type": "object", "properties": {"k": {"const": tag}, "v": schema_of(rng, depth + 1)},
                           "required": ["k"]} for tag in ("a", "b", 1)], "discriminator": {"propertyName": "k"}}
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


#: strings, numbers and arrays with constraints, each with values it takes ("examples": instance_of picks one)
STRINGS = [
    {"type": "string", "maxLength": 3, "examples": ["", "ab", "é\n\"", "\U0001f600xy"]},
    {"type": "string", "minLength": 2, "examples": ["ab", "日本語", "a\\b\tc"]},
    {"type": ["string", "null"], "minLength": 1, "maxLength": 2, "examples": ["a", "é€", None]},
    {"type": "string", "pattern": "^[a-c]+$", "examples": ["a", "abcabc"]},
    {"type": "string", "pattern": "b\\d", "examples": ["b1", "xxb2yy", "é b9\n"]},
    {"type": "string", "pattern": "^(ab|é)*$", "minLength": 2, "maxLength": 5, "examples": ["abab", "éé", "abé"]},
    {"type": "string", "format": "date", "examples": ["2024-02-29", "1999-12-31"]},
    {"type": "string", "format": "date-time", "examples": ["2024-02-29T23:59:59Z", "2001-01-01T00:00:00.5+05:30"]},
    {"type": "string", "format": "uuid", "examples": ["123e4567-e89b-12d3-a456-426614174000"]},
    {"type": "string", "format": "ipv4", "examples": ["10.0.0.255", "1.2.3.4"]},
    {"type": "string", "format": "email", "examples": ["a.b@c.de", "x+1@mail.example.org"]},
    {"type": "string", "format": "binary", "examples": ["", "x y\n"]},  # pydantic's bytes: any text
    {"type": "string", "format": "password", "writeOnly": True, "pattern": "^p", "examples": ["pw", "p"]},
    {"type": "string", "enum": ["ab", "abcd", 5], "maxLength": 3, "examples": ["ab"]},
    {"type": "integer", "minimum": -5, "maximum": 120, "examples": [0, -5, 120, 42]},
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1.5, "examples": [0.001, 1.5, 1, 0.75]},
    {"type": ["number", "null"], "minimum": 2.25, "examples": [2.25, 3, None, 1000.5]},
    {"type": "integer", "multipleOf": 3, "maximum": 100, "examples": [0, -9, 99, 12]},
    {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "examples": [[], ["a", "b"], ["é", "e"]]},
    {"type": "array", "items": {"enum": ["x", 1, False]}, "uniqueItems": True, "examples": [["x", 1, False], [1]]},
]


#: key schemas (propertyNames; a pattern also as patternProperties) and keys each takes
KEYS = [({"enum": ["x", "y z", "ok"]}, ["x", "y z", "ok"]), ({"pattern": "^k[0-9]$"}, ["k1", "k7"]),
        ({"type": "string", "maxLength": 2}, ["", "ab", "é\""]),
        ({"format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"]), ({"pattern": "^[a-c]+$"}, ["a", "cab"])]


def of_type(value, kinds) -> bool:
    return jsonschema.Draft202012Validator({"type": kinds}).is_valid(value)


def instance_of(rng: random.Random, s: dict, root: dict | None = None):
    """A random value the grammar writes for schema s (declared properties in order, optional ones sometimes)."""
    root = s if root is None else root
    if "$ref" in s:
        return instance_of(rng, root["$defs"][s["$ref"].rsplit("/", 1)[1]], root)
    if "anyOf" in s or "allOf" in s or "oneOf" in s:
        return instance_of(rng, rng.choice(s.get("anyOf") or s.get("oneOf") or s["allOf"]), root)
    if "examples" in s:
        return rng.choice(s["examples"])
    if "enum" in s or "const" in s:
        values = s["enum"] if "enum" in s else [s["const"]]
        return rng.choice([v for v in values if "type" not in s or of_type(v, s["type"])])
    kinds = s.get("type", rng.choice(SCALARS + ["object", "array"]))
    kind = rng.choice(kinds) if isinstance(kinds, list) else kinds
    if kind == "object":
        keyed = s.get("propertyNames") or next(({"pattern": p} for p in s.get("patternProperties", {})), None)
        if keyed is not None:
            keys = next(k for n, k in KEYS if n == keyed)
            more = next(iter(s["patternProperties"].values())) if "patternProperties" in s else \
                s.get("additionalProperties", True)
            more = {"type": "integer"} if more is True else more
            return {k: instance_of(rng, more, root) for k in rng.sample(keys, rng.randint(0, len(keys)))}
        if "properties" in s:
            return {k: instance_of(rng, v, root) for k, v in s["properties"].items()
                    if k in s.get("required", []) or rng.random() < 0.5}
        more = s.get("additionalProperties", True)
        if more is False:
            return {}
        if isinstance(more, dict) and more:
            lo, hi = s.get("minProperties", 0), min(s.get("maxProperties", 3), 3)
            return {k: instance_of(rng, more, root) for k in rng.sample(["k", "", "é \"", "k2"], rng.randint(lo, hi))}
        return {"k": [1, {"z": None}]} if rng.random() < 0.5 else {}
    if kind == "array":
        lo, hi = s.get("minItems", 0), s.get("maxItems", 3)
        if "prefixItems" in s:
            prefix, rest = s["prefixItems"], s.get("items", {"type": "integer"})
            n = rng.randint(lo, len(prefix) if rest is False else min(hi, len(prefix) + 2))
            return [instance_of(rng, prefix[i] if i < len(prefix) else rest, root) for i in range(n)]
        if "items" not in s:
            return [1, "two", {"3": [4]}, None, [], 0.5][:rng.randint(lo, hi)]
        return [instance_of(rng, s["items"], root) for _ in range(rng.randint(lo, hi))]
    return {"string": lambda: rng.choice(["", "a b", "é\"\\\n", "\U0001f600"]),
            "number": lambda: rng.choice([0, -1.5, 2e-7, 123456789, 1e300]),
            "integer": lambda: rng.choice([0, -7, 42, 10 ** 20]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[kind]()


def dumps(rng: random.Random, value) -> str:
    text = json.dumps(value, indent=rng.choice([None, 1, "\t"]), separators=rng.choice([None, (",", ":")]),
                      ensure_ascii=rng.random() < 0.5)
    return rng.choice(["", " "]) + text + rng.choice(["", "\n"])


def valid(s: dict, text: str) -> bool:
    """The reference: json.loads reads the text and jsonschema accepts the value."""
    try:
        value = json.loads(text, parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return False
    return jsonschema.Draft202012Validator(s, format_checker=FORMATS).is_valid(value)


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
    for _ in range(2000):
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


#: a recursive schema: a tree of named nodes
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}}


def test_recursive_and_pydantic_style_schemas():
    """$ref recursion, Optional fields as anyOf [X, null], nested models in $defs (what pydantic writes)."""
    g = compile_schema(TREE)
    text = '{"name": "r", "kids": [{"name": "a"}, {"name": "b", "kids": [{"name": "c", "kids": []}]}]}'
    assert g.ends(walk(g, text)) and valid(TREE, text)
    deep = '{"name": "x", "kids": [' * 20 + '{"name": "leaf"}' + "]}" * 20
    assert g.ends(walk(g, deep))
    assert walk(g, '{"name": "x", "kids": [' * (json_mode.MAX_DEPTH // 2 + 1)) is None  # nesting held to MAX_DEPTH
    model = {"$defs": {"Color": {"enum": ["red", "blue"], "title": "Color", "type": "string"},
                       "Pet": {"properties": {"name": {"title": "Name", "type": "string"}}, "required": ["name"],
                               "title": "Pet", "type": "object", "additionalProperties": False}},
             "properties": {"age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
                            "color": {"$ref": "#/$defs/Color"}, "pets": {"items": {"$ref": "#/$defs/Pet"},
                                                                        "type": "array"},
                            "tags": {"additionalProperties": {"type": "string"}, "type": "object"}},
             "required": ["age", "color", "pets", "tags"], "title": "Person", "type": "object",
             "additionalProperties": False}
    g = compile_schema(model)
    for text in ['{"age": null, "color": "red", "pets": [], "tags": {}}',
                 '{"age": 30, "color": "blue", "pets": [{"name": "Rex"}], "tags": {"a": "b", "c d": ""}}']:
        assert g.ends(walk(g, text)) and valid(model, text), text
    for text in ['{"age": "30", "color": "red", "pets": [], "tags": {}}',
                 '{"age": 1, "color": "green", "pets": [], "tags": {}}',
                 '{"age": 1, "color": "red", "pets": [{}], "tags": {}}',
                 '{"age": 1, "color": "red", "pets": [], "tags": {"a": 1}}']:
        st = walk(g, text)
        assert st is None or not g.ends(st), text


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
    ({"type": "string", "enum": ["a", 1]}, "1"),  # the enum's value the type rules out
    ({"type": "object", "additionalProperties": False}, '{"a": 1}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": "x"}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": 1; "b": 2}'),
    ({"type": "array", "minItems": 2}, "[1]"), ({"type": "array", "maxItems": 1}, "[{}, []]"),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, '"1"'),
    ({"anyOf": [{"type": "object", "properties": {"a": {}}, "required": ["a"]}, {"type": "array"}]}, '{"b": 1}'),
    (TREE, '{"name": "a", "kids": [{"name": 1}]}'),
    ({"prefixItems": [{"type": "integer"}, {"type": "string"}]}, '["a", 1]'),  # positions swapped
    ({"prefixItems": [{"type": "integer"}], "items": {"type": "null"}}, "[1, 2]"),  # past the prefix: items
    ({"prefixItems": [{"type": "integer"}], "items": False}, "[1, 2]"), ({"items": False}, "[1]"),
    ({"prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2}, "[1]"),
    ({"propertyNames": {"enum": ["a", "b"]}}, '{"c": 1}'), ({"patternProperties": {"^a+$": {}}}, '{"ab": 1}'),
    ({"patternProperties": {"^a+$": {"type": "null"}}}, '{"aa": 1}'),
    ({"propertyNames": {"maxLength": 1}, "additionalProperties": {"type": "string"}}, '{"a": 1}'),
    ({"type": "object", "maxProperties": 1}, '{"a": 1, "b": 2}'), ({"minProperties": 1}, "{}"),
    ({"maxProperties": 0}, '{"a": 1}'), ({"propertyNames": {"enum": ["a", "b"]}, "maxProperties": 1}, '{"a":1,"b":1}'),
])
def test_what_the_grammar_does_not_write_is_refused(s, text):
    """Invalid values, and valid ones outside what it writes (another order, an undeclared property)."""
    st = walk(compile_schema(s), text)
    assert st is None or not compile_schema(s).ends(st), text


@pytest.mark.parametrize("s,word", [
    ({"type": "string", "pattern": "(?=a)"}, "lookaround"), ({"type": "string", "format": "hostname"}, "format"),
    ({"pattern": "a", "format": "date"}, "beside format"), ({"minLength": 3, "maxLength": 2}, "minLength"),
    ({"pattern": r"^\d{5}$", "maxLength": 3}, "no string matches"), ({"maxLength": -1}, "maxLength"),
    ({"$ref": "#/$defs/x"}, "$ref"), ({"type": "text"}, "type"),
    ({"type": "integer", "multipleOf": 0.5}, "multipleOf"), ({"enum": [[1]]}, "enum"), ({"required": ["a"]}, "required"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "may both take"),
    ({"oneOf": [{"type": "object"}, {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}]},
     "alternatives 0 and 1"), ({"oneOf": [{"type": "string"}, {}]}, "may both"), ({"oneOf": []}, "non-empty"),
    ({"oneOf": [{"enum": [1, "a"]}, {"enum": [1.0]}]}, "may both"),
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                {"type": "object", "properties": {"k": {"enum": ["b", "a"]}}, "required": ["k"]}]}, "may both"),
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                {"type": "object", "properties": {"k": {"const": "b"}}}]}, "may both"),  # b's tag not required
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}, "required": ["k"]},
                {"type": "object", "properties": {"k": {"const": True}}, "required": ["k"]},
                {"type": "object", "properties": {"k": {"const": 1.0}}, "required": ["k"]}]}, "alternatives 0 and 2"),
    ({"allOf": [{"type": "string"}, {"minLength": 1}]}, "allOf"),
    ({"$ref": "https://example.com/s.json"}, "inside the schema"), ({"$ref": "#/$defs/none"}, "names nothing"),
    ({"$ref": "#"}, "cycle"), ({"anyOf": [{"type": "string"}], "type": "string"}, "beside"),
    ({"type": "boolean", "enum": ["a", 1]}, "no enum"),
    ({"prefixItems": [{"type": "integer"}], "uniqueItems": True}, "uniqueItems beside prefixItems"),
    ({"prefixItems": [{}], "items": False, "minItems": 2}, "items false ends"), ({"prefixItems": {}}, "a list"),
    ({"properties": {"a": {}}, "propertyNames": {"maxLength": 1}}, "propertyNames beside properties"),
    ({"patternProperties": {"^a": {}, "^b": {}}}, "one pattern"),
    ({"propertyNames": {}, "required": ["a"]}, "required"),
    ({"type": "object", "minProperties": 2}, "a key written twice"), ({"maxProperties": -1}, "maxProperties"),
    ({"properties": {"a": {}}, "minProperties": 1}, "already keep them"),
    ({"properties": {"a": {}, "b": {}}, "maxProperties": 1}, "already keep them"),
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
            check_mask(v, g, st, str(s))


def test_masks_take_a_large_subtree_whole_only_where_each_of_its_bytes_loops():
    """masks.py takes a subtree of 48+ tokens whole when every byte below it leaves the state as it is (digits in a
    number, letters in a string). A vocabulary with such subtrees and spoilers inside them (a '.' after digits
    where an integer is due, a quote or backslash or newline inside string pieces, 'e' in a number): the masks
    equal a token-by-token check."""
    rng = random.Random(6)
    letters = "abcdefghij"
    pieces = [None, None] + [bytes((b,)) for b in range(256)]
    pieces += [str(n).encode() for n in range(10, 1000)] + [f"{n:03d}".encode() for n in range(100)]
    pieces += [b"12.5", b"7e3", b"99,", b"1}", b"4]", b"10 ", b"0x1"]
    words = {"".join(rng.choices(letters, k=rng.randint(2, 6))) for _ in range(900)}
    pieces += [('"' + w).encode() for w in words] + [(" " + w).encode() for w in words]
    pieces += [b'"ab"', b'"a\\', b'"b\n', b'"c\\"', b'"d",', b'"e":', b" ab\t", b'"' + "é".encode()]
    pieces += [b" " * n for n in range(2, 70)] + [b"\n" + b" " * n for n in range(70)]
    v = Vocab(list(dict.fromkeys(pieces)), [1])
    integer_map = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
                   "additionalProperties": False, "required": ["n"]}
    texts = {json_mode.JSON_OBJECT: ['{"abc": 123, "x": [1.5e3, "abc def"], "y": {"z": -40}}'],
             compile_schema(integer_map): ['{"n": 123, "s": "abc"}', '{ "n" : 9 }'],
             compile_schema({"type": "array", "items": {"type": "number"}}): ["[10, 2.5, -7e3]"]}
    for g, answers in texts.items():
        for text in answers:
            st = g.start
            for c in text.encode():
                check_mask(v, g, st, repr(text))
                st = g.step(st, c)


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
        "type": "string", "format": "hostname"}}}}
    got, answer = server.request("POST", "/v1/chat/completions", bad)
    assert got == 400 and "format" in answer["error"]["message"], answer
    got, answer = server.request("POST", "/v1/chat/completions", {**body, "response_format": {"type": "json_schema"}})
    assert got == 400 and answer["error"]["param"] == "response_format", answer


def test_the_openai_sdk_parses_a_pydantic_model_from_the_answer(server, engine):
    """The SDK's `parse(response_format=Model)` sends the model's strict schema ($defs, $ref, anyOf for Optional,
    Literal, Enum, dict, additionalProperties false); the answer the grammar holds to it parses into the model."""
    import asyncio
    import enum
    from typing import Literal, Optional

    pydantic = pytest.importorskip("pydantic")

    class Kind(str, enum.Enum):
        cat = "cat"
        dog = "dog"

    class Pet(pydantic.BaseModel):
        kind: Kind
        legs: Optional[int]

    class Owner(pydantic.BaseModel):
        pet: Pet
        size: Literal["s", "m"]
        notes: dict[str, int]

    bias = {str(engine.tokenizer.token_id(t)): 8.0 for t in ("}", "\"")}  # objects and strings end soon
    tok = engine.tokenizer  # random weights love whitespace: none here
    bias |= {str(i): -100 for i in range(tok.vocab_size) if (b := tok.token_bytes(i)) and not b.strip()}
    answer = asyncio.run(client(server).chat.completions.parse(
        model="demo", messages=[{"role": "user", "content": "An owner"}], response_format=Owner, max_tokens=120,
        temperature=0, logit_bias=bias))
    owner = answer.choices[0].message.parsed
    assert isinstance(owner, Owner) and isinstance(owner.pet.kind, Kind), answer


def test_the_openai_sdk_parses_tuples_and_keyed_dicts(server, engine):
    """The newer keywords through the whole path: the SDK's strict schema of a model with a tuple (prefixItems) and a
    Literal-keyed dict with max_length (propertyNames, maxProperties), the server's grammar, the parsed model."""
    import asyncio
    from typing import Annotated, Literal

    pydantic = pytest.importorskip("pydantic")

    class Pick(pydantic.BaseModel):
        pair: tuple[Literal["a", "b"], bool]
        counts: Annotated[dict[Literal["x", "y"], Literal[1, 2]], pydantic.Field(max_length=1)]

    tok = engine.tokenizer  # random weights love whitespace: none here
    bias = {str(i): -100 for i in range(tok.vocab_size) if (b := tok.token_bytes(i)) and not b.strip()}
    answer = asyncio.run(client(server).chat.completions.parse(
        model="demo", messages=[{"role": "user", "content": "Pick"}], response_format=Pick, max_tokens=60,
        temperature=0, logit_bias=bias))
    pick = answer.choices[0].message.parsed
    assert isinstance(pick, Pick) and len(pick.counts) <= 1, answer


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
    with pytest.raises(Exception, match="format 'hostname' is not enforced"):
        engine.generate(prompts, max_new_tokens=4, json={"type": "string", "format": "hostname"})


def test_pydantic_tuples_and_keyed_dicts():
    """pydantic writes tuple[int, str] as prefixItems with minItems = maxItems = 2, tuple[float, ...] as items, a
    dict keyed by a Literal, an Enum or a UUID with propertyNames, one keyed by a constrained string with
    patternProperties, bytes and SecretStr as strings of format binary and password (writeOnly)."""
    import enum
    import uuid
    from typing import Annotated, Literal

    pydantic = pytest.importorskip("pydantic")

    class Kind(str, enum.Enum):
        a = "a"
        b = "b"

    class Shape(pydantic.BaseModel):
        point: tuple[int, str]
        rest: tuple[float, ...]
        by: dict[Literal["x", "y"], int] = {}
        kind: dict[Kind, bool] = {}
        ids: dict[uuid.UUID, int] = {}
        low: dict[Annotated[str, pydantic.Field(pattern="^[a-z]+$")], int] = {}
        some: Annotated[dict[str, int], pydantic.Field(min_length=1, max_length=2)] = {"a": 1}
        blob: bytes = b""  # format binary
        key: pydantic.SecretStr = pydantic.SecretStr("")  # format password, writeOnly

    s = Shape.model_json_schema()
    g = compile_schema(s)
    u = '"123e4567-e89b-12d3-a456-426614174000"'
    for text in ('{"point": [1, "a"], "rest": []}', '{"point": [-2, ""], "rest": [0.5, 3], "by": {"y": 1, "x": 2}}',
                 '{"point": [0, "b"], "rest": [], "kind": {"b": true}, "ids": {%s: 7}, "low": {"ab": 1}}' % u,
                 '{"point": [0, "b"], "rest": [], "some": {"x": 2}, "blob": "any \\u00e9", "key": "pw"}'):
        st = walk(g, text)
        assert st is not None and g.ends(st) and valid(s, text), text
        Shape.model_validate_json(text)
    bad = ['{"point": [1], "rest": []}', '{"point": [1, "a", 2], "rest": []}', '{"point": ["a", 1], "rest": []}']
    bad += ['{"point": [1, "a"], "rest": [], %s}' % d for d in ('"by": {"z": 1}', '"kind": {"c": 1}', '"ids": {"u": 1}',
                                                                '"low": {"A": 1}',  # (jsonschema lets "A" by)
                                                                '"some": {}', '"some": {"a": 1, "b": 2, "c": 3}')]
    for text in bad:
        st = walk(g, text)
        assert st is None or not g.ends(st), text
        with pytest.raises(pydantic.ValidationError):
            Shape.model_validate_json(text)


def test_json_object_is_the_schema_of_any_object():
    """The two grammars agree where they should: {"type": "object"} takes what json_object takes."""
    rng = random.Random(4)
    g = compile_schema({"type": "object"})
    for _ in range(200):
        text = dumps(rng, {"k": [1, {"z": None, "s": "é\""}], "n": rng.random()})
        assert g.ends(walk(g, text)) and json_mode.complete(json_mode.advance(json_mode.START, text.encode()))


def test_a_pydantic_discriminated_union_is_held_to_one_alternative():
    """Union[Cat, Dog] with Field(discriminator=...): pydantic writes oneOf + discriminator; the grammar takes each
    alternative's objects and no object that mixes them, and pydantic parses what it takes."""
    from typing import Literal, Union

    pydantic = pytest.importorskip("pydantic")

    class Cat(pydantic.BaseModel):
        kind: Literal["cat"]
        lives: int

    class Dog(pydantic.BaseModel):
        kind: Literal["dog"]
        bark: str

    class Owner(pydantic.BaseModel):
        pet: Union[Cat, Dog] = pydantic.Field(discriminator="kind")

    schema = Owner.model_json_schema()
    assert "oneOf" in json.dumps(schema)
    g = compile_schema(schema)
    for text in ['{"pet": {"kind": "cat", "lives": 9}}', '{"pet": {"kind": "dog", "bark": "woof"}}']:
        assert g.ends(walk(g, text)) and valid(schema, text), text
        Owner.model_validate_json(text)
    for text in ['{"pet": {"kind": "dog", "lives": 9}}', '{"pet": {"kind": "cow", "lives": 1}}', '{"pet": {}}']:
        st = walk(g, text)
        assert st is None or not g.ends(st), text
