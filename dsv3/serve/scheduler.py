"""Continuous batching over the slot-based step (Transformer.forward_step, DESIGN.md "cache slots").

One thread owns the model. Each request owns a slot (a row of one preallocated latent cache) from
admission to its last token; requests join and leave the running batch between steps. Every
iteration runs at most one prefill forward (a chunk of every prompt still being read, shortest
first, padded to one length) and one decode step over all rows that are generating, so a long
prompt is read a chunk at a time while the running streams keep their pace.

A freed slot keeps its cache entries: a request whose prompt starts with the tokens a free slot holds (the next
turn of a conversation, the same few-shot context) takes that slot and reads only the rest (`prefix_cache`).

Answers of one prompt (OpenAI's `n`) share it: the first reads it, the others take a copy of its cache entries
and sample from its logits there (`Request.leader`).

With `speculative="mtp"` the decode step verifies drafts of the MTP module instead (speculation.py).
While drafting does not pay (drafting.py) the steps are probes: plain steps whose drafts are only scored.

Under tensor parallel, rank 0 schedules and every rank runs the same forwards (runner.py).
"""

from __future__ import annotations

import codecs
import heapq
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.errors import DsvError
from ..core.generate import sample
from ..core.model import LatentCache
from . import masks, tools
from .logprobs import entries, logprob_entries
from .runner import DECODE, PREFILL, PREFILL_SCORED, StepRunner
from .speculation import Drafting
from .text import TextStream

log = logging.getLogger("dsv3")

#: an idle rank 0 still broadcasts this often, so followers never hit the process group's timeout
HEARTBEAT_S = 5.0


def _common_prefix(a, b, limit: int) -> int:
    """How many leading tokens a and b share, at most `limit` (a binary search on slice equality, which runs in C)."""
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller answers 429."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # each new token's log-probability and this many alternatives (None: none)
    prompt_logprobs: bool = False  # also every prompt token's (the completions API's `echo` with `logprobs`)
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before sampling
    presence_penalty: float = 0.0  # subtracted once from the logit of each token already in the answer
    frequency_penalty: float = 0.0  # subtracted from a token's logit per time it is already in the answer
    min_tokens: int = 0  # EOS, stop ids and stop strings cannot end the answer before it has this many tokens
    ignore_eos: bool = False  # EOS does not end the answer (fixed-length runs of load testers)
    #: what the answer's tokens must spell: json_mode.JSON_OBJECT (response_format json_object), a
    #: schema.JsonSchema (json_schema), a tools.ToolGrammar (tools), or None; masks.py masks the rest before sampling
    grammar: object | None = None

    @property
    def shapes(self) -> bool:
        """The logits are changed before sampling (logprobs still report the model's own)."""
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty) \
            or self.min_tokens > 0 or self.grammar is not None


