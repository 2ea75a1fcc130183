"""What a grammar costs per token: the masks of json_object, JSON schemas and strict tools on a vocabulary of
DeepSeek-V3's size, against the plain way (every token advanced through the grammar), side by side in one run.

The vocabulary is synthetic (no tokenizer can be downloaded here) but shaped like a byte-level BPE one: every
byte, words with and without a leading space, JSON punctuation runs, every run of 1-3 digits (pre-tokenizers of
this family split numbers so), indentation (spaces, a newline and spaces, tabs), CJK. Its shape decides the
figures: a state costs the tokens it allows that the walk cannot take whole (see masks.py). An
answer of each grammar is cut into its tokens by longest match; along it the table gives the vocabulary's
one-time build, a mask at a state seen for the first time (the walk of the byte-sorted trie, masks.py), the same
mask when cached, advancing the state by one token, and the plain scan of every token at a sample of the
states (the ratio is what the trie buys). Writes the table to benchmarks/RESULTS.md.

    python benchmarks/grammar_masks.py [--vocab 129280]
    python benchmarks/grammar_masks.py --smoke      # 4k tokens (the test suite runs this)
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, cpu_line, parser  # noqa: E402

from dsv3.serve import json_mode, masks  # noqa: E402
from dsv3.serve.masks import Vocab  # noqa: E402
from dsv3.serve.schema import compile_schema  # noqa: E402
from dsv3.serve.tools import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolGrammar  # noqa: E402

WORDS = ("the name of a city age color red blue green pets kind cat dog legs size notes value items total price "
         "weather Paris London unit celsius true false null description result error count data list").split()
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

PERSON = {"$defs": {"Pet": {"type": "object", "additionalProperties": False, "required": ["kind", "legs"],
                            "properties": {"kind": {"enum": ["cat", "dog"]},
                                           "legs": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}},
          "type": "object", "additionalProperties": False, "required": ["name", "age", "pets", "notes"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
                         "notes": {"type": "object", "additionalProperties": {"type": "number"}}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
# strings held to formats, a pattern and a length (schema.py's character-level strings; the site as pydantic's
# HttpUrl: a format with lengths), a bounded integer
EVENT = {"type": "object", "additionalProperties": False,
         "required": ["title", "when", "contact", "code", "seats", "site"],
         "properties": {"title": {"type": "string", "maxLength": 80},
                        "when": {"type": "string", "format": "date-time"},
                        "contact": {"type": "string", "format": "email"},
                        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "seats": {"type": "integer", "minimum": 1, "maximum": 500},
                        "site": {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}}}


def vocabulary(size: int, seed: int = 0) -> list[bytes | None]:
    """`size` distinct pieces: 8 special tokens (EOS and the five tool markers among them), every byte, then
    pieces drawn like a BPE vocabulary's."""
    rng = random.Random(seed)
    pieces: list[bytes | None] = [None] * 8
    seen: set[bytes] = set()

    def add(b: bytes) -> None:
        if b and b not in seen and len(pieces) < size:
            seen.add(b)
            pieces.append(b)

    for b in range(256):
        add(bytes((b,)))
    for w in WORDS:
        for form in (w, " " + w, '"' + w, w + '"', '"' + w + '":', " " + w.capitalize()):
            add(form.encode())
    for p in ('{"', '":', '",', '":"', '"}', '},', '}]', '[{', '": ', '", "', '{}', '[]', ': ', ', '):
        add(p.encode())
    for n in range(1, 1000):
        add(str(n).encode())
        add(f"{n:03d}".encode())
        add(f"{n:02d}".encode() if n < 100 else b"")
    for n in range(1, 33):
        add(b" " * n)
        add(b"\n" + b" " * (n - 1))
        add(b"\t" * min(n, 8))
        add(b"\n" + b"\t" * min(n - 1, 8))
    add(b"\n\n")
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    while len(pieces) < size:
        pick = rng.random()
        if pick < 0.55:  # a word piece, a leading space on half
            n = min(12, max(2, int(rng.expovariate(1 / 5))))
            w = "".join(rng.choices(letters, weights=range(26, 0, -1), k=n))
            add(((" " if rng.random() < 0.5 else "") + w).encode())
        elif pick < 0.75:
            add("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 3))).encode())
        elif pick < 0.9:
            add("".join(rng.choices('{}[]",:. -_/\\()', k=rng.randint(2, 4))).encode())
        else:  # a word piece after punctuation or a newline
            add((rng.choice(['"', "(", "\n", "_", "."]) + "".join(rng.choices(letters, k=rng.randint(2, 8)))).encode())
    return pieces


def tokenize(data: bytes, index: dict[bytes, int], longest: int) -> list[int]:
    out, i = [], 0
    while i < len(data):
        n = next(n for n in range(min(longest, len(data) - i), 0, -1) if data[i:i + n] in index)
        out.append(index[data[i:i + n]])
        i += n
    return out


def answers(pieces, index, longest) -> list[tuple[str, object, list[int]]]:
    person = {"name": "Ada Lovelace", "age": 36, "pets": [{"kind": "cat", "legs": 4}, {"kind": "dog", "legs": None}],
              "notes": {"height": 1.65, "score": -3e2}}
    ids = {m: i for i, m in zip(range(2, 7), MARKERS)}
    strict = ToolGrammar(("get_weather", "get_time"), "auto", True, tuple(sorted(ids.items())),
                         (compile_schema(WEATHER), None))
    call = (tokenize(b"Let me check. ", index, longest) + [ids[CALLS_BEGIN], ids[CALL_BEGIN]]
            + tokenize(b"function", index, longest) + [ids[SEP]]
            + tokenize(b'get_weather\n```json\n{"city": "Paris", "unit": "celsius"}\n```', index, longest)
            + [ids[CALL_END], ids[CALLS_END]])
    text = json.dumps(person, indent=2).encode()
    event = {"title": "the weather of Paris", "when": "2026-12-02T10:30:00Z", "contact": "ada@example.org",
             "code": "PAR-2026", "seats": 42, "site": "https://example.org/events/2026?city=paris#top"}
    return [("json_object", json_mode.JSON_OBJECT, tokenize(text, index, longest)),
            ("json_schema (pydantic-like: $ref, anyOf, enum, map)", compile_schema(PERSON),
             tokenize(text, index, longest)),
            ("tools, one strict", strict, call),
            ("json_schema strings and bounds (maxLength, date-time, email, pattern, minimum/maximum, HttpUrl)",
             compile_schema(EVENT),
             tokenize(json.dumps(event, indent=2).encode(), index, longest))]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--vocab", type=int, default=129280, help="vocabulary size (DeepSeek-V3: 129280)")
    ap.add_argument("--scan-states", type=int, default=6, help="states per grammar scanned token by token")
    ap.add_argument("--smoke", action="store_true", help="4096 tokens, 2 scanned states; RESULTS.md untouched")
    args = ap.parse_args()
    size, scans = (4096, 2) if args.smoke else (args.vocab, args.scan_states)
    pieces = vocabulary(size)
    index = {b: t for t, b in enumerate(pieces) if b is not None}
    longest = max(len(b) for b in index)
    t0 = time.perf_counter()
    vocab = Vocab(pieces, [1])
    build = time.perf_counter() - t0
    rows = []
    for name, grammar, toks in answers(pieces, index, longest):
        states, st = [], grammar.start
        for t in toks:
            states.append(st)
            st = vocab.advance(grammar, st, t)
            if st is None:
                raise SystemExit(f"{name}: the answer breaks its own grammar at token {len(states)}")
        for st in states:  # once, so the trie's own one-time tables are not in the figures
            vocab.allowed(grammar, st)
        vocab.allowed.cache_clear()
        vocab._plain_ends.cache_clear()
        cold, cached, steps = [], [], []
        for st, t in zip(states, toks):
            t0 = time.perf_counter()
            vocab.allowed(grammar, st)
            t1 = time.perf_counter()
            vocab.allowed(grammar, st)
            t2 = time.perf_counter()
            vocab.advance(grammar, st, t)
            t3 = time.perf_counter()
            cold.append(t1 - t0)
            cached.append(t2 - t1)
            steps.append(t3 - t2)
        vocab.allowed.cache_clear()
        masks._WHOLE, whole_at = 1 << 40, masks._WHOLE  # the same walks, each subtree walked token by token
        try:
            t0 = time.perf_counter()
            for st in states:
                vocab.allowed(grammar, st)
            stepwise = (time.perf_counter() - t0) / len(states)
        finally:
            masks._WHOLE = whole_at
            vocab.allowed.cache_clear()
            vocab._plain_ends.cache_clear()
        distinct = len(set(states))
        sample = sorted(range(len(states)), key=lambda i: cold[i])[-scans:]  # the walks that cost most
        scan, walk = [], []
        for i in sample:
            t0 = time.perf_counter()
            want = {t for t in range(len(pieces)) if vocab.advance(grammar, states[i], t) is not None}
            scan.append(time.perf_counter() - t0)
            walk.append(cold[i])
            got = set(vocab.allowed(grammar, states[i]).nonzero().flatten().tolist())
            if got != want:
                raise SystemExit(f"{name}: the mask differs from the scan at state {states[i]}")
        rows.append((name, len(toks), distinct, statistics.mean(cold) * 1e3, stepwise * 1e3, max(cold) * 1e3,
                     statistics.median(cached) * 1e6, statistics.median(steps) * 1e6,
                     statistics.mean(scan) / statistics.mean(walk)))
    head = (f"{cpu_line()}; synthetic byte-level vocabulary of {size} tokens (built in {build:.2f} s, once per "
            "server)\n\n| grammar | tokens | distinct states | new-state mask, mean ms | without whole subtrees, mean ms | "
            f"max ms | cached mask, us | advance, us | plain scan / trie walk (the {scans} costliest states) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {n} | {k} | {d} | {c:.2f} | {w:.2f} | {m:.2f} | {ca:.1f} | {a:.1f} | **{r:.0f}x** |"
             for n, k, d, c, w, m, ca, a, r in rows]
    body = head + "\n" + "\n".join(lines) + ("\n\nA new state's mask is paid once per (grammar, state) and "
                                            "cached (512 entries); a decode step at batch B pays at most B of them.")
    print(body)
    if not args.smoke and not args.no_write:
        append_section("Grammar masks (json_object, json_schema, tools)", "python benchmarks/grammar_masks.py", body)


if __name__ == "__main__":
    main()
