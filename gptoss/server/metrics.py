"""Prometheus metrics in the text exposition format (version 0.0.4), with no dependency.

Counters, gauges and histograms may be updated from the engine thread and the event loop; one
lock guards them all (updates are a few additions).
"""

from __future__ import annotations

import math
import threading

_lock = threading.Lock()


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with _lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        with _lock:
            self.values[labels] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: tuple[float, ...]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with _lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines, running = self.header(), 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """Everything /metrics reports. The engine thread sets the engine gauges after each step."""

    def __init__(self):
        p = "gptoss_"
        self.requests = Counter(p + "requests_total", "HTTP API requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.finished = Counter(p + "generations_finished_total",
                                "Generations that ended, by reason (stop, length, tool_calls, abort, error).",
                                ("reason",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens admitted to the engine.")
        self.cached_tokens = Counter(p + "cached_prompt_tokens_total", "Prompt tokens found in the prefix cache.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated.")
        self.running = Gauge(p + "requests_running", "Generations in the engine (running or waiting for a slot).")
        self.queued = Gauge(p + "requests_queued", "Generations past --max-num-seqs, waiting for a slot.")
        self.batch_size = Gauge(p + "batch_size", "Sequences in the last engine step.")
        self.batch_sizes = Histogram(p + "batch_size_per_step", "Sequences per engine step.",
                                     (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "Fraction of the full-attention KV cache in use.")
        self.steps = Counter(p + "engine_steps_total", "Engine steps run.")
        self.ttft = Histogram(p + "time_to_first_token_seconds",
                              "From request arrival to the first generated token.", _LATENCY_BUCKETS)
        self.latency = Histogram(p + "request_duration_seconds", "From request arrival to the last token.",
                                 _LATENCY_BUCKETS)
        self.rejected = Counter(p + "requests_rejected_total", "Requests refused with 429 (queue full).")

    def render(self) -> str:
        metrics = [self.requests, self.finished, self.rejected, self.prompt_tokens, self.cached_tokens,
                   self.generation_tokens, self.running, self.queued, self.batch_size, self.batch_sizes,
                   self.kv_usage, self.steps, self.ttft, self.latency]
        lines: list[str] = []
        for metric in metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"
