"""SimRuntime: one simulated runtime pod's adapters and metrics, as the real runtime keeps them.

The same rules as loraplane.runtime's adapter manager, without weights: a PUT of the loaded
source is a no-op, a second PUT of a load in flight joins it, a PUT of another source replaces
it (the newest wins), a DELETE cancels a load in flight. Loads take SimConfig.load_seconds and
fail as SimConfig's rules say.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from loraplane.api.wire import (
    METRIC_IN_FLIGHT,
    METRIC_QUEUE_DEPTH,
    METRIC_REQUESTS,
    AdapterErrorCode,
    AdapterInfo,
    AdapterLoadRequest,
    AdapterUnloaded,
    RuntimeAdapterState,
    Tier,
    adapter_name_problem,
    redact_source,
)

from .config import ERROR_STATUS, SimConfig

RANK = 8
TARGET_MODULES = ["q_proj", "v_proj"]
SIZE_BYTES = 4 * 1024 * 1024


class SimError(Exception):
    """A refusal in the runtime's error shape: status, code and a message a person can act on."""

    def __init__(self, code: AdapterErrorCode | str, message: str, status: int | None = None):
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.status = status if status is not None else ERROR_STATUS[AdapterErrorCode(code)]


@dataclass(slots=True)
class _Adapter:
    name: str
    source: str
    revision: str | None
    sha256: str
    pinned: bool
    loaded_at: float

    def same_source(self, source: str, revision: str | None, sha256: str | None) -> bool:
        return (
            self.source == source
            and self.revision == revision
            and (sha256 is None or sha256 == self.sha256)
        )


@dataclass
class _Loading:
    key: tuple[str, str | None, str | None]
    started_at: float
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    cancelled: str | None = None
    adapter: _Adapter | None = None


@dataclass(frozen=True)
class PodIdentity:
    """What the simulated process was started as: from the pod's container command."""

    namespace: str
    name: str
    base_name: str
    model: str
    max_adapters: int


