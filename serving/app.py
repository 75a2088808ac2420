"""The OpenAI-compatible chat server: FastAPI over a router bundle, a FrozenVLM and the scheduler.

Endpoints:

- ``POST /v1/chat/completions``: OpenAI's chat format (``serving/protocol.py``), streamed
  as Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``) or not. The response adds
  ``usage`` and a ``deepinsert`` object: ``layer``, ``routed`` (false when
  ``insert_layer`` forced it), ``fallback`` (the router could not read the question, or its
  guard tripped: the request ran at the fallback layer, or at the layer a loss-curve bundle's
  guard margin let it through to), ``flops_fraction`` (Eq. 5
  prefill FLOPs vs k = 0), ``router_ms``, and ``first_layer`` (the question-only layer) when
  the bundle's image-aware stage refined the decision (its image summary is computed in the
  request thread; the prefill reuses the features it encoded). ``lam`` / ``budget`` in the body choose the
  trade-off per request (loss-curve bundles).
- ``GET /v1/models``: the one served model.
- ``POST /route``, ``GET /health``, ``GET /info``: as the router-only service, plus the
  model and scheduler limits in ``/info``.
- ``GET /metrics``: Prometheus text format.

Every error is OpenAI's ``{"error": {...}}`` JSON with a 4xx status (429 + ``Retry-After``
when the queue is full). Parsing a request (base64, the image header, the chat template,
tokenizing, routing) runs in a thread, and the model runs in the scheduler's one worker
thread, so the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deepinsert.errors import InputError
from deepinsert.frozen_vlm.flops import flops, flops_fraction
from deepinsert.frozen_vlm.layers import image_tokens_per_image
from deepinsert.frozen_vlm.sampling import SamplingParams
from deepinsert.router.service import BodySizeLimit, RouteRequest
from deepinsert.serving.conversation import PromptBuilder
from deepinsert.serving.metrics import ServerMetrics
from deepinsert.serving.protocol import (
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
)
from deepinsert.serving.scheduler import Job, Scheduler, SchedulerConfig
from deepinsert.utils.extras import require

fastapi = require("fastapi", "serve")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side limits of the chat server."""

    model_name: str = "deepinsert"  # the id /v1/models lists and requests must name
    default_max_tokens: int = 256  # answer length when the request gives none (capped by the context)
    max_body_bytes: int = 20 * 1024 * 1024  # largest request body (base64 images included)
    max_image_pixels: int = 4096 * 4096  # larger images are refused from their header, before decoding
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: data URLs only)


