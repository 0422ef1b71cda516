"""OpenAI-compatible HTTP server and web chat on the engine (FastAPI + uvicorn).

    app = create_app(Engine("ckpt"), model_name="apertus")       # any ASGI server can run it
    serve("ckpt", host="127.0.0.1", port=8000, api_key=None)      # what `apertus serve` runs

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics (Prometheus),
GET / (the web chat in web/). Every request becomes engine requests (one per choice) submitted from the event loop;
the engine thread hands each Delta back with `loop.call_soon_threadsafe`, so one process serves many clients while
the engine batches them. A client that goes away cancels its requests (their cache pages are free at once). Bounds:
the body size (413), the engine queue (503 when full), n, stop strings, prompts per request, the context (400).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles

from .engine import EngineBusy
from .openai_schema import (
    MAX_CHOICES,
    MAX_PROMPTS,
    APIError,
    ChatRequest,
    CompletionRequest,
    ReplyParser,
    chat_logprobs,
    chat_prompt,
    chat_stop_ids,
    completion_logprobs,
    parse_body,
    sampling_params,
    validate,
)

log = logging.getLogger(__name__)
WEB = Path(__file__).parent / "web"
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'", "X-Content-Type-Options": "nosniff"}


def _metrics():
    """Prometheus metrics in a registry of the app's own (several apps can live in one process)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

    disable_created_metrics()  # no *_created series next to every counter
    r = CollectorRegistry()
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
    return SimpleNamespace(
        registry=r,
        http=Counter("apertus_http_requests", "HTTP requests answered", ["route", "status"], registry=r),
        http_latency=Histogram("apertus_http_request_duration_seconds", "Time to the end of the response",
                               ["route"], buckets=buckets, registry=r),
        generations=Counter("apertus_generations", "Engine requests finished (one per choice)", ["finish_reason"],
                            registry=r),
        prompt_tokens=Counter("apertus_prompt_tokens", "Prompt tokens submitted", registry=r),
        generation_tokens=Counter("apertus_generation_tokens", "Tokens generated", registry=r),
        waiting=Gauge("apertus_requests_waiting", "Engine requests queued or reading their prompt", registry=r),
        running=Gauge("apertus_requests_running", "Engine requests generating", registry=r),
        ttft=Histogram("apertus_time_to_first_token_seconds", "Submit to first token", buckets=buckets, registry=r),
        latency=Histogram("apertus_generation_duration_seconds", "Submit to last token", buckets=buckets,
                          registry=r),
    )


_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


