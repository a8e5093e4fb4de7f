"""The engine's own process: the whole Runtime but HTTP, driven over a pipe by the HTTP process.

Why a process: in one interpreter every response written, every SSE chunk formatted and
every token made into text held the GIL the engine thread needs to launch the next step, so
the more clients streamed, the longer the GPU waited (vLLM and SGLang split them for the
same reason). Here the engine's process schedules, launches and sends token ids; the HTTP
process (engine_client.RemoteRuntime) tokenizes, makes the text, finds the stop strings and
answers the clients.

The pipe carries pickled tuples:
  HTTP -> engine   ("call", call_id, method, args): one of CALLS, answered by a "reply"
                   ("release", seq_id, reason): a stop string ended it, or nobody reads it
                   ("close",): stop the engine and exit
  engine -> HTTP   ("hello", Hello) or ("fatal", kind, message): once, when the model is
                   loaded or could not be
                   ("reply", call_id, ok, value or exception)
                   ("out", [EngineOutput, ...]): one step's outputs, in order
The engine's process ignores SIGINT and SIGTERM: the HTTP process owns the lifecycle, drain
included, and this process ends when told to or when the pipe closes (the HTTP process died,
even by SIGKILL), so it never outlives its server holding a GPU.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.facade import Limits

log = logging.getLogger(__name__)

# The RuntimeAPI methods the HTTP process calls here (its tokenizer half it answers itself).
CALLS = frozenset(
    {
        "submit_ids",
        "readiness",
        "metrics_text",
        "start",
        "preload_adapters",
        "stop_taking_requests",
        "begin_shutdown",
        "idle",
        "served_adapter",
        "served_adapters",
        "list_adapters",
        "get_adapter",
        "load_adapter",
        "unload_adapter",
    }
)
# Calls answered at once; the others (a fetch, a preload) may take minutes and get a thread.
QUICK = frozenset(CALLS - {"load_adapter", "preload_adapters", "begin_shutdown"})


@dataclass(frozen=True)
class Hello:
    """What the HTTP process needs to know of the engine's, sent once the model is loaded."""

    base_name: str
    base_source: str
    started_at: float
    limits: Limits
    admin_token: str | None
    model_dir: str  # where the tokenizer is (a fetched model is in the cache by now)


class Sender:
    """conn.send from several threads (engine, call threads), one message at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def __call__(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)


def main(config: RuntimeConfig, conn: Connection, log_level: int) -> None:
    """The engine process's entry point (multiprocessing spawns it with this)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s"
    )
    send = Sender(conn)
    runtime = _start(config, send)
    if runtime is not None:
        try:
            serve(runtime, conn, send)
        finally:
            runtime.stop()
    logging.shutdown()
    # Not sys.exit: a call thread still fetching an adapter nobody will use would hold the
    # exit (and the GPU) until its fetch timed out.
    os._exit(0)


def _start(config: RuntimeConfig, send: Sender):
    """The Runtime, or None after telling the HTTP process why there is none."""
    from loraplane.runtime.adapters.errors import AdapterError
    from loraplane.runtime.runtime import Runtime

    try:
        runtime = Runtime(config, sink=lambda batch: send(("out", batch)))
    except AdapterError as e:  # --model from a source that failed
        send(("fatal", "model", e.message))
        return None
    except (ValueError, FileNotFoundError) as e:  # not a model we can serve
        send(("fatal", "model", str(e)))
        return None
    except Exception as e:
        log.exception("the engine could not start")
        send(("fatal", "error", f"{type(e).__name__}: {e}"))
        return None
    send(
        (
            "hello",
            Hello(
                base_name=runtime.base_name,
                base_source=runtime.base_source,
                started_at=runtime.started_at,
                limits=runtime.limits,
                admin_token=runtime.admin_token,
                model_dir=str(runtime.model_dir),
            ),
        )
    )
    return runtime


def serve(runtime: Any, conn: Connection, send: Sender) -> None:
    """Answer the HTTP process until it says close or goes away."""
    slow = ThreadPoolExecutor(
        max_workers=runtime.config.max_concurrent_fetches + 4, thread_name_prefix="engine-call"
    )
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                log.warning("the HTTP process is gone; stopping the engine")
                return
            kind = message[0]
            if kind == "release":
                runtime.release(message[1], message[2])
            elif kind == "call":
                _, call_id, method, args = message
                if method in QUICK:
                    answer(runtime, send, call_id, method, args)
                else:
                    slow.submit(answer, runtime, send, call_id, method, args)
            elif kind == "close":
                return
    finally:
        slow.shutdown(wait=False, cancel_futures=True)


def answer(runtime: Any, send: Sender, call_id: int, method: str, args: tuple[Any, ...]) -> None:
    """Run one call and send its reply: its value, or the exception it raised."""
    try:
        if method not in CALLS:
            raise ValueError(f"{method!r} is not a call the engine process answers")
        value = getattr(runtime, method)(*args)
        reply: tuple[Any, ...] = ("reply", call_id, True, value)
    except Exception as e:
        reply = ("reply", call_id, False, portable(e))
    try:
        send(reply)
    except (pickle.PicklingError, TypeError, AttributeError) as e:  # a value that cannot cross
        log.exception("the reply to %s could not be sent", method)
        send(("reply", call_id, False, RuntimeError(f"{method}: {e}")))


def portable(e: Exception) -> Exception:
    """e if it survives pickling as itself, else a RuntimeError that says what it was."""
    try:
        copy = pickle.loads(pickle.dumps(e))
    except Exception:
        copy = None
    if type(copy) is type(e) and str(copy) == str(e):
        return e
    if not isinstance(e, (ValueError, KeyError)):
        log.error("call failed", exc_info=e)
    return RuntimeError(f"{type(e).__name__}: {e}")
