"""Incremental detokenization and stop strings, against a decode that is not token-by-token additive."""

from __future__ import annotations

import random

from dsv3.serve.text import TextStream

# token i decodes to a fixed byte string; a multi-byte character is split over tokens, as byte-level BPE does
BYTES = {i: bytes([97 + i]) for i in range(26)} | {100: "é".encode()[:1], 101: "é".encode()[1:], 102: b" ", 103: b"\n"}


def decode(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def run(tokens, stops, min_tokens=0):
    """The stream's pieces joined, whether it stopped, and the pieces; stops count from token min_tokens on."""
    s, out, stopped = TextStream(decode, stops), [], False
    for n, t in enumerate(tokens, 1):
        piece, stopped = s.add(t, may_stop=n >= min_tokens)
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


def test_stops_before_min_tokens_do_not_end_the_answer():
    # "c" is the stop; it comes at token 3 and token 6; min_tokens 4 lets only the second one end it
    text, stopped, pieces = run([0, 1, 2, 3, 4, 2, 5], ("c",), 4)
    assert (text, stopped) == ("abcde", True)
    assert pieces[:3] == ["a", "b", "c"]  # nothing held while no stop can end the answer


def test_a_stop_straddling_the_min_tokens_boundary_does_not_take_back_sent_text():
    # "bc" begins in token 2 (sent before stops counted) and ends in token 3: it does not end the answer
    text, stopped, _ = run([0, 1, 2, 3], ("bc",), 3)
    assert (text, stopped) == ("abcd", False)


def test_random_streams_with_min_tokens_cut_at_the_first_stop_after_the_floor():
    """The independent rule: the text of the first min_tokens - 1 tokens is sent as it comes; the answer ends at
    the first stop string that begins after it."""
    rng = random.Random(1)
    for _ in range(300):
        tokens = [rng.choice(list(BYTES)) for _ in range(rng.randrange(1, 60))]
        whole = decode(tokens)
        stops = tuple({whole[i:i + rng.randrange(1, 4)] for i in [rng.randrange(len(whole))]} | {"zzq"})
        m = rng.randrange(0, len(tokens) + 2)
        floor_text = decode(tokens[:max(m - 1, 0)])
        floor = len(floor_text) - floor_text.endswith("\ufffd")
        text, stopped, _ = run(tokens, stops, m)
        cuts = [whole.find(s, floor) for s in stops if s and whole.find(s, floor) >= 0]
        want = whole[:min(cuts)] if cuts else whole
        if "\ufffd" in want or any("\ufffd" in s for s in stops):
            continue  # a stop inside a still-incomplete character is not defined
        assert text == want, (tokens, stops, m)
        assert stopped == bool(cuts)