def _count_requests(app, metrics):
    """ASGI middleware: status and duration of every HTTP response, by route (unknown paths as "other")."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path = scope["path"]
        route = path if path in _ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
        status, t0 = 499, time.perf_counter()  # 499: the client left before any response

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        except Exception:
            status = 500 if status == 499 else status
            raise
        finally:
            metrics.http.labels(route, str(status)).inc()
            metrics.http_latency.labels(route).observe(time.perf_counter() - t0)

    return middleware


def _sse(obj) -> str:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Reply:
    """One choice's streamed text on its way out: the optional output filter, then the reply parser."""

    def __init__(self, prefix: str, output_filter):
        self.parser, self.filter = ReplyParser(), output_filter() if output_filter else None
        self.parser.feed(prefix)

    def text(self, text: str, final: bool) -> str:
        if self.filter is not None:
            text = self.filter.feed(text) + (self.filter.flush() if final else "")
        return text

    def push(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = self.parser.feed(self.text(text, final))
        if final:
            r, c = self.parser.finish()
            reasoning, content = reasoning + r, content + c
        return reasoning, content

    def tool_calls(self) -> list[dict]:
        return [{**c, "id": f"call_{secrets.token_hex(12)}"} for c in self.parser.calls]


def _finish_reason(reason: str, reply: _Reply | None = None) -> str:
    return "tool_calls" if reply is not None and reply.parser.calls and reason == "stop" else reason


def create_app(engine, model_name: str = "apertus", api_key: str | None = None, max_body_bytes: int = 4 << 20,
               output_filter=None) -> FastAPI:
    """The ASGI app serving `engine` under `model_name`. api_key: clients must send `Authorization: Bearer KEY`
    to /v1/* (the page, /health and /metrics stay open). output_filter: a factory of objects with `feed(text) ->
    text` and `flush() -> text` applied to every choice's text (e.g. the PII filter)."""
    if engine.tokenizer is None:
        raise ValueError("server: the model has no tokenizer.json; pass a tokenizer")
    tokenizer, metrics = engine.tokenizer, _metrics()
    app = FastAPI(title="apertus", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(_count_requests, metrics=metrics)
    created = int(time.time())

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

    def check_key(request: Request):
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send the header 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_key(request)
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_body_bytes:
            raise APIError(413, f"request body of {int(size):,} bytes is over the limit of {max_body_bytes:,}")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise APIError(413, f"request body is over the limit of {max_body_bytes:,} bytes")
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the body") from None
        return parse_body(bytes(body))

    def check_model(name: str | None):
        if name is not None and name != model_name:
            raise APIError(404, f"model {name[:100]!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def check_context(n_prompt: int, max_tokens: int | None, param: str):
        limit = engine.max_context
        if n_prompt >= limit:
            raise APIError(400, f"the prompt has {n_prompt:,} tokens; this model's context is {limit:,} tokens",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise APIError(400, f"prompt ({n_prompt:,} tokens) + max_tokens ({max_tokens:,}) exceeds this "
                           f"model's context of {limit:,} tokens", param="max_tokens", code="context_length_exceeded")

    def submit(jobs, loop, queue, every_delta: bool):
        """Submit (prompt ids, params) jobs; the engine thread puts (job index, Delta) on `queue` (every Delta, or
        only the last). All or nothing: on an error the ones already submitted are cancelled."""
        handles = []
        try:
            for i, (ids, params) in enumerate(jobs):
                metrics.waiting.inc()
                try:
                    handles.append(engine.submit(ids, params, on_event=on_event(i, loop, queue, every_delta)))
                except BaseException:
                    metrics.waiting.dec()
                    raise
                metrics.prompt_tokens.inc(len(ids))
        except (ValueError, EngineBusy) as e:
            for h in handles:
                h.cancel()
            if isinstance(e, EngineBusy):
                raise APIError(503, "the server is busy (request queue full); retry later", code="overloaded") from e
            raise APIError(400, str(e).removeprefix("engine: ")) from e
        return handles

    def on_event(i, loop, queue, every_delta):
        t0, started = time.perf_counter(), False

        def on(delta):  # engine thread
            nonlocal started
            if not started and delta.token_ids:
                started = True
                metrics.waiting.dec()
                metrics.running.inc()
                metrics.ttft.observe(time.perf_counter() - t0)
            metrics.generation_tokens.inc(len(delta.token_ids))
            if delta.finish_reason is not None:
                (metrics.running if started else metrics.waiting).dec()
                metrics.generations.labels(delta.finish_reason).inc()
                metrics.latency.observe(time.perf_counter() - t0)
            if every_delta or delta.finish_reason is not None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, delta))

        return on

    async def deltas(queue, n):
        left = n
        while left:
            i, delta = await queue.get()
            left -= delta.finish_reason is not None
            yield i, delta

    async def wait_all(request: Request, queue, n) -> bool:
        """Wait for n requests to finish; False if the client disconnected first."""
        async def gone():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher, waiter = asyncio.ensure_future(gone()), asyncio.ensure_future(
            asyncio.gather(*[queue.get() for _ in range(n)]))
        try:
            await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
            return waiter.done()
        finally:
            watcher.cancel()
            waiter.cancel()

    async def run(request, jobs, stream: bool, respond, stream_chunks):
        """Submit the jobs and answer: a JSON body when all are done, or an SSE stream. The requests are
        cancelled if the client leaves (a cancel after the end does nothing)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        handles = submit(jobs, loop, queue, every_delta=stream)
        if not stream:
            try:
                if not await wait_all(request, queue, len(handles)):
                    return Response(status_code=499)
            finally:
                for h in handles:
                    h.cancel()
            if any(h.finish_reason == "error" for h in handles):
                raise APIError(500, "generation failed in the engine (see the server log)")
            return JSONResponse(respond(handles))

        async def body():
            try:
                async for line in stream_chunks(handles, deltas(queue, len(handles))):
                    yield line
                yield "data: [DONE]\n\n"
            finally:
                for h in handles:
                    h.cancel()

        return _Stream(body(), handles)

    def usage(n_prompt: int, handles) -> dict:
        n_out = sum(len(h.output_ids) for h in handles)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def with_ids(body: dict, req, prompts: list[list[int]], handles) -> dict:
        if req.return_token_ids:
            body["prompt_token_ids"] = prompts[0] if len(prompts) == 1 else prompts
            for choice, h in zip(body["choices"], handles, strict=True):
                choice["token_ids"] = list(h.output_ids)
        return body

    def error_chunk(i: int) -> str:
        return _sse(APIError(500, f"generation of choice {i} failed in the engine (see the server log)").body())

    # --- routes ------------------------------------------------------------------------------------------------

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "apertus",
                "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        value = metrics.registry.get_sample_value
        return {"status": "ok", "model": model_name, "waiting": int(value("apertus_requests_waiting")),
                "running": int(value("apertus_requests_running"))}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return FileResponse(WEB / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = validate(ChatRequest, await read_json(request))
        check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
        params = sampling_params(req, max_tokens, bool(req.logprobs), top, chat_stop_ids(engine.defaults))
        ids, prefix, _ = await run_in_threadpool(chat_prompt, req, tokenizer)
        check_context(len(ids), max_tokens, "messages")
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name}
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

        def logprobs_of(ids_, lps, tops):
            return chat_logprobs(tokenizer, ids_, lps, tops if top else None) if req.logprobs else None

        def respond(handles):
            choices = []
            for i, h in enumerate(handles):
                reply = _Reply(prefix, output_filter)
                reasoning, content = reply.push(h.text, True)
                calls = reply.tool_calls()
                message = {"role": "assistant", "content": content if content or not calls else None,
                           "reasoning_content": reasoning if reply.parser.saw_inner else None}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "finish_reason": _finish_reason(h.finish_reason, reply),
                                "logprobs": logprobs_of(h.output_ids, h.logprobs, h.top_logprobs)})
            return with_ids({**head, "choices": choices, "usage": usage(len(ids), handles)}, req, [ids], handles)

        async def stream_chunks(handles, events):
            replies = [_Reply(prefix, output_filter) for _ in handles]

            def chunk(i, delta, finish=None, logprobs=None):
                out = {**head, "object": "chat.completion.chunk",
                       "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
                return _sse({**out, "usage": None} if include_usage else out)

            for i in range(len(handles)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, d in events:
                final = d.finish_reason is not None
                if d.finish_reason == "error":
                    yield error_chunk(i)
                    continue
                reasoning, content = replies[i].push(d.text, final)
                delta = {"reasoning_content": reasoning} if reasoning else {}
                if content:
                    delta["content"] = content
                lp = logprobs_of(d.token_ids, d.logprobs, d.top_logprobs) if d.token_ids else None
                if delta or lp:
                    yield chunk(i, delta, logprobs=lp)
                if final:
                    calls = replies[i].tool_calls()
                    if calls:
                        yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                    yield chunk(i, {}, finish=_finish_reason(d.finish_reason, replies[i]))
            if include_usage:
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                            "usage": usage(len(ids), handles)})

        return await run(request, [(ids, p) for p in params], bool(req.stream), respond, stream_chunks)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = validate(CompletionRequest, await read_json(request))
        check_model(req.model)
        for name, ok in (("echo", not req.echo), ("suffix", not req.suffix),
                         ("best_of", req.best_of in (None, req.n or 1))):
            if not ok:
                raise APIError(400, f"{name}: is not supported by this server", param=name)
        top = req.logprobs or 0
        params = sampling_params(req, req.max_tokens, req.logprobs is not None, top, None)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(
            req.prompt[0], int) else [req.prompt]
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise APIError(400, f"prompt: between 1 and {MAX_PROMPTS} prompts", param="prompt")
        encoded = await run_in_threadpool(lambda: [engine.encode(p) if isinstance(p, str) else p for p in prompts])
        for ids in encoded:
            check_context(len(ids), req.max_tokens, "prompt")
        jobs = [(ids, p) for ids in encoded for p in params]
        if len(jobs) > MAX_CHOICES:
            raise APIError(400, f"n x prompts = {len(jobs)} choices; at most {MAX_CHOICES}", param="n")
        rid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        n_prompt = sum(len(ids) for ids in encoded)

        def logprobs_of(ids_, lps, tops, offset=0):
            return completion_logprobs(tokenizer, ids_, lps, tops if top else None, offset) \
                if req.logprobs is not None else None

        def respond(handles):
            choices = []
            for i, h in enumerate(handles):
                text = _Reply("", output_filter).text(h.text, True)
                choices.append({"index": i, "text": text, "finish_reason": h.finish_reason,
                                "logprobs": logprobs_of(h.output_ids, h.logprobs, h.top_logprobs)})
            return with_ids({**head, "choices": choices, "usage": usage(n_prompt, handles)}, req, encoded, handles)

        async def stream_chunks(handles, events):
            replies, offsets = [_Reply("", output_filter) for _ in handles], [0] * len(handles)
            async for i, d in events:
                if d.finish_reason == "error":
                    yield error_chunk(i)
                    continue
                text = replies[i].text(d.text, d.finish_reason is not None)
                lp = logprobs_of(d.token_ids, d.logprobs, d.top_logprobs, offsets[i]) if d.token_ids else None
                offsets[i] += len(text)
                if text or lp or d.finish_reason:
                    out = {**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                "finish_reason": d.finish_reason}]}
                    yield _sse({**out, "usage": None} if include_usage else out)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": usage(n_prompt, handles)})

        return await run(request, jobs, bool(req.stream), respond, stream_chunks)

    return app


class _Stream(StreamingResponse):
    """An SSE response that cancels its engine requests however it ends, even if the body never started."""

    def __init__(self, body, handles):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles = handles

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for h in self.handles:
                h.cancel()


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

    from .engine import Engine

    name = model_name or Path(str(model)).name or str(model)
    engine = Engine(model, **engine_kwargs)
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
