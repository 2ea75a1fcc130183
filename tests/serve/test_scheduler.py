"""The scheduler without HTTP: chunked prefill interleaves, and what it computes is each prompt alone."""

from __future__ import annotations

import threading
import time

from dsv3.serve.scheduler import QueueFull, Request, Sampling, Scheduler
from dsv3.serve.text import TextStream


def make(engine, prompt, max_tokens, done):
    """A request whose emitted token ids collect in .tokens; done is released when it ends."""
    tokens = []

    def emit(kind, data):
        if kind == "text":
            tokens.extend(data[1])
        elif kind in ("done", "error"):
            done.release()
    r = Request(str(len(prompt)), prompt, Sampling(max_tokens), emit, TextStream(engine.tokenizer.decode))
    r.tokens = tokens
    return r


def test_a_short_prompt_is_not_stuck_behind_a_long_one(engine):
    s = Scheduler(engine, max_batch=4, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids))
    s.start()
    try:
        done = threading.Semaphore(0)
        long_prompt = [(7 * i) % 500 + 1 for i in range(400)]  # 25 chunks of 16
        short = [3, 1, 4, 1, 5]
        a = make(engine, long_prompt, 6, done)
        s.submit(a)
        while a.length == 0:  # its prefill has begun
            time.sleep(0.001)
        b = make(engine, short, 6, done)
        s.submit(b)
        done.acquire()
        done.acquire()
        assert b.first_token_at < a.first_token_at, "the short request waited for the whole long prefill"
        assert a.tokens == engine.generate([long_prompt], max_new_tokens=6)[0]  # 25 chunks, one answer
        assert b.tokens == engine.generate([short], max_new_tokens=6)[0]
        assert s.stats() == {"running": 0, "waiting": 0, "slots_used": 0}
    finally:
        s.shutdown()


def test_the_waiting_queue_is_bounded(engine):
    s = Scheduler(engine, max_batch=1, max_waiting=2)  # not started: nothing leaves the queue
    for i in range(2):
        s.submit(Request(str(i), [1, 2], Sampling(4), lambda *a: None, TextStream(engine.tokenizer.decode)))
    try:
        s.submit(Request("x", [1, 2], Sampling(4), lambda *a: None, TextStream(engine.tokenizer.decode)))
    except QueueFull as e:
        assert "--max-waiting 2" in str(e)
    else:
        raise AssertionError("a third request was queued past --max-waiting 2")
