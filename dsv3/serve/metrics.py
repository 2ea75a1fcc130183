"""What operators scrape: counters, gauges and histograms in Prometheus' text format (0.0.4).

Small enough to need no client library: the model thread and the HTTP handlers update it under a lock.
"""

from __future__ import annotations

import bisect
import threading
import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # by outcome: stop, length, cancelled, error, rejected
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.tpot = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.step_batch = Histogram(BATCH_BUCKETS)
        self.draft_tokens = self.accepted_tokens = 0  # speculative decoding (--speculative)
        self.drafting = 0  # 1 while the adaptive switch has drafting on (serve/drafting.py)
        self.reused_tokens = 0  # prompt tokens found in a free slot's cache entries (prefix cache)

    def request(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def observe(self, event: str, value) -> None:
        """The scheduler's hook (model thread)."""
        with self._lock:
            if event == "step":
                self.step_batch.observe(value[0])
            elif event == "drafts":
                self.draft_tokens += value[0]
                self.accepted_tokens += value[1]
                self.drafting = int(value[2])
            elif event == "first_token":
                self.ttft.observe(value.first_token_at - value.arrived)
                self.prompt_tokens += len(value.prompt) - value.reused  # what was read (not found in the cache)
            elif event == "reused":
                self.reused_tokens += value
            elif event == "cancelled":
                self.generation_tokens += value.generated
            elif event == "finished":
                self.generation_tokens += value.generated
                if value.first_token_at is not None:
                    now = time.perf_counter()
                    self.e2e.observe(now - value.arrived)
                    if value.generated > 1:
                        self.tpot.observe((now - value.first_token_at) / (value.generated - 1))

    def render(self, state: dict) -> str:
        """The exposition text; `state` is the scheduler's gauges (running, waiting, slots_used) plus max_batch."""
        with self._lock:
            out = ["# HELP dsv3_requests_total Finished requests by outcome.", "# TYPE dsv3_requests_total counter"]
            out += [f'dsv3_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            out += ["# HELP dsv3_prompt_tokens_total Prompt tokens read (not found in the prefix cache or copied).", "# TYPE dsv3_prompt_tokens_total counter",
                    f"dsv3_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP dsv3_prefix_cache_hit_tokens_total Prompt tokens found in a free slot's cache entries "
                    "(not read again).", "# TYPE dsv3_prefix_cache_hit_tokens_total counter",
                    f"dsv3_prefix_cache_hit_tokens_total {self.reused_tokens}",
                    "# HELP dsv3_generation_tokens_total Tokens generated.",
                    "# TYPE dsv3_generation_tokens_total counter", f"dsv3_generation_tokens_total {self.generation_tokens}",
                    "# HELP dsv3_spec_draft_tokens_total Tokens drafted by the MTP module (--speculative).",
                    "# TYPE dsv3_spec_draft_tokens_total counter", f"dsv3_spec_draft_tokens_total {self.draft_tokens}",
                    "# HELP dsv3_spec_accepted_tokens_total Drafted tokens the main model accepted.",
                    "# TYPE dsv3_spec_accepted_tokens_total counter",
                    f"dsv3_spec_accepted_tokens_total {self.accepted_tokens}",
                    "# HELP dsv3_spec_drafting 1 while drafting pays (the adaptive switch), 0 while it only probes.",
                    "# TYPE dsv3_spec_drafting gauge", f"dsv3_spec_drafting {self.drafting}"]
            for name, help_, key in (("dsv3_num_requests_running", "Requests holding a cache slot.", "running"),
                                     ("dsv3_num_requests_waiting", "Requests waiting for a slot.", "waiting"),
                                     ("dsv3_cache_slots_used", "Latent cache slots in use.", "slots_used"),
                                     ("dsv3_cache_slots", "Latent cache slots (--max-batch).", "max_batch")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {state[key]}"]
            for name, help_, h in (
                    ("dsv3_time_to_first_token_seconds", "From arrival to the first token.", self.ttft),
                    ("dsv3_time_per_output_token_seconds", "Mean time between output tokens, per request.", self.tpot),
                    ("dsv3_e2e_request_latency_seconds", "From arrival to the last token.", self.e2e),
                    ("dsv3_decode_batch_size", "Rows per decode step.", self.step_batch)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
            return "\n".join(out) + "\n"
