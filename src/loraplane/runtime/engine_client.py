"""RemoteRuntime: the RuntimeAPI of an engine in its own process, seen from the HTTP process.

It starts the engine's process (engine_process.py) and talks to it over a pipe: calls are
sent with an id and answered by a reply; one reader thread takes the replies and the step
outputs off the pipe and hands the outputs to the streams. Tokenizing and making text happen
here (TokenizerSide), so the engine's process only schedules and runs steps.

If the engine's process dies, every open request ends with a 503 at once, readiness fails,
and on_gone is called: the server then exits non-zero, so Kubernetes restarts the pod rather
than leave a port open that can serve nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from loraplane.api.wire import AdapterInfo, AdapterList, AdapterLoadRequest, AdapterUnloaded
from loraplane.runtime import engine_process
from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.outputs import ENGINE_GONE, EngineGone
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.tokenizer_side import TokenizerSide

log = logging.getLogger(__name__)

# How long stop() waits for the engine's process to exit after "close" before killing it.
EXIT_WAIT_S = 20.0


class EngineStartFailed(Exception):
    """The engine's process could not load the model: kind is "model" (the model's fault:
    the message says why) or "error" (anything else)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class RemoteRuntime(TokenizerSide):
    def __init__(
        self,
        config: RuntimeConfig,
        log_level: int = logging.INFO,
        on_gone: Callable[[], None] | None = None,
        target: Callable[..., None] = engine_process.main,
    ) -> None:
        """Start the engine's process and wait until its model is loaded (or fails to).
        target: the process's entry point (bench/processes.py wraps it to put a timed
        stand-in in place of the device)."""
        from transformers import AutoTokenizer

        # spawn, not fork: the child must not inherit this process's threads or locks, and a
        # forked CUDA context is unusable.
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=target, args=(config, child, log_level), name="loraplane-engine"
        )
        self.process.start()
        child.close()  # only the child holds its end: its death is our EOF
        hello = self._hello()
        self.base_name = hello.base_name
        self.base_source = hello.base_source
        self.started_at = hello.started_at
        self.limits = hello.limits
        self.admin_token = hello.admin_token
        super().__init__(AutoTokenizer.from_pretrained(hello.model_dir))
        self.on_gone = on_gone
        self.send_lock = threading.Lock()
        self.join_lock = threading.Lock()
        self.call_ids = itertools.count()
        self.calls: dict[int, Future[tuple[bool, Any]]] = {}
        self.gone: str | None = None  # why the engine cannot answer any more
        self.closing = False
        self.reader = threading.Thread(target=self._read, name="engine-pipe", daemon=True)
        self.reader.start()

    def _hello(self) -> engine_process.Hello:
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(10)
            raise EngineStartFailed(
                "error",
                f"the engine process exited (code {self.process.exitcode}) before it was ready",
            ) from None
        if message[0] == "fatal":
            self.process.join(10)
            raise EngineStartFailed(message[1], message[2])
        return message[1]

    # -- the pipe ---------------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _call(self, method: str, *args: Any) -> Any:
        if self.gone is not None:
            raise EngineGone(self.gone)
        future: Future[tuple[bool, Any]] = Future()
        call_id = next(self.call_ids)
        self.calls[call_id] = future
        try:
            self._send(("call", call_id, method, args))
        except OSError:  # the reader sees the same and fails every call
            self.calls.pop(call_id, None)
            raise EngineGone(self.gone or "the engine process is gone") from None
        ok, value = future.result()
        if ok:
            return value
        raise value

    def _read(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "out":
                    self.streams.deliver(message[1])
                elif message[0] == "reply":
                    future = self.calls.pop(message[1], None)
                    if future is not None:
                        future.set_result((message[2], message[3]))
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("reading from the engine process failed")
        self._lost()

    def _lost(self) -> None:
        self.gone = "the engine process exited"  # before the wait: no call is sent meanwhile
        code = self._join(5)
        self.gone = (
            "the server is shutting down"
            if self.closing
            else f"the engine process exited (code {code}); the server is restarting"
        )
        if not self.closing:
            log.error("%s: ending every request", self.gone)
        for call_id in list(self.calls):
            future = self.calls.pop(call_id, None)
            if future is not None:
                future.set_result((False, EngineGone(self.gone)))
        self.streams.fail_all(self.gone, ENGINE_GONE)
        if not self.closing and self.on_gone is not None:
            self.on_gone()

    def _join(self, timeout_s: float) -> int | None:
        """The engine process's exit code, waiting up to timeout_s; None while it runs.
        One thread at a time: two waiting on one child race to reap it, and the loser reads
        it as still running."""
        with self.join_lock:
            self.process.join(timeout_s)
            return self.process.exitcode

    # -- RuntimeAPI -------------------------------------------------------------------------------

    def submit_ids(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter: str | None,
        seq_ids: list[int],
    ) -> None:
        self._call("submit_ids", prompts, params, adapter, seq_ids)

    def release(self, seq_id: int, reason: str) -> None:
        if self.gone is None:
            with contextlib.suppress(OSError):  # gone: the reader ends everything
                self._send(("release", seq_id, reason))

    def readiness(self) -> str | None:
        if self.gone is not None:
            return self.gone
        return self._call("readiness")

    def metrics_text(self) -> bytes:
        return self._call("metrics_text")

    def start(self) -> None:
        self._call("start")

    def preload_adapters(self) -> None:
        self._call("preload_adapters")

    def stop_taking_requests(self) -> None:
        if self.gone is None:
            self._call("stop_taking_requests")

    def begin_shutdown(self, grace_s: float) -> None:
        if self.gone is None:
            self._call("begin_shutdown", grace_s)

    def idle(self) -> bool:
        return self.gone is not None or self._call("idle")

    def stop(self) -> None:
        """Stop the engine's process: it finishes its step, ends what runs, and exits."""
        self.closing = True
        if self.gone is None:
            with contextlib.suppress(OSError):
                self._send(("close",))
        if self._join(EXIT_WAIT_S) is None:
            log.error("the engine process did not exit in %.0f s; killing it", EXIT_WAIT_S)
            self.process.kill()
            self._join(5)
        self.reader.join(5)
        self.conn.close()

    def served_adapter(self, name: str) -> AdapterInfo:
        return self._call("served_adapter", name)

    def served_adapters(self) -> list[AdapterInfo]:
        return self._call("served_adapters")

    def list_adapters(self) -> AdapterList:
        return self._call("list_adapters")

    def get_adapter(self, name: str) -> AdapterInfo:
        return self._call("get_adapter", name)

    def load_adapter(self, name: str, body: AdapterLoadRequest) -> tuple[AdapterInfo, bool]:
        return self._call("load_adapter", name, body)

    def unload_adapter(self, name: str) -> AdapterUnloaded:
        return self._call("unload_adapter", name)
