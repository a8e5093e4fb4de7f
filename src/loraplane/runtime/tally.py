"""The engine's counters and gauges: requests queued and in flight, and every per-request metric.

One owner, so the engine's step reads as steps and streams. `queued` and `in_flight` are read
by HTTP threads (admission, readiness) and changed by the engine thread: under `lock`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.metrics import Metrics
from loraplane.runtime.sequence import Sequence

if TYPE_CHECKING:
    from loraplane.runtime.scheduler import Step


class Tally:
    def __init__(self, metrics: Metrics, base_name: str) -> None:
        self.metrics = metrics
        self.base_name = base_name
        self.lock = threading.Lock()
        self.queued = 0  # accepted, not in a forward pass yet
        self.in_flight = 0  # accepted, not finished
        self.steps = 0
        # Most distinct adapters (base included) that shared one forward pass: proof of mixing.
        self.peak_adapters_per_step = 0
        self.seen = {"queries": 0, "hits": 0, "preemptions": 0}  # counted by cache()
        self.per_adapter: dict[str, tuple[Any, Any, Any]] = {}  # label -> metric children

    def label(self, seq: Sequence) -> str:
        return seq.adapter.name if seq.adapter is not None else self.base_name

    def rejected(self, adapter: str | None, n: int) -> None:
        self.metrics.requests.labels(adapter=adapter or self.base_name, status="rejected").inc(n)

    def accepted(self, n: int) -> None:
        """The caller holds `lock` (admission checks and counts in one go)."""
        self.queued += n
        self.in_flight += n

    def step(self, step: Step) -> None:
        seqs = step.seqs
        started = [s for s in seqs if not s.started]
        for seq in started:
            seq.started = True
            self.metrics.prompt.labels(adapter=self.label(seq)).inc(len(seq.prompt_ids))
        with self.lock:
            self.queued -= len(started)
        self.metrics.batch_tokens.observe(step.num_tokens)
        self.peak_adapters_per_step = max(self.peak_adapters_per_step, len(set(step.lora_slots)))
        self.steps += 1

    def token(self, seq: Sequence, now: float) -> None:
        # Per token, so the labelled children are looked up once per adapter: labels() costs
        # more than the observation itself.
        label = self.label(seq)
        children = self.per_adapter.get(label)
        if children is None:
            m = self.metrics
            children = self.per_adapter[label] = (
                m.ttft.labels(adapter=label),
                m.tpot.labels(adapter=label),
                m.generated.labels(adapter=label),
            )
        ttft, tpot, generated = children
        if seq.first_token_at is None:
            seq.first_token_at = now
            ttft.observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            tpot.observe(now - seq.last_token_at)
        seq.last_token_at = now
        generated.inc()

    def finished(self, seq: Sequence, reason: str, was_queued: bool) -> None:
        with self.lock:
            self.in_flight -= 1
            if was_queued:
                self.queued -= 1
        status = {"stop": "success", "length": "success"}.get(reason, reason)
        self.metrics.requests.labels(adapter=self.label(seq), status=status).inc()

    def gauges(self) -> None:
        self.metrics.queue_depth.set(self.queued)
        self.metrics.in_flight.set(self.in_flight)

    def cache(self, blocks: BlockManager, preemptions: int) -> None:
        """The KV cache's gauges, and its counters moved on to the block manager's totals."""
        m = self.metrics
        m.kv_usage.set(1 - blocks.num_free / blocks.num_blocks)
        m.prefix_queries.inc(blocks.queries - self.seen["queries"])
        m.prefix_hits.inc(blocks.hits - self.seen["hits"])
        m.preemptions.inc(preemptions - self.seen["preemptions"])
        self.seen = {"queries": blocks.queries, "hits": blocks.hits, "preemptions": preemptions}

    def idle(self) -> bool:
        with self.lock:
            return self.in_flight == 0
