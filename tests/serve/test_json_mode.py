"""response_format json_object: the grammar automaton against Python's json module, the vocabulary masks
against a token-by-token check, and answers of the real scheduler and server (json_mode.py, masks.py)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import reference, run_all

from dsv3.serve import json_mode
from dsv3.serve.json_mode import JSON_OBJECT, MAX_DEPTH, MAX_WS, START, advance, complete
from dsv3.serve.masks import Vocab
from dsv3.serve.scheduler import Sampling, Scheduler

ALPHABET = '{}[]:,"\\ \n\t0123456789.-+eEtrufalsn abcxyz\u00e9\u4e2d/\x01'


def document(rng: random.Random, depth: int = 0):
    """A random JSON value: every kind of value, escape and number form json.dumps writes."""
    kind = rng.choice(["obj", "arr", "str", "int", "float", "lit"] if depth < 4 else ["str", "int", "float", "lit"])
    if kind == "obj":
        return {"".join(rng.choices(ALPHABET, k=rng.randint(0, 6))): document(rng, depth + 1)
                for _ in range(rng.randint(0, 4))}
    if kind == "arr":
        return [document(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "str":
        return "".join(rng.choices(ALPHABET + "\U0001f600\x7f", k=rng.randint(0, 8)))
    if kind == "int":
        return rng.choice([0, -1, 7, 10 ** rng.randint(0, 30), -(10 ** rng.randint(0, 30)) + 3])
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-7, 3.0e21, -1.5e300, 123.456])
    return rng.choice([True, False, None])


def dumps(rng: random.Random, doc: dict) -> str:
    indent = rng.choice([None, 0, 2, "\t"])
    seps = rng.choice([None, (",", ":"), (" , ", " : ")])
    text = json.dumps(doc, indent=indent, separators=seps, ensure_ascii=rng.random() < 0.5)
    return rng.choice(["", " ", "\n"]) + text + rng.choice(["", "\n", " \r\n"])


def loads_object(text: str) -> bool:
    """Python's verdict: the text is one JSON object (within the automaton's whitespace and depth bounds)."""
    try:
        doc = json.loads(text, parse_constant=lambda c: 1 / 0)  # NaN/Infinity: Python's extension, not JSON
    except (ValueError, ZeroDivisionError, RecursionError):
        return False
    spaces = re.search(f"[ \t\n\r]{{{MAX_WS + 1}}}", text)
    return isinstance(doc, dict) and not spaces and depth(text) <= MAX_DEPTH


def depth(text: str) -> int:
    d = most = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            d += 1
            most = max(most, d)
        elif ch in "}]":
            d -= 1
    return most


def test_python_json_objects_are_accepted_and_close_only_at_their_end():
    rng = random.Random(0)
    for _ in range(400):
        text = dumps(rng, {"k": document(rng)} if rng.random() < 0.3 else dict(enumerate([document(rng)])))
        data = text.encode()
        close = len(data.rstrip()) - 1  # the object's closing brace (only whitespace after it)
        st = START
        for i, c in enumerate(data):
            st = json_mode.step(st, c)
            assert st is not None, f"{text!r} refused at byte {i}: {data[:i + 1]!r}"
            assert complete(st) == (i >= close), f"{text!r}: complete={complete(st)} after byte {i}"


def test_complete_exactly_where_python_json_reads_an_object():
    """Both ways, over mutations of valid objects (a byte inserted, dropped or replaced): whenever the automaton
    calls the whole text complete, json.loads reads an object; whenever json.loads does, the automaton agrees."""
    rng = random.Random(1)
    agree = refused = 0
    for _ in range(3000):
        text = dumps(rng, {"a": document(rng)})
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) + 1)
            op = rng.random()
            text = text[:i] + (rng.choice(ALPHABET) if op < 0.7 else "") + text[i + (op >= 0.35):]
        ours = complete(advance(START, text.encode()))
        assert ours == loads_object(text), f"{text!r}: automaton {ours}, json.loads {not ours}"
        agree += ours
        refused += not ours
    assert agree > 100 and refused > 1000, (agree, refused)  # both verdicts are exercised


@pytest.mark.parametrize("text", ['[1]', '"a"', '1', '{"a":01}', '{"a" 1}', '{,}', '{"a":1,}', '{"a":tru}',
                                  '{"a":"\x01"}', '{"a":1.}', '{"a":-}', '{"a":1e}', '{"a":"\\x"}', '{"a":1}}',
                                  '{"a":"\\u12g4"}', '{a:1}', "{'a':1}", '{"a":.5}', '{"a":+1}', '{"a":NaN}',
                                  '{"a":1} x', '{"a":[1,]}', '{"a":[,1]}', '{"a":{}]'])
def test_what_no_json_object_starts_with_is_refused(text):
    assert advance(START, text.encode()) is None, text
    assert not loads_object(text), text


def test_whitespace_and_depth_are_bounded():
    assert advance(START, b"{" + b" " * MAX_WS) is not None
    assert advance(START, b"{" + b" " * (MAX_WS + 1)) is None
    assert advance(START, b'{"a":' + b"[" * (MAX_DEPTH - 1)) is not None
    assert advance(START, b'{"a":' + b"[" * MAX_DEPTH) is None


def tokens_of(rng: random.Random) -> list[bytes | None]:
    """A byte-level vocabulary: every single byte, multi-byte pieces of JSON and of prose, and special tokens."""
    vocab: list[bytes | None] = [None, None] + [bytes((b,)) for b in range(256)]
    words = ['{"', '":', '": "', '",', '"}', '}}', '{}', '[]', '},', '],', ' {', '\n  ', '\\n', '\\u00', 'true',
             'false', 'null', 'tru', '0.', '1e', '-0', 'the', ' th', ' t', 'null,', '"\\', '\\"', ' "', '""',
             '\u00e9', ', "']
    vocab += [w.encode() for w in words]
    vocab += ["".join(rng.choices(ALPHABET, k=rng.randint(2, 6))).encode() for _ in range(600)]
    return vocab


def test_masks_are_the_tokens_that_continue_the_state():
    """The trie walk (and the plain-string shortcut) against advancing each token's bytes one by one, in states
    met along real documents; EOS only where the object is closed; special tokens never."""
    rng = random.Random(2)
    vocab = tokens_of(rng)
    eos = [1]
    jv = Vocab(vocab, eos)
    states = {START}
    for _ in range(30):
        st = START
        for c in dumps(rng, {"x": document(rng)}).encode():
            st = json_mode.step(st, c)
            states.add(st)
    states |= {("{", "s", 1), ("{", "S", 3), ("{[", "N", 0), ("{", "N", 5), ("{", "Lrue", 0)}
    for st in states:
        want = {t for t, b in enumerate(vocab) if b and advance(st, b) is not None}
        want |= set(eos) if complete(st) else set()
        got = set(jv.allowed(JSON_OBJECT, st).nonzero().flatten().tolist())
        assert got == want, f"{st}: extra {sorted(got - want)[:5]}, missing {sorted(want - got)[:5]}"
    assert 0 not in set().union(*(set(jv.allowed(JSON_OBJECT, st).nonzero().flatten().tolist()) for st in states))


def run(s: Scheduler, engine, reqs) -> dict[str, tuple[list[int], str]]:
    """(token ids, finish_reason) by request id (conftest.run_all)."""
    return {rid: (a.tokens, a.finish) for rid, a in run_all(s, engine, reqs).items()}


def test_greedy_json_is_the_masked_argmax_of_transformers(engine, hf):
    """The reference masks transformers' logits with each token's bytes advanced one by one (no trie, no cache)."""
    eos = set(engine.cfg.eos_token_ids)
    tok = engine.tokenizer
    vocab = [None if t in tok.special_ids else tok.token_bytes(t) for t in range(tok.vocab_size)]
    prompt = tok.encode("A JSON object:")
    s = Scheduler(engine, max_batch=2, eos_ids=tuple(eos))
    got, finish = run(s, engine, [("json", prompt, Sampling(20, grammar=JSON_OBJECT))])["json"]
    want, st = [], START
    for _ in range(20):
        logits = reference(hf, prompt + want)[-1].clone()
        ok = [t for t in range(logits.numel()) if (t < len(vocab) and vocab[t] and advance(st, vocab[t]))
              or (t in eos and complete(st))]
        masked = torch.full_like(logits, float("-inf"))
        masked[ok] = logits[ok]
        t = int(masked.argmax())
        if t in eos:
            break
        want.append(t)
        st = advance(st, vocab[t])
    assert got == want, (tok.decode(got), tok.decode(want))
    plain = engine.generate([prompt], max_new_tokens=20)[0]
    assert plain[:len(want)] != want, "the grammar changes nothing here: the test cannot fail"


def test_sampled_answers_are_json_objects_or_their_beginnings(engine):
    """Random weights, sampled: an answer that ends is one JSON object; one cut by max_tokens is a prefix of one."""
    s = Scheduler(engine, max_batch=4, eos_ids=tuple(engine.cfg.eos_token_ids))
    prompt = engine.tokenizer.encode("Reply in JSON.")
    got = run(s, engine, [(f"s{i}", prompt, Sampling(300, temperature=1.0, seed=i, grammar=JSON_OBJECT)) for i in range(8)])
    ended = 0
    for rid, (tokens, finish) in got.items():
        text = engine.tokenizer.decode(tokens)
        data = b"".join(s.vocab.bytes[t] for t in tokens)
        if finish == "stop":
            ended += 1
            assert loads_object(text), f"{rid}: {text!r}"
        else:
            assert finish == "length" and advance(START, data) is not None, f"{rid}: {finish} {text!r}"
    assert ended >= 1, "no answer ends: what they end with is not tested"


def test_the_server_answers_json_object(server):
    """Over HTTP (what it refuses with it: tests/serve/test_shaping.py)."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 120,
            "temperature": 1.0, "seed": 3, "n": 3, "response_format": {"type": "json_object"}}
    got, answer = server.request("POST", "/v1/chat/completions", body)
    assert got == 200, answer
    assert len(answer["choices"]) == 3  # one prompt read once, three answers each with its own grammar state
    for choice in answer["choices"]:
        text = choice["message"]["content"]
        ok = loads_object(text) if choice["finish_reason"] == "stop" else advance(START, text.encode()) is not None
        assert ok, (choice["finish_reason"], text)


