"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from loraplane.runtime.facade import RuntimeAPI
from loraplane.runtime.server.errors import GENERATION_ERRORS, APIError
from loraplane.runtime.server.generation import (
    Result,
    absorb,
    call,
    check_text,
    collect,
    resolve_adapter,
    submit,
    submit_all,
    tokenize,
)
from loraplane.runtime.server.openai_schemas import ChatRequest, CompletionRequest

router = APIRouter(responses=GENERATION_ERRORS)


def _runtime(request: Request) -> RuntimeAPI:
    return request.app.state.runtime


def _usage(r: Result) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _finish(reason: str | None) -> str | None:
    return "length" if reason == "length" else ("stop" if reason else None)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    runtime = _runtime(request)
    adapter = await resolve_adapter(runtime, body.model)
    for name in ("echo", "suffix"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported", param=name)
    if body.logprobs or (body.best_of or 1) > 1:
        raise APIError(400, "logprobs and best_of are not supported", param="logprobs")
    prompts: list[str | list[int]]
    if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
        prompts = [body.prompt]
    else:
        prompts = list(body.prompt)  # type: ignore[arg-type]
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    params = body.params(16)  # OpenAI's documented default for completions
    ids = [await tokenize(runtime, p) for p in prompts]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        if len(ids) != 1:
            raise APIError(400, "streaming takes a single prompt", param="prompt")
        stream = await submit(runtime, ids[0], params, adapter)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str, reason: str | None) -> dict:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            }

        return _stream_response(
            stream, chunk, include_usage, rid, created, body.model, "text_completion"
        )
    # All prompts are queued together or none is (429, too long): one refusal never leaves
    # the others running for nobody, or counted as aborted.
    streams = await submit_all(runtime, ids, params, adapter)
    try:
        results = await asyncio.gather(*(collect(s, request) for s in streams))
    finally:
        for s in streams:
            s.abort()
    usage = {k: sum(_usage(r)[k] for r in results) for k in _usage(results[0])}
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": i,
                "text": r.text,
                "logprobs": None,
                "finish_reason": _finish(r.finish_reason),
            }
            for i, r in enumerate(results)
        ],
        "usage": usage,
    }


async def _chat_prompt(runtime: RuntimeAPI, body: ChatRequest) -> list[int]:
    if body.tools or body.functions:
        raise APIError(400, "tools are not supported", param="tools")
    # Ignoring it would hand back free text to a client that asked for JSON.
    if body.response_format and body.response_format.get("type") != "text":
        raise APIError(
            400,
            f"response_format {body.response_format.get('type')!r} is not supported; only 'text'",
            param="response_format",
        )
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise APIError(
                        400,
                        f"content part type {part.get('type')!r} is not supported; only text",
                        param="messages",
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        check_text(content or "", "messages")
        messages.append({"role": m.role, "content": content or ""})
    if not runtime.has_chat_template:
        raise APIError(400, "the base model has no chat template; use /v1/completions")
    text = await asyncio.to_thread(runtime.chat_text, messages)
    # The template writes BOS itself where the model wants it.
    return await tokenize(runtime, text, "messages", special=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    runtime = _runtime(request)
    adapter = await resolve_adapter(runtime, body.model)
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    ids = await _chat_prompt(runtime, body)
    if body.max_completion_tokens and not body.max_tokens:
        body.max_tokens = body.max_completion_tokens
    room = runtime.limits.max_seq_len - len(ids)
    params = body.params(max(1, min(runtime.limits.default_max_tokens, room)))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream = await submit(runtime, ids, params, adapter)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = [True]

        def chunk(text: str, reason: str | None) -> dict:
            delta: dict[str, str] = {"content": text} if text or reason is None else {}
            if first[0]:
                delta = {"role": "assistant", "content": text}
                first[0] = False
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                ],
            }

        return _stream_response(
            stream, chunk, include_usage, rid, created, body.model, "chat.completion.chunk"
        )
    r = await collect(stream, request)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": _finish(r.finish_reason),
            }
        ],
        "usage": _usage(r),
    }


def _stream_response(stream, chunk, include_usage, rid, created, model, obj) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        result = Result()
        try:
            async for out in stream:
                try:
                    absorb(result, out)
                except APIError as e:
                    yield _sse({"error": {"message": e.message, "type": e.kind, "code": e.code}})
                    yield "data: [DONE]\n\n"
                    return
                if out.finished:
                    yield _sse(chunk("", _finish(out.finish_reason)))
                elif out.text:
                    yield _sse(chunk(out.text, None))
            if include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(result),
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            stream.abort()  # a client that went away must not keep its sequence running

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/v1/models")
async def models(request: Request):
    runtime = _runtime(request)
    created = int(runtime.started_at)
    data = [
        {
            "id": runtime.base_name,
            "object": "model",
            "created": created,
            "owned_by": "loraplane",
            "root": runtime.base_source,
            "parent": None,
        }
    ]
    for adapter in await call(runtime.served_adapters):
        assert adapter.loaded_at is not None  # a registered adapter was loaded
        data.append(
            {
                "id": adapter.name,
                "object": "model",
                "created": int(adapter.loaded_at.timestamp()),
                "owned_by": "loraplane",
                "root": adapter.source,
                "parent": runtime.base_name,
            }
        )
    return {"object": "list", "data": data}
