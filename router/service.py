"""The HTTP router service: FastAPI over a loaded :class:`~deepinsert.router.runtime.Router`.

Endpoints (all JSON):

- ``POST /route`` with ``{"prompt": "..."}`` -> ``{"layer", "index", "probs", "num_tokens", "truncated"}``,
  or with ``{"prompts": ["...", ...]}`` -> ``{"results": [...]}`` (at most ``max_batch`` prompts).
- ``GET /health`` -> ``{"status": "ok"}``.
- ``GET /info`` -> the bundle metadata (``router.json``) and the service limits.

Errors are JSON ``{"error": "<message>"}`` with a 4xx status: 422 for a request that does
not match the schema, 400 for a prompt the router cannot use (empty, no tokens), 413 for
a body larger than ``max_body_bytes``, 404/405 for unknown routes. Torch-free, like the
runtime. Run it with ``deepinsert serve BUNDLE_DIR`` (binds 127.0.0.1 by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepinsert.errors import InputError
from deepinsert.router.runtime import Router
from deepinsert.utils.extras import require

fastapi = require("fastapi", "serve")
pydantic = require("pydantic", "serve")

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY_BYTES = 256 * 1024


class BodySizeLimit:
    """Pure ASGI middleware: reject request bodies over ``max_bytes`` with 413 before parsing.

    Checks ``Content-Length`` first, then counts the bytes of streamed (chunked) bodies,
    buffering at most ``max_bytes`` and replaying them to the app.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"error": f"request body too large (limit {self.max_bytes} bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)



class RouteRequest(pydantic.BaseModel):
    """Exactly one of ``prompt`` (a string) or ``prompts`` (a non-empty list of strings)."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    prompt: str | None = None
    prompts: list[str] | None = pydantic.Field(default=None, min_length=1)

    @pydantic.model_validator(mode="after")
    def _one_of(self) -> RouteRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError('give exactly one of "prompt" (a string) or "prompts" (a list of strings)')
        return self


class Decision(pydantic.BaseModel):
    """One routing decision (see :class:`~deepinsert.router.runtime.RouteDecision`)."""

    layer: int
    index: int
    probs: list[float]
    num_tokens: int
    truncated: bool


class BatchDecision(pydantic.BaseModel):
    """Decisions for ``prompts``, in order."""

    results: list[Decision]


def create_app(
    router: Router | str | Path,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> fastapi.FastAPI:
    """The FastAPI app serving ``router`` (a loaded Router or a bundle folder)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_batch < 1 or max_body_bytes < 1:
        raise InputError(f"max_batch and max_body_bytes must be >= 1, got {max_batch}, {max_body_bytes}")
    if not isinstance(router, Router):
        router = Router.load(router)

    app = fastapi.FastAPI(
        title="deepinsert router",
        description="Which decoder layer should the image tokens enter at, for this prompt?",
        version=router.info.versions.get("deepinsert", "unknown"),
    )
    app.state.router = router
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(status_code=422, content={"error": "invalid request: " + "; ".join(parts)})

    @app.exception_handler(InputError)
    async def _input_error(request: fastapi.Request, exc: InputError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return {**router.info.to_dict(), "limits": {"max_batch": max_batch, "max_body_bytes": max_body_bytes}}

    @app.post("/route", response_model=Decision | BatchDecision)
    def route(req: RouteRequest) -> dict[str, Any]:
        if req.prompt is not None:
            return router.route(req.prompt).to_dict()
        assert req.prompts is not None
        if len(req.prompts) > max_batch:
            raise StarletteHTTPException(
                status_code=422, detail=f"too many prompts: {len(req.prompts)} > max_batch={max_batch}; split the request"
            )
        return {"results": [d.to_dict() for d in router.route_batch(req.prompts)]}

    return app
