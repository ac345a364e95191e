"""The FastAPI app: routes, API-key check, request metrics, and `serve()` for `gptoss serve`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from gptoss.server import chat_completions, completions, errors, responses
from gptoss.server.state import ServerState

log = logging.getLogger("gptoss.server")

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics")


def _endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    for prefix in ("/v1/responses/", "/v1/models/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


# The largest request body read: more than a full 131k-token context of text, and less than what
# makes the harmony tokenizer fail. Larger bodies get 413 before anything parses them.
MAX_BODY_BYTES = 1024 * 1024


class _BodyTooLarge(Exception):
    pass


def _content_length(scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class APIMiddleware:
    """Checks the API key on /v1/* and the body size, and counts every answer by endpoint and
    status (pure ASGI, so streaming and disconnect detection pass through untouched)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 499}  # stays 499 when the client leaves before any answer

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def answer(error: errors.APIError, *extra_headers) -> None:
            body = json.dumps(error.body()).encode()
            await send_counted({"type": "http.response.start", "status": error.status,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), *extra_headers]})
            await send({"type": "http.response.body", "body": body})

        received = 0

        async def receive_bounded():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        try:
            if path.startswith("/v1/") and self.state.api_key and not self._authorized(scope):
                return await answer(errors.invalid_api_key(), (b"www-authenticate", b"Bearer"))
            if _content_length(scope) > MAX_BODY_BYTES:
                return await answer(errors.body_too_large(MAX_BODY_BYTES))
            try:
                await self.app(scope, receive_bounded, send_counted)
            except _BodyTooLarge:
                if status["code"] == 499:  # nothing answered yet
                    await answer(errors.body_too_large(MAX_BODY_BYTES))
            except ClientDisconnect:  # the client left while sending its body: nobody to answer
                log.info("%s: the client disconnected before sending the whole request body", path)
        finally:
            self.state.metrics.requests.inc(1, _endpoint_label(path), str(status["code"]))

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          self.state.api_key.encode())
        return False


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            await state.engine.stop()

    app = FastAPI(title="gptoss", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    errors.install(app)
    app.include_router(chat_completions.router)
    if state.ui:
        page = (Path(__file__).parent / "ui" / "index.html").read_bytes()

        @app.get("/", include_in_schema=False)
        async def chat_page():  # the chat page: static, it talks to /v1 like any client
            return Response(page, media_type="text/html; charset=utf-8")

    app.include_router(responses.router)
    app.include_router(completions.router)
    app.add_middleware(APIMiddleware, state=state)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "gptoss",
                "root": state.model_root, "parent": None,
                "max_model_len": min(state.engine.context_length, state.engine.kv_cache_tokens)}

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        state.check_model(name)
        return JSONResponse(model_card())

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if state.engine.draining:  # load balancers: send no more traffic here
            return JSONResponse({"status": "shutting down", "running": state.engine.num_active}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_name,
                             "running": state.engine.num_active})

    @app.get("/metrics")
    async def metrics(request: Request):
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


MIN_KV_CACHE_TOKENS = 1024  # less, and every chat request would be refused for length


def build_state(path: str | Path, *, served_model_name: str | None = None, api_key: str | None = None,
                kv_cache_size=None, max_num_seqs: int = 32, max_queue: int = 64, device: str = "cpu",
                progress: bool = True, dense_int8: bool = False, strict_params: bool = False,
                ui: bool = True, tensor_parallel_size: int = 1, expert_parallel: bool = False,
                cuda_graphs: bool | None = None, mmap: bool = True) -> ServerState:
    """Load the model and wrap it for serving."""
    from gptoss.engine.engine import LLMEngine
    from gptoss.engine.distributed import load_model
    from gptoss.server.async_engine import AsyncEngine
    from gptoss.tokenizer import harmony_encoding, tiktoken_encoding

    from gptoss.checkpoint import detect_layout

    path = Path(path)
    detect_layout(path)  # a folder that is not a model says so first (before the vocabulary is looked for)
    encoding, text_encoding = harmony_encoding(path), tiktoken_encoding(path)  # fail fast on a missing vocab
    model = load_model(path, device=device, progress=progress, dense_int8=dense_int8,
                       tensor_parallel_size=tensor_parallel_size, expert_parallel=expert_parallel, mmap=mmap)
    engine = LLMEngine(model, kv_cache_size=kv_cache_size, max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs)
    smallest = min(MIN_KV_CACHE_TOKENS, model.config.context_length)
    if engine.kv_cache_tokens < smallest:
        raise ValueError(f"a KV cache of {kv_cache_size} holds {engine.kv_cache_tokens} tokens; the server needs room "
                         f"for at least {smallest} (a chat prompt alone is about 100 tokens)")
    name = served_model_name or path.resolve().name
    return ServerState(AsyncEngine(engine, max_queue=max_queue), encoding, text_encoding, name, api_key,
                       strict_params=strict_params, model_root=str(path.resolve()), ui=ui)


def run(state: ServerState, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        shutdown_timeout: float = 30.0) -> None:
    """Serve until SIGTERM or Ctrl-C: then take no new requests (503), let the running ones finish
    for up to `shutdown_timeout` seconds, end the rest with an error event, and return. A second
    signal stops at once."""
    engine = state.engine
    print(f"gptoss serve: {state.model_name} on http://{host}:{port}/v1"
          f"{f' (chat page at http://{host}:{port}/)' if state.ui else ''} "
          f"(KV cache {engine.kv_cache_tokens} tokens, {engine.max_num_seqs} sequences, "
          f"queue {engine.max_queue}{', API key required' if state.api_key else ''}; "
          f"kernels: {_kernels(engine)})", flush=True)
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, state.engine, shutdown_timeout)
    state.engine.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.engine.fatal is not None:
        raise SystemExit(f"gptoss serve: stopped: {state.engine.fatal}")


def _kernels(engine) -> str:
    from gptoss import ops

    model = getattr(getattr(engine, "engine", None), "model", None)
    return ops.backend_name(model.device) if model is not None else "unknown"


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, whose first exit signal drains the engine before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, engine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if self.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        log.warning("shutting down: no new requests; waiting up to %.0f s for %d running", self.grace,
                    self.engine.num_active)
        cut = await self.engine.drain(self.grace)
        if cut:
            log.warning("shutting down: ended %d requests still running after %.0f s", cut, self.grace)
        await asyncio.sleep(0.1)  # let their streams write the error and [DONE]
        self.should_exit = True


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          shutdown_timeout: float = 30.0, **options) -> None:
    run(build_state(path, **options), host=host, port=port, log_level=log_level, shutdown_timeout=shutdown_timeout)
