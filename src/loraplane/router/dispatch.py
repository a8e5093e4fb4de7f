"""The router's one decision loop: choose a pod, try it, retry once or hold, stream the answer.

Router owns what the decision needs between requests: the table the watches keep current,
the requests outstanding per pod, and the holds. It answers in plain data (an Answer to
stream, or a Refusal); app.py turns those into HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import anyio

from .choice import Choice, Target, choose
from .config import RouterConfig
from .errors import Refusal
from .holds import Hold, HoldQueue, Outcome
from .metrics import RouterMetrics
from .retry import Failure, Step, next_step
from .table import Table
from .upstream import Failed, Opened, Upstream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """One client request, read whole, with the target its body names."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    target: Target


@dataclass
class Answer:
    """A pod's answer: `body` whole, or `chunks` to stream (ending it releases the pod)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None


class Router:
    def __init__(self, config: RouterConfig, upstream: Upstream, metrics: RouterMetrics) -> None:
        self.config = config
        self.upstream = upstream
        self.metrics = metrics
        self.table = Table(config.base)
        self.synced = asyncio.Event()  # set once every watched collection has been listed
        self.outstanding: dict[str, int] = {}  # pod -> requests sent there and not finished
        self.holds = HoldQueue(config.max_held, metrics.set_held)
        self._turn = itertools.count()
        self._cleanups: set[asyncio.Future] = set()

    # ---- the watches' side ------------------------------------------------------------------

    def changed(self) -> None:
        """The table changed: let go every hold that a ready pod can take now."""
        self.metrics.ready_pods.set(len(self.table.backends))
        if self.synced.is_set():
            self.holds.release(
                lambda h: choose(self.table, h.target, {}, self._avoid(h.tried)) is not None
            )
        self._forget_pods()

    def _forget_pods(self) -> None:
        """Close the connections of pods that left the table once nothing runs on them."""
        live = {(b.name, b.url) for b in self.table.backends.values()}

        def keep(pod: str, url: str) -> bool:
            return (pod, url) in live or pod in self.outstanding

        task = asyncio.ensure_future(self.upstream.forget(keep))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # ---- the requests' side -----------------------------------------------------------------

    async def forward(self, call: Call, gone: asyncio.Future | None = None) -> Answer | Refusal:
        """The answer of a ready pod, held for one first when none can take it now."""
        started = time.monotonic()
        deadline = started + self.config.hold_timeout_seconds
        tried: dict[str, int] = {}  # pod -> its admission when it failed this request
        failed: Failed | None = None
        attempts = 0
        while True:
            choice = None
            if self.synced.is_set():
                choice = choose(
                    self.table, call.target, self.outstanding, self._avoid(tried), next(self._turn)
                )
            if choice is None:
                refusal = await self._hold(call.target, tried, deadline, gone, failed)
                if refusal is not None:
                    return self._refused(call.target, refusal, started)
                continue
            result = await self._try(choice, call)
            attempts += 1
            if isinstance(result, Opened):
                return await self._answer(call.target, choice, result, started)
            failed = result
            tried[choice.pod.name] = self.table.admitted.get(choice.pod.name, 0)
            another = choose(self.table, call.target, {}, self._avoid(tried)) is not None
            step = next_step(result.failure, attempts, another)
            log.info("%s on %s: %s; %s", call.path, choice.pod.name, result.message, step)
            if step is Step.ANSWER:
                return self._give_up(call.target, result, attempts, started)

    def _avoid(self, tried: Mapping[str, int]) -> list[str]:
        """Pods that failed this request and have not been out of service since."""
        return [pod for pod, admitted in tried.items() if self.table.admitted.get(pod) == admitted]

    async def _hold(
        self,
        target: Target,
        tried: dict[str, int],
        deadline: float,
        gone: asyncio.Future | None,
        failed: Failed | None,
    ) -> Refusal | None:
        """Hold until a pod can take the request; the refusal when none did in time."""
        hold: Hold | None = self.holds.admit(target, tried)
        if hold is None:
            self.metrics.hold_seconds.labels(outcome=Outcome.FULL).observe(0)
            return Refusal(
                429,
                f"{self.config.max_held} requests already wait for a ready pod of "
                f"{self.config.base!r}; retry later",
                "server_overloaded",
                "overloaded",
                retry_after=self.config.retry_after_seconds,
            )
        started = time.monotonic()
        outcome = await self.holds.wait(hold, deadline - started, gone)
        self.metrics.hold_seconds.labels(outcome=outcome).observe(time.monotonic() - started)
        if outcome is Outcome.RELEASED:
            return None
        if outcome is Outcome.GONE:
            return Refusal(499, "the client closed the connection while its request was held")
        return Refusal(
            503,
            self._why_unready(failed),
            "server_unavailable",
            "no_ready_replicas",
            retry_after=self.config.retry_after_seconds,
        )

    def _why_unready(self, failed: Failed | None) -> str:
        waited = f"{self.config.hold_timeout_seconds:g}s"
        base = self.config.base
        if failed is not None:
            return f"{failed.message}, and no other pod of {base!r} became ready in {waited}"
        if not self.synced.is_set():
            return f"the router has not yet read the pods of {base!r} from the API ({waited})"
        if not self.table.base_exists:
            return f"BaseModelDeployment {base!r} does not exist"
        starting = len(self.table.starting)
        state = f"{starting} starting" if starting else "scaled to zero, waking up"
        return f"no pod of {base!r} became ready in {waited} ({state}); retry later"

    async def _try(self, choice: Choice, call: Call) -> Opened | Failed:
        pod, label = choice.pod.name, call.target.label
        self.metrics.routed_to(label, choice.hit)
        self.outstanding[pod] = self.outstanding.get(pod, 0) + 1
        result = await self.upstream.open(
            choice.pod, call.method, call.path, call.headers, call.body
        )
        if isinstance(result, Failed):
            self._finished(pod)
            self.metrics.upstream_errors.labels(adapter=label, kind=result.failure).inc()
        return result

    def _finished(self, pod: str) -> None:
        left = self.outstanding.get(pod, 0) - 1
        if left > 0:
            self.outstanding[pod] = left
            return
        self.outstanding.pop(pod, None)
        if pod not in self.table.backends:  # its last answer ended after it left
            self._forget_pods()

    async def _answer(
        self, target: Target, choice: Choice, opened: Opened, started: float
    ) -> Answer:
        label, pod = target.label, choice.pod.name
        if opened.whole:
            async for _ in opened.rest:  # its end, so the connection goes back to the pool
                pass
            await opened.close()
            self._finished(pod)
            self._count(label, str(opened.status), started)
            return Answer(opened.status, opened.headers, body=opened.first)
        self.metrics.in_flight.labels(adapter=label).inc()

        async def chunks() -> AsyncIterator[bytes]:
            completed = False
            try:
                yield opened.first
                async for chunk in opened.rest:
                    yield chunk
                completed = True
            except Exception as e:
                # Bytes went out: the answer is this pod's, cut. The client sees the connection
                # close before the end; a second answer would be glued to part of the first.
                self.metrics.upstream_errors.labels(adapter=label, kind=Failure.CUT).inc()
                log.warning("answer from %s cut after it began: %s", pod, e)
                raise
            finally:
                self._finished(pod)
                self.metrics.in_flight.labels(adapter=label).dec()
                code = str(opened.status) if completed else "cut"
                self._count(label, code, started)
                with anyio.CancelScope(shield=True):  # a client gone cancels; close anyway
                    await opened.close()

        return Answer(opened.status, opened.headers, chunks=chunks())

    def _give_up(
        self, target: Target, failed: Failed, attempts: int, started: float
    ) -> Answer | Refusal:
        """No try succeeded: the pod's own refusal when it gave one, else the router's."""
        if failed.answer is not None:
            status, headers, body = failed.answer
            self._count(target.label, str(status), started)
            return Answer(status, headers, body=body)
        if failed.failure is Failure.TIMEOUT:
            refusal = Refusal(504, failed.message, "server_error", "upstream_timeout")
        else:
            tries = "once" if attempts == 1 else f"{attempts} times"
            refusal = Refusal(
                502, f"{failed.message} (tried {tries})", "server_error", "upstream_failed"
            )
        return self._refused(target, refusal, started)

    def _refused(self, target: Target, refusal: Refusal, started: float) -> Refusal:
        self._count(target.label, str(refusal.status), started)
        return refusal

    def _count(self, label: str, code: str, started: float) -> None:
        self.metrics.answered(label, code, time.monotonic() - started)