@dataclass(eq=False)  # a request is itself, not its fields' values: `in`, `remove` and sets go by identity
class Request:
    """One generation. `emit(kind, data)` receives ("text", (text, token_ids, logprobs)) events, then ("done",
    finish_reason) or ("error", message), through the scheduler's `deliver` (by default: called from the model
    thread). With `params.logprobs`, each token's entry in `logprobs` is (token id, log-probability, [(id,
    log-probability)] of the most likely tokens), else it is None; with `params.prompt_logprobs`, ("prompt",
    entries) events come first, one per prefill chunk, the prompt's first token's entry (id, None, None). An answer
    that calls tools sends ("tool_delta", [(call index, its name the first time else None, arguments text)]) as the
    calls are written (a stream's deltas; their texts add up to the arguments) and ("tools", calls) before "done".
    Log-probabilities are the model's (log-softmax of its logits), whatever the sampling temperature."""

    id: str
    prompt: list[int]
    params: Sampling
    emit: Callable[[str, object], None]
    text: TextStream
    arrived: float = field(default_factory=time.perf_counter)
    slot: int = -1
    length: int = 0  # entries of its slot holding this request's tokens
    last: int = -1  # the token sampled last, fed at position `length` by the next decode step
    generated: int = 0
    first_token_at: float | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    draft_logits: torch.Tensor | None = None  # speculative: the MTP module's logits [V] for the token after `last`
    draft_h: torch.Tensor | None = None  # ... and its block's output there [D] (chains a further draft)
    # probe steps' (main hidden [D], next token) pairs the MTP cache has not caught up on, from position pending_at
    pending: list = field(default_factory=list)
    pending_at: int = 0
    #: a request with the same prompt, submitted before this one (another of OpenAI's n answers): its prompt is read
    #: once, and this request takes a copy of its cache entries and samples from its logits after the prompt
    leader: "Request | None" = None
    shared: bool = False  # some request names this one its leader: keep prefix_logits
    prefix_logits: torch.Tensor | None = None  # [V]: after the prompt, while forks may still take it
    prefix_hidden: torch.Tensor | None = None  # [D]: the final hidden there (drafting: each fork's MTP entry)
    counts: torch.Tensor | None = None  # [V]: each token's count in the answer so far (presence/frequency penalties)
    out: list[int] = field(default_factory=list)  # the answer's tokens so far (what its slot holds after the prompt)
    reused: int = 0  # prompt tokens found in its slot's cache entries at admission (not read again)
    grammar_state: tuple | None = None  # params.grammar: where the answer so far stands in it (None: broken)
    calls_at: int = -1  # tools: where in `out` the tool calls begin (their tokens are markup, not text)
    call_at: int = -1  # tools: where in `out` the call being written begins (its separator token)
    calls_sent: dict = field(default_factory=dict)  # per call named, by call_at: [index, UTF-8 decoder, bytes sent]

    def __post_init__(self):
        if self.params.grammar is not None:
            self.grammar_state = self.params.grammar.start

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt)


