"""The HTTP router service: FastAPI over a loaded :class:`~deepinsert.router.runtime.Router`.

Endpoints (all JSON):

- ``POST /route`` with ``{"prompt": "..."}`` -> ``{"layer", "index", "probs", "num_tokens", "truncated",
  "fallback", "ood_score", "lam", "losses"}``, or with ``{"prompts": ["...", ...]}`` ->
  ``{"results": [...]}`` (at most ``max_batch`` prompts). Optional ``"lam"`` or ``"budget"``
  (target mean FLOPs fraction) for loss-curve bundles; a fixed-λ bundle answers 400.
  ``fallback`` is true when the out-of-distribution guard tripped (the layer is its fallback
  layer, or the one a loss-curve bundle's guard margin let the prompt through to).
- ``GET /health`` -> ``{"status": "ok"}``.
- ``GET /info`` -> the bundle metadata (``router.json``) and the service limits.

Errors are JSON ``{"error": "<message>"}`` with a 4xx status: 422 for a request that does
not match the schema, 400 for a prompt the router cannot use (empty, no tokens), 413 for
a body larger than ``max_body_bytes`` or prompts longer than ``max_prompt_chars`` in all,
404/405 for unknown routes. Torch-free, like the runtime. Run it with
``deepinsert serve BUNDLE_DIR`` (binds 127.0.0.1 by default).

Limits against abuse (each a :func:`create_app` / :func:`serve` argument and a ``serve`` flag):

- work per request is bounded *before* tokenising: a request's prompts may hold at most
  ``max_prompt_chars`` characters in all (each prompt is routed on its first 256 tokens
  anyway), so no request can make the tokenizer chew through a 256 KB word;
- a connection must deliver a complete request (headers and body) within
  ``request_timeout_s`` of connecting or of its previous response, or it is closed (slow
  clients cannot hold connections); idle keep-alive connections close after ``keep_alive_s``;
- at most ``max_connections`` connections are served at once (503 beyond);
- ``/docs`` and ``/openapi.json`` are off unless ``docs=True`` (``serve --docs``); ``/info``
  shows the bundle's metadata with absolute paths cut to their last component.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from deepinsert.errors import InputError
from deepinsert.router.runtime import Router
from deepinsert.utils.extras import require

fastapi = require("fastapi", "serve")
pydantic = require("pydantic", "serve")

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_PROMPT_CHARS = 4096
"""Characters of all prompts of one request together (a 256-token prompt is ~1-2 K characters;
tokenising 4 K characters takes ~2-3 ms on one core, 254 K took ~200 ms)."""
DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5
DEFAULT_MAX_CONNECTIONS = 128
MAX_HEADER_BYTES = 16 * 1024


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



def _cut_paths(obj: Any) -> Any:
    """A copy of ``obj`` with every absolute path string replaced by its last component."""
    if isinstance(obj, dict):
        return {k: _cut_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_cut_paths(v) for v in obj]
    if isinstance(obj, str) and obj and (PurePosixPath(obj).is_absolute() or PureWindowsPath(obj).is_absolute()
                                         or obj.startswith("~")):
        return (PureWindowsPath(obj) if "\\" in obj else PurePosixPath(obj)).name or "/"
    return obj


class ErrorBody(pydantic.BaseModel):
    """Every 4xx answer: one human-readable line."""

    error: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a prompt the router cannot use (empty, no tokens, not UTF-8)"},
    413: {"model": ErrorBody, "description": "body over max_body_bytes, or prompts over max_prompt_chars"},
    422: {"model": ErrorBody, "description": "a request that does not match the schema"},
}


def _check_budget(req: Any, max_prompt_chars: int) -> None:
    """Bound the work of one request before any tokenising (413), and refuse text that is not
    valid Unicode (a lone surrogate such as ``"\\ud800"`` in the JSON) with 400."""
    from starlette.exceptions import HTTPException

    prompts = [req.prompt] if req.prompt is not None else list(req.prompts or ())
    chars = sum(len(p) for p in prompts)
    if chars > max_prompt_chars:
        raise HTTPException(status_code=413,
                            detail=f"prompts too long: {chars} characters > max_prompt_chars={max_prompt_chars}")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(status_code=400, detail=f"prompt {i} is not valid Unicode text (lone surrogate)") from None


class RouteRequest(pydantic.BaseModel):
    """Exactly one of ``prompt`` (a string) or ``prompts`` (a non-empty list of strings), and at
    most one of ``lam`` / ``budget`` (loss-curve bundles only)."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    prompt: str | None = None
    prompts: list[str] | None = pydantic.Field(default=None, min_length=1)
    lam: float | None = pydantic.Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    budget: float | None = pydantic.Field(default=None, gt=0, le=1, allow_inf_nan=False)

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
    fallback: bool
    ood_score: float | None
    lam: float | None
    losses: list[float] | None
    first_layer: int | None = None
    """Set only where the image-aware stage refined the decision (the chat server); /route is question-only."""


