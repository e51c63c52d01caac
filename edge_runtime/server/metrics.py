"""The server's Prometheus metrics: what a kiosk fleet's dashboard needs to see that a device is well.

Counters are totals since start (requests by endpoint and status, tokens, seconds spent), from which any
rate follows; the gauges give the present (queue depth, a generation running, memory) and the speed of the
last request, which is what a person looking at one device asks for.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge_runtime.memory import current_rss_bytes, peak_rss_bytes
from edge_runtime.model import GenerationStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # the *_created series only restate the start time, doubling a small device's scrape
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


class ServerMetrics:
    """One registry per server, so that tests and several apps in a process never share counts."""

    def __init__(self, queue_depth: Callable[[], float], generating: Callable[[], float], context_length: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edge_runtime_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("edge_runtime_request_duration_seconds", "Time to the end of the response",
                                 ["endpoint"], registry=r,
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, float("inf")))
        self.prompt_tokens = Counter("edge_runtime_prompt_tokens", "Prompt tokens of finished generations",
                                     registry=r)
        self.cached_tokens = Counter("edge_runtime_cached_prompt_tokens",
                                     "Prompt tokens reused from the KV cache rather than run", registry=r)
        self.generated_tokens = Counter("edge_runtime_generated_tokens", "Tokens generated", registry=r)
        self.prefill_seconds = Counter("edge_runtime_prefill_seconds", "Seconds spent running prompts", registry=r)
        self.decode_seconds = Counter("edge_runtime_decode_seconds", "Seconds spent generating tokens", registry=r)
        self.cancelled = Counter("edge_runtime_cancelled_generations",
                                 "Generations stopped because their client left", registry=r)
        self.prefill_speed = Gauge("edge_runtime_prefill_tokens_per_second", "Prompt speed of the last request",
                                   registry=r)
        self.decode_speed = Gauge("edge_runtime_decode_tokens_per_second", "Generation speed of the last request",
                                  registry=r)
        Gauge("edge_runtime_queue_depth", "Requests waiting for their turn", registry=r).set_function(queue_depth)
        Gauge("edge_runtime_generating", "1 while a generation runs", registry=r).set_function(generating)
        Gauge("edge_runtime_context_length", "Context the model was loaded with",
              registry=r).set(context_length)
        Gauge("edge_runtime_resident_memory_bytes", "Resident set size of the server",
              registry=r).set_function(lambda: current_rss_bytes() or 0)
        Gauge("edge_runtime_peak_resident_memory_bytes", "Highest resident set size since start",
              registry=r).set_function(lambda: peak_rss_bytes() or 0)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_generation(self, stats: GenerationStats, cancelled: bool) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        self.prefill_seconds.inc(stats.prefill_seconds)
        self.decode_seconds.inc(stats.decode_seconds)
        if cancelled:
            self.cancelled.inc()
        if stats.prefill_seconds > 0:
            self.prefill_speed.set(stats.prefill_tokens_per_second)
        if stats.decode_seconds > 0:
            self.decode_speed.set(stats.decode_tokens_per_second)

    def text(self) -> bytes:
        return generate_latest(self.registry)
