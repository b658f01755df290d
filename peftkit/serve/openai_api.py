"""The OpenAI-compatible HTTP API of ``peftkit serve`` for causal LMs (FastAPI; the official ``openai`` client
works against it unchanged). ``model`` in a request is an adapter's name or ``base``.

    POST   /v1/chat/completions  messages -> the assistant's answer (``stream: true``: server-sent events)
    POST   /v1/completions       prompt -> its continuation
    GET    /v1/models            base and every adapter
    GET    /v1/adapters          POST /v1/adapters {"name", "path"}   DELETE /v1/adapters/{name}   (hot load/unload)
    GET    /health
    GET    /metrics              Prometheus text format (``openai_metrics.py``)

Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, never a 500 for a bad request:
an unknown model 404; a prompt longer than the context, an unsupported field (``n > 1``, ``logprobs``, ``tools``,
...: ``openai_schema.UNSUPPORTED``) or several prompts in one request 400; a malformed body (not JSON, wrong types,
values out of range, lone surrogates) 422; a body over ``max_request_bytes`` 413. Every request is one row of the
engine's running batch (``engine.py``); a client that disconnects, streaming or not, frees its row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..mixing import BASE
from .common import BodyLimit, LoadRequest
from .engine import Engine, Row, Sampling
from .generation import ServedLM
from .openai_metrics import GenerationMetrics
from .model import AdapterConflict, AdapterNotFound, BadAdapterRequest
from .openai_schema import ChatRequest, CompletionRequest, Generation, error_body

log = logging.getLogger("peftkit.serve")


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def create_openai_app(served: ServedLM, max_batch_size: int = 16, default_max_tokens: int = 256,
                      max_request_bytes: int = 4 * 1024 * 1024) -> FastAPI:
    box: dict = {}
    metrics = GenerationMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        box["engine"] = Engine(served.model, served.tokenizer, served.lock, max_batch_size, served.context_length)
        app.state.engine = box["engine"]
        metrics.watch(box["engine"], served)
        yield
        box["engine"].close()

    app = FastAPI(title="peftkit serve (OpenAI-compatible)", version="1", lifespan=lifespan,
                  description="One causal LM, many adapters; `model` picks the adapter ('base': none).")
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(metrics.middleware)
    app.state.metrics = metrics
    vocabulary = served.model.base_model.get_input_embeddings().num_embeddings

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content=error_body(message, status, param))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        first = exc.errors()[0]["loc"][1:] if exc.errors() else ()
        return error(422, f"invalid request: {problems[:2000]}", str(first[0]) if first else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 413:
            return error(413, f"the request body is larger than {max_request_bytes} bytes (the server's "
                              "--max_request_bytes)")
        if exc.status_code == 400:  # FastAPI could not parse the body (bad UTF-8, a huge number, deep nesting)
            return error(422, f"invalid request: the body is not valid JSON ({exc.detail})")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error(exc.status, str(exc), exc.param)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    def context() -> int:
        return box["engine"].context_length

    def check(body: Generation) -> None:
        """What a request asks for that this server cannot give: before any tokenizing."""
        if body.model != BASE and body.model not in served.adapters:
            served_names = ", ".join([BASE, *sorted(served.adapters)])
            raise RequestError(404, f"the model {body.model!r} does not exist; this server has: {served_names}", "model")
        refused = body.unsupported()
        if refused is not None:
            raise RequestError(400, refused[1], refused[0])

    def prepare(body: Generation, prompt: list[int], param: str) -> Sampling:
        if not prompt:
            raise RequestError(400, "the prompt is empty (no tokens)", param)
        if len(prompt) >= context():
            raise RequestError(400, f"the prompt has {len(prompt)} tokens; this model's context is {context()} tokens "
                                    "(prompt and answer together): shorten the prompt", param)
        wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max_tokens
        return Sampling(max_tokens=min(wanted, context() - len(prompt)), temperature=body.temperature,
                        top_p=body.top_p, seed=body.seed, stop=tuple(body.stop or ()))

    def chat_prompt(body: ChatRequest) -> list[int]:
        tokenizer = served.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(400, "the base model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # a template may refuse a conversation (e.g. roles out of order)
            raise RequestError(400, f"the chat template refused these messages: {err}", "messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt(body: CompletionRequest) -> list[int]:
        try:
            prompt = body.one_prompt()
        except ValueError as err:
            raise RequestError(400, str(err), "prompt") from None
        if isinstance(prompt, str):
            return served.tokenizer(prompt)["input_ids"]
        wrong = next((t for t in prompt if not 0 <= t < vocabulary), None)
        if wrong is not None:
            raise RequestError(400, f"token id {wrong} is outside the model's vocabulary (0 to {vocabulary - 1})",
                               "prompt")
        return list(prompt)

    def start(body: Generation, prompt: list[int], param: str) -> tuple[Row, asyncio.Queue]:
        sampling = prepare(body, prompt, param)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(event: tuple) -> None:  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        return box["engine"].submit(Row(body.model, prompt, sampling, sink)), events

    async def answer(request: Request, body: Generation, prompt: list[int], kind: str):
        row, events = start(body, prompt, "messages" if kind == "chat" else "prompt")
        ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(stream(row, events, body, ident, created, kind), media_type="text/event-stream")
        text = []
        try:
            while True:
                try:  # wake up now and then to notice a client that went away
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the row is freed below
                    continue
                if event[0] == "delta":
                    text.append(event[1])
                elif event[0] == "error":
                    raise RequestError(event[2], event[1], "model" if event[2] == 404 else None)
                else:
                    break
        finally:
            row.cancel()  # (a no-op once it finished) the client went away: free the row
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}} if kind == "chat"
                  else {"index": 0, "text": "".join(text)})
        return {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": body.model, "choices": [{**choice, "finish_reason": row.finish_reason, "logprobs": None}],
                "usage": usage(row)}

    async def stream(row: Row, events: asyncio.Queue, body: Generation, ident: str, created: int, kind: str):
        def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
            if kind == "chat":
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece or ""}
            data = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "created": created, "model": body.model,
                    "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(data)}\n\n"

        try:
            if kind == "chat":
                yield chunk(None, role=True)
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield chunk(event[1])
                elif event[0] == "error":  # the status line is sent: the error comes as an event
                    yield f"data: {json.dumps(error_body(event[1], event[2], 'model' if event[2] == 404 else None))}\n\n"
                    break
                else:
                    yield chunk(None, finish=row.finish_reason)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        data = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                "created": created, "model": body.model, "choices": [], "usage": usage(row)}
                        yield f"data: {json.dumps(data)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream: its row leaves the batch at the next step
            row.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        check(body)
        return await answer(request, body, chat_prompt(body), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        check(body)
        return await answer(request, body, completion_prompt(body), "text")

    @app.get("/v1/models")
    async def models():
        """Every model with this server's limits: ``context_length`` (prompt and answer together) and
        ``default_max_tokens`` (the answer's length when a request sends no ``max_tokens``; any ``max_tokens`` is
        capped at what the context leaves)."""
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "peftkit",
                                            "context_length": context(), "default_max_tokens": default_max_tokens}
                                           for name in [BASE, *served.adapters]]}

    @app.get("/metrics")
    async def prometheus():
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": [info.public() for info in served.adapters.values()]}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadRequest):
        try:
            return served.load(body.name, body.path).public()
        except AdapterNotFound as err:
            return error(404, str(err.args[0]), "path")
        except AdapterConflict as err:
            return error(409, str(err), "name")
        except BadAdapterRequest as err:
            return error(400, str(err))

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            served.unload(name)
        except AdapterNotFound as err:
            return error(404, str(err.args[0]), "name")
        return {"unloaded": name}

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": len(served.adapters), "rows": box["engine"].active}

    return app


def usage(row: Row) -> dict:
    return {"prompt_tokens": len(row.prompt), "completion_tokens": len(row.tokens),
            "total_tokens": len(row.prompt) + len(row.tokens)}


def serve_openai(base: str, adapters: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
                 context_length: int | None = None, threads: int | None = None,
                 max_request_bytes: int = 4 * 1024 * 1024, default_max_tokens: int = 256) -> None:
    """``peftkit serve --task causal-lm``: the OpenAI-compatible server on ``base`` with the adapters under
    ``adapters``."""
    import torch
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    served = ServedLM(base, adapters, context_length)
    for folder, problem in served.discover():
        print(f"skipped adapter folder {folder!r}: {problem}", flush=True)
    print(f"serving {len(served.adapters)} adapter(s) and the base model (OpenAI-compatible API) on "
          f"http://{host}:{port}/v1", flush=True)
    app = create_openai_app(served, max_batch_size, default_max_tokens, max_request_bytes)
    uvicorn.run(app, host=host, port=port, log_level="warning")
