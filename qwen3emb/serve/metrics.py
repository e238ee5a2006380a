"""Prometheus metrics of one server, in their own registry (several apps may share a process)."""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class ServerMetrics:
    """Request counts by status, latencies, queue and inference times, batch shapes, queue
    depth and tokens embedded. Needs ``prometheus-client`` (the ``serve`` extra)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("qwen3emb_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("qwen3emb_request_seconds", "Request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_seconds = Histogram("qwen3emb_queue_seconds",
                                       "Time a request waits before its first batch runs",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("qwen3emb_inference_seconds",
                                           "Time of one inference call",
                                           buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("qwen3emb_batch_size", "Sequences per inference call",
                                    buckets=SIZE_BUCKETS, registry=registry)
        self.batch_tokens = Histogram("qwen3emb_batch_tokens",
                                      "Padded tokens per inference call",
                                      buckets=TOKEN_BUCKETS, registry=registry)
        self.queue_requests = Gauge("qwen3emb_queue_requests",
                                    "Requests waiting or running", registry=registry)
        self.queue_tokens = Gauge("qwen3emb_queue_tokens", "Tokens waiting or running",
                                  registry=registry)
        self.tokens = Counter("qwen3emb_tokens", "Tokens embedded (instruction and end token "
                              "included)", registry=registry)
        self.inputs = Counter("qwen3emb_inputs", "Inputs embedded", registry=registry)
        self.cancelled = Counter("qwen3emb_cancelled_requests",
                                 "Requests dropped because their client went away",
                                 registry=registry)

    def watch_queues(self, depths: Any) -> None:
        """Report the queue gauges as the sum over every batcher's ``depth`` (several models
        in one process), read at each scrape, instead of the value a batcher last set."""
        self.queue_requests.set_function(lambda: sum(r for r, _ in depths()))
        self.queue_tokens.set_function(lambda: sum(t for _, t in depths()))

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def observe_request(metrics: Any, route: str, status: int, seconds: float) -> None:
    """Count one finished request."""
    metrics.requests.labels(route=route, status=str(status)).inc()
    metrics.latency.labels(route=route).observe(seconds)
