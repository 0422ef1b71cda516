"""The server's Prometheus metrics and the middleware that counts every HTTP response."""

from __future__ import annotations

import time
from types import SimpleNamespace

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


def new_metrics():
    """Prometheus metrics in a registry of the app's own (several apps can live in one process)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

    disable_created_metrics()  # no *_created series next to every counter
    r = CollectorRegistry()
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
    return SimpleNamespace(
        registry=r,
        http=Counter("apertus_http_requests", "HTTP requests answered", ["route", "status"], registry=r),
        http_latency=Histogram("apertus_http_request_duration_seconds", "Time to the end of the response",
                               ["route"], buckets=buckets, registry=r),
        generations=Counter("apertus_generations", "Engine requests finished (one per choice)", ["finish_reason"],
                            registry=r),
        prompt_tokens=Counter("apertus_prompt_tokens", "Prompt tokens submitted", registry=r),
        generation_tokens=Counter("apertus_generation_tokens", "Tokens generated", registry=r),
        waiting=Gauge("apertus_requests_waiting", "Engine requests queued or reading their prompt", registry=r),
        running=Gauge("apertus_requests_running", "Engine requests generating", registry=r),
        ttft=Histogram("apertus_time_to_first_token_seconds", "Submit to first token", buckets=buckets, registry=r),
        latency=Histogram("apertus_generation_duration_seconds", "Submit to last token", buckets=buckets,
                          registry=r),
    )


class EngineCounters:
    """Counters the engine keeps (read at each scrape): prompt tokens looked up in the prefix cache and found
    there; the hit rate is hits / queries (vLLM's prefix_cache_queries / prefix_cache_hits)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats = self.engine.stats
        yield CounterMetricFamily("apertus_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=stats["prefix_queried_tokens"])
        yield CounterMetricFamily("apertus_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  value=stats["prefix_hit_tokens"])


def count_requests(app, metrics):
    """ASGI middleware: status and duration of every HTTP response, by route (unknown paths as "other")."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
        status, t0 = 499, time.perf_counter()  # 499: the client left before any response

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        except Exception:
            status = 500 if status == 499 else status
            raise
        finally:
            metrics.http.labels(route, str(status)).inc()
            metrics.http_latency.labels(route).observe(time.perf_counter() - t0)

    return middleware