class Scheduler:
    """Slots, the waiting queue and the model loop (a thread, `start`)."""

    def __init__(self, engine, max_batch: int = 8, max_waiting: int = 64, prefill_chunk: int = 128,
                 eos_ids: tuple[int, ...] = (), speculative: str | None = None, draft_tokens: int = 1,
                 prefix_cache: bool = True):
        self.engine, self.model = engine, engine.model
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.max_len = self.model.max_seq_len
        self.eos_ids = frozenset(eos_ids)
        model = self.model
        # one slot per request, and a scratch slot (the last) for the padding rows of a decode step's batch bucket
        self.cache = LatentCache.allocate(model.cfg, len(model.layers), max_batch + 1, self.max_len, engine.dtype,
                                          model.rope_cos.device)
        self.runner = StepRunner(model, self.cache, graphs=engine.cuda_graphs)
        if speculative is not None and speculative != "mtp":
            raise DsvError(f"--speculative {speculative}: the one drafter is 'mtp' (the checkpoint's MTP layer)")
        #: MTP drafting in the decode step (--speculative mtp: speculation.py), or None
        self.spec = Drafting(self, draft_tokens) if speculative is not None else None
        self.free = list(range(max_batch))  # a heap: the lowest slot first, so the batch is mostly a prefix
        # free slot -> the tokens its cache entries [0, n) hold (prefix_cache; with drafting, the MTP cache's
        # entries [0, n) too: each pairs the main model's hidden at t with token t + 1)
        self.held: dict[int, list[int]] | None = {} if prefix_cache else None
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.pending = 0  # requests submitted and not yet admitted (inbox + waiting)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.thread: threading.Thread | None = None
        self.running = False
        self.error: BaseException | None = None
        self.observe = None  # metrics hook: observe(event, value)
        self._outbox: list = []
        #: deliver(list of (request, kind, data)): how events leave the model thread (the app posts them to its loop)
        self.deliver = self.deliver_here
        self.step_time = 0.0  # the last decode step, seconds
        self._vocab: masks.Vocab | None = None
        #: the tokenizer's tool-call markers (tools.marker_ids), or None where it has none
        self.tool_ids = tools.marker_ids(engine.tokenizer) if engine.tokenizer is not None else None

    def prepare_grammars(self) -> None:
        """Build the grammar vocabulary now (`dsv3 serve` at load), not in the model loop at the first JSON or tools
        request, where its pass over every token (~1 s on a 129k vocabulary) would pause every stream."""
        if self.engine.tokenizer is not None:
            self.vocab  # noqa: B018 (the property builds it)

    @property
    def vocab(self) -> masks.Vocab:
        """The vocabulary as grammars mask it (built at the first request that asks, unless prepare_grammars ran:
        a pass over every token)."""
        if self._vocab is None:
            if self.engine.tokenizer is None:
                raise DsvError("JSON mode and tools need the checkpoint's tokenizer (tokenizer.json) to know each "
                               "token's text")
            self._vocab = masks.Vocab.of(self.engine.tokenizer, self.eos_ids, self.model.cfg.vocab_size,
                                         self.model.rope_cos.device, (self.tool_ids or {}).values())
        return self._vocab

    # ---- the caller's side (any thread) ------------------------------------------------------
    def submit(self, *reqs: Request) -> None:
        """Queue requests, all or none (the answers of one HTTP request: QueueFull when they do not all fit)."""
        if self.error is not None:  # the model loop has died: nothing would ever take the request
            raise DsvError(f"the model loop failed ({type(self.error).__name__}: {self.error}); restart the server")
        with self._lock:
            if self.pending + len(reqs) > self.max_waiting:
                more = f" and {len(reqs)} more asked" if len(reqs) > 1 else ""
                raise QueueFull(f"{self.pending} requests are waiting{more} (the bound is --max-waiting "
                                f"{self.max_waiting})")
            self.pending += len(reqs)
        for req in reqs:
            if req.leader is not None and (req.params.prompt_logprobs or req.leader.prompt != req.prompt):
                req.leader = None  # the prompt's own logprobs would need a prefill of its own
            if req.leader is not None:
                req.leader.shared = True
            if req.params.seed is not None:
                req.generator = torch.Generator().manual_seed(req.params.seed)
            self.inbox.put(req)
        self._wake.set()

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # the model thread frees its slot before the next step
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self.running

    def run(self) -> None:
        """The model loop, in the calling thread, until `shutdown` (or Ctrl-C there). Call it from the main thread:
        torch's OpenMP regions started from another thread run several times slower (measured: a decode step of
        the 280M model at batch 16 takes 2.5x as long), so `dsv3 serve` runs HTTP in a thread instead."""
        self.running = True
        try:
            self._loop()
        finally:
            self.running = False

    def complete(self, *reqs: Request) -> None:
        """Submit reqs and run the model loop in the calling thread until the scheduler is idle again: the way
        engine.generate reaches what only the scheduler does (JSON answers with MTP drafting). One process (a
        tensor-parallel scheduler's followers would wait for `run`'s plans); an error raises here."""
        if self.model.par.world_size > 1:
            raise DsvError("Scheduler.complete runs on one process; under tensor parallel use `dsv3 serve`")
        self.submit(*reqs)
        self._admit()
        while self.active:
            self._step()
            self._admit()

    def start(self) -> None:
        """The model loop in a thread (embedding, tests): simpler, but see `run` for the cost."""
        self.running = True
        self.thread = threading.Thread(target=self.run, name="dsv3-scheduler", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def stats(self) -> dict:
        return {"running": len(self.active), "waiting": self.pending, "slots_used": self.max_batch - len(self.free)}

    # ---- the model thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        last_beat = time.monotonic()
        try:
            while not self._stop:
                self._admit()
                if not self.active:
                    self._wake.wait(timeout=HEARTBEAT_S / 2)
                    self._wake.clear()
                    if time.monotonic() - last_beat > HEARTBEAT_S:
                        self.runner.idle()
                        last_beat = time.monotonic()
                    continue
                self._step()
                last_beat = time.monotonic()
        except KeyboardInterrupt:
            self._fail_all("the server is shutting down")
            raise
        except BaseException as e:  # the model failed: every open request gets the error, the server reports unhealthy
            self.error = e
            log.exception("the model loop failed")
            self._fail_all(f"the model failed: {type(e).__name__}: {e}")
        finally:
            self.runner.stop()

    def _step(self) -> None:
        """One iteration of the admitted requests: prefill chunks, then a decode step, events handed over after each."""
        self._prefill()
        self._flush()  # first tokens leave now, not after the decode step below (+1 step to each TTFT)
        self._decode()
        self._flush()

    def _send(self, r: Request, kind: str, data) -> None:
        self._outbox.append((r, kind, data))

    def _flush(self) -> None:
        """Everything one iteration produced, handed over at once (the HTTP side wakes once per step, not per token)."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.deliver(batch)

    @staticmethod
    def deliver_here(batch: list) -> None:
        for r, kind, data in batch:
            r.emit(kind, data)

    def _fail_all(self, message: str) -> None:
        for r in self.active + list(self.waiting):
            self._send(r, "error", message)
        while True:
            try:
                self._send(self.inbox.get_nowait(), "error", message)
            except queue.Empty:
                break
        self._flush()

    def _admit(self) -> None:
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for r in [r for r in self.active if r.cancelled]:
            self._finish(r, None)
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft()
            with self._lock:
                self.pending -= 1
        while self.waiting and self.free:
            r = self.waiting.popleft()
            with self._lock:
                self.pending -= 1
            if r.cancelled:
                continue
            r.slot = self._slot_for(r)
            self.active.append(r)

    def _slot_for(self, r: Request) -> int:
        """A free slot for r: the one whose cache entries hold the longest start of its prompt (all but the prompt's
        last token at most: its logits are needed; where that slot holds more, a copy of the shared part in another
        free slot), else the free slot holding the least (the lowest of the empty ones)."""
        held, best, shared = self.held, None, 0
        if held and r.leader is None and not r.params.prompt_logprobs:  # forks copy; a scored prompt reads it all
            for slot in self.free:
                n = _common_prefix(held.get(slot, []), r.prompt, len(r.prompt) - 1)
                if n > shared:
                    best, shared = slot, n
        # drafting: the MTP cache's entry n - 1 pairs the hidden at n - 1 with token n, which r may not share: that
        # position is read again (it rewrites the main entry with the same values)
        hit = shared - 1 if self.spec is not None else shared
        if hit <= 0:
            best = None
        if best is None and held:  # a slot holding nothing (the lowest), else the least: keep histories for their turns
            slot = min(self.free, key=lambda f: (len(held.get(f, [])), f))
            self.free.remove(slot)
            heapq.heapify(self.free)
        elif best is None:
            slot = heapq.heappop(self.free)
        else:
            slot = best
            if shared < len(held[best]) and len(self.free) > 1:
                # the slot holds more than r shares (another branch of a conversation, a longer few-shot prompt):
                # keep it for a later request and copy the shared entries to the free slot holding the least
                slot = min((f for f in self.free if f != best), key=lambda f: len(held.get(f, [])))
                self.runner.copy(best, [slot], hit)
            self.free.remove(slot)
            heapq.heapify(self.free)
            r.length = r.reused = hit
            if self.observe:
                self.observe("reused", hit)
        if held is not None:
            held.pop(slot, None)  # its entries are r's from now on
        return slot

    def _finish(self, r: Request, reason: str | None) -> None:
        """Free the slot (entries past a slot's length are never read, so nothing is erased: with prefix_cache a
        later request may start from them)."""
        self.active.remove(r)
        if self.held is not None:  # what [0, length) holds: each token fed so far (the MTP cache: to pending_at)
            self.held[r.slot] = (r.prompt + r.out)[:r.pending_at if r.pending else r.length]
        heapq.heappush(self.free, r.slot)
        r.slot = -1
        r.prefix_logits = r.prefix_hidden = r.leader = None
        if reason is not None:
            rest = r.text.finish()
            if rest:
                self._send(r, "text", (rest, [], [] if r.params.logprobs is not None else None))
            self._send(r, "done", reason)
        if self.observe:  # a cancelled request's tokens were generated too (its latency is no answer's)
            self.observe("finished" if reason is not None else "cancelled", r)

    def _waits(self, r: Request) -> bool:
        """A fork whose leader is still reading the shared prompt (a leader that left: the fork reads it itself)."""
        lead = r.leader
        return lead is not None and r.length == 0 and lead.slot >= 0 and not lead.cancelled and lead.prefilling

    def _fork(self) -> None:
        """Forks whose leader has read the prompt take its cache entries (one copy per slot, on every rank) and
        sample their first token from its logits there, each with its own generator."""
        forks = [r for r in self.active if r.leader is not None and r.length == 0 and not r.cancelled
                 and r.leader.prefix_logits is not None]
        if not forks:
            return
        for lead in {id(f.leader): f.leader for f in forks}.values():
            self.runner.copy(lead.slot, [f.slot for f in forks if f.leader is lead], len(lead.prompt))
        logits = torch.stack([f.leader.prefix_logits for f in forks])  # [n, V]
        hidden = [f.leader.prefix_hidden for f in forks]
        for f in forks:
            f.length, f.leader = len(f.prompt), None
            f.reused = f.length  # none of it read (usage counts the prompt once, from its leader)
        go = [i for i, f in enumerate(forks) if f.params.max_tokens > 0]
        if go:
            self._sample(logits[go], [forks[i] for i in go])
        for f in forks:
            if f.params.max_tokens == 0:
                self._finish(f, "length")
        if self.spec is not None:  # each fork's MTP entry at the prompt's last position: its own first token
            alive = [i for i, f in enumerate(forks) if f.slot >= 0]
            if alive:
                self.spec.forked([forks[i] for i in alive], torch.stack([hidden[i] for i in alive]))

    def _prefill(self) -> None:
        self._fork()  # forks admitted after their leader read the prompt
        todo = sorted((r for r in self.active if r.prefilling and not r.cancelled and not self._waits(r)),
                      key=lambda r: len(r.prompt) - r.length)  # shortest remaining first: short prompts are not stuck
        if not todo:
            return
        # One forward for every prompt being read. When all of them end within a chunk, pad to the longest and finish
        # them together (a forward costs about the same for a few more tokens; fewer forwards, and the rows start
        # decoding in one batch). Otherwise q = the shortest rest (at most a chunk) for every row: no padding, and a
        # short prompt arriving during a long one is done in the next small forward, not after the long one.
        rests = [len(r.prompt) - r.length for r in todo]
        q = max(rests) if max(rests) <= self.prefill_chunk else min(self.prefill_chunk, rests[0])
        if any(r.length + q > self.max_len for r in todo):  # padding would run past a slot's end
            q = min(self.prefill_chunk, rests[0])
        rows = todo
        tokens = [r.prompt[r.length:r.length + q] for r in rows]
        take = [len(t) - 1 for t in tokens]
        tokens = [t + [0] * (q - len(t)) for t in tokens]
        slots, starts = [r.slot for r in rows], [r.length for r in rows]
        score, every = [r.params.prompt_logprobs for r in rows], None  # every [b, q, V]: the scored rows' logits
        if self.spec is None and any(score):
            logits, every = self.runner.forward(PREFILL_SCORED, slots, tokens, starts, take, score)
        elif self.spec is None:
            logits = self.runner.forward(PREFILL, slots, tokens, starts, take)
        else:
            logits, hidden, every = self.runner.forward_hidden(slots, tokens, starts, take, score)  # hidden [B, q, D]
        if every is not None:
            self._prompt_logprobs([(r, at, t) for r, at, t, sc in zip(rows, starts, take, score) if sc], every)
        for r, t in zip(rows, take):
            r.length += t + 1
        for i, r in enumerate(rows):
            if r.shared and not r.prefilling:
                r.prefix_logits = logits[i].clone()
                if self.spec is not None:
                    r.prefix_hidden = hidden[i, take[i]].clone()
        if self.spec is None:  # before the leaders sample: one that ends at its first token frees its slot (drafting:
            self._fork()  # at the next iteration's start, after the MTP module has read the leaders' prompts)
        done = [(i, r) for i, r in enumerate(rows) if not r.prefilling and r.params.max_tokens > 0]
        if done:
            self._sample(logits[[i for i, _ in done]], [r for _, r in done])
        if self.spec is not None:
            self.spec.prefilled(rows, slots, starts, take, hidden)
        for r in rows:
            if not r.prefilling and r.params.max_tokens == 0:  # echo of a prompt being scored: nothing to generate
                self._finish(r, "length")

    def _prompt_logprobs(self, scored: list[tuple[Request, int, int]], every: torch.Tensor) -> None:
        """("prompt", entries) for the rows that asked, (request, chunk start, take) each, every [b, q, V] their
        logits at each position of the chunk: position j of a chunk scores the prompt's token j + 1."""
        for i, (r, start, t) in enumerate(scored):
            n = min(t + 1, len(r.prompt) - 1 - start)  # the chunk's last position scores a new token, not the prompt's
            out = [(r.prompt[0], None, None)] if start == 0 else []
            if n > 0:
                out += logprob_entries(every[i, :n], r.prompt[start + 1:start + 1 + n], r.params.logprobs or 0)
            self._send(r, "prompt", out)

    def _decode(self) -> None:
        rows = [r for r in self.active if not r.prefilling and not r.cancelled and r.last >= 0]
        if not rows:
            return
        rows.sort(key=lambda r: r.slot)
        if self.spec is not None:
            return self.spec.decode(rows)
        t0 = time.perf_counter()
        logits = self.runner.forward(DECODE, [r.slot for r in rows], [[r.last] for r in rows],
                                     [r.length for r in rows], [0] * len(rows))
        for r in rows:
            r.length += 1
        self._sample(logits, rows)
        self.step_time = time.perf_counter() - t0
        if self.observe:
            self.observe("step", (len(rows), self.step_time))

    def shape(self, r: Request, row: torch.Tensor, ahead: list[int] | tuple = ()) -> torch.Tensor:
        """Request r's logits row [V] (fp32, changed in place) as it samples its next token after its answer so far
        and `ahead` (drafts taken as accepted): its logit_bias added, presence and frequency penalties subtracted
        (OpenAI's formula over the answer's tokens), EOS and stop ids masked before min_tokens."""
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=row.device)
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=row.device))
        if p.presence_penalty or p.frequency_penalty:
            counts = r.counts
            if ahead:
                counts = counts.clone() if counts is not None else torch.zeros_like(row)
                counts.index_add_(0, torch.tensor(list(ahead), device=row.device), torch.ones(len(ahead), device=row.device))
            if counts is not None:
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if r.generated + len(ahead) < p.min_tokens:
            ends = sorted(p.stop_ids | (frozenset() if p.ignore_eos else self.eos_ids))
            row[torch.tensor(ends, dtype=torch.long, device=row.device)] = float("-inf")
        if p.grammar is not None:
            vocab, state = self.vocab, r.grammar_state
            for t in ahead:
                state = vocab.advance(p.grammar, state, t)
            if state is not None:  # None: a draft before this position broke the grammar, so this one is never used
                row.masked_fill_(~vocab.allowed(p.grammar, state), float("-inf"))
        return row

    def _shaped(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """logits [n, V] as the rows' requests sample from them (`shape`); the model's own where no row asks (no
        copy)."""
        asked = [i for i, r in enumerate(rows) if r.params.shapes]
        if not asked:
            return logits
        out = logits.float().clone()
        for i in asked:
            self.shape(rows[i], out[i])
        return out

    def choose(self, logits: torch.Tensor, rows: list[Request]) -> tuple[list[int], dict[int, tuple]]:
        """The rows' next tokens from logits [n, V] (shaped, at each row's temperature and top_p, from its
        generator) and the logprob entries of the rows that asked ({row index: entry})."""
        shaped = self._shaped(logits, rows)
        greedy = shaped.argmax(dim=-1).tolist()
        toks = [greedy[i] if r.params.temperature <= 0 else
                int(sample(shaped[i:i + 1], r.params.temperature, r.params.top_p, r.generator))
                for i, r in enumerate(rows)]
        return toks, entries(logits, [(i, i, toks[i], r.params.logprobs) for i, r in enumerate(rows)
                                      if r.params.logprobs is not None])

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> None:
        toks, lps = self.choose(logits, rows)
        now = time.perf_counter()
        for i, r in enumerate(rows):
            self.emit(r, toks[i], now, lps.get(i))

    def emit(self, r: Request, tok: int, now: float, logprob: tuple | None = None) -> bool:
        """Request r's next token (and its logprob entry, where asked): streamed, or the end of it (EOS, a stop,
        max_tokens, the context). True: finished."""
        p = r.params
        if r.first_token_at is None:
            r.first_token_at = now
            if self.observe:
                self.observe("first_token", r)
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_ids:
            if p.logprobs is not None:  # its logprob still counts (a scorer reads one entry per token it caused)
                self._send(r, "text", ("", [], [logprob]))
            self._end(r, "stop")
            return True
        r.generated += 1
        r.last = tok
        r.out.append(tok)
        if p.grammar is not None and r.grammar_state is not None:
            r.grammar_state = self.vocab.advance(p.grammar, r.grammar_state, tok)
            if r.calls_at < 0 and isinstance(p.grammar, tools.ToolGrammar) and r.grammar_state is not None \
                    and not p.grammar.free(r.grammar_state):
                r.calls_at = len(r.out) - 1
        if r.calls_at >= 0:  # tool-call markup: read back at the end (tools.calls), never text nor a stop string
            self._send(r, "text", ("", [tok], None if p.logprobs is None else [logprob]))
            self._send_call_progress(r)
            if r.generated >= p.max_tokens or r.length + 1 > self.max_len:
                self._end(r, "length")
                return True
            return False
        if p.presence_penalty or p.frequency_penalty:  # how often each token is in the answer so far
            if r.counts is None:
                r.counts = torch.zeros(self.model.cfg.vocab_size, device=self.model.rope_cos.device)
            r.counts[tok] += 1
        text, stopped = r.text.add(tok, may_stop=r.generated >= p.min_tokens)
        if text or not stopped:
            self._send(r, "text", (text, [tok], None if p.logprobs is None else [logprob]))
        if stopped:
            self._finish(r, "stop")
        elif r.generated >= p.max_tokens or r.length + 1 > self.max_len:
            self._finish(r, "length")
        else:
            return False
        return True

    def _send_call_progress(self, r: Request) -> None:
        """("tool_delta", ...): what the call being written has gained with this token (its name the first time,
        then argument text). Only that call is read again (tools.progress): the ones before it were sent whole."""
        if r.out[-1] == self.tool_ids[tools.SEP]:
            r.call_at = len(r.out) - 1
        if r.call_at < 0:
            return
        for name, args in tools.progress(r.out[r.call_at:], self.vocab.bytes, self.tool_ids):  # (at most one)
            new = r.call_at not in r.calls_sent
            if new:
                r.calls_sent[r.call_at] = [len(r.calls_sent), codecs.getincrementaldecoder("utf-8")("replace"), 0]
            j, decoder, sent = r.calls_sent[r.call_at]
            text = decoder.decode(args[sent:])  # (a character split between tokens waits for its last byte)
            r.calls_sent[r.call_at][2] = len(args)
            if new or text:
                self._send(r, "tool_delta", [(j, name if new else None, text)])

    def _end(self, r: Request, reason: str) -> None:
        """Finish r; an answer that called tools first sends ("tools", [{name, arguments}]) and ends with
        "tool_calls" (or "length" where max_tokens cut it: its complete calls still come)."""
        if r.calls_at >= 0:
            found = tools.calls(r.out[r.calls_at:], self.vocab.bytes, self.tool_ids)
            self._send(r, "tools", found)
            reason = "tool_calls" if reason == "stop" and found else reason
        self._finish(r, reason)
