"""OpenAI-compatible HTTP server and web chat on the engine (FastAPI + uvicorn).

    app = create_app(Engine("ckpt"), model_name="apertus")       # any ASGI server can run it
    serve("ckpt", host="127.0.0.1", port=8000, api_key=None)      # what `apertus serve` runs

Routes, one router each: POST /v1/chat/completions (routes_chat.py), POST /v1/completions (routes_completions.py),
GET /v1/models, GET /health, GET /metrics (Prometheus) and GET / (the web chat in web/) (routes_meta.py). They share
a ServerState (server_state.py: the engine, the settings, the metrics, the trip of a request through the engine).
Bounds: the body size (413), the engine queue (503 when full), n, stop strings, prompts per request, the context
(400).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from . import routes_chat, routes_completions, routes_meta
from .openai_schema import APIError
from .server_metrics import EngineCounters, count_requests
from .server_state import ServerState

log = logging.getLogger(__name__)


def create_app(engine, model_name: str = "apertus", api_key: str | None = None, max_body_bytes: int = 4 << 20,
               output_filter=None) -> FastAPI:
    """The ASGI app serving `engine` under `model_name`. api_key: clients must send `Authorization: Bearer KEY`
    to /v1/* (the page, /health and /metrics stay open). output_filter: a factory of objects with `feed(text) ->
    text` and `flush() -> text` applied to every choice's text (e.g. the PII filter)."""
    if engine.tokenizer is None:
        raise ValueError("server: the model has no tokenizer.json; pass a tokenizer")
    state = ServerState(engine, model_name, api_key, max_body_bytes, output_filter)
    app = FastAPI(title="apertus", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server, app.state.engine, app.state.metrics = state, engine, state.metrics
    app.add_middleware(count_requests, metrics=state.metrics)
    state.metrics.registry.register(EngineCounters(engine))
    add_error_handlers(app)
    for router in (routes_chat.router, routes_completions.router, routes_meta.models, routes_meta.health,
                   routes_meta.web):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=routes_meta.WEB), name="static")
    return app


def add_error_handlers(app: FastAPI):
    """Every error answers in the OpenAI error shape; a 503 says when to retry; a crash says no more than its type."""

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status, headers={"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal server error: {type(e).__name__}").body(), 500)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run `app` with uvicorn in a thread (tests, benchmarks); yields the base URL. port 0 takes a free port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server: uvicorn failed to start (see the log)")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_body_mb: float = 4.0, output_filter=None, log_level: str = "info",
          **engine_kwargs) -> None:
    """Load `model` into an Engine and serve it until interrupted (`apertus serve`)."""
    import uvicorn

    from .engine import Engine, print_start_info

    name = model_name or Path(str(model)).name or str(model)
    engine = Engine(model, **engine_kwargs)
    print_start_info(engine, "apertus serve")
    try:
        app = create_app(engine, name, api_key=api_key, max_body_bytes=int(max_body_mb * 2**20),
                         output_filter=output_filter)
        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
        print(f"apertus serve: {name} at http://{host}:{port} (web chat at /, OpenAI API at /v1, "
              f"context {engine.max_context:,} tokens)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
