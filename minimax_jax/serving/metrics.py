"""Engine metrics in the Prometheus text format: queue depth, running slots, K/V pages in use and
free, decode tokens/s, time to first token, token and request counters."""

from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds


class Metrics:
    """Counters and gauges updated by the engine thread, read by the HTTP thread (one lock)."""

    def __init__(self, prefix: str = "minimax"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self.queue_depth = 0
        self.running_slots = 0
        self.kv_pages_used = 0
        self.kv_pages_free = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0
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

    def observe_ttft(self, seconds: float) -> None:
        """Time from a request's arrival to its first generated token."""
        with self._lock:
            self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self._ttft_sum += seconds

    def add_finished(self, reason: str) -> None:
        """A request ended ("stop", "length", "abort" or "error")."""
        with self._lock:
            self.finished[reason] += 1

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
        with self._lock:
            lines = [
                f"# HELP {p}_queue_depth Requests waiting for a free slot.",
                f"# TYPE {p}_queue_depth gauge", f"{p}_queue_depth {self.queue_depth}",
                f"# HELP {p}_running_slots Slots holding a request (prefilling or decoding).",
                f"# TYPE {p}_running_slots gauge", f"{p}_running_slots {self.running_slots}",
                f"# HELP {p}_kv_pages_used K/V pool pages held by requests.",
                f"# TYPE {p}_kv_pages_used gauge", f"{p}_kv_pages_used {self.kv_pages_used}",
                f"# HELP {p}_kv_pages_free K/V pool pages free.",
                f"# TYPE {p}_kv_pages_free gauge", f"{p}_kv_pages_free {self.kv_pages_free}",
                f"# HELP {p}_generation_tokens_per_second Generated tokens per second, last {RATE_WINDOW_S:g} s.",
                f"# TYPE {p}_generation_tokens_per_second gauge",
                f"{p}_generation_tokens_per_second {rate:.6g}",
                f"# HELP {p}_prompt_tokens_total Prompt tokens of accepted requests.",
                f"# TYPE {p}_prompt_tokens_total counter", f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_generation_tokens_total Generated tokens.",
                f"# TYPE {p}_generation_tokens_total counter",
                f"{p}_generation_tokens_total {self.generation_tokens}",
                f"# HELP {p}_requests_finished_total Finished requests by reason.",
                f"# TYPE {p}_requests_finished_total counter",
            ]
            lines += [f'{p}_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            lines += [f"# HELP {p}_time_to_first_token_seconds Time from arrival to the first token.",
                      f"# TYPE {p}_time_to_first_token_seconds histogram"]
            cumulative = 0
            for bound, count in zip((*map(str, TTFT_BUCKETS), "+Inf"), self._ttft_counts):
                cumulative += count
                lines.append(f'{p}_time_to_first_token_seconds_bucket{{le="{bound}"}} {cumulative}')
            lines += [f"{p}_time_to_first_token_seconds_sum {self._ttft_sum:.6g}",
                      f"{p}_time_to_first_token_seconds_count {cumulative}"]
        return "\n".join(lines) + "\n"
