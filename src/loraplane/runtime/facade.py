"""The one surface the HTTP routes see of a runtime (server/ imports nothing else of it).

Its calls may block (with the engine in its own process, most are a pipe round trip): the
routes make them off the event loop (server.generation.call); the few attributes are plain
values, and the tokenizer's answers are local.

Submit a request and get its stream, the limits a request is checked against, readiness and
the lifecycle, the tokenizer's few answers, and the admin API's adapter verbs (their bodies
are the wire models of loraplane.api.wire). Runtime (in process) and RemoteRuntime (the engine
in its own) implement it; mypy holds the routes to it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from loraplane.api.wire import AdapterInfo, AdapterList, AdapterLoadRequest, AdapterUnloaded
from loraplane.runtime.outputs import RequestStream
from loraplane.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Limits:
    max_seq_len: int  # prompt + max_tokens of one sequence
    vocab_size: int  # token ids a prompt may hold: [0, vocab_size)
    default_max_tokens: int  # chat requests that give no max_tokens
    max_request_bytes: int  # an HTTP body
    shutdown_timeout_s: float  # running requests get this long after SIGTERM


class RuntimeAPI(Protocol):
    base_name: str  # the `model` that means the base
    base_source: str  # where the base came from, redacted
    started_at: float  # epoch seconds
    limits: Limits
    admin_token: str | None  # None: the admin API is open (--allow-unauthenticated-admin)

    # -- requests (event loop) ------------------------------------------------------------------
    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> list[RequestStream]:
        """Queue a request's prompts together or none: InvalidRequest, AdapterNotFound,
        QueueFull, ShuttingDown. loop: where the streams are read (the call is made off it)."""
        ...

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of text (blocking: call it off the event loop)."""
        ...

    @property
    def has_chat_template(self) -> bool: ...

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied, with the generation prompt (blocking)."""
        ...

    def is_special(self, token_id: int) -> bool: ...

    # -- health and lifecycle -------------------------------------------------------------------
    def readiness(self) -> str | None:
        """None when ready, else why not."""
        ...

    def metrics_text(self) -> bytes: ...

    def start(self) -> None: ...

    def preload_adapters(self) -> None:
        """The --adapter preloads (blocking); ready once all are in."""
        ...

    def stop_taking_requests(self) -> None: ...

    def idle(self) -> bool: ...

    def stop(self) -> None: ...

    # -- adapters (admin API) -------------------------------------------------------------------
    def served_adapter(self, name: str) -> AdapterInfo:
        """A registered adapter requests may name (AdapterNotFound otherwise)."""
        ...

    def served_adapters(self) -> list[AdapterInfo]: ...

    def list_adapters(self) -> AdapterList: ...

    def get_adapter(self, name: str) -> AdapterInfo: ...

    def load_adapter(self, name: str, body: AdapterLoadRequest) -> tuple[AdapterInfo, bool]:
        """(the adapter, whether this load created it); blocking: call it off the loop."""
        ...

    def unload_adapter(self, name: str) -> AdapterUnloaded: ...
