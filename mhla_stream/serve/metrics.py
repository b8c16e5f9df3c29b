"""Prometheus metrics of the server (one registry per server, exposed at ``GET /metrics``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def http_counters(registry) -> tuple[Counter, Counter]:
    """The families the HTTP side counts (requests by endpoint and status, prompt tokens): in the
    HTTP process's own registry with --http-process, in the one registry otherwise."""
    requests = Counter("mhla_requests", "HTTP API requests by endpoint and status", ["endpoint", "status"],
                       registry=registry)
    return requests, Counter("mhla_prompt_tokens", "prompt tokens fed", registry=registry)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests, self.tokens_in = http_counters(r)
        self.tokens_out = Counter("mhla_generated_tokens", "tokens generated (the completion tokens sent)", registry=r)
        self.running = Gauge("mhla_running_sequences", "sequences holding an engine slot", registry=r)
        self.queued = Gauge("mhla_queued_requests", "requests waiting for a slot", registry=r)
        self.ttft = Histogram("mhla_time_to_first_token_seconds", "from request accepted to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mhla_inter_token_latency_seconds", "between consecutive tokens of one sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.sessions = Gauge("mhla_sessions", "stored sessions by tier", ["tier"], registry=r)
        self.engine = Info("mhla_engine", "the engine's slots, decode buckets, prefill pieces and plans", registry=r)
        self.session_bytes = Gauge("mhla_session_bytes", "bytes of stored sessions by tier", ["tier"], registry=r)

    def render(self, engine, store) -> bytes:
        running, queued = engine.counts()
        self.running.set(running)
        self.queued.set(queued)
        self.sessions.labels("device").set(sum(1 for s in list(engine.seqs.values()) if s.job.session))
        for tier, (count, nbytes) in store.sizes().items():
            self.sessions.labels(tier).set(count)
            self.session_bytes.labels(tier).set(nbytes)
        return generate_latest(self.registry)
