"""Prometheus series of one app (its own CollectorRegistry), fed by the routes and, as the
scheduler's ``Metrics`` observer, from the scheduler's thread (prometheus-client is thread-safe).

| series | type | what |
| --- | --- | --- |
| mixport_requests_total{endpoint, status} | counter | HTTP requests answered, by route and status code |
| mixport_prompt_tokens_total | counter | prompt tokens of finished requests |
| mixport_completion_tokens_total | counter | generated tokens of finished requests |
| mixport_requests_finished_total{reason} | counter | scheduler finishes: stop, length, cancelled, error |
| mixport_queue_depth | gauge | requests waiting for a batch row |
| mixport_active_requests | gauge | batch rows in use |
| mixport_batch_occupancy | gauge | active rows / max batch, at the last step |
| mixport_batch_occupancy_ratio | histogram | active rows / max batch, per decode step |
| mixport_step_seconds{kind} | histogram | one prefill or decode step |
| mixport_time_to_first_token_seconds | histogram | submit -> first token |
| mixport_inter_token_latency_seconds | histogram | token -> next token of the same request |
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
OCCUPANCY_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
PREFIX = "mixport"


class ServeMetrics:
    """The app's series; implements ``mixport.runtime.scheduler.Metrics``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series beside each counter (process-wide setting)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.finished = Counter(f"{PREFIX}_requests_finished", "Requests the scheduler finished, by reason",
                                ["reason"], registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a batch row", registry=r)
        self.active = Gauge(f"{PREFIX}_active_requests", "Batch rows in use", registry=r)
        self.occupancy = Gauge(f"{PREFIX}_batch_occupancy", "Active rows / max batch at the last step", registry=r)
        self.occupancy_hist = Histogram(f"{PREFIX}_batch_occupancy_ratio", "Active rows / max batch per decode step",
                                        buckets=OCCUPANCY_BUCKETS, registry=r)
        self.step = Histogram(f"{PREFIX}_step_seconds", "One prefill or decode step", ["kind"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Submit to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Token to next token of one request",
                             buckets=LATENCY_BUCKETS, registry=r)

    # the scheduler's Metrics protocol (called on its thread)
    def on_queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_step(self, kind: str, active: int, max_batch: int, seconds: float) -> None:
        ratio = active / max_batch if max_batch else 0.0
        self.active.set(active)
        self.occupancy.set(ratio)
        self.step.labels(kind=kind).observe(seconds)
        if kind == "decode":
            self.occupancy_hist.observe(ratio)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.finished.labels(reason=reason).inc()  # last: a counted finish has its tokens counted

    # the routes
    def on_response(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def sync(self, active: int, queue_depth: int) -> None:
        """Gauges from the scheduler's own counts (at scrape time: idle steps report nothing)."""
        self.active.set(active)
        self.queue_depth.set(queue_depth)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
