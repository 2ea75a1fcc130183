"""Incremental detokenization and stop strings, against a decode that is not token-by-token additive."""

from __future__ import annotations

import random

from dsv3.serve.text import TextStream

# token i decodes to a fixed byte string; a multi-byte character is split over tokens, as byte-level BPE does
BYTES = {i: bytes([97 + i]) for i in range(26)} | {100: "é".encode()[:1], 101: "é".encode()[1:], 102: b" ", 103: b"\n"}


def decode(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def run(tokens, stops):
    s, out, stopped = TextStream(decode, stops), [], False
    for t in tokens:
        piece, stopped = s.add(t)
        out.append(piece)
        if stopped:
            break
    if not stopped:
        out.append(s.finish())
    return "".join(out), stopped, out


def test_split_characters_wait_for_their_rest():
    text, _, pieces = run([0, 100, 101, 1], ())
    assert text == "aéb" and "\ufffd" not in "".join(pieces)
    assert pieces[1] == ""  # half a character is never sent


def test_stop_text_is_never_sent_even_across_tokens():
    text, stopped, pieces = run([0, 1, 2, 3, 4, 5], ("cde",))
    assert (text, stopped) == ("ab", True)
    assert "c" not in "".join(pieces)


def test_held_text_is_released_when_the_stop_does_not_come():
    text, stopped, pieces = run([0, 2, 3, 5, 6], ("cdx",))
    assert (text, stopped) == ("acdfg", False)
    assert pieces[1] == "" and pieces[2] == ""  # "c", "cd" held: they might begin the stop


def test_random_streams_equal_the_whole_decode_cut_at_the_first_stop():
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.choice(list(BYTES)) for _ in range(rng.randrange(1, 60))]
        whole = decode(tokens)
        stops = tuple({whole[i:i + rng.randrange(1, 4)] for i in [rng.randrange(len(whole))]} | {"zzq"})
        text, stopped, _ = run(tokens, stops)
        cuts = [whole.find(s) for s in stops if s and whole.find(s) >= 0 and "\ufffd" not in s]
        want = whole[:min(cuts)] if cuts else whole
        if "\ufffd" in want or any("\ufffd" in s for s in stops):
            continue  # a stop inside a still-incomplete character is not defined
        assert text == want, (tokens, stops)
