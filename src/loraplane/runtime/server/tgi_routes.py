"""TGI/LoRAX-compatible routes: POST /, /generate, /generate_stream; parameters.adapter_id."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loraplane.runtime.facade import RuntimeAPI
from loraplane.runtime.outputs import InvalidRequest
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.server.errors import GENERATION_ERRORS, APIError
from loraplane.runtime.server.generation import (
    Result,
    absorb,
    collect,
    resolve_adapter,
    submit,
    tokenize,
)

router = APIRouter(responses=GENERATION_ERRORS)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX's; adapters here come only from the admin API
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = Field(default=None, ge=0.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    typical_p: float | None = None
    truncate: int | None = None
    watermark: bool = False
    top_n_tokens: int | None = None
    grammar: Any = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def _params(p: Parameters) -> SamplingParams:
    for name, neutral in (
        ("repetition_penalty", 1.0),
        ("frequency_penalty", 0.0),
        ("typical_p", 1.0),
    ):
        value = getattr(p, name)
        if value is not None and value != neutral:
            raise APIError(422, f"{name} is not supported", code="validation")
    if (
        p.watermark
        or p.grammar
        or p.top_n_tokens
        or (p.best_of or 1) > 1
        or p.truncate
        or p.decoder_input_details
    ):
        raise APIError(
            422,
            "watermark, grammar, top_n_tokens, best_of, truncate and decoder_input_details "
            "are not supported",
            code="validation",
        )
    # TGI samples when asked to, or when any sampling knob is set.
    sample = p.do_sample or p.temperature is not None or p.top_k or p.top_p is not None
    try:
        return SamplingParams(
            max_tokens=p.max_new_tokens or 100,
            temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k or 0,
            seed=p.seed,
            stop=tuple(p.stop),
        )
    except InvalidRequest as e:
        raise APIError(422, str(e), code="validation") from e


def _finish(r: Result) -> str:
    if r.eos:
        return "eos_token"
    return "stop_sequence" if r.stop_hit else "length"


def _details(r: Result, seed: int | None, runtime: RuntimeAPI, with_tokens: bool) -> dict:
    details: dict[str, Any] = {
        "finish_reason": _finish(r),
        "generated_tokens": r.completion_tokens,
        "seed": seed,
        "input_length": r.prompt_tokens,
        "prompt_tokens": r.prompt_tokens,  # LoRAX's client requires this name
    }
    if with_tokens:
        details["prefill"] = []
        details["tokens"] = [_token(t, runtime) for t in r.tokens]
    return details


def _token(t: tuple[int, str, float], runtime: RuntimeAPI) -> dict:
    token_id, text, logprob = t
    special = runtime.is_special(token_id)
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


async def _start(request: Request, body: GenerateRequest):
    runtime: RuntimeAPI = request.app.state.runtime
    adapter = await resolve_adapter(runtime, body.parameters.adapter_id)
    params = _params(body.parameters)
    ids = await tokenize(runtime, body.inputs, "inputs")
    return runtime, await submit(runtime, ids, params, adapter)


async def _generate(request: Request, body: GenerateRequest) -> dict:
    runtime, stream = await _start(request, body)
    r = await collect(stream, request)
    text = (body.inputs + r.text) if body.parameters.return_full_text else r.text
    out: dict[str, Any] = {"generated_text": text}
    if body.parameters.details:
        out["details"] = _details(r, body.parameters.seed, runtime, True)
    return out


async def _generate_stream(request: Request, body: GenerateRequest) -> StreamingResponse:
    runtime, stream = await _start(request, body)

    async def events() -> AsyncIterator[str]:
        # TGI puts the last token and the whole text in one final event, so each token event
        # is held back by one until we know whether it is the last.
        result = Result()
        pending: dict[str, Any] | None = None
        try:
            async for out in stream:
                try:
                    absorb(result, out)
                except APIError as e:
                    event = {"error": e.message, "error_type": e.code or "generation"}
                    yield f"data:{json.dumps(event)}\n\n"
                    return
                if out.token_id is not None:
                    if pending is not None:
                        yield f"data:{json.dumps(pending)}\n\n"
                    pending = {
                        "index": len(result.tokens),
                        "generated_text": None,
                        "token": _token(result.tokens[-1], runtime),
                        "top_tokens": None,
                        "details": None,
                    }
                elif out.text and pending is not None:  # text flushed at end of sequence
                    pending["token"]["text"] += out.text
                if out.finished:
                    if pending is None:
                        pending = {
                            "index": 0,
                            "token": _token((0, "", 0.0), runtime),
                            "top_tokens": None,
                        }
                    text = result.text
                    if body.parameters.return_full_text:
                        text = body.inputs + text
                    pending["generated_text"] = text
                    pending["details"] = _details(result, body.parameters.seed, runtime, False)
                    yield f"data:{json.dumps(pending)}\n\n"
        finally:
            stream.abort()

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    return await _generate(request, body)


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request):
    return await _generate_stream(request, body)


@router.post("/")
async def compat(body: GenerateRequest, request: Request):
    if body.stream:
        return await _generate_stream(request, body)
    return JSONResponse([await _generate(request, body)])
