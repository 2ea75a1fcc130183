"""response_format {"type": "json_schema"}: the answer is JSON that a schema accepts, token by token.

`compile_schema` turns a JSON schema into a grammar of masks.py: a byte automaton whose state knows, at each
point, which schema the value being written must meet. Every answer it lets through is valid against the
schema; it writes a subset of the valid ones: an object's declared properties in their declared order (each at
most once, the required ones present), nothing beyond the declared properties. An object schema without
`properties` takes any keys (their values meeting `additionalProperties` when that is a schema, none when it is
false), an array without `items` any values, and a schema with no `type` any JSON value.

Supported: `type` (one or a list), `properties`, `required`, `additionalProperties`, `propertyNames` (the keys'
schema), `patternProperties` of one pattern (only its keys are written), `maxProperties` and `minProperties` up to
1 (any keys: a key written twice counts once), `items` (a schema, or false after `prefixItems`), `prefixItems` (a
tuple's items by position, as pydantic writes them), `minItems`, `maxItems`, `enum` and `const` of strings,
numbers, booleans and null, `anyOf`, `allOf` of one schema, `$ref` to `#/...` (`$defs`, `definitions`; recursion
included), the strings' `pattern`, `format` (regex.FORMATS: date, time, date-time, uuid, ipv4, ipv6, email, uri,
duration), `minLength` and `maxLength`, the numbers' `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`
and a whole `multipleOf` (numbers.py: a bounded number has no exponent and at most 15 digits), `uniqueItems` over
scalars without string or number constraints (an item's value checked where it ends; items of few values chosen
among those left), `oneOf` where no value can meet two alternatives (they differ in type, or in a required
property's const/enum: a discriminated union), and the annotations `title`, `description`, `default`, `examples`,
`$schema`, `$id`, `$comment`, `discriminator`, `readOnly`, `writeOnly`, `deprecated` (and the formats binary, path
and password: any text). That covers what pydantic and the OpenAI SDK generate for models. Anything else (a
`multipleOf` of 0.01, a `oneOf` whose alternatives overlap, a format not listed...) would be a promise the grammar
cannot keep: `SchemaError` names it, and the server answers 400.

A string with constraints is read as characters: UTF-8 validated, escapes decoded (surrogates only as a pair of
escapes, high then low: one character), the pattern's automaton stepped a character at a time, lengths counted in
code points (as jsonschema counts them), and a character only taken where the string can still be finished within
the lengths.

States are sets of deterministic states: `anyOf` follows each alternative the bytes so far still fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from . import json_mode
from .numbers import DIGITS, Bounds, exact
from .regex import FORMATS, MAX_CP, Pattern, PatternError

# (discriminator: OpenAPI's note beside a oneOf, which pydantic writes; the oneOf itself is what is checked)
ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "discriminator", "readOnly", "writeOnly", "deprecated"))
#: formats of strings that take any text: pydantic's bytes, Path and SecretStr (jsonschema checks none of them)
ANY_TEXT_FORMATS = frozenset(("binary", "path", "password"))
KEYWORDS = frozenset(("type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                      "enum", "const", "anyOf", "allOf", "oneOf", "$ref", "$defs", "definitions", "pattern", "format",
                      "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                      "uniqueItems", "prefixItems", "multipleOf", "propertyNames", "patternProperties",
                      "minProperties", "maxProperties"))
KEYWORDS |= ANNOTATIONS
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_FIRST = {"object": b"{", "array": b"[", "string": b'"', "number": b"-0123456789", "integer": b"-0123456789",
          "boolean": b"tf", "null": b"n"}
_WS = frozenset(b" \t\n\r")
# a JSON value of any kind, written by json_mode's automaton inside a container it never closes: the value is
# done when that automaton stands after it at the container's level
_ANY = ("[", "V", 0)
_ESCAPED = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_LITERAL = {0x74: True, 0x66: False, 0x6E: None}
# the code points an n-byte UTF-8 sequence may hold (shorter forms are overlong)
_UTF8 = {2: (0x80, 0x7FF), 3: (0x800, 0xFFFF), 4: (0x10000, 0x10FFFF)}


class SchemaError(ValueError):
    """The schema uses what the grammar cannot enforce, or is not a schema."""


class _Duplicate(Exception):
    """An item of a uniqueItems array ended as a value written before."""


@dataclass(frozen=True)
class Text:
    """A string's constraints: its pattern's automaton (None: any characters) and its length in code points."""

    pattern: Pattern | None
    min_len: int = 0
    max_len: int | None = None

    @property
    def cap(self) -> int:
        """Counting past this many characters tells nothing more"""
        return self.max_len if self.max_len is not None else self.min_len

    def allows(self, value: str) -> bool:
        return self.min_len <= len(value) <= (self.max_len if self.max_len is not None else len(value)) and \
            (self.pattern is None or self.pattern.matches(value))


@dataclass(frozen=True)
class Node:
    """One schema, compiled. kinds: the types it takes (empty: any JSON value); props: (key's JSON bytes, node,
    required) in declared order (None: any keys); extra: props None, the node of every key's value (None: any
    value); items: the arrays' node (None: any values); enum: the JSON bytes of each allowed value (None: any of
    the types); alts: anyOf's nodes (the node is one of them: nothing else of it counts); text: its strings'
    constraints (None: any string); bounds: its numbers' (None: any number); unique: its arrays' items differ
    (uniqueItems); prefix: the nodes of its arrays' first items, one each (prefixItems: `items` holds from there);
    names: props None, the node every key meets (a string schema: propertyNames, or patternProperties' one pattern);
    min_props/max_props: props None, how many keys (minProperties at most 1: a key written twice counts once).
    """

    kinds: frozenset
    props: tuple | None = None
    extra: int | None = None
    items: int | None = None
    min_items: int = 0
    max_items: int | None = None
    enum: tuple | None = None
    alts: tuple | None = None
    text: Text | None = None
    bounds: Bounds | None = None
    unique: bool = False
    prefix: tuple = ()
    names: int | None = None
    min_props: int = 0
    max_props: int | None = None

    def item(self, i: int) -> int:
        """The node of an array's item i (from 0)."""
        return self.prefix[i] if i < len(self.prefix) else self.items


def _kind_of(value) -> set[str]:
    if isinstance(value, bool):
        return {"boolean"}
    if value is None:
        return {"null"}
    if isinstance(value, str):
        return {"string"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    return {"number"}


def _pointer(root, ref: str, where: str):
    """The schema `ref` ("#/$defs/Name", JSON-pointer escapes ~0 ~1) names inside the root schema."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise SchemaError(f"{where}.$ref: only references inside the schema (\"#/...\") are followed, got {ref!r}")
    at = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(at, dict) or part not in at:
            raise SchemaError(f"{where}.$ref: {ref!r} names nothing in the schema")
        at = at[part]
    return at


def compile_schema(schema) -> JsonSchema:
    nodes: list[Node] = []
    refs: dict[str, int] = {}
    one_of: list[tuple[int, str]] = []  # (its node, where)
    uniques: list[tuple[int, int, int, str]] = []  # (the array's node, its items' node, minItems, where)

    def alias(targets: list, where: str, depth: int) -> int:
        at = len(nodes)
        nodes.append(Node(frozenset()))
        nodes[at] = Node(frozenset(), alts=tuple(node(t, f"{where}[{i}]", depth + 1) for i, t in enumerate(targets)))
        return at

    def node(s, where: str, depth: int) -> int:
        if depth > json_mode.MAX_DEPTH:
            raise SchemaError(f"{where}: nested deeper than {json_mode.MAX_DEPTH} levels")
        if s is True or s == {}:
            nodes.append(Node(frozenset()))
            return len(nodes) - 1
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema is an object, got {s!r}")
        other = sorted(set(s) - KEYWORDS)
        if other:
            raise SchemaError(f"{where}: {other[0]!r} is not enforced here (supported: {', '.join(sorted(KEYWORDS))})")
        for word in ("$ref", "anyOf", "allOf", "oneOf"):
            if word in s:
                rest = sorted(set(s) - ANNOTATIONS - {word, "$defs", "definitions"})
                if rest:
                    raise SchemaError(f"{where}: {word} beside {rest[0]!r} is not enforced here (only annotations "
                                      f"may sit beside {word})")
        if "$ref" in s:
            ref = s["$ref"]
            if ref not in refs:  # its place first, so a schema that refers to itself finds it
                at = refs[ref] = len(nodes)
                nodes.append(Node(frozenset()))
                nodes[at] = Node(frozenset(), alts=(node(_pointer(schema, ref, where), ref, depth + 1),))
            return refs[ref]
        if "oneOf" in s:  # held as anyOf where no value can meet two alternatives (checked once all is compiled)
            if not isinstance(s["oneOf"], list) or not s["oneOf"]:
                raise SchemaError(f"{where}.oneOf: a non-empty list of schemas")
            one_of.append((alias(s["oneOf"], f"{where}.oneOf", depth), f"{where}.oneOf"))
            return one_of[-1][0]
        if "anyOf" in s or "allOf" in s:
            word = "anyOf" if "anyOf" in s else "allOf"
            if not isinstance(s[word], list) or not s[word] or (word == "allOf" and len(s[word]) != 1):
                raise SchemaError(f"{where}.{word}: a non-empty list of schemas"
                                  + (" (allOf of one schema only: more would be an intersection)"
                                     if word == "allOf" else ""))
            return alias(s[word], f"{where}.{word}", depth)
        kinds = s.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or any(k not in TYPES for k in kinds) or len(set(kinds)) != len(kinds):
            raise SchemaError(f"{where}.type: one of {', '.join(TYPES)} or a list of them, got {s.get('type')!r}")
        text, bounds = _text(s, where), _bounds(s, where, kinds)
        enum = None
        if "enum" in s or "const" in s:
            values = s["enum"] if "enum" in s else [s["const"]]
            if not isinstance(values, list) or not values or any(isinstance(v, (dict, list)) for v in values):
                raise SchemaError(f"{where}: enum/const values must be strings, numbers, booleans or null")
            values = [v for v in values if (not kinds or _kind_of(v) & set(kinds))  # the type holds as well
                      and (text is None or not isinstance(v, str) or text.allows(v))  # and the string's rules
                      and (bounds is None or isinstance(v, (bool, str)) or v is None or bounds.holds(exact(v)))]
            if not values:
                raise SchemaError(f"{where}: no enum/const value has the type {kinds}")
            enum = tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False).encode() for v in values))
        at = len(nodes)
        nodes.append(Node(frozenset()))  # its place first: children come after it
        props = extra = items = names = None
        more = s.get("additionalProperties", True)
        if not isinstance(more, (bool, dict)):
            raise SchemaError(f"{where}.additionalProperties must be a boolean or a schema")
        keyed = [w for w in ("properties", "propertyNames", "patternProperties") if w in s]
        if len(keyed) > 1:
            raise SchemaError(f"{where}: {keyed[1]} beside {keyed[0]} is not enforced here")
        if "properties" not in s and s.get("required"):
            raise SchemaError(f"{where}.required without properties")
        if "patternProperties" in s:  # the keys written are the pattern's, their values its schema's
            pp = s["patternProperties"]
            if not isinstance(pp, dict) or len(pp) != 1:
                raise SchemaError(f"{where}.patternProperties: one pattern is enforced here (a key two patterns match "
                                  "meets both schemas)")
            (pattern, value), = pp.items()
            names = node({"type": "string", "pattern": pattern}, f"{where}.patternProperties", depth + 1)
            extra = node(value, f"{where}.patternProperties.{pattern}", depth + 1)
        elif "propertyNames" in s and more is not False:  # (additionalProperties false: no key at all, below)
            names = node(s["propertyNames"], f"{where}.propertyNames", depth + 1)
            extra = node(more, f"{where}.additionalProperties", depth + 1)
        elif "properties" in s:
            if not isinstance(s["properties"], dict):
                raise SchemaError(f"{where}.properties must be an object")
            required = s.get("required", [])
            if not isinstance(required, list) or any(r not in s["properties"] for r in required):
                raise SchemaError(f"{where}.required must list names of properties")
            props = tuple((json.dumps(k, ensure_ascii=False).encode(), node(v, f"{where}.properties.{k}", depth + 1),
                           k in required) for k, v in s["properties"].items())
        elif more is False:
            props = ()  # no key at all: {}
        elif more is not True and more != {}:
            extra = node(more, f"{where}.additionalProperties", depth + 1)
        least, most = s.get("minProperties", 0), s.get("maxProperties")
        if not isinstance(least, int) or isinstance(least, bool) or least < 0 or (most is not None and (
                not isinstance(most, int) or isinstance(most, bool) or most < least)):
            raise SchemaError(f"{where}: minProperties/maxProperties must be integers, 0 <= minProperties <= "
                              "maxProperties")
        if props is not None:  # declared keys: held only where every object written has a count within them
            if least > sum(req for _, _, req in props) or (most is not None and most < len(props)):
                raise SchemaError(f"{where}: minProperties/maxProperties beside properties are enforced only where "
                                  "the required and declared ones already keep them")
            least, most = 0, None
        elif least > 1:
            raise SchemaError(f"{where}: minProperties {least} of an object with any keys is not enforced here (a "
                              "key written twice counts once); at most 1")
        elif (least or most is not None) and extra is None:  # counted: the object is written here
            extra = node(True, f"{where}.additionalProperties", depth + 1)
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise SchemaError(f"{where}: minItems/maxItems must be integers, 0 <= minItems <= maxItems")
        unique = s.get("uniqueItems", False)
        if not isinstance(unique, bool):
            raise SchemaError(f"{where}.uniqueItems must be a boolean, got {unique!r}")
        prefix = s.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise SchemaError(f"{where}.prefixItems must be a list of schemas")
        if prefix and unique:
            raise SchemaError(f"{where}: uniqueItems beside prefixItems is not enforced here")
        prefix = tuple(node(p, f"{where}.prefixItems[{i}]", depth + 1) for i, p in enumerate(prefix))
        if s.get("items", True) is False:  # no item past the prefix
            hi = len(prefix) if hi is None else min(hi, len(prefix))
            if lo > hi:
                raise SchemaError(f"{where}: minItems {lo}, but items false ends the array after {hi}")
            items = node(True, f"{where}.items", depth + 1)  # (never reached: the count stops first)
        elif "items" in s:
            items = node(s["items"], f"{where}.items", depth + 1)
        elif lo or hi is not None or unique or prefix:  # counted: the array is written here, its values by json_mode
            items = node(True, f"{where}.items", depth + 1)
        if unique:
            uniques.append((at, items, lo, f"{where}.uniqueItems"))
        nodes[at] = Node(frozenset(kinds), props, extra, items, lo, hi, enum, text=text, bounds=bounds,
                         unique=unique, prefix=prefix, names=names, min_props=least, max_props=most)
        return at

    node(schema, "schema", 0)
    _check_aliases(nodes)
    for at, items, least, where in uniques:
        _check_unique(nodes, items, least, where)
    for at, where in one_of:
        alts = nodes[at].alts
        for i in range(len(alts)):
            for j in range(i + 1, len(alts)):
                if not _apart(nodes, alts[i], alts[j]):
                    raise SchemaError(f"{where}: alternatives {i} and {j} may both take one value, which oneOf "
                                      "forbids; it is enforced where alternatives differ in type or in a required "
                                      "property's const/enum (a discriminated union); use anyOf if either may do")
    return JsonSchema(tuple(nodes))


def _literals(node: Node) -> tuple | None:
    """The JSON bytes of every value a node of scalars takes where they are few (an enum, booleans, null); None
    where they are endless (strings, numbers)."""
    if node.enum is not None:
        return node.enum
    if node.kinds and node.kinds <= {"boolean", "null"}:
        return tuple(b for k, b in (("boolean", b"true"), ("boolean", b"false"), ("null", b"null")) if k in node.kinds)
    return None


def _distinct(few: tuple | None) -> int | None:
    """How many values JSON bytes `few` hold as uniqueItems tells them apart (None: endless)."""
    return None if few is None else len({_key(json.loads(b)) for b in few})


def _utf8_range(v: int, left: int, size: int) -> tuple[int, int]:
    """The code points a UTF-8 sequence of `size` bytes may still hold: v its bits so far, `left` bytes to come."""
    return max(v << 6 * left, _UTF8[size][0]), min(((v + 1) << 6 * left) - 1, _UTF8[size][1])


def _key(value):
    """A JSON value as uniqueItems compares it: 1 is 1.0, true is not 1."""
    return ("b", value) if isinstance(value, bool) else ("n", value) if isinstance(value, (int, float)) else \
        ("s", value) if isinstance(value, str) else ("z", None)


def _check_unique(nodes: list[Node], items: int, least: int, where: str) -> None:
    """uniqueItems is held where the items are scalars with no string or number constraints: then an item in
    progress can always become a value not yet written, or (few values) is chosen among those left."""
    node = _resolve(nodes, items)
    scalars = {"string", "number", "integer", "boolean", "null"}
    if node.alts is not None or node.text is not None or node.bounds is not None or \
            (node.enum is None and not (node.kinds and node.kinds <= scalars)):
        raise SchemaError(f"{where}: unique items are enforced where the items are strings, numbers, booleans, null "
                          "or an enum, with no pattern, format, lengths or bounds")
    values = _distinct(_literals(node))
    if values is not None and values < least:
        raise SchemaError(f"{where}: minItems {least} unique items, but the items take only {values} values")


def _resolve(nodes: list[Node], n: int) -> Node:
    """The node a $ref (an alias of one alternative) stands for."""
    seen = set()
    while nodes[n].alts is not None and len(nodes[n].alts) == 1 and n not in seen:
        seen.add(n)
        n = nodes[n].alts[0]
    return nodes[n]


def _classes(node: Node) -> frozenset | None:
    """The kinds of JSON value a node takes, integer counted as number (None: any, or not known here)."""
    if node.alts is not None:
        return None
    if node.enum is not None:
        kinds = map(_kind_of, map(json.loads, node.enum))
        return frozenset("number" if k & {"number"} else next(iter(k)) for k in kinds)
    return frozenset("number" if k == "integer" else k for k in node.kinds) or None


def _apart(nodes: list[Node], a: int, b: int) -> bool:
    """No JSON value meets both nodes: their kinds differ, or both are objects that require one property whose
    enum/const values differ (a discriminated union's tag). False where it cannot tell."""
    na, nb = _resolve(nodes, a), _resolve(nodes, b)
    ca, cb = _classes(na), _classes(nb)
    if ca is None or cb is None:
        return False
    if not ca & cb:
        return True
    if ca != {"object"} or cb != {"object"} or na.props is None or nb.props is None:
        return False

    def tags(n: Node) -> dict:
        out = {}
        for key, child, required in n.props:
            c = _resolve(nodes, child)
            if required and c.enum is not None:  # (kind, value): true is not 1, 1 is 1.0
                out[key] = {(frozenset(_kind_of(v)), v) for v in map(json.loads, c.enum)}
        return out

    ta, tb = tags(na), tags(nb)
    return any(not ta[k] & tb[k] for k in ta.keys() & tb.keys())


def _text(s: dict, where: str) -> Text | None:
    """The string constraints of schema s (None: none)."""
    if not any(k in s for k in ("pattern", "format", "minLength", "maxLength")):
        return None
    if "pattern" in s and s.get("format", "binary") not in ANY_TEXT_FORMATS:
        raise SchemaError(f"{where}: pattern beside format is not enforced here (one of them per string)")
    lo, hi = s.get("minLength", 0), s.get("maxLength")
    if not isinstance(lo, int) or isinstance(lo, bool) or lo < 0 or \
            (hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < lo)):
        raise SchemaError(f"{where}: minLength/maxLength must be integers, 0 <= minLength <= maxLength; got "
                          f"{lo!r}/{hi!r}")
    source = s.get("pattern")
    if "format" in s and s["format"] not in ANY_TEXT_FORMATS:
        if s["format"] not in FORMATS:
            raise SchemaError(f"{where}.format {s['format']!r} is not enforced here (supported: "
                              f"{', '.join((*FORMATS, *sorted(ANY_TEXT_FORMATS)))})")
        source = FORMATS[s["format"]]
    try:
        text = Text(None if source is None else Pattern(source), lo, hi)
    except PatternError as e:
        raise SchemaError(f"{where}.pattern: {e}") from None
    if not _alive(text, None if text.pattern is None else text.pattern.start, 0, {}):
        raise SchemaError(f"{where}: no string matches the pattern within minLength {lo}, maxLength {hi}")
    return text


def _bounds(s: dict, where: str, kinds: list) -> Bounds | None:
    """The number bounds of schema s (None: none, or it takes no numbers)."""
    words = [w for w in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf") if w in s]
    if not words or (kinds and not {"number", "integer"} & set(kinds)):
        return None
    for w in words:
        if isinstance(s[w], bool) or not isinstance(s[w], (int, float)) or not math.isfinite(s[w]):
            raise SchemaError(f"{where}.{w} must be a number, got {s[w]!r}")
    q = s.get("multipleOf")
    if q is not None and (q < 1 or q != int(q)):
        raise SchemaError(f"{where}: multipleOf {q} is not enforced here, only a whole one (validators divide "
                          "doubles, and 0.07 / 0.01 is not 7 there: they disagree on the multiples of a fraction)")
    lo = max(((exact(s[w]), w == "exclusiveMinimum") for w in ("minimum", "exclusiveMinimum") if w in s), default=None)
    hi = min(((exact(s[w]), w != "exclusiveMaximum") for w in ("maximum", "exclusiveMaximum") if w in s), default=None)
    integer = "integer" in kinds and "number" not in kinds
    b = Bounds(lo and lo[0], hi and hi[0], bool(lo and lo[1]), bool(hi and not hi[1]), integer,
               None if q is None else int(q))
    if not (b.reach("") or b.reach("-")):
        raise SchemaError(f"{where}: no {'integer' if integer else 'number'} of at most {DIGITS} digits lies within "
                          f"{', '.join(f'{w} {s[w]}' for w in words)}")
    return b


def _alive(t: Text, r, count: int, memo: dict) -> bool:
    """A string whose characters so far left t's pattern in state r, `count` of them (capped at t.cap; -1: not
    counted), can still be finished within t's lengths, memoized in memo. Once minLength is met, the shortest way
    to the pattern's end decides; before, a search over (state, count) pairs up to minLength."""
    if count < 0 or t.pattern is None or (t.min_len == 0 and t.max_len is None):
        return True  # no pattern: pad or stop; no lengths: every state of the automaton reaches its end
    if count >= t.min_len:
        return t.max_len is None or _shortest(t.pattern, r, memo) <= t.max_len - count
    key = (t, r, count)
    if key not in memo:
        seen, todo, ok = {(r, count)}, [(r, count)], False
        while todo and not ok:
            q, k = todo.pop()
            if k >= t.min_len:
                ok = _alive(t, q, k, memo)
            elif t.max_len is None or k < t.max_len:
                for cp in t.pattern.reps:
                    q2 = t.pattern.step(q, cp)
                    if q2 is not None and (q2, k + 1) not in seen:
                        seen.add((q2, k + 1))
                        todo.append((q2, k + 1))
        memo[key] = ok
    return memo[key]


def _shortest(p: Pattern, r, memo: dict) -> int:
    """The fewest characters that take pattern p from state r to its end (breadth first over its states)."""
    key = ("shortest", p, r)
    if key not in memo:
        level, seen, n = [r], {r}, 0
        while level and not any(p.accepts(q) for q in level):
            level = [q2 for q in level for cp in p.reps if (q2 := p.step(q, cp)) is not None and q2 not in seen
                     and not seen.add(q2)]
            n += 1
        memo[key] = n if level else 1 << 40
    return memo[key]


def _check_aliases(nodes: list[Node]) -> None:
    """A $ref/anyOf cycle that never reaches a value ({"$ref": "#"} at the root, A -> B -> A) has no answer."""
    state = [0] * len(nodes)  # 0 new, 1 on the path, 2 done

    def visit(n: int) -> None:
        if state[n] == 1:
            raise SchemaError("$ref/anyOf refer to each other in a cycle that never reaches a value")
        if state[n] == 0 and nodes[n].alts is not None:
            state[n] = 1
            for a in nodes[n].alts:
                visit(a)
        state[n] = 2

    for n in range(len(nodes)):
        visit(n)


@dataclass(frozen=True)
class JsonSchema:
    """The grammar (masks.py) of one value valid against the compiled schema `nodes` (nodes[0] the root).

    A state is a frozenset of deterministic states (frames, mode). Frames (innermost last) say where a finished
    value returns: ("o", node, next property) in an object with declared properties, ("m", node, keys) in one with
    any keys, ("a", node, items so far) in an array (of a uniqueItems one: ("a", node, items so far, their values,
    this item's bytes so far)). Modes: ("v", node, ws) a value of node; ("e", alternatives' remaining bytes) one
    of an enum; ("j", node, json state) a value json_mode's automaton writes; ("o", node, next, phase, ws) in an
    object's punctuation (phase "{" after the brace, "," after a comma, ">" after a value); ("k", node,
    [(remaining bytes, property)]) a key; (":", node, property, ws); ("m", node, phase, keys, ws), ("mk", node,
    json state, keys) and (";", node, keys, ws): the same for any keys, keys begun counted up to what
    min/max_props need (a key of propertyNames' schema is a value in a frame ("n", node, keys); a value's frame
    is ("m", node, keys)); ("a", node, count, phase, values so far (a uniqueItems array's, else None), ws) in an
    array's punctuation; ("end", ws) done."""

    nodes: tuple

    def __hash__(self) -> int:  # masks are cached by (grammar, state): a token's lookup should not rehash the schema
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self.nodes)
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def start(self):
        return frozenset((((), ("v", 0, 0)),))

    @property
    def tight_start(self):
        """The start with no whitespace before the value (a tool call's arguments open at once)."""
        return frozenset((((), ("v", 0, json_mode.MAX_WS)),))

    def step(self, st, c: int):
        out = frozenset(s for one in st for s in self._unique_step(one, c))
        return out or None

    def _unique_step(self, one, c: int) -> list:
        """_step, with an item of a uniqueItems array recording its bytes in its frame ("a", node, count, values
        so far, bytes so far): a duplicate refused where the item ends (_done raises _Duplicate)."""
        frames, mode = one
        item = frames and len(frames[-1]) == 5
        if not item and mode[0] != "a":  # neither in nor opening a unique item: _step alone
            return self._step(one, c)
        if item:
            f = frames[-1]
            frames = frames[:-1] + ((*f[:4], f[4] + bytes((c,))),)
        try:
            out = self._step((frames, mode), c)
        except _Duplicate:
            return []
        # an integer item "0" or "-0" where 0 is written: no digit may follow, so it could end no way
        return [(fr, m) for fr, m in out if not (fr and len(fr[-1]) == 5 and fr[-1][4] in (b"0", b"-0") and
                                                ("n", 0) in fr[-1][3] and m[0] == "j" and
                                                "number" not in self.nodes[m[1]].kinds)]

    def special(self, st, token: int):
        return None

    def ends(self, st) -> bool:
        return any(self._ends(s) for s in st)

    def whole(self, st) -> bool:
        """The value is written: only whitespace may follow (a number is never whole: a digit may follow)."""
        return any(not frames and mode[0] == "end" for frames, mode in st)

    def free(self, st) -> bool:
        return False

    def in_string(self, st) -> bool:
        """Inside a JSON string in some alternative: a token of plain string bytes continues that one, so every
        such token is allowed (masks.py walks the others)."""
        return any(mode[0] in ("j", "mk") and json_mode.in_string(mode[2]) for _, mode in st)

    # one deterministic state: each returns the list of states after byte c (empty: c breaks it)

    def _done(self, frames):
        """The mode after a value, back in the frame that holds it."""
        if not frames:
            return frames, ("end", 0)
        f = frames[-1]
        if f[0] == "o":
            return frames[:-1], ("o", f[1], f[2], ">", 0)
        if f[0] == "m":
            return frames[:-1], ("m", f[1], ">", f[2], 0)
        if f[0] == "n":  # a key of propertyNames' schema: its colon next
            return frames[:-1], (";", f[1], f[2], 0)
        if len(f) == 5:  # an item of unique ones: its bytes (a number's with the byte after it) hold its value
            text = f[4].decode("utf-8", "replace")  # as the answer's text reads it (strings take any bytes)
            try:
                key = _key(json.loads(text))
            except ValueError:
                key = _key(json.loads(text[:-1]))
            if key in f[3]:
                raise _Duplicate
            return frames[:-1], ("a", f[1], f[2] + 1, ">", f[3] | {key}, 0)
        return frames[:-1], ("a", f[1], f[2] + 1, ">", None, 0)

    def _value(self, frames, n: int, c: int) -> list:
        """Byte c opens a value of node n."""
        node = self.nodes[n]
        if node.alts is not None:
            return [s for a in node.alts for s in self._value(frames, a, c)]
        seen = frames[-1][3] if frames and len(frames[-1]) == 5 else None  # a unique item's values so far
        few = node.enum if seen is None else _literals(node)
        if few is not None:
            return self._enum(frames, tuple(e[1:] for e in few if e[0] == c and (
                seen is None or _key(json.loads(e)) not in seen)))
        if seen is not None and c in _LITERAL and _key(_LITERAL[c]) in seen:
            return []  # true/false/null written before: this one could only end as a duplicate
        kinds = node.kinds
        if kinds and not any(c in _FIRST[k] for k in kinds):
            return []
        if node.bounds is not None and c in _FIRST["number"]:
            return [(frames, ("b", n, chr(c)))] if node.bounds.reach(chr(c)) else []
        if c == 0x22 and node.text is not None and (not kinds or "string" in kinds):
            return [(frames, ("t", n, None if node.text.pattern is None else node.text.pattern.start, 0, ()))]
        own_object = node.props is not None or node.extra is not None
        if (c == 0x7B and own_object and (not kinds or "object" in kinds)) or \
                (c == 0x5B and node.items is not None and (not kinds or "array" in kinds)):
            if len(frames) >= json_mode.MAX_DEPTH:
                return []
            if c == 0x5B:
                return [(frames, ("a", n, 0, "{", frozenset() if node.unique else None, 0))]
            return [(frames, ("o", n, 0, "{", 0) if node.props is not None else ("m", n, "{", 0, 0))]
        nxt = json_mode.step(_ANY, c)
        return [] if nxt is None else [self._json(frames, n, nxt)]

    def _enum(self, frames, left: tuple) -> list:
        """Enum values still matching, by their remaining bytes: done where the only match is whole (b"")."""
        if not left:
            return []
        return [self._done(frames) if left == (b"",) else (frames, ("e", left))]

    def _json(self, frames, n: int, st):
        if st[0] == "[" and st[1] == "A":  # the value is whole (a string, literal, object or array closed)
            return self._done(frames)
        return frames, ("j", n, st)

    def _keys(self, n: int, start: int):
        """The properties that may come next from property `start` on: up to the first required one."""
        out = []
        for i, (key, _, required) in enumerate(self.nodes[n].props[start:], start):
            out.append((key, i))
            if required:
                break
        return out

    def _key_may_begin(self, n: int) -> bool:
        """A key of node n's any-keys object can begin: a comma is not a dead end."""
        names = self.nodes[n].names
        return names is None or bool(self._value((("n", n, 0),), names, 0x22))

    def _may_close(self, n: int, start: int) -> bool:
        return not any(req for _, _, req in self.nodes[n].props[start:])

    def _step(self, one, c: int) -> list:
        frames, mode = one
        kind = mode[0]
        if kind == "e":
            left = tuple(e[1:] for e in mode[1] if e and e[0] == c)
            if left:
                return self._enum(frames, left)
            if b"" not in mode[1]:
                return []
            frames, mode = self._done(frames)  # a number of the enum ended: c is what follows it
            kind = mode[0]
        elif kind == "j":
            n, js = mode[1], mode[2]
            if js[1] != "N" or len(js[0]) > 1:  # not a number the value is, but one inside it (or no number)
                nxt = json_mode.step(js, c)
                return [] if nxt is None else [self._json(frames, n, nxt)]
            kinds = self.nodes[n].kinds
            if c in b".eE" and "integer" in kinds and "number" not in kinds:
                return []
            if json_mode.number_step(js[2], c) is not None:
                return [(frames, ("j", n, json_mode.step(js, c)))]
            if js[2] not in json_mode.NUMBER_ENDS:
                return []
            frames, mode = self._done(frames)  # a number ends at the first byte that does not continue it
            kind = mode[0]
        elif kind == "k":
            left = tuple((k[1:], i) for k, i in mode[2] if k[0] == c)
            if not left:
                return []
            whole = [i for k, i in left if not k]
            return [(frames, (":", mode[1], whole[0], 0)) if whole else (frames, ("k", mode[1], left))]
        elif kind == "b":  # a bounded number: ("b", node, its bytes so far)
            b = self.nodes[mode[1]].bounds
            nxt = b.step(mode[2], c)
            if nxt is not None:
                return [(frames, ("b", mode[1], nxt))]
            if not b.ends(mode[2]):
                return []
            frames, mode = self._done(frames)  # it ends at the first byte that does not continue it
            kind = mode[0]
        elif kind == "t":
            return self._text(frames, mode, c)
        elif kind == "mk":
            nxt = json_mode.step(mode[2], c)
            if nxt is None:
                return []
            return [(frames, (";", mode[1], mode[3], 0) if nxt[1] == "A" else ("mk", mode[1], nxt, mode[3]))]
        ws = mode[-1]
        if c in _WS:
            return [] if ws >= json_mode.MAX_WS else [(frames, mode[:-1] + (ws + 1,))]
        if kind == "v":
            return self._value(frames, mode[1], c)
        if kind == ":":
            if c != 0x3A:
                return []
            return [(frames + (("o", mode[1], mode[2] + 1),), ("v", self.nodes[mode[1]].props[mode[2]][1], 0))]
        if kind == ";":
            if c != 0x3A:
                return []
            return [(frames + (("m", mode[1], mode[2]),), ("v", self.nodes[mode[1]].extra, 0))]
        if kind == "o":
            n, nxt, phase = mode[1], mode[2], mode[3]
            if c == 0x7D and phase != "," and self._may_close(n, nxt):
                return [self._done(frames)]
            if phase == ">":
                return [(frames, ("o", n, nxt, ",", 0))] if c == 0x2C and self._keys(n, nxt) else []
            left = tuple((k[1:], i) for k, i in self._keys(n, nxt) if k[0] == c)
            return [(frames, ("k", n, left))] if left else []
        if kind == "m":
            n, phase, keys = mode[1], mode[2], mode[3]
            node = self.nodes[n]
            if c == 0x7D and phase != "," and keys >= node.min_props:
                return [self._done(frames)]
            if phase == ">":
                room = node.max_props is None or keys < node.max_props
                return [(frames, ("m", n, ",", keys, 0))] if c == 0x2C and room and self._key_may_begin(n) else []
            if c != 0x22 or node.max_props == 0:
                return []
            cap = node.max_props if node.max_props is not None else node.min_props
            keys = min(keys + 1, cap)  # (0 where nothing is counted: the states of uncounted objects stay few)
            if node.names is not None:
                return self._value(frames + (("n", n, keys),), node.names, c)
            return [(frames, ("mk", n, json_mode.step(_ANY, c), keys))]
        if kind == "a":
            n, count, phase = mode[1], mode[2], mode[3]
            node = self.nodes[n]
            if c == 0x5D and phase != "," and count >= node.min_items:
                return [self._done(frames)]
            if phase == ">":
                full = node.max_items is not None and count >= node.max_items
                if node.unique:  # items of few values: a comma only while one is left
                    values = _distinct(_literals(_resolve(self.nodes, node.items)))
                    full = full or (values is not None and values <= len(mode[4]))
                return [(frames, ("a", n, count, ",", mode[4], 0))] if c == 0x2C and not full else []
            if node.max_items == 0:
                return []
            frame = ("a", n, count, mode[4], bytes((c,))) if node.unique else ("a", n, count)
            return self._value(frames + (frame,), node.item(count), c)
        return []  # "end": only whitespace

    # a string with constraints: ("t", node, pattern state (None: no pattern), characters begun (capped at the
    # node's cap; -1: not counted, see `counted`), pending) where pending is () between characters, ("\\",) after a
    # backslash, ("x", value, hex digits to come) in a \\u escape, ("h", high surrogate, bytes to come) before the
    # "\\u" of its low half, ("y", high, value, hex digits to come) in that low half, ("u", value, bytes to come,
    # length) in a UTF-8 sequence. A character is counted where it begins; the pattern steps where it is whole.

    def _text(self, frames, mode, c: int) -> list:
        _, n, r, count, pend = mode
        t = self.nodes[n].text
        if pend:
            if pend[0] == "\\":
                if c == 0x75:
                    return [(frames, ("t", n, r, count, ("x", 0, 4)))] if self._viable(t, r, count, 0, MAX_CP) else []
                return self._char(frames, n, r, count, _ESCAPED[c]) if c in _ESCAPED else []
            if pend[0] == "x":  # \\u and its hex digits; of a high surrogate, its low half's escape must follow
                if c not in _HEX:
                    return []
                v, left = pend[1] * 16 + _HEX[c], pend[2] - 1
                lo, hi = v << 4 * left, ((v + 1) << 4 * left) - 1
                if left == 0 and 0xD800 <= v <= 0xDBFF:
                    pair = 0x10000 + ((v - 0xD800) << 10)
                    return [(frames, ("t", n, r, count, ("h", v, b"\\u")))] if self._viable(
                        t, r, count, pair, pair + 0x3FF) else []
                if left == 0:
                    return [] if 0xDC00 <= v <= 0xDFFF else self._char(frames, n, r, count, v)
                if not (self._viable(t, r, count, lo, hi) or (lo <= 0xDBFF and hi >= 0xD800 and self._viable(
                        t, r, count, 0x10000 + ((max(lo, 0xD800) - 0xD800) << 10),
                        0x10000 + ((min(hi, 0xDBFF) - 0xD800) << 10) + 0x3FF))):
                    return []
                return [(frames, ("t", n, r, count, ("x", v, left)))]
            if pend[0] == "h":  # after a high surrogate's escape: the low half's "\\u"
                if c != pend[2][0]:
                    return []
                return [(frames, ("t", n, r, count, ("h", pend[1], pend[2][1:]) if len(pend[2]) > 1
                                  else ("y", pend[1], 0, 4)))]
            if pend[0] == "y":  # the low half's hex digits: DC00-DFFF
                if c not in _HEX:
                    return []
                v, left = pend[2] * 16 + _HEX[c], pend[3] - 1
                lo, hi = max(v << 4 * left, 0xDC00), min(((v + 1) << 4 * left) - 1, 0xDFFF)
                base = 0x10000 + ((pend[1] - 0xD800) << 10) - 0xDC00
                if lo > hi or (left and not self._viable(t, r, count, base + lo, base + hi)):
                    return []
                return self._char(frames, n, r, count, base + v) if left == 0 else \
                    [(frames, ("t", n, r, count, ("y", pend[1], v, left)))]
            if not 0x80 <= c <= 0xBF:
                return []
            return self._utf8(frames, n, r, count, pend[1] * 64 + (c & 0x3F), pend[2] - 1, pend[3])
        if c == 0x22:
            whole = count >= t.min_len and (r is None or t.pattern.accepts(r))
            return [self._done(frames)] if whole else []
        if c < 0x20:
            return []
        if count >= 0:  # a character begins
            if t.max_len is not None and count >= t.max_len:
                return []
            count = min(count + 1, t.cap)
        if c == 0x5C:
            return [(frames, ("t", n, r, count, ("\\",)))] if self._viable(t, r, count, 0, MAX_CP) else []
        if c < 0x80:
            return self._char(frames, n, r, count, c)
        size = 2 if 0xC2 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF4 else 0
        return self._utf8(frames, n, r, count, c & (0x1F, 0x0F, 0x07)[size - 2], size - 1, size) if size else []

    def _utf8(self, frames, n: int, r, count: int, v: int, left: int, size: int) -> list:
        """v: the bits of a UTF-8 sequence of `size` bytes so far, `left` bytes to come."""
        lo, hi = _utf8_range(v, left, size)
        if lo > hi or (0xD800 <= lo and hi <= 0xDFFF):
            return []
        if left == 0:
            return self._char(frames, n, r, count, v)
        if not self._viable(self.nodes[n].text, r, count, lo, hi):
            return []
        return [(frames, ("t", n, r, count, ("u", v, left, size)))]

    def _char(self, frames, n: int, r, count: int, cp: int) -> list:
        """Character cp (already counted) is whole."""
        t = self.nodes[n].text
        if r is not None:
            r = t.pattern.step(r, cp)
            if r is None:
                return []
        return [(frames, ("t", n, r, count, ()))] if _alive(t, r, count, self._memo) else []

    def _viable(self, t: Text, r, count: int, lo: int, hi: int) -> bool:
        """Some character in [lo, hi] (not a surrogate) may come next."""
        if t.pattern is None:
            return lo <= hi and not (0xD800 <= lo and hi <= 0xDFFF)
        for cp in t.pattern.runs(lo, hi):
            q = t.pattern.step(r, cp)
            if q is not None and _alive(t, q, count, self._memo):
                return True
        return False

    @property
    def _memo(self) -> dict:
        memo = self.__dict__.get("_alive")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_alive", memo)
        return memo

    def counted(self, st):
        """masks.py's split for a string with lengths, outside escapes: (the state with its count left out, or None
        between characters of a string without a pattern (any plain token of well-formed UTF-8 goes on); the
        characters it may still take (None: any); with a pattern, `live(end, k)`: a token that leaves the count-free
        state at `end` having begun k characters leaves a string that can still end within the lengths). A token of
        plain string bytes is then judged by its walk from the count-free state (cached once) and its length; only
        the others are walked per count."""
        if len(st) != 1:
            return None
        ((frames, mode),) = st
        if mode[0] != "t":
            return None
        n, r, count, pend = mode[1:]
        t = self.nodes[n].text
        if count < 0 or (pend and pend[0] != "u") or (t.min_len == 0 and t.max_len is None):
            return None
        room = None if t.max_len is None else t.max_len - count
        base = frozenset(((frames, ("t", n, r, -1, pend)),))
        if t.pattern is None:
            return (base if pend else None), room, None

        def live(end, k: int) -> bool:
            ((_, (_, _, q, _, left)),) = end
            c = min(count + k, t.cap)
            if not left:
                return _alive(t, q, c, self._memo)
            return self._viable(t, q, c, *_utf8_range(*left[1:]))

        return base, room, live

    def _ends(self, one) -> bool:
        frames, mode = one
        if mode[0] == "end":
            return True
        if frames:
            return False
        return (mode[0] == "e" and b"" in mode[1]) or (mode[0] == "j" and mode[2][:2] == ("[", "N")
                                                      and mode[2][2] in json_mode.NUMBER_ENDS) \
            or (mode[0] == "b" and self.nodes[mode[1]].bounds.ends(mode[2]))
