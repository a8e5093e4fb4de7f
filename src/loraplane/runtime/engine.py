"""The engine: one thread owns the scheduler and the model runner and steps them.

HTTP handlers call submit() from the event loop and read Outputs from an asyncio queue;
the engine thread pushes to it with call_soon_threadsafe. Requests and aborts reach the thread
through an inbox, so the scheduler's state is only ever touched by that thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from loraplane.runtime.adapters.manager import AdapterEntry, AdapterManager
from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.detokenizer import Detokenizer
from loraplane.runtime.metrics import Metrics
from loraplane.runtime.model_runner import ModelRunner
from loraplane.runtime.outputs import (
    ADAPTER_FAILED,
    GENERATION_FAILED,
    SHUT_DOWN,
    Output,
    QueueFull,
    RequestStream,
    ShuttingDown,
)
from loraplane.runtime.sampler import FAILED
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.scheduler import Scheduler, Step
from loraplane.runtime.sequence import Sequence, Status

log = logging.getLogger(__name__)

__all__ = ["Engine", "Output", "QueueFull", "RequestStream", "ShuttingDown"]


class Engine:
    def __init__(
        self,
        config: RuntimeConfig,
        runner: ModelRunner,
        tokenizer: Any,
        adapters: AdapterManager,
        metrics: Metrics,
        base_name: str,
    ) -> None:
        self.config = config
        self.runner = runner
        self.adapters = adapters
        self.metrics = metrics
        self.base_name = base_name
        self.detok = Detokenizer(tokenizer)
        eos = set(runner.model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.max_seq_len = min(config.max_batch_tokens, runner.model.config.max_position_embeddings)
        self.blocks = BlockManager(config.kv_cache_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.blocks, adapters, config.max_batch_tokens, config.max_running
        )
        self.streams: dict[int, RequestStream] = {}
        self.inbox: deque[tuple[str, Sequence]] = deque()
        self.wake = threading.Condition()
        self.lock = threading.Lock()  # guards the counters below and the draining flag
        self.queued = 0
        self.in_flight = 0
        self.draining = False
        self.drain_deadline: float | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.steps = 0
        # Most distinct adapters (base included) that shared one forward pass: proof of mixing.
        self.peak_adapters_per_step = 0

    # -- called from the event loop -----------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None
    ) -> RequestStream:
        """Queue a request; raises ValueError (400), AdapterNotFound (404), QueueFull, ShuttingDown."""
        return self.submit_many([prompt_ids], params, adapter)[0]

    def submit_many(
        self, prompts: list[list[int]], params: SamplingParams, adapter: str | None
    ) -> list[RequestStream]:
        """Queue the prompts of one request all together, or none of them (then it raises)."""
        for prompt_ids in prompts:
            self.check_fits(len(prompt_ids), params.max_tokens)
        with self.lock:
            if self.draining:
                raise ShuttingDown("the server is shutting down")
            if self.queued + len(prompts) > self.config.max_queue:
                self.metrics.requests.labels(
                    adapter=adapter or self.base_name, status="rejected"
                ).inc(len(prompts))
                raise QueueFull(
                    f"{self.queued} requests are waiting (--max-queue {self.config.max_queue}) "
                    f"and this one brings {len(prompts)}; retry later"
                )
            entries = [self.adapters.acquire(adapter) if adapter else None for _ in prompts]
            self.queued += len(prompts)
            self.in_flight += len(prompts)
        streams = []
        for prompt_ids, entry in zip(prompts, entries, strict=True):
            seq = Sequence(list(prompt_ids), params, entry, arrival=time.monotonic())
            stream = RequestStream(seq, asyncio.get_running_loop(), self.abort)
            self.streams[seq.seq_id] = stream
            streams.append(stream)
            self._post("add", seq)
        self._gauges()
        return streams

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """ValueError (400) unless a prompt this long can run with this max_tokens."""
        if prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if prompt_tokens + max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{prompt_tokens + max_tokens}, above this server's limit of "
                f"{self.max_seq_len} tokens per sequence; shorten the prompt or max_tokens"
            )

    def abort(self, seq: Sequence) -> None:
        self._post("abort", seq)

    def _post(self, verb: str, seq: Sequence) -> None:
        with self.wake:
            self.inbox.append((verb, seq))
            self.wake.notify()

    def notify(self) -> None:
        with self.wake:
            self.wake.notify()

    def begin_drain(self, deadline_s: float | None = None) -> None:
        """Take no new requests; at deadline_s from now, end the running ones with an error.

        The deadline falls before the HTTP server's own: a stream then ends with an event
        that says why, instead of a connection cut mid-stream.
        """
        with self.lock:
            self.draining = True
            if deadline_s is not None and self.drain_deadline is None:
                self.drain_deadline = time.monotonic() + deadline_s
        self.notify()

    def idle(self) -> bool:
        with self.lock:
            return self.in_flight == 0

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.queued)
        self.metrics.in_flight.set(self.in_flight)

    # -- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                if not self.inbox and not self.scheduler.has_work() and not self.stopped:
                    self.wake.wait(timeout=0.5)
                if self.stopped:
                    break
                inbox = list(self.inbox)
                self.inbox.clear()
            try:
                self._iterate(inbox)
            except Exception:
                log.exception("engine step failed; failing the requests of this step")
                self._fail_running("internal error in the engine step")
        for seq in self._all_seqs():
            self._finish(seq, "abort")

    def _all_seqs(self) -> list[Sequence]:
        waiting = [s for q in self.scheduler.waiting.values() for s in q]
        return list(self.scheduler.running) + waiting

    def _iterate(self, inbox: list[tuple[str, Sequence]]) -> None:
        for verb, seq in inbox:
            if verb == "add":
                self.scheduler.add(seq)
            elif not seq.finished:
                self._finish(seq, "abort")
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            for seq in self._all_seqs():
                self._finish(
                    seq,
                    "abort",
                    error="the server shut down before this request finished; retry it",
                    error_code=SHUT_DOWN,
                )
        for slot, entry in self.adapters.take_pending():
            self._load(slot, entry)
        for slot in self.adapters.reap():
            self.runner.clear_adapter(slot)
        self._place_idle()
        if not self.scheduler.has_work():
            return
        step = self.scheduler.schedule()
        for seq in step.failed:
            self._finish(
                seq,
                "error",
                error=f"adapter {seq.adapter_key!r}: {seq.adapter.error}",
                error_code=ADAPTER_FAILED,
            )
        if not step.seqs:
            with self.wake:  # every waiting adapter is being read back: wait for it
                self.wake.wait(timeout=0.05)
            return
        self._run(step)

    def _place_idle(self) -> None:
        """Put freshly registered adapters into free slots (pinned ones may evict)."""
        busy = {s.adapter.uid for s in self.scheduler.running if s.adapter is not None}
        for entry in self.adapters.unplaced():
            if not entry.pinned and self.adapters.slots.free_count() == 0:
                break
            slot = self.adapters.place(entry, busy)
            if slot is not None:
                self._load(slot, entry)

    def _load(self, slot: int, entry: AdapterEntry) -> bool:
        """Copy an adapter into its slot; on failure the adapter is marked failed, not served."""
        try:
            assert entry.weights is not None, f"adapter {entry.name} has no host copy"
            self.runner.load_adapter(slot, entry.weights)
        except Exception as e:
            log.exception("copying adapter %s into slot %d failed", entry.name, slot)
            self.runner.clear_adapter(slot)
            self.adapters.fail(entry, f"copying into GPU slot {slot} failed: {e}")
            return False
        return True

    def _run(self, step: Step) -> None:
        broken = {entry.uid for slot, entry in step.loads if not self._load(slot, entry)}
        if broken:
            kept = [
                (q, s)
                for q, s in zip(step.seqs, step.slots, strict=True)
                if q.adapter is None or q.adapter.uid not in broken
            ]
            for seq in step.seqs:
                if seq.adapter is not None and seq.adapter.uid in broken:
                    self._finish(
                        seq,
                        "error",
                        error=f"adapter {seq.adapter_key!r}: {seq.adapter.error}",
                        error_code=ADAPTER_FAILED,
                    )
            step.seqs, step.slots = [q for q, _ in kept], [s for _, s in kept]
            if not step.seqs:
                return
        started = [s for s in step.seqs if not s.started]
        for seq in started:
            seq.started = True
            self.metrics.prompt.labels(adapter=self._label(seq)).inc(len(seq.prompt_ids))
        with self.lock:
            self.queued -= len(started)
        self.metrics.batch_tokens.observe(sum(len(s) - s.num_cached for s in step.seqs))
        try:
            tokens, logprobs = self.runner.run(step.seqs, step.slots)
        except Exception:
            log.exception("a step of %d sequences failed; running them one by one", len(step.seqs))
            tokens, logprobs = self._run_alone(step)
        self.peak_adapters_per_step = max(self.peak_adapters_per_step, len(set(step.slots)))
        self.steps += 1
        now = time.monotonic()
        for seq, token, logprob in zip(step.seqs, tokens, logprobs, strict=True):
            if seq.finished:
                continue
            if token == FAILED:
                self._finish(seq, "error", error=self._why_failed(seq))
                continue
            try:
                self._advance(seq, token, logprob, now)
            except Exception:
                log.exception("sequence %d failed after its step", seq.seq_id)
                self._finish(seq, "error", error="internal error on this request")
        self._gauges()

    def _run_alone(self, step: Step) -> tuple[list[int], list[float]]:
        """Each sequence of a failed step in its own forward: only the culprit fails."""
        tokens, logprobs = [], []
        for seq, slot in zip(step.seqs, step.slots, strict=True):
            try:
                (token,), (logprob,) = self.runner.run([seq], [slot])
            except Exception:
                log.exception("sequence %d failed on its own", seq.seq_id)
                token, logprob = FAILED, 0.0
            tokens.append(token)
            logprobs.append(logprob)
        return tokens, logprobs

    def _why_failed(self, seq: Sequence) -> str:
        who = f"adapter {seq.adapter_key!r}" if seq.adapter is not None else "the base model"
        return f"{who} produced no valid next token for this request (non-finite logits)"

    def _advance(self, seq: Sequence, token: int, logprob: float, now: float) -> None:
        label = self._label(seq)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.labels(adapter=label).observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.metrics.tpot.labels(adapter=label).observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generated.labels(adapter=label).inc()
        is_eos = token in self.eos_ids and not seq.params.ignore_eos
        if not is_eos:
            seq.output_ids.append(token)
        reason = None
        if is_eos:
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or len(seq) >= self.max_seq_len:
            reason = "length"
        # On the last token, flush text held back for an incomplete character.
        delta = self.detok.update(seq, final=reason is not None)
        if seq.stop_hit is not None:
            reason = "stop"
        stream = self.streams.get(seq.seq_id)
        if stream is not None and (delta or not is_eos):
            token_id = None if is_eos else token
            stream.push(Output(delta, token_id, logprob, completion_tokens=len(seq.output_ids)))
        if reason is not None:
            self._finish(seq, reason, eos=is_eos)

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        error: str | None = None,
        eos: bool = False,
        error_code: str = GENERATION_FAILED,
    ) -> None:
        if seq.finished:
            return
        was_queued = not seq.started
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.runner.sampler.forget(seq.seq_id)
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)
        with self.lock:
            self.in_flight -= 1
            if was_queued:
                self.queued -= 1
        status = {"stop": "success", "length": "success"}.get(reason, reason)
        self.metrics.requests.labels(adapter=self._label(seq), status=status).inc()
        stream = self.streams.pop(seq.seq_id, None)
        if stream is not None:
            stream.push(
                Output(
                    "",
                    None,
                    finished=True,
                    finish_reason=reason,
                    stop_hit=seq.stop_hit,
                    eos=eos,
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                    error=error,
                    error_code=error_code if error else None,
                )
            )
        self._gauges()

    def _fail_running(self, error: str) -> None:
        for seq in list(self.scheduler.running):
            self._finish(seq, "error", error=error)

    def _label(self, seq: Sequence) -> str:
        return seq.adapter.name if seq.adapter is not None else self.base_name