class BatchDecision(pydantic.BaseModel):
    """Decisions for ``prompts``, in order."""

    results: list[Decision]


def create_app(
    router: Router | str | Path,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    docs: bool = False,
) -> fastapi.FastAPI:
    """The FastAPI app serving ``router`` (a loaded Router or a bundle folder).

    ``docs`` turns on ``/docs`` and ``/openapi.json`` (off by default: a production router
    need not describe itself to strangers; ``app.openapi()`` still gives the schema).
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    for name, v in (("max_batch", max_batch), ("max_body_bytes", max_body_bytes), ("max_prompt_chars", max_prompt_chars)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(router, Router):
        router = Router.load(router)

    app = fastapi.FastAPI(
        title="deepinsert router",
        description="Which decoder layer should the image tokens enter at, for this prompt?",
        version=router.info.versions.get("deepinsert", "unknown"),
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
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
        limits = {"max_batch": max_batch, "max_body_bytes": max_body_bytes, "max_prompt_chars": max_prompt_chars}
        return {**_cut_paths(router.info.to_dict()), "limits": limits}

    @app.post("/route", response_model=Decision | BatchDecision, responses=ERROR_RESPONSES)
    def route(req: RouteRequest) -> dict[str, Any]:
        _check_budget(req, max_prompt_chars)
        if req.prompt is not None:
            return router.route(req.prompt, lam=req.lam, budget=req.budget).to_dict()
        assert req.prompts is not None
        if len(req.prompts) > max_batch:
            raise StarletteHTTPException(
                status_code=422, detail=f"too many prompts: {len(req.prompts)} > max_batch={max_batch}; split the request"
            )
        return {"results": [d.to_dict() for d in router.route_batch(req.prompts, lam=req.lam, budget=req.budget)]}

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, or ``InputError`` (port busy, bad address).

    Binding before the server starts lets ``deepinsert serve`` say "port in use" in one line
    instead of announcing a server that then dies.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"cannot listen on {host}:{port}: unknown address ({e})") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted connections only
    # then, and without it every response waits ~40 ms for a delayed ACK
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        reason = "port already in use" if e.errno in (98, 48, 10048) else (e.strerror or str(e))
        raise InputError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def guarded_protocol(request_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline: a connection must deliver a whole request
    (headers and body) within ``request_timeout_s`` of connecting or of its previous response.

    uvicorn alone has no header or body read timeout, and any received byte cancels its
    keep-alive timer, so a client sending a byte now and then holds a connection forever.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                self.transport.close()  # a slow or stalled client: drop it, nothing was answered

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def serve(
    app: Any,
    sock: socket.socket,
    *,
    log_level: str = "info",
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    keep_alive_s: int = DEFAULT_KEEP_ALIVE_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Run ``app`` with uvicorn on the bound ``sock`` (see :func:`bind_socket`) until interrupted."""
    uvicorn = require("uvicorn", "serve")
    config = uvicorn.Config(
        app,
        http=guarded_protocol(request_timeout_s),
        log_level=log_level,
        timeout_keep_alive=keep_alive_s,
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        backlog=128,
        server_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])
