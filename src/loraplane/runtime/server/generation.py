"""What the OpenAI and TGI routes share: resolving the model, and running one request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from loraplane.runtime.engine import Output, RequestStream
from loraplane.runtime.runtime import Runtime
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.server.errors import APIError

DISCONNECT_POLL_S = 0.5


def resolve_adapter(runtime: Runtime, model: str | None) -> str | None:
    """None for the base model, else the adapter's name; 404 when neither."""
    if model is None or model in ("", runtime.base_name):
        return None
    entry = runtime.adapters.get(model)  # raises AdapterNotFound -> 404
    if entry.error:
        raise APIError(
            503,
            f"adapter {model!r} cannot be served: {entry.error}; load it again",
            "server_error",
            "adapter_failed",
        )
    return model


def tokenize(runtime: Runtime, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        vocab = runtime.runner.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="prompt"
            )
        return list(prompt)
    return runtime.tokenizer.encode(prompt, add_special_tokens=False)


@dataclass
class Result:
    text: str = ""
    tokens: list[tuple[int, str, float]] = field(default_factory=list)  # id, text, logprob
    finish_reason: str | None = None
    eos: bool = False
    stop_hit: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def collect(stream: RequestStream, request: Request | None = None) -> Result:
    """All of a request's outputs; a client that hangs up has its sequence aborted."""
    result = Result()
    watcher = asyncio.create_task(_abort_on_disconnect(request, stream)) if request else None
    try:
        async for out in stream:
            absorb(result, out)
    finally:
        if watcher is not None:
            watcher.cancel()
        stream.abort()
    return result


async def _abort_on_disconnect(request: Request, stream: RequestStream) -> None:
    # Without this a client that timed out would keep its sequence decoding to max_tokens.
    while not stream.done:
        if await request.is_disconnected():
            stream.abort()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def absorb(result: Result, out: Output) -> None:
    if out.error:
        raise APIError(500, out.error, "server_error", "generation_failed")
    result.text += out.text
    if out.token_id is not None:
        result.tokens.append((out.token_id, out.text, out.logprob))
    if out.finished:
        result.finish_reason = out.finish_reason
        result.eos = out.eos
        result.stop_hit = out.stop_hit
        result.prompt_tokens = out.prompt_tokens
        result.completion_tokens = out.completion_tokens


def submit(runtime: Runtime, ids: list[int], params: SamplingParams, adapter: str | None):
    return runtime.engine.submit(ids, params, adapter)
