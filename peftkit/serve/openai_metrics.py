"""Prometheus metrics of the OpenAI-compatible server (``GET /metrics``): requests by endpoint and status,
generated tokens, time to first token, inter-token latency, rows and distinct adapters per forward, and the rows
decoding and waiting now."""

from __future__ import annotations

#: the routes counted by name; any other path (unknown, hostile) is counted as "other", so that clients cannot
#: grow the label set without bound
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/health", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GenerationMetrics:
    """The engine calls ``step`` after every forward and ``token`` for every new token (from its thread)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("peftkit_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("peftkit_generated_tokens", "tokens generated", ["model"], registry=self.registry)
        self.first_token = Histogram("peftkit_time_to_first_token_seconds", "from a request's arrival in the engine "
                                     "to its first token", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("peftkit_inter_token_seconds", "between two tokens of one request",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("peftkit_batch_rows", "rows per forward pass", ["phase"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_adapters = Histogram("peftkit_batch_adapters", "distinct adapters (base counts as one) per forward "
                                        "pass", ["phase"], buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.active = Gauge("peftkit_active_rows", "rows in the running batch", registry=self.registry)
        self.waiting = Gauge("peftkit_waiting_rows", "rows waiting to join the batch", registry=self.registry)
        self.adapters = Gauge("peftkit_adapters_loaded", "adapters in memory", registry=self.registry)

    def watch(self, engine, served) -> None:
        """Read the live gauges from ``engine`` and ``served`` at every scrape."""
        self.active.set_function(lambda: len(engine.rows))
        self.waiting.set_function(lambda: len(engine.waiting))
        self.adapters.set_function(lambda: len(served.adapters))
        engine.observer = self

    def step(self, names: list[str], prefill: bool, waiting: int) -> None:
        phase = "prefill" if prefill else "decode"
        self.batch_rows.labels(phase).observe(len(names))
        self.batch_adapters.labels(phase).observe(len(set(names)))

    def token(self, model: str, seconds: float, first: bool) -> None:
        self.tokens.labels(model).inc()
        (self.first_token if first else self.inter_token).observe(seconds)

    def middleware(self, app):
        """ASGI middleware counting every HTTP answer by route and status."""

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope.get("path", "")
            endpoint = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
            status = {"code": 500}  # if the app fails before it answers

            async def sending(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                self.requests.labels(endpoint, str(status["code"])).inc()

        return counted

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