class _OpenAIBodyLimit(BodySizeLimit):
    async def _reject(self, send: Any) -> None:
        body = json.dumps(error_body(f"request body too large (limit {self.max_bytes} bytes)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _error_response(err: APIError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=err.status, content=err.body(), headers=err.headers)


def create_chat_app(
    vlm: Any,
    router: Any,
    *,
    config: ServerConfig | None = None,
    scheduler_config: SchedulerConfig | None = None,
) -> fastapi.FastAPI:
    """The FastAPI app; the scheduler's worker starts with the app and stops with it.

    Args:
        vlm: a :class:`~deepinsert.frozen_vlm.FrozenVLM` with its processor.
        router: a :class:`~deepinsert.router.Router` trained for ``vlm`` (same N, embedding table).
        config: HTTP-side limits.
        scheduler_config: batching limits (KV budget, batch size, queue).
    """
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from deepinsert.generate import _check_router_fits, refine_with_images

    config = config or ServerConfig()
    scheduler_config = scheduler_config or SchedulerConfig()
    if vlm.processor is None:
        raise InputError("the chat server needs the model's processor (load it with load_vlm)")
    _check_router_fits(router, vlm)
    N = vlm.num_layers
    n_img_tokens = image_tokens_per_image(vlm.config)
    max_pos = getattr(vlm.config.text_config, "max_position_embeddings", None)
    builder = PromptBuilder(vlm.processor, n_img_tokens, max_pos, max_pixels=config.max_image_pixels,
                            allow_remote_images=config.allow_remote_images,
                            max_image_bytes=config.max_body_bytes)
    metrics = ServerMetrics()
    scheduler = Scheduler(vlm, builder, scheduler_config, metrics)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = fastapi.FastAPI(title="deepinsert chat", lifespan=lifespan,
                          description="OpenAI-compatible multimodal chat with per-request image insertion layers")
    app.state.scheduler, app.state.router, app.state.vlm, app.state.metrics = scheduler, router, vlm, metrics
    app.add_middleware(_OpenAIBodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        parts, params = [], []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            params.append(loc)
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(status_code=400, content=error_body("invalid request: " + "; ".join(parts),
                                                                 param=params[0] if params else None))

    @app.exception_handler(APIError)
    async def _api_error(request: fastapi.Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(InputError)
    async def _input_error(request: fastapi.Request, exc: InputError) -> JSONResponse:
        return JSONResponse(status_code=400, content=error_body(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail), kind))

    @app.get("/health")
    def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ok" if ok else "model worker stopped"})

    @app.get("/info")
    def info() -> dict[str, Any]:
        return {**router.info.to_dict(),
                "model": {"name": config.model_name, "num_layers": N, "image_tokens": n_img_tokens,
                          "dtype": str(vlm.dtype).replace("torch.", ""), "device": str(vlm.device),
                          "max_positions": max_pos},
                "scheduler": {**scheduler_config.__dict__, **scheduler.state()},
                "limits": {"max_body_bytes": config.max_body_bytes, "max_image_pixels": config.max_image_pixels,
                           "default_max_tokens": config.default_max_tokens,
                           "allow_remote_images": config.allow_remote_images}}

    @app.get("/metrics")
    def prom_metrics() -> Response:
        body, ctype = metrics.render()
        return Response(content=body, media_type=ctype)

    @app.post("/route")
    def route(req: RouteRequest) -> dict[str, Any]:
        if req.prompt is not None:
            return router.route(req.prompt, lam=req.lam, budget=req.budget).to_dict()
        return {"results": [d.to_dict() for d in router.route_batch(req.prompts or [], lam=req.lam, budget=req.budget)]}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "deepinsert"}]}

    def _plan(req: ChatRequest) -> tuple[Job, dict[str, Any]]:
        """Everything before the model (runs in a thread): validate, parse, route, reserve."""
        if req.model != config.model_name:
            raise APIError(f"the model {req.model!r} does not exist; this server serves {config.model_name!r}",
                           404, type="not_found_error", param="model", code="model_not_found")
        req.check_supported()
        if req.lam is not None or req.budget is not None:
            param = "lam" if req.lam is not None else "budget"
            if not router.supports_lam:
                raise APIError("this router bundle was trained at one lambda; lam / budget are not supported by it",
                               param=param)
            try:
                router.lam_for(req.lam, req.budget)  # validate before parsing the conversation
            except InputError as e:
                raise APIError(str(e), param=param) from None
        if req.insert_layer is not None and req.insert_layer > N:
            raise APIError(f"insert_layer must be in 0..{N}", param="insert_layer")
        conv = builder.parse(req)
        room = (max_pos - len(conv.prompt_ids)) if max_pos else None
        asked = req.requested_max_tokens()
        if asked is not None and room is not None and asked > room:
            raise APIError(f"max_tokens={asked} does not fit: the prompt is {len(conv.prompt_ids)} tokens and the "
                           f"model handles {max_pos} positions", param="max_tokens", code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(config.default_max_tokens, room or config.default_max_tokens)
        routed, fallback, router_ms, first_layer, image_features = False, False, 0.0, None, None
        if req.insert_layer is not None:
            layer = int(req.insert_layer)
        elif conv.image is None:
            layer = N  # no image: every k computes the same; N needs no vision tower
        elif not conv.question:
            layer, fallback = 0, True
        else:
            t0 = time.perf_counter()
            try:
                decision = router.route(conv.question, lam=req.lam, budget=req.budget)
                routed = True
            except InputError:  # nothing the router can read (e.g. no known token): the stock model
                layer, fallback = 0, True
            else:  # the bundle's image-aware stage, if it has one (its vision-tower pass is the prefill's)
                refined, feats = refine_with_images(vlm, router, [decision], [conv.image])
                decision, image_features = refined[0], feats[0]
                layer, fallback, first_layer = int(decision.layer), bool(decision.fallback), decision.first_layer
            router_ms = 1000 * (time.perf_counter() - t0)
        if fallback:
            metrics.fallbacks.inc()
        f_k = flops(vlm, layer, conv.n_text, conv.n_image)
        f_0 = flops(vlm, 0, conv.n_text, conv.n_image)
        metrics.flops_total.inc(f_k)
        metrics.flops_saved.inc(f_0 - f_k)
        sampling = SamplingParams(float(req.temperature or 0.0), float(req.top_p if req.top_p is not None else 1.0),
                                  req.seed)
        job = Job(prompt_ids=conv.prompt_ids, image=conv.image, layer=layer, n_text=conv.n_text,
                  n_image=conv.n_image, max_tokens=max_tokens, sampling=sampling, stops=req.stop_list(),
                  image_features=image_features)
        extra = {"layer": layer, "routed": routed, "fallback": fallback,
                 "flops_fraction": flops_fraction(vlm, layer, conv.n_text, conv.n_image),
                 "router_ms": round(router_ms, 3), "num_layers": N}
        if first_layer is not None:
            extra["first_layer"] = first_layer
        return job, extra

    def _usage(done: dict[str, Any]) -> dict[str, int]:
        p, c = int(done["prompt_tokens"]), int(done["completion_tokens"])
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: fastapi.Request) -> Any:
        job, extra = await asyncio.to_thread(_plan, req)
        loop = asyncio.get_running_loop()
        scheduler.submit(job, loop)
        cid, created = completion_id(), int(time.time())
        timeout = scheduler_config.request_timeout_s + 5.0
        assert job.events is not None

        if not req.stream:
            pieces: list[str] = []
            t_end = time.monotonic() + timeout
            try:
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(job.events.get(), 0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel()
                            return Response(status_code=499)
                        if time.monotonic() > t_end:
                            job.cancel()
                            raise APIError("the request timed out", 408, type="timeout") from None
                        continue
                    if kind == "delta":
                        pieces.append(payload)
                    elif kind == "error":
                        raise payload
                    else:
                        extra["finish_reason"] = payload["finish_reason"]
                        extra.update({"ttft_ms": round(1000 * (payload["ttft_s"] or 0.0), 3)})
                        return completion_body(cid, config.model_name, "".join(pieces), payload["finish_reason"],
                                               _usage(payload), extra, created)
            except asyncio.CancelledError:
                job.cancel()
                raise

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            def sse(obj: Any) -> str:
                return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

            try:
                yield sse(chunk_body(cid, config.model_name, created, {"role": "assistant", "content": ""},
                                     deepinsert=extra))
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(job.events.get(), timeout)
                    except asyncio.TimeoutError:
                        job.cancel()
                        yield sse(error_body("the request timed out", "timeout"))
                        break
                    if kind == "delta":
                        yield sse(chunk_body(cid, config.model_name, created, {"content": payload}))
                    elif kind == "error":
                        yield sse(payload.body())
                        break
                    else:
                        yield sse(chunk_body(cid, config.model_name, created, {}, payload["finish_reason"]))
                        if include_usage:
                            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": config.model_name, "choices": [], "usage": _usage(payload)})
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): stop generating for it
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
