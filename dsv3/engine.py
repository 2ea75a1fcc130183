"""The embedding API: `load` a checkpoint into an `Engine`, then `logits` or `generate`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .core.checkpoint import Checkpoint, validate
from .core.config import ModelConfig
from .core.errors import DsvError
from .core.generate import Stats, StepPool, generate
from .core.model import ATTN_IMPLS, Transformer
from .core.parallel import Parallel
from .core.weights import load_weights

log = logging.getLogger("dsv3")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DsvError(f"dtype {dtype!r} is not supported; use bf16 or fp32")
    return DTYPES[dtype]


class Engine:
    """A loaded model with its tokenizer (if the checkpoint has one)."""

    def __init__(self, model: Transformer, cfg: ModelConfig, kernels, par: Parallel, dtype: torch.dtype,
                 tokenizer=None, path: Path | None = None, has_mtp: bool = False, cuda_graphs: bool = True):
        self.model, self.cfg, self.kernels, self.par = model, cfg, kernels, par
        self.dtype, self.tokenizer, self.path, self.has_mtp = dtype, tokenizer, path, has_mtp
        #: capture the decode step as a CUDA/HIP graph where the backend can (off: eager, for debugging)
        self.cuda_graphs = cuda_graphs
        self.last_stats: Stats | None = None
        #: the last calls' captured steps and caches, replayed by a next call of the same shape (see release())
        self.steps = StepPool()
        self._vocab = None  # json=True: the vocabulary as grammars mask it (serve/masks.py), built once
        #: json with speculative decoding: ((batch, draft_tokens, eos), the serve.Scheduler that runs it), kept
        self._drafting_scheduler = None

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def _ids(self, ids) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long)
        if t.dim() == 1:
            t = t[None]
        return t.to(self.model.rope_cos.device)

    def logits(self, token_ids) -> torch.Tensor:
        """LongTensor [B, S] -> FloatTensor [B, S, vocab] for every position, no cache."""
        ids = self._ids(token_ids)
        if ids.shape[1] > self.max_seq_len:
            raise DsvError(f"input has {ids.shape[1]} tokens; max_seq_len is {self.max_seq_len} (raise max_seq_len)")
        return self.model(ids)

    def mtp_logits(self, token_ids) -> torch.Tensor:
        """Draft logits [B, S-1, vocab] of the MTP module: position t predicts token t+2 from the
        main model's final hidden state at t and the embedding of token t+1 (no cache)."""
        if not self.has_mtp:
            raise DsvError(f"{self.path}: this checkpoint has no MTP layer (num_nextn_predict_layers=0 or dropped)")
        ids = self._ids(token_ids)
        with torch.inference_mode():
            h, _ = self.model.hidden(ids)
            step = self.model.step(ids.shape[0], ids.shape[1] - 1, 0, None)
            return self.model.mtp[0](self.model, ids[:, 1:], h[:, :-1], step)

    def release(self) -> None:
        """Free the captured steps and caches kept for the next call of the same shape (their memory: on a GPU, the
        latent cache of the batch and span; call it before other work needs that memory, or after replacing a
        weight tensor, which the kept steps would not see)."""
        self.steps.clear()
        self._drafting_scheduler = None

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, static: bool = False, speculative: str | None = None,
                 draft_tokens: int = 1, ignore_eos: bool = False, json: bool | dict = False) -> list[list[int]]:
        """New token ids for each prompt (EOS excluded). Greedy when temperature == 0. `static` runs the
        fixed-shape (graph-ready) decode step even where no graph is captured. `speculative="mtp"` drafts
        `draft_tokens` tokens per step with the checkpoint's MTP layer and verifies them in one main-model step:
        the same greedy tokens (the same distribution when sampling), fewer steps; last_stats.extra reports the
        acceptance. `ignore_eos`: run on past end-of-sequence tokens, max_new_tokens for every prompt (benchmarks).
        `json=True`: each answer is one JSON object (every token masked to what continues one, EOS once it is
        closed; an answer cut by max_new_tokens is the beginning of one), as the server's response_format
        json_object; `json=` a JSON schema (a dict): each answer is JSON the schema accepts, as json_schema
        (the subset serve/schema.py enforces; DsvError names a keyword outside it)."""
        if speculative not in (None, "mtp"):
            raise DsvError(f"speculative={speculative!r}; the one drafter is 'mtp' (the checkpoint's MTP layer)")
        if speculative and not self.has_mtp:
            raise DsvError(f"{self.path}: this checkpoint has no MTP layer (num_nextn_predict_layers=0 or dropped), so "
                           "there is nothing to draft with; run without speculative decoding")
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompts = [list(map(int, p)) for p in prompts]
        longest = max((len(p) for p in prompts), default=0)
        if longest == 0:
            raise DsvError("empty prompt; give at least one token")
        if longest + max_new_tokens > self.max_seq_len:
            raise DsvError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context of {self.max_seq_len}; "
                "shorten the prompt, lower --max-new-tokens or raise --max-seq-len"
            )
        eos = self.cfg.eos_token_ids
        if self.tokenizer is not None and self.tokenizer.eos_id is not None and self.tokenizer.eos_id not in eos:
            eos = (*eos, self.tokenizer.eos_id)
        if ignore_eos:
            eos = ()
        constrain = None
        if json is not False and json is not None:
            if json is not True and not isinstance(json, dict):
                raise DsvError(f"json={json!r}: True (one JSON object) or a JSON schema as a dict")
            if ignore_eos:
                raise DsvError("json ends where the JSON does: run it without ignore_eos")
            if not speculative:
                constrain = self._json_masks(len(prompts), eos, json)
        if speculative:
            from .core.speculative import speculative_generate

            if longest + max_new_tokens + 2 * draft_tokens + 2 > self.max_seq_len:
                raise DsvError(f"prompt of {longest} tokens + {max_new_tokens} new tokens + room for {draft_tokens} "
                               f"drafts exceeds the context of {self.max_seq_len}; shorten the prompt or raise "
                               "--max-seq-len")
            if json is not False and json is not None:
                return self._json_drafted(prompts, max_new_tokens, temperature, top_p, seed, eos, draft_tokens, json)
            out, self.last_stats = speculative_generate(self.model, prompts, max_new_tokens, draft_tokens, temperature,
                                                        top_p, eos, seed, self.dtype, graphs=self.cuda_graphs,
                                                        pool=self.steps)
            return out
        out, self.last_stats = generate(self.model, prompts, max_new_tokens, temperature, top_p, eos, seed, self.dtype,
                                        graphs=self.cuda_graphs, static=static, pool=self.steps, constrain=constrain)
        return out

    def _grammar(self, json: bool | dict):
        """The grammar of json=True (one JSON object, serve/json_mode.py) or of a schema (serve/schema.py)."""
        from .serve.json_mode import JSON_OBJECT
        from .serve.schema import SchemaError, compile_schema

        try:
            grammar = JSON_OBJECT if json is True else compile_schema(json)
        except SchemaError as e:
            raise DsvError(f"json schema: {e}") from None
        if self.tokenizer is None:
            raise DsvError(f"{self.path}: json needs the checkpoint's tokenizer (tokenizer.json) to know each "
                           "token's text")
        return grammar

    def _json_masks(self, rows: int, eos: tuple[int, ...], json: bool | dict):
        """decode_tokens' `constrain` for `rows` answers that are each one JSON object (serve/json_mode.py) or,
        `json` a schema, JSON it accepts (serve/schema.py)."""
        from .serve.masks import Vocab

        grammar = self._grammar(json)
        if self._vocab is None or self._vocab.eos != frozenset(eos):
            self._vocab = Vocab.of(self.tokenizer, eos, self.cfg.vocab_size, self.model.rope_cos.device)
        vocab, states, ended = self._vocab, [grammar.start] * rows, [False] * rows

        def constrain(logits: torch.Tensor, so_far: torch.Tensor) -> torch.Tensor:
            if so_far.shape[1]:
                for b, t in enumerate(so_far[:, -1].tolist()):
                    ended[b] = ended[b] or t in vocab.eos
                    if not ended[b]:
                        states[b] = vocab.advance(grammar, states[b], t)
            logits = logits.float().clone()
            for b, st in enumerate(states):
                if not ended[b] and st is not None:  # an ended row runs on to be trimmed: anything goes
                    logits[b].masked_fill_(~vocab.allowed(grammar, st), float("-inf"))
            return logits
        return constrain

    def _json_drafted(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                      seed: int | None, eos: tuple[int, ...], draft_tokens: int, json: bool | dict) -> list[list[int]]:
        """json with speculative="mtp": the prompts as requests of the server's scheduler, the one decode loop that
        masks verified drafts (each position as if the drafts before it were accepted: serve/speculation.py), run
        here to the end. Row b samples with seed + b. The scheduler (its caches and captured steps) is kept for the
        next call of the same batch size and drafts (release() frees it)."""
        from .serve.drafting import DraftPolicy
        from .serve.scheduler import Request, Sampling, Scheduler
        from .serve.text import TextStream

        if self.par.world_size > 1:  # the scheduler's followers would wait for plans no rank sends
            raise DsvError("json with speculative decoding runs in one process; under tensor parallel serve it "
                           "(torchrun ... -m dsv3 serve ... --speculative mtp) or drop speculative decoding")
        grammar = self._grammar(json)
        key = (len(prompts), draft_tokens, tuple(eos))
        if self._drafting_scheduler is None or self._drafting_scheduler[0] != key:
            self._drafting_scheduler = None  # the old one's caches go before the new one's are allocated
            sched = Scheduler(self, max_batch=len(prompts), max_waiting=len(prompts), eos_ids=eos, speculative="mtp",
                              draft_tokens=draft_tokens, prefix_cache=False)
            self._drafting_scheduler = key, sched
        sched = self._drafting_scheduler[1]
        answers: list[list[int]] = [[] for _ in prompts]

        def emit(b: int):
            def take(kind: str, data) -> None:
                if kind == "text":
                    answers[b].extend(data[1])
            return take
        reqs = [Request(str(b), list(p), Sampling(max_new_tokens, temperature, top_p,
                                                  None if seed is None else seed + b, grammar=grammar),
                        emit(b), TextStream(self.tokenizer.decode)) for b, p in enumerate(prompts)]
        spec = sched.spec
        spec.policy = DraftPolicy(draft_tokens)  # each call judges drafting afresh, as speculative_generate does
        drafted, accepted, probes, t0 = spec.drafted, spec.accepted, spec.probes, time.perf_counter()
        sched.complete(*reqs)
        end = time.perf_counter()
        first = max(r.first_token_at or end for r in reqs)  # every prompt read and its first token chosen
        drafted, accepted = spec.drafted - drafted, spec.accepted - accepted
        rounds = drafted // draft_tokens  # rows' rounds that drafted
        self.last_stats = Stats(prefill_tokens=sum(map(len, prompts)), prefill_s=first - t0,
                                decode_tokens=sum(map(len, answers)), decode_s=end - first)
        self.last_stats.extra.update(speculative="mtp", draft_tokens=draft_tokens, rounds=rounds,
                                     probes=spec.probes - probes,
                                     acceptance=accepted / max(drafted, 1),
                                     tokens_per_round=1 + accepted / max(rounds, 1),
                                     drafting_at_end=spec.policy.drafting)
        return answers


