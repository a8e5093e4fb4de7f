"""What a request gets back: the engine's token ids made into Outputs, and the refusals.

The engine (its own thread, or its own process) sends EngineOutputs; Streams hands them to
each request's RequestStream on its event loop, which makes the text (detokenizer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from loraplane.runtime.detokenizer import Detokenizer, TextState

if TYPE_CHECKING:  # sampling imports InvalidRequest from here
    from loraplane.runtime.sampling import SamplingParams

# Why a request ended in an error: the HTTP layer turns each into its status.
GENERATION_FAILED = "generation_failed"  # 500: this request's forward or sampling failed
ADAPTER_FAILED = "adapter_failed"  # 503: its adapter could not be put in a slot; PUT it again
SHUT_DOWN = "shutting_down"  # 503: the shutdown deadline came first
ENGINE_GONE = "engine_failed"  # 503: the engine's process exited; the server is restarting


class InvalidRequest(ValueError):
    """The request itself is wrong (400; 422 on the TGI routes): the message says what to fix.

    Only this is the client's fault: any other exception is a bug, answered 500 as one.
    """


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the client should retry later (429)."""


class ShuttingDown(Exception):
    """The server is shutting down and takes no new requests (503)."""


class EngineGone(ShuttingDown):
    """The engine's process exited: nothing more can be served; the server exits too (503)."""


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


class EngineOutput(NamedTuple):
    """What the engine says about one sequence after a step: token ids, never text.

    A tuple, as it crosses from the engine process to the HTTP process once per sequence
    per step: it pickles small and fast.
    """

    seq_id: int
    token_id: int | None  # the sampled token (EOS included); None: a finish without one
    logprob: float = 0.0
    finish_reason: str | None = None  # stop (EOS), length, abort, error; None: goes on
    eos: bool = False  # token_id is end-of-sequence: not part of the output
    error: str | None = None
    error_code: str | None = None  # GENERATION_FAILED, ADAPTER_FAILED or SHUT_DOWN


# Finishes whose text held back so far (a partial character, a possible stop string's start)
# is released; an abort or an error ends the text where it was.
NATURAL_ENDS = ("stop", "length")


class RequestStream:
    """What a handler holds: one sequence's Outputs, made from the engine's token ids.

    The text is made here, on the handler's event loop, not on the engine's thread (nor in
    its process): the engine sends token ids, and this turns each into the text it adds and
    looks for the stop strings. A stop string ends the stream at once and tells the engine
    (release), which may have computed a token or two past it meanwhile: they are dropped.
    """

    def __init__(
        self,
        seq_id: int,
        prompt_tokens: int,
        params: SamplingParams,
        detok: Detokenizer,
        loop: asyncio.AbstractEventLoop,
        release: Callable[[int, str], None],
    ) -> None:
        self.seq_id = seq_id
        self.prompt_tokens = prompt_tokens
        self.detok = detok
        self.state = TextState(params.stop)
        self.loop = loop
        self._release = release
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.ready: deque[Output] = deque()
        self.ended = False  # the finished Output is made (it may not be read yet)
        self.released = False  # the engine was told it may drop the sequence
        self.done = False  # the finished Output was read

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Output:
        while not self.ready:
            if self.ended:
                raise StopAsyncIteration
            self.absorb(await self.queue.get())
        out = self.ready.popleft()
        self.done = out.finished
        return out

    def absorb(self, e: EngineOutput) -> None:
        """Turn one engine output into the Outputs a handler reads."""
        if self.ended:
            return  # tokens computed past a stop string this stream already ended on
        st = self.state
        natural = e.finish_reason in NATURAL_ENDS
        if e.token_id is not None:
            if not e.eos:
                st.output_ids.append(e.token_id)
            text = self.detok.update(st, final=natural)
            if text or not e.eos:
                self.ready.append(
                    Output(
                        text,
                        None if e.eos else e.token_id,
                        e.logprob,
                        completion_tokens=len(st.output_ids),
                    )
                )
        elif natural:
            text = self.detok.update(st, final=True)
            if text:
                self.ready.append(Output(text, None, completion_tokens=len(st.output_ids)))
        reason = "stop" if st.stop_hit is not None else e.finish_reason
        if reason is None:
            return
        self.ended = True
        if e.finish_reason is None:  # a stop string: the engine does not know yet
            self.release("stop")
        else:
            self.released = True  # the engine finished it
        self.ready.append(
            Output(
                "",
                None,
                finished=True,
                finish_reason=reason,
                stop_hit=st.stop_hit,
                eos=e.eos,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=len(st.output_ids),
                error=e.error,
                error_code=e.error_code,
            )
        )

    def release(self, reason: str = "abort") -> None:
        """Tell the engine this sequence is over (a stop string, or nobody reads it)."""
        if not self.released:
            self.released = True
            self._release(self.seq_id, reason)

    def abort(self) -> None:
        """The handler is done with this stream: a sequence still running is aborted."""
        if not self.ended:
            self.release("abort")


class Streams:
    """The open streams by sequence id, and their ids: made on the event loop, fed from the
    engine's thread or from the pipe of the engine's process (deliver), one loop wake-up
    per batch. RequestStream.queue.put per Output woke the loop (a write to its self-pipe)
    once per token; at 64 sequences a step that was most of the engine thread's time."""

    def __init__(self, detok: Detokenizer) -> None:
        self.detok = detok
        self.open: dict[int, RequestStream] = {}
        self.ids = itertools.count()

    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        submit: Callable[[list[int]], None],
        release: Callable[[int, str], None],
        loop: asyncio.AbstractEventLoop,
    ) -> list[RequestStream]:
        """Streams for a request's prompts, read on loop, opened before submit(their seq_ids)
        hands them to the engine, so none of their outputs can arrive unclaimed. submit
        raises for a refused request (InvalidRequest, QueueFull, ...): the streams are closed
        again. Any thread."""
        made = [
            RequestStream(next(self.ids), len(p), params, self.detok, loop, release)
            for p in prompts
        ]
        for stream in made:
            self.open[stream.seq_id] = stream
        try:
            submit([stream.seq_id for stream in made])
        except BaseException:
            for stream in made:
                self.open.pop(stream.seq_id, None)
            raise
        return made

    def deliver(self, batch: list[EngineOutput]) -> None:
        """Hand the engine's outputs to their streams' loops (any thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, EngineOutput]]] = {}
        for e in batch:
            stream = self.open.get(e.seq_id)
            if stream is None:
                continue  # released and finished already
            if e.finish_reason is not None:
                del self.open[e.seq_id]
            by_loop.setdefault(stream.loop, []).append((stream, e))
        for loop, items in by_loop.items():
            # A closed loop raises RuntimeError: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put, items)

    def fail_all(self, error: str, error_code: str) -> None:
        """End every open stream with error (the engine is gone)."""
        self.deliver(
            [
                EngineOutput(
                    seq_id, None, finish_reason="error", error=error, error_code=error_code
                )
                for seq_id in list(self.open)
            ]
        )


def _put(items: list[tuple[RequestStream, EngineOutput]]) -> None:
    for stream, e in items:
        stream.queue.put_nowait(e)
