"""What a request gets back from the engine: Outputs on an asyncio queue, and the refusals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sequence -> sampling -> here: InvalidRequest must not need Sequence
    from loraplane.runtime.sequence import Sequence

# Why a request ended in an error: the HTTP layer turns each into its status.
GENERATION_FAILED = "generation_failed"  # 500: this request's forward or sampling failed
ADAPTER_FAILED = "adapter_failed"  # 503: its adapter could not be put in a slot; PUT it again
SHUT_DOWN = "shutting_down"  # 503: the shutdown deadline came first


class InvalidRequest(ValueError):
    """The request itself is wrong (400; 422 on the TGI routes): the message says what to fix.

    Only this is the client's fault: any other exception is a bug, answered 500 as one.
    """


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the client should retry later (429)."""


class ShuttingDown(Exception):
    """The server is shutting down and takes no new requests (503)."""


@dataclass
class Output:
    text: str  # new text since the previous Output
    token_id: int | None
    logprob: float = 0.0
    finished: bool = False
    finish_reason: str | None = None  # stop, length, abort, error
    stop_hit: str | None = None
    eos: bool = False  # finished because the model emitted end-of-sequence
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # GENERATION_FAILED, ADAPTER_FAILED or SHUT_DOWN


class RequestStream:
    """What a handler holds: the sequence (for abort) and its queue of Outputs."""

    def __init__(
        self,
        seq: Sequence,
        loop: asyncio.AbstractEventLoop,
        abort: Callable[[Sequence], None],
    ) -> None:
        self.seq = seq
        self._abort = abort
        self.loop = loop
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.done = False

    def push(self, out: Output) -> None:
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Output:
        if self.done:
            raise StopAsyncIteration
        out = await self.queue.get()
        self.done = out.finished
        return out

    def abort(self) -> None:
        if not self.done:
            self._abort(self.seq)


class Outbox:
    """Outputs for the streams, handed to their event loops in one wake-up per loop.

    RequestStream.push wakes its loop once per Output (a write to the loop's self-pipe);
    at 64 sequences a step that was most of the engine thread's time. The engine puts a
    step's Outputs here and flushes once; each stream still gets its own in order."""

    def __init__(self) -> None:
        self.pending: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Output]]] = {}

    def put(self, stream: RequestStream, out: Output) -> None:
        self.pending.setdefault(stream.loop, []).append((stream, out))

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for loop, items in pending.items():
            # A closed loop raises RuntimeError: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[RequestStream, Output]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)
