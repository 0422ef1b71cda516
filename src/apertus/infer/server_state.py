"""What every route of the server shares: the engine, the settings, the metrics, and the way a request's choices go
through the engine and come back (a whole JSON body, or an SSE stream).

Every request becomes engine requests (one per choice) submitted from the event loop; the engine thread hands each
Delta back with `loop.call_soon_threadsafe`, so one process serves many clients while the engine batches them. A
client that goes away cancels its requests (their cache pages are free at once).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .engine import EngineBusy
from .openai_schema import APIError, ReplyParser, parse_body
from .server_metrics import new_metrics


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_chunk(i: int) -> str:
    return sse(APIError(500, f"generation of choice {i} failed in the engine (see the server log)").body())


class Reply:
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

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.parser.calls and reason == "stop" else reason


class SSEStream(StreamingResponse):
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


def usage(n_prompt: int, handles, cached: int = 0) -> dict:
    """The OpenAI usage object; cached: prompt tokens found in the prefix cache (prompt_tokens_details)."""
    n_out = sum(len(h.output_ids) for h in handles)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": cached}}


def with_ids(body: dict, req, prompts: list[list[int]], handles) -> dict:
    """The body with the token ids of the prompts and the choices, when the request asked for them."""
    if req.return_token_ids:
        body["prompt_token_ids"] = prompts[0] if len(prompts) == 1 else prompts
        for choice, h in zip(body["choices"], handles, strict=True):
            choice["token_ids"] = list(h.output_ids)
    return body


@dataclass
class ServerState:
    """The app's shared state (app.state.server). api_key: clients must send `Authorization: Bearer KEY` to /v1/*.
    output_filter: a factory of `feed(text) -> text` / `flush() -> text` filters applied to every choice's text."""

    engine: object
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    output_filter: object = None
    metrics: object = field(default_factory=new_metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # --- checks ------------------------------------------------------------------------------------------------

    def check_key(self, request: Request):
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send the header 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        """The JSON body, read up to the size limit (413 beyond it, whatever Content-Length says)."""
        limit = self.max_body_bytes
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            raise APIError(413, f"request body of {int(size):,} bytes is over the limit of {limit:,}")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(413, f"request body is over the limit of {limit:,} bytes")
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the body") from None
        return parse_body(bytes(body))

    def check_model(self, name: str | None):
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name[:100]!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_context(self, n_prompt: int, max_tokens: int | None, param: str):
        limit = self.engine.max_context
        if n_prompt >= limit:
            raise APIError(400, f"the prompt has {n_prompt:,} tokens; this model's context is {limit:,} tokens",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise APIError(400, f"prompt ({n_prompt:,} tokens) + max_tokens ({max_tokens:,}) exceeds this "
                           f"model's context of {limit:,} tokens", param="max_tokens", code="context_length_exceeded")

    # --- through the engine ------------------------------------------------------------------------------------

    async def constrain(self, params: list, constraint: dict, param: str) -> list:
        """The choices' params with the constraint (SamplingParams fields), its grammar compiled off the event loop
        (the engine keeps it for submit); 400 naming `param` when the grammar library cannot use it."""
        if not constraint:
            return params
        params = [dataclasses.replace(p, **constraint) for p in params]
        try:
            await run_in_threadpool(self.engine.grammars.matcher, params[0])
        except ValueError as e:
            raise APIError(400, f"{param}: {str(e).removeprefix('engine: ')}", param=param) from None
        return params

    def submit(self, jobs, loop, queue, every_delta: bool):
        """Submit (prompt ids, params) jobs; the engine thread puts (job index, Delta) on `queue` (every Delta, or
        only the last). All or nothing: on an error the ones already submitted are cancelled."""
        handles, metrics = [], self.metrics
        try:
            for i, (ids, params) in enumerate(jobs):
                metrics.waiting.inc()
                try:
                    handles.append(self.engine.submit(ids, params, on_event=self.on_event(i, loop, queue, every_delta)))
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

    def on_event(self, i, loop, queue, every_delta):
        """The engine-thread callback of job i: keeps the generation metrics and passes Deltas to the loop."""
        t0, started, metrics = time.perf_counter(), False, self.metrics

        def on(delta):
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

    async def run(self, request: Request, jobs, stream: bool, respond, stream_chunks):
        """Submit the jobs and answer: `respond(handles)` as JSON when all are done, or the SSE lines of
        `stream_chunks(handles, events)`. The requests are cancelled if the client leaves (a cancel after the end
        does nothing)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        handles = self.submit(jobs, loop, queue, every_delta=stream)
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

        return SSEStream(body(), handles)


async def deltas(queue, n):
    """(job index, Delta) pairs until n jobs have finished."""
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


def server_state(request: Request) -> ServerState:
    """The dependency routes take their state from."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]  # a route's parameter `state: State`


async def authorized(request: Request) -> None:
    """Dependency of the /v1 routes: the API key, when the server has one."""
    server_state(request).check_key(request)
