"""The forwards the scheduler (serve/scheduler.py) asks for, run on every rank: under tensor parallel rank 0
broadcasts each step's plan (slots, tokens, positions) and the other ranks follow (`StepRunner.follow`)."""

from __future__ import annotations

import torch

from ..core.generate import StaticStep, bucket
from ..core.model import LatentCache, Transformer
from ..core.rounds import greedy_round

#: plan kinds broadcast to follower ranks (PREFILL_SCORED: a prefill chunk some of whose rows, a prompt being scored
#: for its logprobs, also want logits at every position)
#: (COPY: cache entries copied from one slot to others, the prompt a request shares with its siblings, OpenAI's n)
#: (HIDDEN, VERIFY, ROUND, MTP: the steps of MTP drafting, speculation.py)
STOP, IDLE, PREFILL, DECODE, PREFILL_SCORED, COPY, HIDDEN, VERIFY, ROUND, MTP = range(10)


class StepRunner:
    """The forwards of the server. On rank 0 each call first broadcasts its plan; followers replay them.

    The steps of a decode round (one token per row; with drafting, the verify step and the MTP module's) run as
    static steps, one per (kind, batch bucket, q), captured where the backend can (a graph on cuda/rocm, a recorded
    step on the cpu; with graphs off, the same steps eagerly) and replayed: slots, positions and tokens are staged
    into the step's buffers, the span is the whole cache (attention reads each row's own length), and a bucket's
    padding rows write to a scratch slot, the cache's last, which no request owns. Prefill chunks run eagerly (their
    q varies)."""

    def __init__(self, model: Transformer, cache: LatentCache, graphs: bool = True):
        self.model, self.cache, self.par = model, cache, model.par
        self.mtp_cache: LatentCache | None = None  # the MTP module's, set by a scheduler that drafts
        self.device = model.rope_cos.device
        self.scratch = cache.kv.shape[1] - 1
        # single rank only: a rank whose capture failed would run eagerly while the others replay (as generate()).
        # Where steps can be captured, the decode round runs the static steps (a bucket's rows, the whole cache as
        # span) whether captured or not: --no-cuda-graphs then runs the very steps a graph holds, eagerly, and gives
        # their tokens (a padded bucket's row count can change the kernel: AMX tiles from 5 rows on a CPU)
        self.static_shapes = model.kernels.can_capture() and model.par.world_size == 1
        self.graphs = graphs and self.static_shapes
        self.static: dict[tuple[str, int, int], StaticStep] = {}  # by (kind, batch bucket, q)

    def _broadcast(self, kind: int, data: torch.Tensor | None = None) -> None:
        if self.par.world_size == 1:
            return
        header = torch.tensor([kind, *(data.shape if data is not None else (0, 0))], dtype=torch.long)
        self.par.broadcast(header.to(self.device))
        if data is not None:
            self.par.broadcast(data.to(self.device))

    def idle(self) -> None:
        self._broadcast(IDLE)

    def stop(self) -> None:
        self._broadcast(STOP)

    @torch.inference_mode()
    def forward(self, kind: int, slots: list[int], tokens: list[list[int]], positions: list[int],
                take: list[int], score: list[bool] | None = None):
        """Rows b: tokens[b] (one length q) written to slot slots[b] from positions[b]; logits [B, V] at take[b].
        PREFILL_SCORED: (those logits, and [b, q, V] at every position of the b rows whose `score` is set, in row
        order), for a prompt's logprobs: the output head runs at every position of those rows only."""
        _live(slots)
        score = score or [False] * len(slots)
        plan = torch.tensor([[s, p, t, int(sc), *row] for s, p, t, sc, row in zip(slots, positions, take, score, tokens)],
                            dtype=torch.long)
        self._broadcast(kind, plan)
        return self._run(plan.to(self.device), scored=kind == PREFILL_SCORED)

    @torch.inference_mode()
    def copy(self, src: int, dsts: list[int], length: int) -> None:
        """Entries [0, length) of slot src into slots dsts, every layer, the MTP module's cache too where it drafts
        (a prompt prefilled once for n answers; a prefix one request leaves and another starts with)."""
        _live([src, *dsts])
        plan = torch.tensor([[src, d, length] for d in dsts], dtype=torch.long)
        self._broadcast(COPY, plan)
        self._copy(plan)

    def _copy(self, plan: torch.Tensor) -> None:
        for src, dst, length in plan.tolist():
            for cache in (self.cache, self.mtp_cache) if self.mtp_cache is not None else (self.cache,):
                cache.kv[:, dst, :length] = cache.kv[:, src, :length]  # [L, length, C]
                cache.pe[:, dst, :length] = cache.pe[:, src, :length]  # [L, length, R]

    def _run(self, plan: torch.Tensor, scored: bool = False):
        slots, positions, take, score, tokens = plan[:, 0], plan[:, 1], plan[:, 2], plan[:, 3], plan[:, 4:]
        B, q = tokens.shape
        if q == 1 and self.static_shapes and not scored:
            return self._decode_static(slots, positions, tokens)
        span = int(plan[:, 1].max()) + q  # host ints: the plan was built on the host
        rows = None if torch.equal(slots.cpu(), torch.arange(B)) else slots  # a prefix of slots: no gather
        logits, h = self.model.forward_step(tokens, positions, self.cache, span, rows=rows, take=take,
                                            all_hidden=scored)
        if not scored:
            return logits  # [B, V]
        return logits, self.model.logits(h[score.bool()])  # [B, V], [b, q, V] (h: normed, [B, q, D])

    def _decode_static(self, slots: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits, _ = self._staged("decode", slots, tokens=tokens, positions=positions)
        return logits  # [B, V]

    def _staged(self, kind: str, slots: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the static step of (kind, batch bucket, q) on these rows: their inputs staged into its buffers, the
        padding rows pointed at the scratch slot (rows an earlier, larger batch left there must not write their
        slots). Returns views of the step's outputs for the B rows, valid until its next replay."""
        B, q = inputs["tokens"].shape
        key = (kind, bucket(B), q)
        step = self.static.get(key)
        if step is None:
            step = self.static[key] = self._static_step(kind, bucket(B), q)
        buf = step.buffers
        buf["rows"][:B].copy_(slots)
        buf["rows"][B:] = self.scratch
        buf["positions"][B:] = 0
        for name, value in inputs.items():
            buf[name][:B].copy_(value)
        return tuple(t[:B] if t.dim() else t for t in step())  # a scalar (greedy_round's sum) covers the padding too

    def _static_step(self, kind: str, rows: int, q: int) -> StaticStep:
        """decode: logits [Bb, V] of one token per row; verify: logits [Bb, q, V] and final hidden [Bb, q, D] of q
        tokens per row; mtp: the MTP module's catch-up over q (hidden, next token) pairs per row, draft logits and
        block output at `take`; round: a greedy round (verify, acceptance, catch-up: greedy_round). The span is
        the whole cache: attention reads each row only to its own length."""
        model, device = self.model, self.device
        zeros = lambda *shape, dtype=torch.long: torch.zeros(rows, *shape, dtype=dtype, device=device)  # noqa: E731
        buffers = dict(tokens=zeros(q), positions=zeros(),
                       rows=torch.full((rows,), self.scratch, dtype=torch.long, device=device))
        if kind == "decode":
            buffers["take"] = zeros()
            cache = self.cache
            run = lambda tokens, positions, rows, take: model.forward_step(  # noqa: E731
                tokens, positions, cache, cache.max_len, rows=rows, take=take)
        elif kind == "round":
            cache, mtp_cache = self.cache, self.mtp_cache
            run = lambda tokens, positions, rows: greedy_round(  # noqa: E731
                model, cache, mtp_cache, tokens, positions, cache.max_len, rows=rows)
        elif kind == "verify":
            cache = self.cache
            run = lambda tokens, positions, rows: model.forward_step(  # noqa: E731
                tokens, positions, cache, cache.max_len, rows=rows)
        else:
            buffers.update(take=zeros(), hidden=zeros(q, model.cfg.hidden_size, dtype=self.cache.kv.dtype))
            cache = self.mtp_cache
            run = lambda tokens, positions, rows, take, hidden: model.mtp_step(  # noqa: E731
                tokens, hidden, positions, cache, cache.max_len, take=take, rows=rows)
        return StaticStep(model, f"server {kind} step", run, buffers, graphs=self.graphs)

    # ---- speculative decoding: on rank 0 each call broadcasts its plan (the MTP module's, its hidden states too);
    # followers run the same steps eagerly (graphs are single-rank) ---------------------------------------------
    def _slots(self, slots: list[int]) -> torch.Tensor | None:
        return None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)

    def _plan(self, kind: int, slots, positions, take, flags, tokens: torch.Tensor) -> None:
        """Broadcast a plan [slot, position, take, flag, *tokens] per row (tokens [B, q], on the device: built
        there, no host read) to the followers."""
        if self.par.world_size == 1:
            return
        cols = [torch.as_tensor(c, device=self.device).long().view(-1, 1) for c in (slots, positions, take, flags)]
        self._broadcast(kind, torch.cat([*cols, tokens.long()], dim=1))

    @torch.inference_mode()
    def forward_hidden(self, slots: list[int], tokens: list[list[int]], positions: list[int], take: list[int],
                       score: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A prefill chunk that also returns every position's final hidden [B, q, D] (what the MTP module reads), and
        for the rows whose `score` is set their logits at every position [b, q, V] (a prompt's logprobs), else
        None."""
        _live(slots)
        score = score or [False] * len(slots)
        t = torch.tensor(tokens, device=self.device)
        self._plan(HIDDEN, slots, positions, take, [int(x) for x in score], t)
        return self._hidden(slots, t, positions, take, score)

    def _hidden(self, slots: list[int], tokens: torch.Tensor, positions: list[int], take: list[int],
                score: list[bool]):
        logits, hidden = self.model.forward_step(tokens, torch.tensor(positions, device=self.device), self.cache,
                                                 max(positions) + tokens.shape[1], rows=self._slots(slots),
                                                 take=torch.tensor(take, device=self.device), all_hidden=True)
        every = self.model.logits(hidden[torch.tensor(score, device=self.device)]) if any(score) else None
        return logits, hidden, every

    @torch.inference_mode()
    def verify(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, q] at positions.. of each slot -> logits [B, q, V] and final hidden [B, q, D] (a static step's
        buffers where steps are captured: read them before the next verify)."""
        _live(slots)
        self._plan(VERIFY, slots, positions, [0] * len(slots), [0] * len(slots), tokens)
        at = torch.tensor(positions, device=self.device)
        if self.static_shapes:
            return self._staged("verify", torch.tensor(slots, device=self.device), tokens=tokens, positions=at)
        return self.model.forward_step(tokens, at, self.cache, max(positions) + tokens.shape[1],
                                       rows=self._slots(slots))

    @torch.inference_mode()
    def round(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, ...]:
        """A greedy round (core/rounds.greedy_round): tokens [B, q] = [last, drafts] -> draft logits [B, V],
        choices [B, q], accepted drafts [B], draft hidden [B, D], the logits' sum (a static step's buffers where
        steps are captured: read them before the next round). Every rank chooses from the same gathered logits."""
        _live(slots)
        self._plan(ROUND, slots, positions, [0] * len(slots), [0] * len(slots), tokens)
        at = torch.tensor(positions, device=self.device)
        if self.static_shapes:
            return self._staged("round", torch.tensor(slots, device=self.device), tokens=tokens, positions=at)
        return greedy_round(self.model, self.cache, self.mtp_cache, tokens, at, max(positions) + tokens.shape[1],
                            rows=self._slots(slots))

    @torch.inference_mode()
    def mtp(self, slots: list[int], tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
            take: torch.Tensor, static: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP module over (hidden, next token) pairs at positions.. of each slot, in the MTP cache (mtp_cache)
        -> draft logits [B, V], [B, D].
        `static`: a decode round's shape (not a prefill chunk's), run as a static step where steps are captured
        (its outputs are that step's buffers: read or copy them before its next run). Under tensor parallel the
        hidden states [B, q, D] go to the followers with the plan (rank 0's: the host chose which)."""
        _live(slots)
        if self.par.world_size > 1:
            self._plan(MTP, slots, positions, take, [0] * len(slots), tokens)  # followers run it eagerly
            hidden = self.par.broadcast(hidden.to(self.cache.kv.dtype).contiguous())
        if static and self.static_shapes:
            return self._staged("mtp", torch.tensor(slots, device=self.device), tokens=tokens, hidden=hidden,
                                positions=positions, take=take)
        return self.model.mtp_step(tokens, hidden, positions, self.mtp_cache, int(positions.max()) + tokens.shape[1],
                                   take=take, rows=self._slots(slots))

    def _follow_drafting(self, kind: int, plan: torch.Tensor) -> None:
        """A follower's side of the calls above, from rank 0's plan."""
        slots, positions, take, flags = (plan[:, i].tolist() for i in range(4))
        tokens = plan[:, 4:]
        if kind == HIDDEN:
            self._hidden(slots, tokens, positions, take, [bool(f) for f in flags])
        elif kind == VERIFY:
            self.model.forward_step(tokens, plan[:, 1], self.cache, max(positions) + tokens.shape[1],
                                    rows=self._slots(slots))
        elif kind == ROUND:
            greedy_round(self.model, self.cache, self.mtp_cache, tokens, plan[:, 1], max(positions) + tokens.shape[1],
                         rows=self._slots(slots))
        else:  # MTP
            hidden = torch.empty(*tokens.shape, self.model.cfg.hidden_size, dtype=self.cache.kv.dtype,
                                 device=self.device)
            self.par.broadcast(hidden)
            self.model.mtp_step(tokens, hidden, plan[:, 1], self.mtp_cache, max(positions) + tokens.shape[1],
                                take=plan[:, 2], rows=self._slots(slots))

    @torch.inference_mode()
    def follow(self) -> None:
        """Followers (rank > 0): run rank 0's plans until it stops."""
        header = torch.zeros(3, dtype=torch.long, device=self.device)
        while True:
            self.par.broadcast(header)
            kind, B, n = (int(v) for v in header.tolist())
            if kind == STOP:
                return
            if kind == IDLE:
                continue
            plan = torch.zeros(B, n, dtype=torch.long, device=self.device)
            self.par.broadcast(plan)
            if kind == COPY:
                self._copy(plan)
            elif kind in (HIDDEN, VERIFY, ROUND, MTP):
                self._follow_drafting(kind, plan)
            else:
                self._run(plan, scored=kind == PREFILL_SCORED)


def _live(slots: list[int]) -> None:
    """Every slot of a step must belong to a running request. A finished one's is -1: torch's indexing would wrap it
    to the scratch slot, but the cpu backend's C kernels would write before the cache's first entry (heap
    corruption, a crash steps later), so it is stopped here, where the host still has the plan."""
    if slots and min(slots) < 0:
        raise RuntimeError(f"internal error: a step over slots {list(slots)}: -1 is a finished request's")
