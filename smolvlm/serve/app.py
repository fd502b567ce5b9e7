"""OpenAI-compatible HTTP server: `POST /v1/chat/completions` (plain and SSE streaming), `GET /v1/models`,
`GET /health`, `GET /info` and a chat web page at `/`, all served from one continuous-batching Scheduler.

Request path: size / content-type checks -> JSON -> validated request -> image URLs resolved under the image policy
-> processor (in a worker thread) -> Scheduler.submit -> updates streamed back through an asyncio queue. A client
that disconnects cancels its generation, which frees its batch slot at the next step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from smolvlm.api import VLM
from smolvlm.engine.scheduler import Handle, QueueFullError, RequestTimeoutError, Scheduler, Update
from smolvlm.errors import GenerationError, ImageError, PromptError, SmolVLMError
from smolvlm.serve import protocol
from smolvlm.serve.images import ImagePolicy, resolve_image_urls

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("smolvlm.serve")
DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class ServerSettings:
    """Limits and policies of one server."""

    model_name: str = "smolvlm"
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 2048  # the most a request may ask for
    default_max_tokens: int = 256
    max_batch_size: int = 32
    max_queue: int = 128
    request_timeout: float = 300.0
    retry_after: int = 1  # seconds, in 429 answers
    feature_cache_tiles: int = 512
    images: ImagePolicy = field(default_factory=ImagePolicy)


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON answer."""
        body = protocol.error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def api_error(error: Exception, settings: ServerSettings) -> APIError:
    """Map an exception raised while serving a request to its HTTP answer."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFullError):
        return APIError(429, str(error), "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(settings.retry_after)})  # fmt: skip
    if isinstance(error, RequestTimeoutError):
        return APIError(504, str(error), "timeout_error", code="timeout")
    if isinstance(error, ImageError):
        return APIError(400, str(error), param="messages", code="invalid_image")
    if isinstance(error, (PromptError, GenerationError, SmolVLMError)):
        return APIError(400, str(error))
    log.exception("internal error", exc_info=error)
    return APIError(500, f"internal server error ({type(error).__name__}); the request was not completed",
                    "server_error")  # fmt: skip


def create_app(vlm: VLM, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `vlm`; the scheduler starts and stops with the app."""
    settings = settings or ServerSettings(model_name=vlm.name)
    vlm.processor.max_pixels = settings.max_image_pixels
    scheduler = Scheduler(vlm.engine, settings.max_batch_size, settings.max_queue,
                          feature_cache_tiles=settings.feature_cache_tiles)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="smolvlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type_).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        return api_error(error, settings).response()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no static file {name!r}", "not_found_error")
        return FileResponse(path)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, **scheduler.stats()}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        limits = {k: v for k, v in asdict(settings).items() if k != "images"}
        limits["http_images"] = settings.images.allow_http
        return {"model": vlm.info(), "limits": limits, "defaults": asdict(vlm.defaults)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "smolvlm"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        try:
            chat = protocol.ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            message, param = protocol.validation_message(e)
            raise APIError(400, message, param=param) from None
        if chat.model != settings.model_name:
            raise APIError(404, f"model {chat.model!r} is not served here; use {settings.model_name!r}",
                           "not_found_error", "model", "model_not_found")  # fmt: skip
        options = chat.options(settings.default_max_tokens)
        if options["max_new_tokens"] > settings.max_tokens:
            raise APIError(400, f"max_tokens {options['max_new_tokens']} is above this server's limit of "
                           f"{settings.max_tokens}", param="max_tokens")  # fmt: skip
        try:
            config = vlm.config_for(options)
            conversation = await run_in_threadpool(resolve_image_urls, chat.conversation(), settings.images)
            batch = await run_in_threadpool(vlm.prepare, [conversation])
        except Exception as e:  # noqa: BLE001 - every bad input becomes an OpenAI error answer
            raise api_error(e, settings) from None
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        try:
            handle = scheduler.submit(batch.input_ids, batch.attention_mask, config, batch.pixel_values,
                                      batch.pixel_attention_mask, timeout=settings.request_timeout,
                                      sink=lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            raise api_error(e, settings) from None
        completion_id = protocol.new_id()
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            events = _sse(completion_id, settings, handle, updates, include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        result = await _wait_for_result(request, handle, updates)
        if result is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        if isinstance(result, Exception):
            raise api_error(result, settings)
        return JSONResponse(protocol.completion(completion_id, settings.model_name, result))

    return app


async def _read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON, enforcing content type and size."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}",
                       code="unsupported_media_type")  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is above the limit of {limit} bytes",
                       code="request_too_large")  # fmt: skip
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise APIError(413, f"request body is above the limit of {limit} bytes", code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None


async def _wait_for_result(request: Request, handle: Handle, updates: asyncio.Queue[Update]) -> Any:
    """The final result (or error) of a non-streamed request; None (and the request cancelled) if the client left."""
    checked = time.monotonic()
    while True:
        try:
            update = await asyncio.wait_for(updates.get(), timeout=DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            update = None
        if time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:  # pieces arrive often: poll by the clock
            checked = time.monotonic()
            if await request.is_disconnected():
                handle.cancel()
                return None
        if update is None:
            continue
        if update.error is not None:
            return update.error
        if update.result is not None:
            return update.result


async def _sse(completion_id: str, settings: ServerSettings, handle: Handle, updates: asyncio.Queue[Update],
               include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; closing the stream cancels."""
    model = settings.model_name

    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield event(protocol.chunk(completion_id, model, {"role": "assistant", "content": ""}))
        while True:
            update = await updates.get()
            if update.error is not None:
                error = api_error(update.error, settings)
                yield event(protocol.error_body(error.message, error.type, error.param, error.code))
                break
            if update.result is not None:
                if include_usage:
                    yield event(protocol.chunk(completion_id, model, {}, usage_counts=protocol.usage(update.result)))
                break
            if update.text or update.finish_reason:
                delta = {"content": update.text} if update.text else {}
                yield event(protocol.chunk(completion_id, model, delta, update.finish_reason))
        yield "data: [DONE]\n\n"
    finally:
        if not handle.done.is_set():
            handle.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of `smolvlm serve`."""
    defaults = ServerSettings()
    p = argparse.ArgumentParser(prog="smolvlm serve", description="OpenAI-compatible server with a chat web page")
    p.add_argument("-m", "--model", default="demo", help="hub id, local folder, .gguf, smollm2 or demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: the --model value)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="the most a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    p.add_argument("--timeout", type=float, default=defaults.request_timeout, help="seconds per request")
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    p.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    p.add_argument("--max-image-mb", type=float, default=ImagePolicy().max_bytes / 2**20)
    p.add_argument("--feature-cache-tiles", type=int, default=defaults.feature_cache_tiles)
    p.add_argument("--allow-image-host", action="append", default=[], metavar="HOST",
                   help="fetch http(s) image URLs from this host (repeatable; *.domain or * for any public host)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from parsed options."""
    images = ImagePolicy(allow_http=bool(args.allow_image_host), allowed_hosts=tuple(args.allow_image_host),
                         max_bytes=int(args.max_image_mb * 2**20))  # fmt: skip
    return ServerSettings(
        model_name=args.served_model_name or args.model,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        request_timeout=args.timeout,
        feature_cache_tiles=args.feature_cache_tiles,
        images=images,
    )


def main(argv: list[str] | None = None) -> int:
    """`smolvlm serve`: load the model and serve it until interrupted."""
    import uvicorn

    from smolvlm.api import load

    args = parse_args(argv)
    settings = settings_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        vlm = load(args.model, device=args.device, dtype=args.dtype)
    except SmolVLMError as e:
        print(f"error: {e}")
        return 1
    log.info("serving %s on http://%s:%d", settings.model_name, args.host, args.port)
    uvicorn.run(create_app(vlm, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0
