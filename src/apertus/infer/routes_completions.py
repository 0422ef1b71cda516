"""POST /v1/completions: raw text or token-id prompts (several at once), whole or streamed.

Structured outputs take the chat endpoint's `response_format` (json_object, json_schema), as vLLM's completions do;
`logit_bias` is OpenAI's."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from .openai_schema import (
    MAX_CHOICES,
    MAX_PROMPTS,
    APIError,
    CompletionRequest,
    completion_logprobs,
    response_format,
    sampling_params,
    validate,
)
from .server_state import Reply, ServerState, State, authorized, error_chunk, sse, usage, with_ids

router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/completions")
async def completions(request: Request, state: State):
    req = validate(CompletionRequest, await state.read_json(request))
    state.check_model(req.model)
    for name, ok in (("echo", not req.echo), ("suffix", not req.suffix),
                     ("best_of", req.best_of in (None, req.n or 1))):
        if not ok:
            raise APIError(400, f"{name}: is not supported by this server", param=name)
    params = sampling_params(req, req.max_tokens, req.logprobs is not None, req.logprobs or 0, None,
                             state.engine.config.vocab_size)
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(
        req.prompt[0], int) else [req.prompt]
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise APIError(400, f"prompt: between 1 and {MAX_PROMPTS} prompts", param="prompt")
    encoded = await run_in_threadpool(lambda: [state.engine.encode(p) if isinstance(p, str) else p for p in prompts])
    for ids in encoded:
        state.check_context(len(ids), req.max_tokens, "prompt")
    params = await state.constrain(params, response_format(req), "response_format")
    jobs = [(ids, p) for ids in encoded for p in params]
    if len(jobs) > MAX_CHOICES:
        raise APIError(400, f"n x prompts = {len(jobs)} choices; at most {MAX_CHOICES}", param="n")
    answer = CompletionAnswer(state, req, encoded)
    return await state.run(request, jobs, bool(req.stream), answer.respond, answer.chunks)


class CompletionAnswer:
    """The answer to one completion request from its finished handles (`respond`) or its Deltas (`chunks`)."""

    def __init__(self, state: ServerState, req: CompletionRequest, encoded: list[list[int]]):
        self.state, self.req, self.encoded = state, req, encoded
        self.head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                     "created": int(time.time()), "model": state.model_name}
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        self.n_prompt = sum(len(ids) for ids in encoded)

    def usage(self, handles) -> dict:
        """prompt_tokens counts each prompt once, so cached_tokens does too: its first choice's (jobs are prompt by
        prompt, n choices each)."""
        n = len(handles) // len(self.encoded)
        return usage(self.n_prompt, handles, sum(h.cached_tokens for h in handles[::n]))

    def logprobs(self, ids, lps, tops, offset=0):
        if self.req.logprobs is None:
            return None
        return completion_logprobs(self.state.tokenizer, ids, lps, tops if self.req.logprobs else None, offset)

    def respond(self, handles) -> dict:
        choices = []
        for i, h in enumerate(handles):
            text = Reply("", self.state.output_filter).text(h.text, True)
            choices.append({"index": i, "text": text, "finish_reason": h.finish_reason,
                            "logprobs": self.logprobs(h.output_ids, h.logprobs, h.top_logprobs)})
        body = {**self.head, "choices": choices, "usage": self.usage(handles)}
        return with_ids(body, self.req, self.encoded, handles)

    async def chunks(self, handles, events):
        replies, offsets = [Reply("", self.state.output_filter) for _ in handles], [0] * len(handles)
        async for i, d in events:
            if d.finish_reason == "error":
                yield error_chunk(i)
                continue
            text = replies[i].text(d.text, d.finish_reason is not None)
            lp = self.logprobs(d.token_ids, d.logprobs, d.top_logprobs, offsets[i]) if d.token_ids else None
            offsets[i] += len(text)
            if text or lp or d.finish_reason:
                out = {**self.head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                 "finish_reason": d.finish_reason}]}
                yield sse({**out, "usage": None} if self.include_usage else out)
        if self.include_usage:
            yield sse({**self.head, "choices": [], "usage": self.usage(handles)})