class SimRuntime:
    def __init__(self, pod: PodIdentity, config: SimConfig) -> None:
        self.pod = pod
        self.config = config
        self.started_at = time.time()
        self.adapters: dict[str, _Adapter] = {}
        self.loading: dict[str, _Loading] = {}
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            METRIC_REQUESTS,
            "Requests finished, by adapter and outcome",
            ["adapter", "status"],
            registry=r,
        )
        self.in_flight = Gauge(METRIC_IN_FLIGHT, "Requests accepted and not finished", registry=r)
        self.queue_depth = Gauge(
            METRIC_QUEUE_DEPTH, "Requests waiting for their first forward pass", registry=r
        )
        self.tiers = Gauge(
            "loraplane_adapters",
            "Registered adapters by tier (gpu, cpu, disk)",
            ["tier"],
            registry=r,
        )

    # -- admin ------------------------------------------------------------------------------
    def list(self) -> list[AdapterInfo]:
        tiers = self._tiers()
        out = [self._describe(a, tiers[a.name]) for a in sorted(self.adapters.values(), key=_name)]
        for name, inflight in sorted(self.loading.items()):
            if name not in self.adapters:
                out.append(self._describe_loading(name, inflight))
        return out

    def get(self, name: str) -> AdapterInfo:
        if name in self.adapters:
            return self._describe(self.adapters[name])
        if name in self.loading:
            return self._describe_loading(name, self.loading[name])
        raise SimError(AdapterErrorCode.NOT_FOUND, f"adapter {name!r} is not loaded")

    async def load(self, name: str, req: AdapterLoadRequest) -> tuple[AdapterInfo, bool]:
        """(the adapter, whether this PUT loaded it): False means it was loaded already."""
        problem = adapter_name_problem(name)
        if problem is not None:
            raise SimError(AdapterErrorCode.INVALID_NAME, problem)
        sha256 = req.sha256.lower() if req.sha256 else None
        current = self.adapters.get(name)
        if current is not None and current.same_source(req.source, req.revision, sha256):
            current.pinned = req.pinned
            return self._describe(current), False
        key = (req.source, req.revision, sha256)
        inflight = self.loading.get(name)
        if inflight is not None and inflight.key == key:
            await asyncio.shield(inflight.done)  # raises the first PUT's refusal, if any
            assert inflight.adapter is not None
            return self._describe(inflight.adapter), False
        if inflight is not None:  # the newest PUT wins, whichever load ends first
            inflight.cancelled = f"a PUT from {redact_source(req.source)} replaced it"
        inflight = self.loading[name] = _Loading(key, time.time())
        try:
            inflight.adapter = await self._fetch(name, req, sha256, inflight)
        except Exception as e:
            inflight.done.set_exception(e)
            inflight.done.exception()  # marks it retrieved: there may be no joiner
            raise
        except BaseException:  # cancelled (shutdown): joiners stop waiting too
            inflight.done.cancel()
            raise
        finally:
            if self.loading.get(name) is inflight:
                del self.loading[name]
        self.adapters[name] = inflight.adapter
        inflight.done.set_result(None)
        return self._describe(inflight.adapter), True

    async def _fetch(
        self, name: str, req: AdapterLoadRequest, sha256: str | None, inflight: _Loading
    ) -> _Adapter:
        await asyncio.sleep(self.config.load_seconds)
        failure = self.config.failure_for(req.source)
        if failure is not None:
            code, why = failure
            raise SimError(
                code,
                f"adapter {name!r} from {redact_source(req.source)}: simulated {code.value} "
                f"(the simulated runtime refuses this source: {why})",
            )
        if inflight.cancelled:
            raise SimError(
                AdapterErrorCode.CONFLICT,
                f"adapter {name!r} from {redact_source(req.source)} was not registered: "
                f"{inflight.cancelled} while it loaded",
            )
        # 200 pods x 1,000 adapters: the same strings once per process, not once per pod.
        return _Adapter(
            sys.intern(name),
            sys.intern(req.source),
            sys.intern(req.revision) if req.revision else None,
            sys.intern(sha256) if sha256 else _digest(req.source, req.revision),
            req.pinned,
            time.time(),
        )

    def unload(self, name: str) -> AdapterUnloaded:
        entry = self.adapters.pop(name, None)
        inflight = self.loading.pop(name, None)
        if entry is None and inflight is None:
            raise SimError(AdapterErrorCode.NOT_FOUND, f"adapter {name!r} is not loaded")
        if inflight is not None:
            inflight.cancelled = "a DELETE came"
        return AdapterUnloaded(name=name, state="unloaded")

    # -- serving ----------------------------------------------------------------------------
    def resolve(self, model: str | None) -> str | None:
        """None for the base model, else the adapter's name; 404 when neither is served."""
        if model in (None, "", self.pod.base_name):
            return None
        if model not in self.adapters:
            raise SimError("model_not_found", f"adapter {model!r} is not loaded", status=404)
        return model

    async def complete(self, adapter: str | None) -> None:
        """One request's life: in flight for completion_seconds, then counted as a success."""
        self.in_flight.inc()
        try:
            if self.config.completion_seconds:
                await asyncio.sleep(self.config.completion_seconds)
        finally:
            self.in_flight.dec()
        self.requests.labels(adapter=adapter or self.pod.base_name, status="success").inc()

    def metrics(self) -> bytes:
        counts = {t.value: 0 for t in Tier}
        for tier in self._tiers().values():
            counts[tier.value] += 1
        for tier, n in counts.items():
            self.tiers.labels(tier=tier).set(n)
        return generate_latest(self.registry)

    def models(self) -> list[dict]:
        base = {
            "id": self.pod.base_name,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "loraplane",
            "root": self.pod.model,
            "parent": None,
        }
        adapters = [
            {
                "id": a.name,
                "object": "model",
                "created": int(a.loaded_at),
                "owned_by": "loraplane",
                "root": redact_source(a.source),
                "parent": self.pod.base_name,
            }
            for a in sorted(self.adapters.values(), key=lambda a: a.name)
        ]
        return [base, *adapters]

    # -- describing ---------------------------------------------------------------------------
    def _tiers(self) -> dict[str, Tier]:
        # The first max_adapters loaded hold GPU slots; the rest wait in host memory.
        return {
            name: Tier.GPU if i < self.pod.max_adapters else Tier.CPU
            for i, name in enumerate(self.adapters)
        }

    def _describe(self, a: _Adapter, tier: Tier | None = None) -> AdapterInfo:
        return AdapterInfo(
            name=a.name,
            source=redact_source(a.source),
            revision=a.revision,
            sha256=a.sha256,
            pinned=a.pinned,
            state=RuntimeAdapterState.LOADED,
            tier=tier or self._tiers().get(a.name, Tier.CPU),
            rank=RANK,
            target_modules=TARGET_MODULES,
            size_bytes=SIZE_BYTES,
            loaded_at=_utc(a.loaded_at),
        )

    def _describe_loading(self, name: str, inflight: _Loading) -> AdapterInfo:
        source, revision, _ = inflight.key
        return AdapterInfo(
            name=name,
            source=redact_source(source),
            revision=revision,
            state=RuntimeAdapterState.LOADING,
            loading_since=_utc(inflight.started_at),
        )


@functools.lru_cache(maxsize=65536)
def _digest(source: str, revision: str | None) -> str:
    """The real runtime reports the digest of what it read; here, one of the source."""
    return sys.intern(hashlib.sha256(f"{source}@{revision}".encode()).hexdigest())


def _name(a: _Adapter) -> str:
    return a.name


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(int(timestamp), UTC)
