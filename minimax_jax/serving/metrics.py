"""Engine metrics in the Prometheus text format, every sample labelled with the served model's
name (`model_name`): queue depth, running slots, K/V pages in use and free, decode tokens/s, the
token and request counters, requests rejected (answered 4xx), the prefix cache's hits, misses,
prompt tokens reused, entries and pages, and histograms of time to first token, end-to-end request
time, inter-token time and time waiting in the queue for a slot."""

from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds


class Histogram:
    """Counts of observations per bucket (upper bounds `bounds`, then +Inf) and their sum."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        """The `_bucket` (cumulative), `_sum` and `_count` samples of metric `name`."""
        out, cumulative = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum{{{labels}}} {self.sum:.6g}", f"{name}_count{{{labels}}} {cumulative}"]


class Metrics:
    """Counters, gauges and histograms updated by the engine thread and the HTTP handlers, read
    by the HTTP thread (one lock)."""

    def __init__(self, prefix: str = "minimax", model_name: str = ""):
        self.prefix, self.model_name = prefix, model_name
        self._lock = threading.Lock()
        self.queue_depth = 0
        self.running_slots = 0
        self.kv_pages_used = 0
        self.kv_pages_free = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.rejected = 0
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.prefix_hit_tokens = 0
        self.prefix_entries = 0
        self.prefix_pages = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.inter_token = Histogram(ITL_BUCKETS)
        self.queue_time = Histogram(QUEUE_BUCKETS)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def set_load(self, queue_depth: int, running_slots: int) -> None:
        """Requests waiting for a slot, and slots holding a request."""
        with self._lock:
            self.queue_depth, self.running_slots = queue_depth, running_slots

    def set_kv_pages(self, used: int, free: int) -> None:
        """K/V pool pages held by requests, and pages free."""
        with self._lock:
            self.kv_pages_used, self.kv_pages_free = used, free

    def add_tokens(self, n: int, now: float | None = None) -> None:
        """`n` tokens generated (by one step)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))

    def add_prompt(self, n: int) -> None:
        """A request of `n` prompt tokens was accepted."""
        with self._lock:
            self.prompt_tokens += n

    def add_prefix_lookup(self, hit_tokens: int) -> None:
        """An admitted request found a cached prefix of `hit_tokens` prompt tokens (0: a miss)."""
        with self._lock:
            if hit_tokens:
                self.prefix_hits += 1
                self.prefix_hit_tokens += hit_tokens
            else:
                self.prefix_misses += 1

    def set_prefix_cache(self, entries: int, pages: int) -> None:
        """Cached prefixes (snapshots held), and the K/V pages they hold."""
        with self._lock:
            self.prefix_entries, self.prefix_pages = entries, pages

    def add_rejected(self) -> None:
        """A request was refused (answered with a 4xx status)."""
        with self._lock:
            self.rejected += 1

    def observe_ttft(self, seconds: float) -> None:
        """Time from a request's arrival to its first generated token."""
        with self._lock:
            self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        """Time between two consecutive generated tokens of one request."""
        with self._lock:
            self.inter_token.observe(seconds)

    def observe_queue_time(self, seconds: float) -> None:
        """Time a request waited from its arrival to getting a slot."""
        with self._lock:
            self.queue_time.observe(seconds)

    def add_finished(self, reason: str, seconds: float | None = None) -> None:
        """A request ended ("stop", "length", "abort" or "error"), `seconds` after its arrival."""
        with self._lock:
            self.finished[reason] += 1
            if seconds is not None:
                self.e2e.observe(seconds)

    def tokens_per_second(self, now: float | None = None) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        rate = self.tokens_per_second()
        p = self.prefix
        name = self.model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        label = f'model_name="{name}"'
        lines: list[str] = []

        def metric(metric_name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {p}_{metric_name} {help_text}", f"# TYPE {p}_{metric_name} {kind}", *samples])

        def single(metric_name: str, kind: str, help_text: str, value) -> None:
            metric(metric_name, kind, help_text, [f"{p}_{metric_name}{{{label}}} {value}"])

        with self._lock:
            single("queue_depth", "gauge", "Requests waiting for a free slot.", self.queue_depth)
            single("running_slots", "gauge", "Slots holding a request (prefilling or decoding).", self.running_slots)
            single("kv_pages_used", "gauge", "K/V pool pages held by requests.", self.kv_pages_used)
            single("kv_pages_free", "gauge", "K/V pool pages free.", self.kv_pages_free)
            single("generation_tokens_per_second", "gauge",
                   f"Generated tokens per second, last {RATE_WINDOW_S:g} s.", f"{rate:.6g}")
            single("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", self.prompt_tokens)
            single("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
            single("requests_rejected_total", "counter", "Requests refused with a 4xx answer.", self.rejected)
            single("prefix_cache_hits_total", "counter", "Admitted requests that reused a cached prompt prefix.",
                   self.prefix_hits)
            single("prefix_cache_misses_total", "counter",
                   "Admitted requests that found no cached prompt prefix (prefix cache on).", self.prefix_misses)
            single("prefix_cache_hit_tokens_total", "counter", "Prompt tokens read from the prefix cache.",
                   self.prefix_hit_tokens)
            single("prefix_cache_entries", "gauge", "Cached prompt prefixes (lightning-state snapshots held).",
                   self.prefix_entries)
            single("prefix_cache_pages", "gauge", "K/V pool pages held by cached prompt prefixes.",
                   self.prefix_pages)
            metric("requests_finished_total", "counter", "Finished requests by reason.",
                   [f'{p}_requests_finished_total{{{label},reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())])
            for metric_name, help_text, hist in (
                    ("time_to_first_token_seconds", "Time from arrival to the first token.", self.ttft),
                    ("e2e_request_latency_seconds", "Time from arrival to the end of a request.", self.e2e),
                    ("inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                     self.inter_token),
                    ("queue_time_seconds", "Time from arrival to getting a slot.", self.queue_time)):
                metric(metric_name, "histogram", help_text, hist.lines(f"{p}_{metric_name}", label))
        return "\n".join(lines) + "\n"
