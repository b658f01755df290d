"""The HTTP API of ``peftkit serve`` (FastAPI). OpenAPI schema at ``/openapi.json``.

    POST   the task's route      classification: /v1/classify  {"adapter": name, "texts": [...]} or
                                 {"adapter": name, "pairs": [[a, b], ...]}  (the task's request/response schema)
    GET    /v1/adapters          name, method, labels, trainable share of every adapter
    POST   /v1/adapters          {"name": ..., "path": ...}   load an adapter folder (inside the adapter directory)
    DELETE /v1/adapters/{name}   unload it
    GET    /health               liveness
    GET    /metrics              Prometheus text format
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from .batcher import Batcher
from .common import BodyLimit, LoadRequest
from .model import AdapterConflict, AdapterNotFound, BadAdapterRequest, BadText, ServedModel

log = logging.getLogger("peftkit.serve")


class Limits(BaseModel):
    max_texts: int = 256
    max_chars: int = 10_000
    #: whole request body in bytes (413 above it); 256 texts of 10,000 characters fit
    max_request_bytes: int = 4 * 1024 * 1024


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("peftkit_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("peftkit_errors", "requests answered with an error", ["endpoint"], registry=self.registry)
        self.latency = Histogram("peftkit_request_seconds", "time from request to response", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.batch_rows = Histogram("peftkit_batch_rows", "rows per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                    registry=self.registry)
        self.batch_adapters = Histogram("peftkit_batch_adapters", "different adapters in one forward pass",
                                        buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        # one counter for every task's texts (classified, tagged, ...), told apart by the task label
        self.texts = Counter("peftkit_texts", "texts answered, per adapter and task", ["adapter", "task"],
                             registry=self.registry)
        self.adapters = Gauge("peftkit_adapters_loaded", "adapters in memory", registry=self.registry)


def create_app(served: ServedModel, max_batch_size: int = 32, max_wait_ms: float = 5.0,
               limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    metrics = Metrics()
    metrics.adapters.set(len(served.adapters))
    batcher_box: dict = {}

    def observe(names: list[str]) -> None:
        metrics.batch_rows.observe(len(names))
        metrics.batch_adapters.observe(len(set(names)))

    served.on_forward = observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher_box["batcher"] = Batcher(served.infer, max_batch_size, max_wait_ms)
        yield
        batcher_box["batcher"].close()

    app = FastAPI(title="peftkit serve", version="1", lifespan=lifespan,
                  description="One base model, many adapters; each request picks its adapter.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)

    def error(status: int, message: str, endpoint: str) -> JSONResponse:
        metrics.errors.labels(endpoint).inc()
        metrics.requests.labels(endpoint, str(status)).inc()
        # messages may quote what the client sent: keep them encodable whatever it was
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return JSONResponse(status_code=status, content={"error": message})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(422, f"invalid request: {problems[:2000]}", request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 413:  # BodyLimit
            return error(413, f"the request body is larger than {limits.max_request_bytes} bytes (the server's "
                              "--max_request_bytes): send fewer or shorter texts per request", request.url.path)
        return error(exc.status_code, str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details", request.url.path)

    for task in served.tasks:  # one route per task (--task auto: /v1/classify and /v1/tag)
        _route(app, served, task, task.serve_schema(), limits, metrics, batcher_box, error)

    @app.get("/v1/adapters")
    async def list_adapters():
        metrics.requests.labels("/v1/adapters", "200").inc()
        return {"base": {"labels": served.base_labels, **served.settings},
                "adapters": [info.public() for info in served.adapters.values()]}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadRequest):
        endpoint = "/v1/adapters"
        try:
            info = served.load(body.name, body.path)
        except AdapterNotFound as err:
            return error(404, str(err.args[0]), endpoint)
        except AdapterConflict as err:
            return error(409, str(err), endpoint)
        except BadAdapterRequest as err:
            return error(400, str(err), endpoint)
        metrics.adapters.set(len(served.adapters))
        metrics.requests.labels(endpoint, "201").inc()
        return info.public()

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        endpoint = "/v1/adapters"
        try:
            served.unload(name)
        except AdapterNotFound as err:
            return error(404, str(err.args[0]), endpoint)
        metrics.adapters.set(len(served.adapters))
        metrics.requests.labels(endpoint, "200").inc()
        return {"unloaded": name}

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": len(served.adapters)}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _route(app: FastAPI, served: ServedModel, task, schema, limits: Limits, metrics: Metrics, batcher_box: dict,
           error) -> None:
    """``POST schema.route``: the task's requests, batched with every other request (of any task) by the batcher."""

    async def infer(body):
        started = time.perf_counter()
        endpoint = schema.route
        items = task.request_rows(body)
        if not items:
            return error(422, f"nothing to {schema.verb}: the list is empty", endpoint)
        if len(items) > limits.max_texts:
            return error(413, f"{len(items)} texts in one request; the limit is {limits.max_texts}", endpoint)
        for i, item in enumerate(items):
            for text in (t for t in item if isinstance(t, str)):
                if len(text) > limits.max_chars:
                    return error(413, f"text {i} has {len(text)} characters; the limit is {limits.max_chars}", endpoint)
                if not text.strip():
                    return error(422, f"text {i} is empty", endpoint)
        try:
            labels = served.labels_of(body.adapter)
        except AdapterNotFound as err:
            return error(404, str(err.args[0]), endpoint)
        except BadAdapterRequest as err:
            return error(400, str(err), endpoint)
        if served.task_of(body.adapter) is not task:  # --task auto: a run of another task
            other = served.task_of(body.adapter)
            return error(422, f"adapter {body.adapter!r} is a {other.name} adapter: send its texts to "
                              f"{other.serve_schema().route}", endpoint)
        problem = task.request_problem(body, served.settings_of(body.adapter))
        if problem:
            return error(422, problem, endpoint)
        rows = [(body.adapter, *item) for item in items]
        outputs = await batcher_box["batcher"].submit(rows)
        failed = next((p for p in outputs if isinstance(p, Exception)), None)
        if failed is not None:
            return _row_error(failed, endpoint)
        answer = task.response(body.adapter, outputs, labels, served.vocabulary_of(body.adapter))
        metrics.texts.labels(body.adapter, task.name).inc(len(rows))
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return answer

    infer.__annotations__["body"] = schema.request  # the task's request model: validated, and in the OpenAPI schema
    app.post(schema.route, response_model=schema.response)(infer)

    def _row_error(failed: Exception, endpoint: str) -> JSONResponse:
        if isinstance(failed, AdapterNotFound):  # the adapter was unloaded while the request waited
            return error(404, str(failed.args[0]), endpoint)
        if isinstance(failed, BadText):
            return error(422, str(failed), endpoint)
        log.error("%s failed: %s: %s", schema.verb, type(failed).__name__, failed)
        return error(500, f"{schema.verb} failed ({type(failed).__name__}); the server log has the details", endpoint)