def load(path: str | Path, backend: str = "auto", dtype: str | torch.dtype = "bf16", device=None,
         attn_impl: str = "auto", max_seq_len: int | None = None, parallel: Parallel | None = None,
         with_mtp: bool = True, progress=None, require_tokenizer: bool = False, cuda_graphs: bool = True,
         cpu_weights: str = "auto") -> Engine:
    """Load a checkpoint (released FP8, BF16 HF layout, or model-parallel rank files).

    `progress(nbytes, total)`, if given, is called as each tensor is read (total: all tensor bytes).
    `cpu_weights` (cpu backend): "fp8" keeps FP8 weights as FP8 in memory, "bf16" dequantizes them at load,
    "auto" is fp8 wherever the cpu backend's C kernels run a bf16 model (half the memory, faster decode)."""
    from .backends import resolve
    from .core.tokenizer import Tokenizer

    path = Path(path)
    if attn_impl not in ATTN_IMPLS:
        raise DsvError(f"attention form {attn_impl!r} is not one of {', '.join(ATTN_IMPLS)}")
    dt = parse_dtype(dtype)
    par = parallel or Parallel.from_env()
    kernels = resolve(backend, device)
    if cpu_weights != "auto":
        if not hasattr(kernels, "use_weights"):
            raise DsvError(f"cpu weights {cpu_weights!r}: the {kernels.name} backend decides its own weight format "
                           "(the option is the cpu backend's); drop it or use --backend cpu")
        kernels.use_weights(cpu_weights)
    if par.world_size > 1:
        if device is None and kernels.device.type != "cpu":  # one accelerator per local rank
            kernels.device = torch.device(kernels.device.type, par.local_rank)
        par.init(kernels.dist_backend)
    ckpt = Checkpoint(path)
    cfg = ModelConfig.from_file(path)
    if require_tokenizer and not (path / "tokenizer.json").is_file():
        raise DsvError(f"{path}: no tokenizer.json; copy tokenizer.json and tokenizer_config.json from the original "
                       "checkpoint into this directory (dsv3 convert copies them)")
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None  # its errors before the weights
    par.check_same("checkpoint (config.json + tensor index)", _fingerprint(ckpt, dt, max_seq_len, attn_impl))
    if ckpt.layout == "mp" and par.world_size > 1 and ckpt.mp != par.world_size:
        raise DsvError(f"{path}: rank files are for --model-parallel {ckpt.mp} but {par.world_size} processes "
                       f"were started; launch {ckpt.mp} processes, or reshard for {par.world_size}")
    has_mtp = validate(ckpt, cfg) and with_mtp
    if max_seq_len is None:
        max_seq_len = min(cfg.max_position_embeddings, 4096)
    if max_seq_len <= 0:
        raise DsvError(f"max_seq_len={max_seq_len} must be positive")
    kernels.configure(cfg)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg, kernels, par, attn_impl, max_seq_len, with_mtp=has_mtp)
    model.build_rope(kernels.device)
    load_weights(model, ckpt, cfg, kernels, dt, par, progress)
    ckpt.close()
    model.eval()
    log.info("loaded %s with %s in %.1fs", path, kernels.describe(), time.perf_counter() - t0)
    return Engine(model, cfg, kernels, par, dt, tokenizer, path, has_mtp, cuda_graphs)



def _fingerprint(ckpt: Checkpoint, dtype, max_seq_len, attn_impl) -> bytes:
    """What must agree across ranks: config, tensor names/shapes, and the run settings."""
    parts = [(ckpt.path / "config.json").read_bytes(), repr((str(dtype), max_seq_len, attn_impl)).encode()]
    for name in sorted(ckpt.names()):
        info = ckpt.info(name)
        parts.append(f"{name}:{info.dtype}:{info.shape}".encode())
    return b"\n".join(parts)


def resident_bytes(engine: Engine) -> int:
    """Weight bytes this rank holds (buffers, excluding computed rope tables)."""
    seen, total = set(), 0
    for name, b in engine.model.named_buffers():
        if b is None or "rope" in name or id(b) in seen:
            continue
        seen.add(id(b))
        total += b.numel() * b.element_size()
    return total
