"""POST /v1/chat/completions: the chat template in, reasoning / content / tool calls out, whole or streamed."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from .openai_schema import APIError, ChatRequest, chat_logprobs, chat_prompt, chat_stop_ids, sampling_params, validate
from .server_state import Reply, ServerState, State, authorized, error_chunk, sse, usage, with_ids

router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State):
    req = validate(ChatRequest, await state.read_json(request))
    state.check_model(req.model)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
    params = sampling_params(req, max_tokens, bool(req.logprobs), top, chat_stop_ids(state.engine.defaults),
                             state.engine.config.vocab_size)
    ids, prefix, _, constraint = await run_in_threadpool(chat_prompt, req, state.tokenizer)
    state.check_context(len(ids), max_tokens, "messages")
    params = await state.constrain(params, constraint, "tool_choice" if prefix else "response_format")
    answer = ChatAnswer(state, req, ids, prefix)
    return await state.run(request, [(ids, p) for p in params], bool(req.stream), answer.respond, answer.chunks)


class ChatAnswer:
    """The answer to one chat request from its finished handles (`respond`) or its stream of Deltas (`chunks`)."""

    def __init__(self, state: ServerState, req: ChatRequest, ids: list[int], prefix: str):
        self.state, self.req, self.ids, self.prefix = state, req, ids, prefix
        self.head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
                     "created": int(time.time()), "model": state.model_name}
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def usage(self, handles) -> dict:
        # cached: what the first choice found in the prefix cache; the other choices of the same prompt also
        # take the pages the first one computes, but that is this request's own prompt, not a cached one
        return usage(len(self.ids), handles, handles[0].cached_tokens)

    def reply(self) -> Reply:
        return Reply(self.prefix, self.state.output_filter)

    def logprobs(self, ids, lps, tops):
        if not self.req.logprobs:
            return None
        return chat_logprobs(self.state.tokenizer, ids, lps, tops if self.req.top_logprobs else None)

    def respond(self, handles) -> dict:
        choices = []
        for i, h in enumerate(handles):
            reply = self.reply()
            reasoning, content = reply.push(h.text, True)
            calls = reply.tool_calls()
            message = {"role": "assistant", "content": content if content or not calls else None,
                       "reasoning_content": reasoning if reply.parser.saw_inner else None}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "finish_reason": reply.finish_reason(h.finish_reason),
                            "logprobs": self.logprobs(h.output_ids, h.logprobs, h.top_logprobs)})
        body = {**self.head, "choices": choices, "usage": self.usage(handles)}
        return with_ids(body, self.req, [self.ids], handles)

    def chunk(self, i, delta, finish=None, logprobs=None) -> str:
        out = {**self.head, "object": "chat.completion.chunk",
               "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        return sse({**out, "usage": None} if self.include_usage else out)

    async def chunks(self, handles, events):
        replies = [self.reply() for _ in handles]
        for i in range(len(handles)):
            yield self.chunk(i, {"role": "assistant", "content": ""})
        async for i, d in events:
            if d.finish_reason == "error":
                yield error_chunk(i)
                continue
            for line in self.pieces(i, d, replies[i]):
                yield line
        if self.include_usage:
            yield sse({**self.head, "object": "chat.completion.chunk", "choices": [],
                       "usage": self.usage(handles)})

    def pieces(self, i: int, d, reply: Reply) -> list[str]:
        """The chunks of one Delta of choice i: text split into reasoning and content, then at the end the tool
        calls and the finish reason."""
        final, out = d.finish_reason is not None, []
        reasoning, content = reply.push(d.text, final)
        delta = {"reasoning_content": reasoning} if reasoning else {}
        if content:
            delta["content"] = content
        lp = self.logprobs(d.token_ids, d.logprobs, d.top_logprobs) if d.token_ids else None
        if delta or lp:
            out.append(self.chunk(i, delta, logprobs=lp))
        if final:
            calls = reply.tool_calls()
            if calls:
                out.append(self.chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}))
            out.append(self.chunk(i, {}, finish=reply.finish_reason(d.finish_reason)))
        return out