def serve(base: str, adapters: str, host: str = "127.0.0.1", port: int = 8000, options: dict | None = None,
          max_batch_size: int = 32, max_wait_ms: float = 5.0, max_length: int = 128, threads: int | None = None,
          max_request_bytes: int = Limits().max_request_bytes, task: str = "classification",
          context_length: int | None = None, default_max_tokens: int = 256) -> None:
    """``options``: the task's base-model settings (classification: ``{"pooling": ...}``). ``task="causal-lm"``
    starts the OpenAI-compatible generation server instead (``openai_api.py``; its context is ``context_length``,
    at most the model's own, not ``max_length``; ``default_max_tokens``: the answer length of a request without
    ``max_tokens``)."""
    import torch
    import uvicorn

    if task == "causal-lm":
        from .openai_api import serve_openai

        return serve_openai(base, adapters, host, port, max_batch_size, context_length=context_length,
                            threads=threads, max_request_bytes=max_request_bytes,
                            default_max_tokens=default_max_tokens)

    from ..ops.memory import keep_freed_memory

    keep_freed_memory()  # a long-lived process: reuse freed activation memory instead of faulting it in again
    if threads:
        torch.set_num_threads(threads)
    served = ServedModel(base, adapters, task=task, max_length=max_length, **(options or {}))
    for folder, problem in served.discover():
        print(f"skipped adapter folder {folder!r}: {problem}", flush=True)
    shown = ", ".join(f"{key} {value}" for key, value in served.settings.items())
    print(f"serving {len(served.adapters)} adapter(s) on http://{host}:{port}" + (f" ({shown})" if shown else ""),
          flush=True)
    app = create_app(served, max_batch_size, max_wait_ms, Limits(max_request_bytes=max_request_bytes))
    uvicorn.run(app, host=host, port=port, log_level="warning")
