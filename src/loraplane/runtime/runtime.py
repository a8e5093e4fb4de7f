"""Runtime: the parts of one serving process wired together from a RuntimeConfig, and the one
surface (facade.RuntimeAPI) the HTTP routes use of them.

In one process (--no-engine-process, and most tests) the routes call it directly. Otherwise
it lives in the engine's process (engine_process.py), its outputs go to a `sink` (the pipe),
and the HTTP process holds a RemoteRuntime (engine_client.py) with the same surface.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from loraplane.api.wire import (
    AdapterInfo,
    AdapterList,
    AdapterLoadRequest,
    AdapterUnloaded,
    redact_source,
)
from loraplane.runtime.adapters.errors import AdapterNotFound
from loraplane.runtime.adapters.guard import FetchLimits, parse_networks
from loraplane.runtime.adapters.manager import AdapterEntry, AdapterManager, ModelFacts
from loraplane.runtime.adapters.report import describe, describe_loading
from loraplane.runtime.adapters.sources import Fetcher, split_source
from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.engine import Engine
from loraplane.runtime.facade import Limits
from loraplane.runtime.metrics import Metrics
from loraplane.runtime.model import ModelConfig
from loraplane.runtime.model_runner import ModelRunner
from loraplane.runtime.outputs import EngineOutput
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.tokenizer_side import TokenizerSide

log = logging.getLogger(__name__)


class Runtime(TokenizerSide):
    def __init__(
        self,
        config: RuntimeConfig,
        fetcher: Fetcher | None = None,
        sink: Callable[[list[EngineOutput]], None] | None = None,
    ) -> None:
        """sink: where the engine's outputs go when the HTTP side is another process; by
        default they go to this object's own streams."""
        from transformers import AutoTokenizer

        self.config = config
        self.fetcher = fetcher or Fetcher(
            config.cache_dir,
            config.pvc_root,
            config.hf_token,
            limits=FetchLimits(
                max_bytes=config.max_adapter_bytes,
                timeout_s=config.fetch_timeout_s,
                read_timeout_s=min(30.0, config.fetch_timeout_s),
                deny=parse_networks(config.deny_source_cidrs),
                allow=parse_networks(config.allow_source_cidrs),
            ),
            max_concurrent=config.max_concurrent_fetches,
        )
        self.model_dir = self._model_dir()
        ModelConfig.from_dir(self.model_dir)  # refuse an unservable model before anything loads
        self.base_name = config.served_model_name or self._default_name()
        TokenizerSide.__init__(self, AutoTokenizer.from_pretrained(str(self.model_dir)))
        self.metrics = Metrics()
        self.runner = ModelRunner(config, self.model_dir)
        facts = ModelFacts(
            names={
                self.base_name,
                config.model,
                str(self.model_dir),
                self.model_dir.name,
                *config.base_model_aliases,
            },
            modules=self.runner.linear_modules,
            lora_modules=self.runner.lora_modules,
            shapes=self.runner.lora_shapes,
        )
        self.adapters = AdapterManager(
            self.fetcher,
            facts,
            config.max_adapters,
            config.max_cpu_adapters,
            config.max_lora_rank,
            on_change=self._wake,
            pin_memory=self.runner.device.type == "cuda",
        )
        self.engine = Engine(
            config,
            self.runner,
            self.tokenizer,
            self.adapters,
            self.metrics,
            self.base_name,
            sink=sink or self.streams.deliver,
        )
        self.ready = False
        self.preload_error: str | None = None
        self.started_at = time.time()
        self.base_source = redact_source(config.model)
        self.admin_token = config.admin_token
        self.limits = Limits(
            max_seq_len=self.engine.max_seq_len,
            vocab_size=self.runner.model.config.vocab_size,
            default_max_tokens=config.default_max_tokens,
            max_request_bytes=config.max_request_bytes,
            shutdown_timeout_s=config.shutdown_timeout_s,
        )

    def _model_dir(self) -> Path:
        if "://" not in self.config.model:
            return Path(self.config.model)
        return self.fetcher.fetch(self.config.model, model=True)

    def _default_name(self) -> str:
        scheme, rest = split_source(self.config.model)
        if scheme == "hf":
            return rest.split("@", 1)[0]
        return Path(rest.rstrip("/")).name or "base"

    def _wake(self) -> None:
        # The manager calls this before the engine exists (preload) too.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.notify()

    # -- requests -------------------------------------------------------------------------------

    def submit_ids(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter: str | None,
        seq_ids: list[int],
    ) -> None:
        self.engine.submit(prompts, params, adapter, seq_ids)

    def release(self, seq_id: int, reason: str) -> None:
        self.engine.abort(seq_id, reason)

    # -- health and lifecycle -------------------------------------------------------------------

    def readiness(self) -> str | None:
        if self.engine.shutting_down:
            return "draining"  # the word /readyz has always answered (wire behaviour)
        if not self.ready:
            return self.preload_error or "loading"
        return None

    def metrics_text(self) -> bytes:
        return self.metrics.render(self.adapters.tiers())

    def start(self) -> None:
        self.engine.start()

    def preload_adapters(self) -> None:
        """Load the --adapter preloads; ready only once all are in. Runs off the event loop."""
        try:
            for name, source in self.config.adapters.items():
                self._register(name, source)
        except Exception as e:
            self.preload_error = f"preloading adapters failed: {e}"
            log.error("%s", self.preload_error)
            return
        self.ready = True

    def stop_taking_requests(self) -> None:
        self.engine.begin_shutdown()

    def idle(self) -> bool:
        return self.engine.idle()

    # -- adapters -------------------------------------------------------------------------------

    def served_adapter(self, name: str) -> AdapterInfo:
        return describe(self.adapters.get(name))

    def served_adapters(self) -> list[AdapterInfo]:
        return [describe(e) for e in self.adapters.registered()]

    def list_adapters(self) -> AdapterList:
        adapters = [describe(e) for e in self.adapters.registered()]
        adapters += [describe(e) for e in self.adapters.unloading()]  # deleted, still finishing
        loaded = {a.name for a in adapters}
        for name, inflight in sorted(self.adapters.loading_now().items()):
            if name not in loaded:  # a replacement in flight: the served entry is what counts
                adapters.append(describe_loading(name, inflight))
        return AdapterList(adapters=adapters)

    def get_adapter(self, name: str) -> AdapterInfo:
        try:
            return describe(self.adapters.get(name))
        except AdapterNotFound:
            inflight = self.adapters.loading_now().get(name)
            if inflight is not None:
                return describe_loading(name, inflight)  # as the list shows it
            for entry in self.adapters.unloading():
                if entry.name == name:
                    return describe(entry)
            raise

    def load_adapter(self, name: str, body: AdapterLoadRequest) -> tuple[AdapterInfo, bool]:
        entry, created = self._register(
            name,
            body.source,
            revision=body.revision,
            sha256=body.sha256,
            pinned=body.pinned,
            credentials=body.credentials,
        )
        return describe(entry), created

    def unload_adapter(self, name: str) -> AdapterUnloaded:
        entry = self.adapters.unregister(name)
        state = "unloading" if entry is not None and entry.refs else "unloaded"
        return AdapterUnloaded(name=name, state=state)

    def _register(self, name: str, source: str, **kwargs) -> tuple[AdapterEntry, bool]:
        started = time.monotonic()
        entry, created = self.adapters.register(name, source, **kwargs)
        if created:
            self.metrics.adapter_load.observe(time.monotonic() - started)
            log.info("adapter %s loaded from %s (rank %d)", name, redact_source(source), entry.rank)
        return entry, created

    def begin_shutdown(self, grace_s: float) -> None:
        """SIGTERM: readiness fails at once, loads in flight stop (nobody will use them), and
        requests still running shortly before grace_s ends are ended with an error event."""
        self.engine.begin_shutdown(max(0.0, grace_s - min(2.0, grace_s / 10)))
        self.adapters.stop_loading()

    def stop(self) -> None:
        self.engine.stop()
        self.adapters.close()
