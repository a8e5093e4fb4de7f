"""Runtime: the parts of one serving process wired together from a RuntimeConfig."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from loraplane.api.wire import redact_source
from loraplane.runtime.adapters.guard import FetchLimits, parse_networks
from loraplane.runtime.adapters.manager import AdapterEntry, AdapterManager, ModelFacts
from loraplane.runtime.adapters.sources import Fetcher, split_source
from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.engine import Engine
from loraplane.runtime.metrics import Metrics
from loraplane.runtime.model import ModelConfig
from loraplane.runtime.model_runner import ModelRunner

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, config: RuntimeConfig, fetcher: Fetcher | None = None) -> None:
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
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
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
        )
        self.engine = Engine(
            config, self.runner, self.tokenizer, self.adapters, self.metrics, self.base_name
        )
        self.ready = False
        self.preload_error: str | None = None
        self.started_at = time.time()

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

    def start_adapters(self) -> None:
        """Load the --adapter preloads; ready only once all are in. Runs off the event loop."""
        try:
            for name, source in self.config.adapters.items():
                self.load_adapter(name, source)
        except Exception as e:
            self.preload_error = f"preloading adapters failed: {e}"
            log.error("%s", self.preload_error)
            return
        self.ready = True

    def load_adapter(self, name: str, source: str, **kwargs) -> tuple[AdapterEntry, bool]:
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
