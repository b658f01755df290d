"""What both servers (classification: ``app.py``, generation: ``openai_api.py``) share: the body size limit and
the adapter-load request."""

from __future__ import annotations

from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ..tasks.schema import Text


class LoadRequest(BaseModel):
    name: Text
    path: Text = Field(description="folder of the adapter, relative to (or inside) the server's adapter directory",
                       max_length=4096)


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (HTTP 413) before they are read whole: by their declared
    Content-Length, and by counting the bytes of a body sent without one (chunked)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.app(scope, _refuse, send)  # the endpoint's body read raises BodyTooLarge
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()  # an HTTPException: FastAPI passes it on to the 413 handler
            return message

        await self.app(scope, counted, send)


async def _refuse():
    raise BodyTooLarge()
