"""Prometheus metrics of the front-end (names follow vLLM's, prefixed dist_infer:)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dist_infer.workers.llm_engine import EngineStats, RequestOutput

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}
        self.prompt_tokens = Counter("dist_infer:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("dist_infer:generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("dist_infer:request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        self.running = Gauge("dist_infer:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("dist_infer:num_requests_waiting", "Requests waiting for the batch", registry=r)
        self.kv_usage = Gauge("dist_infer:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", registry=r)
        self.prefix_hit_rate = Gauge("dist_infer:prefix_cache_hit_rate", "Prompt tokens found in the prefix "
                                     "cache / prompt tokens looked up", registry=r)
        self.preemptions = Gauge("dist_infer:num_preemptions", "Sequences preempted so far", registry=r)
        hist = dict(buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("dist_infer:time_to_first_token_seconds", "Time to first token", **hist)
        self.itl = Histogram("dist_infer:inter_token_latency_seconds", "Time between streamed tokens", **hist)
        self.e2e = Histogram("dist_infer:e2e_request_latency_seconds", "Request latency, end to end", **hist)
        self.queue = Histogram("dist_infer:request_queue_time_seconds", "Time waiting before the first step",
                               **hist)
        self.labels = labels

    def render(self, stats: EngineStats | None) -> bytes:
        if stats is not None:
            self.running.set(stats.running)
            self.waiting.set(stats.waiting)
            self.kv_usage.set(stats.kv_usage)
            self.prefix_hit_rate.set(stats.prefix_hit_rate)
            self.preemptions.set(stats.preemptions)
        return generate_latest(self.registry)


class RequestTimer:
    """Per-request latency bookkeeping, fed with each delta."""

    def __init__(self, metrics: Metrics, num_prompt_tokens: int):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first = True
        metrics.prompt_tokens.inc(num_prompt_tokens)

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.new_token_ids:
            (self.metrics.ttft if self.first else self.metrics.itl).observe(now - self.last)
            if self.first and out.queue_s is not None:
                self.metrics.queue.observe(out.queue_s)
            self.first, self.last = False, now
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished:
            self.metrics.e2e.observe(now - self.start)
            self.metrics.requests.labels(out.finish_reason or "unknown").inc()