def test_engine_json_answers_are_the_schedulers(engine):
    """engine.generate(json=True) (the static decode step with a mask a token) against the scheduler's JSON mode,
    which the test above holds to transformers: the same greedy tokens, for a batch of two prompt lengths."""
    prompts = [engine.tokenizer.encode("A JSON object:"), engine.tokenizer.encode("Give me data as JSON, please.")]
    got = engine.generate(prompts, max_new_tokens=24, json=True)
    s = Scheduler(engine, max_batch=2, eos_ids=tuple(engine.cfg.eos_token_ids))
    want = run(s, engine, [(str(i), p, Sampling(24, grammar=JSON_OBJECT)) for i, p in enumerate(prompts)])
    assert got == [want[str(i)][0] for i in range(2)]
    assert got != engine.generate(prompts, max_new_tokens=24), "the grammar changes nothing here"
    with pytest.raises(Exception, match="without ignore_eos"):
        engine.generate(prompts, max_new_tokens=4, json=True, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 2])
def test_engine_json_with_mtp_drafts_gives_the_same_greedy_tokens(engine, k):
    """engine.generate(json=..., speculative="mtp") runs the scheduler's drafting loop (each verified position
    masked as if the drafts before it were accepted): the tokens of JSON decoding without drafts, for an object
    and a schema, a batch of three prompt lengths; the rounds did draft (the stats say how many)."""
    prompts = [engine.tokenizer.encode(t) for t in ("A JSON object:", "Reply in JSON please, with keys", "x")]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
              "required": ["a", "b"]}
    for answer in (True, schema):
        want = engine.generate(prompts, max_new_tokens=30, json=answer)
        got = engine.generate(prompts, max_new_tokens=30, json=answer, speculative="mtp", draft_tokens=k)
        assert got == want, (answer, [engine.tokenizer.decode(t) for t in got],
                             [engine.tokenizer.decode(t) for t in want])
        st = engine.last_stats.extra
        assert st["rounds"] > 0 and st["speculative"] == "mtp" and st["draft_tokens"] == k, st
        assert engine.last_stats.decode_tokens == sum(map(len, got))
    again = engine.generate(prompts, max_new_tokens=30, json=schema, speculative="mtp", draft_tokens=k)
    assert again == want, "a second call on the kept scheduler"


def test_prepare_grammars_builds_the_vocabulary_before_any_request(engine):
    """dsv3 serve calls it at load so the first JSON request does not pause every stream for a pass over the
    vocabulary; the vocabulary it builds is the one requests then mask with (the same bytes per token)."""
    s = Scheduler(engine, max_batch=1, eos_ids=tuple(engine.cfg.eos_token_ids))
    assert s._vocab is None
    s.prepare_grammars()
    assert s._vocab is not None and s.vocab is s._vocab
    ids = engine.tokenizer.encode("A JSON object: {\"a\": 1}")
    assert b"".join(s.vocab.bytes[t] for t in ids).decode() == engine.tokenizer.decode(ids)
