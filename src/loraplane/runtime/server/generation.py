"""What the OpenAI and TGI routes share: resolving the model, and running one request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from loraplane.runtime.facade import RuntimeAPI
from loraplane.runtime.outputs import GENERATION_FAILED, Output, RequestStream
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.server.errors import APIError

DISCONNECT_POLL_S = 0.5
T = TypeVar("T")


async def resolve_adapter(runtime: RuntimeAPI, model: str | None) -> str | None:
    """None for the base model, else the adapter's name; 404 when neither."""
    if model is None or model in ("", runtime.base_name):
        return None
    adapter = await call(runtime.served_adapter, model)  # raises AdapterNotFound -> 404
    if adapter.error:
        raise APIError(
            503,
            f"adapter {model!r} cannot be served: {adapter.error}; load it again",
            "server_error",
            "adapter_failed",
        )
    return model


# A prompt this many characters per token of room is tokenized by a prefix first: a prompt
# that cannot fit is refused without tokenizing megabytes (a shortcut, not the rule).
PREFIX_CHARS_PER_TOKEN = 16


async def tokenize(
    runtime: RuntimeAPI, prompt: str | list[int], param: str = "prompt", special: bool = True
) -> list[int]:
    """A prompt's token ids, encoded as PEFT, vLLM and TGI do (BOS where the tokenizer adds
    one; special=False for text a chat template has already framed). Off the event loop, so
    a long prompt never stalls /healthz or other requests."""
    if isinstance(prompt, list):
        vocab = runtime.limits.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param=param
            )
        return list(prompt)
    check_text(prompt, param)
    limit = runtime.limits.max_seq_len
    head = PREFIX_CHARS_PER_TOKEN * limit
    if len(prompt) > head:
        prefix = await asyncio.to_thread(runtime.encode, prompt[:head], special)
        if len(prefix) > limit + 1:  # +1: the cut may split one token into two
            raise APIError(
                400,
                f"{param} is longer than this server's limit of {limit} tokens per sequence; "
                "shorten it",
                param=param,
            )
    return await asyncio.to_thread(runtime.encode, prompt, special)


def check_text(text: str, param: str) -> None:
    """400 for text no tokenizer can take: a lone surrogate (JSON allows "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400,
            f"{param} holds {text[e.start]!r} at character {e.start}, a lone UTF-16 surrogate "
            "that is not valid Unicode; send the pair or the character itself",
            param=param,
        ) from e


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
        code = out.error_code or GENERATION_FAILED
        status = 500 if code == GENERATION_FAILED else 503
        raise APIError(status, out.error, "server_error", code)
    result.text += out.text
    if out.token_id is not None:
        result.tokens.append((out.token_id, out.text, out.logprob))
    if out.finished:
        result.finish_reason = out.finish_reason
        result.eos = out.eos
        result.stop_hit = out.stop_hit
        result.prompt_tokens = out.prompt_tokens
        result.completion_tokens = out.completion_tokens


async def call(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) off the event loop: the runtime's calls may wait on the engine's process
    (a pipe round trip, the GIL there), and the loop serves every other stream meanwhile."""
    return await asyncio.to_thread(fn, *args)


async def submit_all(
    runtime: RuntimeAPI, prompts: list[list[int]], params: SamplingParams, adapter: str | None
) -> list[RequestStream]:
    """The request's streams, submitted off the loop. A handler cancelled meanwhile (its
    client hung up) has them aborted as soon as they exist: nobody will read them."""
    loop = asyncio.get_running_loop()
    job = asyncio.ensure_future(call(runtime.submit, prompts, params, adapter, loop))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(_abort_unread)
        raise


def _abort_unread(job: asyncio.Future[list[RequestStream]]) -> None:
    if not job.cancelled() and job.exception() is None:
        for stream in job.result():
            stream.abort()


async def submit(
    runtime: RuntimeAPI, ids: list[int], params: SamplingParams, adapter: str | None
) -> RequestStream:
    return (await submit_all(runtime, [ids], params, adapter))[0]
