"""The engine: one thread steps the scheduler and the model runner, and sends token ids out.

submit() and abort() are called from the HTTP side (the event loop, or the pipe from the
HTTP process: engine_process.py); they reach the thread through an inbox, so the
scheduler's state (KV blocks, LoRA slots, queues) is only ever touched by that thread. What
comes out is EngineOutputs, token ids only, handed to `sink` once per step: the text and the
stop strings are made on the HTTP side (outputs.RequestStream), off this thread. Decisions
live elsewhere: what runs (scheduler.py), when a sequence is finished (postprocess.py), what
is counted (tally.py).

A step, with async scheduling (the default): schedule step N+1, copy in its LoRA slots, launch
it; only then read step N's tokens (the one wait), accept them (EOS, length) and send them
while the device runs N+1. N+1 was scheduled with N's tokens pending: their ids reach N+1 on
the device, a sequence that N's token ends by length is left out, and one that N's token ends
by EOS (or an abort, a stop string, a failed row) has its N+1 token dropped, never sent nor
counted. `--no-async-scheduling`: launch N, send N-1's tokens, read N's, then schedule N+1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loraplane.runtime.adapters.manager import AdapterEntry, AdapterManager
from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.lora_slot_manager import LoraSlotManager
from loraplane.runtime.metrics import Metrics
from loraplane.runtime.model_runner import ModelRunner, PendingStep
from loraplane.runtime.outputs import (
    ADAPTER_FAILED,
    GENERATION_FAILED,
    SHUT_DOWN,
    EngineOutput,
    InvalidRequest,
    QueueFull,
    ShuttingDown,
)
from loraplane.runtime.postprocess import PostProcessor
from loraplane.runtime.sampler import FAILED
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.scheduler import Scheduler, Step
from loraplane.runtime.sequence import Sequence, Status
from loraplane.runtime.tally import Tally

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineOutput", "QueueFull", "ShuttingDown"]


@dataclass
class Accepted:
    """A token taken into its sequence, to be sent out (_emit)."""

    seq: Sequence
    token: int
    logprob: float
    eos: bool
    reason: str | None  # "stop" (EOS) or "length" when the token finishes the sequence


@dataclass
class Launched:
    """A step handed to the model runner, and what the engine needs once its tokens are read."""

    step: Step
    samples: list[bool]  # per sequence: does it sample (taken before launch moves num_cached)
    pending: PendingStep | None = None  # None: the launch failed, each sequence runs alone
    computed: list[int] = field(default_factory=list)  # each sequence's num_cached once it ran
    dropped: set[int] = field(default_factory=set)  # seq_ids that ended before it was read

    @property
    def sampled(self) -> list[Sequence]:
        return [s for s, last in zip(self.step.seqs, self.samples, strict=True) if last]


class Engine:
    def __init__(
        self,
        config: RuntimeConfig,
        runner: ModelRunner,
        tokenizer: Any,
        adapters: AdapterManager,
        metrics: Metrics,
        base_name: str,
        sink: Callable[[list[EngineOutput]], None],
    ) -> None:
        """sink: called on the engine thread with each step's outputs, in order."""
        self.config = config
        self.runner = runner
        self.adapters = adapters
        eos = set(runner.model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.max_seq_len = runner.max_seq_len
        self.post = PostProcessor(eos, self.max_seq_len)
        self.tally = Tally(metrics, base_name)
        self.blocks = BlockManager(
            runner.kv_blocks, config.block_size, config.prefix_caching, runner.watermark_blocks
        )
        self.scheduler = Scheduler(
            self.blocks,
            LoraSlotManager(config.max_adapters, adapters.host),
            adapters,
            config.max_num_batched_tokens,
            config.max_running,
        )
        self.live: dict[int, Sequence] = {}  # by seq_id: submitted, not finished
        self.unsent: list[Accepted] = []  # tokens taken from the device, not sent yet
        self.sink = sink
        self.outbox: list[EngineOutput] = []  # this iteration's outputs, sent at once
        # ("add", seq), or ("abort" | "stop", seq): stop is the HTTP side's stop string.
        self.inbox: deque[tuple[str, Sequence]] = deque()
        self.wake = threading.Condition()
        self.shutting_down = False  # under tally.lock: admission reads it with the counters
        self.shutdown_deadline: float | None = None
        self.stopped = False
        # Async scheduling: the step on the device whose tokens are not read yet.
        self.launched: Launched | None = None
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # -- called from the event loop -----------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter: str | None,
        seq_ids: list[int],
    ) -> None:
        """Queue the prompts of one request all together, or none of them: raises
        InvalidRequest, AdapterNotFound, QueueFull or ShuttingDown. seq_ids are the HTTP
        side's, given before its streams were opened; outputs carry them."""
        for prompt_ids in prompts:
            self.check_fits(len(prompt_ids), params.max_tokens)
        with self.tally.lock:
            if self.shutting_down:
                raise ShuttingDown("the server is shutting down")
            if self.tally.queued + len(prompts) > self.config.max_queue:
                self.tally.rejected(adapter, len(prompts))
                raise QueueFull(
                    f"{self.tally.queued} requests are waiting (--max-queue "
                    f"{self.config.max_queue}) and this one brings {len(prompts)}; retry later"
                )
            entries = [self.adapters.acquire(adapter) if adapter else None for _ in prompts]
            self.tally.accepted(len(prompts))
        for prompt_ids, entry, seq_id in zip(prompts, entries, seq_ids, strict=True):
            seq = Sequence(list(prompt_ids), params, entry, seq_id=seq_id, arrival=time.monotonic())
            self.live[seq_id] = seq
            self._post("add", seq)
        self.tally.gauges()

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """InvalidRequest unless a prompt this long can run with this max_tokens."""
        if prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        if prompt_tokens + max_tokens > self.max_seq_len:
            raise InvalidRequest(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{prompt_tokens + max_tokens}, above this server's limit of "
                f"{self.max_seq_len} tokens per sequence; shorten the prompt or max_tokens"
            )

    def abort(self, seq_id: int, reason: str = "abort") -> None:
        """End a sequence: "abort" (nobody reads it) or "stop" (its stop string came)."""
        seq = self.live.get(seq_id)
        if seq is not None:
            self._post("stop" if reason == "stop" else "abort", seq)

    def _post(self, verb: str, seq: Sequence) -> None:
        with self.wake:
            self.inbox.append((verb, seq))
            self.wake.notify()

    def notify(self) -> None:
        with self.wake:
            self.wake.notify()

    def begin_shutdown(self, deadline_s: float | None = None) -> None:
        """Take no new requests; at deadline_s from now, end the running ones with an error.

        The deadline falls before the HTTP server's own: a stream then ends with an event
        that says why, instead of a connection cut mid-stream.
        """
        with self.tally.lock:
            self.shutting_down = True
            if deadline_s is not None and self.shutdown_deadline is None:
                self.shutdown_deadline = time.monotonic() + deadline_s
        self.notify()

    def idle(self) -> bool:
        return self.tally.idle()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    # -- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                idle = not (self.inbox or self.unsent or self.launched or self.scheduler.has_work())
                if idle and not self.stopped:
                    self.wake.wait(timeout=0.5)
                if self.stopped:
                    break
                inbox = list(self.inbox)
                self.inbox.clear()
            try:
                self._iterate(inbox)
            except Exception:
                log.exception("engine step failed; failing the requests of this step")
                self._drop_launched()
                self._fail_running("internal error in the engine step")
            self._flush()
        self._drop_launched()
        self._emit()
        for seq in self._all_seqs():
            self._finish(seq, "abort")
        self._flush()

    def _drop_launched(self) -> None:
        """Forget the step in flight (its requests end): a waiting sequence that was preempted
        with a pending token recomputes that token instead."""
        self.launched = None
        for seq in self._all_seqs():
            if not seq.num_cached:
                seq.num_pending = 0

    def _all_seqs(self) -> list[Sequence]:
        waiting = [s for q in self.scheduler.waiting.values() for s in q]
        return list(self.scheduler.running) + waiting

    def _iterate(self, inbox: list[tuple[str, Sequence]]) -> None:
        for verb, seq in inbox:
            if verb == "add":
                self.scheduler.add(seq)
            elif not seq.finished:
                self._finish(seq, verb)
        if self.shutdown_deadline is not None and time.monotonic() >= self.shutdown_deadline:
            for seq in self._all_seqs():
                self._finish(
                    seq,
                    "abort",
                    error="the server shut down before this request finished; retry it",
                    error_code=SHUT_DOWN,
                )
        step = self.scheduler.schedule()
        self._prepare_lora_slots(step)
        for seq in step.failed:
            self._fail_adapter(seq)
        if step.seqs:
            self._run(step)
            return
        if self.launched is not None:  # nothing to queue behind it: wait for its tokens
            launched, self.launched = self.launched, None
            self._land(launched)
            self._emit()
            return
        self._emit()
        if self.scheduler.has_work() and not step.loads:
            with self.wake:  # every waiting adapter is being read back: wait for it
                self.wake.wait(timeout=0.05)

    def _prepare_lora_slots(self, step: Step) -> None:
        """Clear freed slots, then copy in new ones (Step's order); drop what cannot run."""
        for slot in step.clears:
            self.runner.clear_adapter(slot)
        broken = {entry.uid for slot, entry in step.loads if not self._copy_in(slot, entry)}
        if not broken:
            return
        kept = [
            (q, s)
            for q, s in zip(step.seqs, step.lora_slots, strict=True)
            if q.adapter is None or q.adapter.uid not in broken
        ]
        for seq in step.seqs:
            if seq.adapter is not None and seq.adapter.uid in broken:
                self._fail_adapter(seq)
        step.seqs, step.lora_slots = [q for q, _ in kept], [s for _, s in kept]

    def _copy_in(self, slot: int, entry: AdapterEntry) -> bool:
        """Copy an adapter into its slot; on failure the adapter is marked failed, not served."""
        try:
            assert entry.weights is not None, f"adapter {entry.name} has no host copy"
            self.runner.load_adapter(slot, entry.weights)
        except Exception as e:
            log.exception("copying adapter %s into LoRA slot %d failed", entry.name, slot)
            self.scheduler.lora_slots.deallocate(entry)
            self.runner.clear_adapter(slot)
            self.adapters.fail(entry, f"copying into GPU slot {slot} failed: {e}")
            return False
        return True

    def _fail_adapter(self, seq: Sequence) -> None:
        assert seq.adapter is not None
        self._finish(
            seq,
            "error",
            error=f"adapter {seq.adapter_key!r}: {seq.adapter.error}",
            error_code=ADAPTER_FAILED,
        )

    def _run(self, step: Step) -> None:
        """Launch step N. Synchronous: send N-1's tokens while it runs, then read N's. Async:
        read N-1's (launched last iteration) now that N is queued behind it, and send them
        while N runs; N's are read once N+1 is queued."""
        self.tally.step(step)
        now = Launched(step, step.samples)
        try:
            now.pending = self.runner.launch(step.seqs, step.lora_slots, step.chunks)
            now.computed = [s.num_cached for s in step.seqs]
        except Exception:
            log.exception("a step of %d sequences failed; running them one by one", len(step.seqs))
        if not self.config.async_scheduling:
            self._emit()  # the previous step's tokens go out while the device runs this one
            self._land(now)
            return
        before, self.launched = self.launched, now
        if before is not None:
            self._land(before)  # an EOS among these voids that sequence's row in N
        if now.pending is None:
            self.launched = None
            self._land(now)  # each sequence alone: their pending tokens are known now
        else:
            self._mark_pending(now)
        self.tally.gauges()  # the queue moved at launch; no token may be read this iteration
        self._emit()

    def _mark_pending(self, launched: Launched) -> None:
        """N's sampled tokens, not read yet, count in their sequences when N+1 is scheduled:
        one more position and block each, the ids taken on the device. A token known to be
        the last (max_tokens, the sequence limit) does not: its sequence is not run again."""
        for seq in launched.sampled:
            if seq.finished or seq.seq_id in launched.dropped:
                continue
            if seq.room(self.max_seq_len) > 1:
                seq.num_pending = 1

    def _land(self, done: Launched) -> None:
        """Read a launched step's tokens (or run its sequences alone when the launch failed),
        offer its computed blocks to the prefix cache, and take each token into its sequence:
        EOS and length are decided here (PostProcessor.accept)."""
        step, computed = done.step, done.computed
        if done.pending is None:
            tokens, logprobs = self._run_alone(done)
            computed = [s.num_cached for s in step.seqs]
        else:
            try:
                tokens, logprobs = done.pending.result()
            except Exception:
                if self.config.async_scheduling:
                    raise  # a step is queued on these tokens: _loop fails what is running
                log.exception(
                    "a step of %d sequences failed; running them one by one", len(step.seqs)
                )
                for seq, chunk in zip(step.seqs, step.chunks, strict=True):
                    if seq.block_table:
                        seq.num_cached -= chunk  # not computed after all
                tokens, logprobs = self._run_alone(done)
                computed = [s.num_cached for s in step.seqs]
        for seq, upto in zip(step.seqs, computed, strict=True):
            self.blocks.commit(seq, upto)  # its newly computed full blocks, for later prompts
        self.tally.cache(self.blocks, self.scheduler.preemptions)
        later = self.launched if self.launched is not done else None
        for seq, token, logprob in zip(done.sampled, tokens, logprobs, strict=True):
            seq.num_pending = 0  # known now, or void
            if seq.finished or seq.seq_id in done.dropped:
                continue  # ended while the step ran: EOS a step before, a stop string, an abort
            reason = None
            if token == FAILED:
                self._finish(seq, "error", error=self._why_failed(seq))
                reason = "error"
            else:
                try:
                    eos, reason = self.post.accept(seq, token)
                except Exception:
                    log.exception("sequence %d failed after its step", seq.seq_id)
                    self._finish(seq, "error", error="internal error on this request")
                    reason = "error"
                else:
                    if reason is not None:
                        self.scheduler.remove(seq)  # never scheduled again, finished on emit
                    self.unsent.append(Accepted(seq, token, logprob, eos, reason))
            if reason is not None and later is not None:
                later.dropped.add(seq.seq_id)  # its token there was computed in vain
        self.tally.gauges()

    def _run_alone(self, done: Launched) -> tuple[list[int], list[float]]:
        """Each sequence of a failed step in its own forward: only the culprit fails."""
        tokens, logprobs = [], []
        step = done.step
        for seq, slot, chunk, last in zip(
            step.seqs, step.lora_slots, step.chunks, done.samples, strict=True
        ):
            if seq.finished or seq.seq_id in done.dropped:
                out_tokens, out_logprobs = ([FAILED], [0.0]) if last else ([], [])
            else:
                try:
                    out_tokens, out_logprobs = self.runner.launch([seq], [slot], [chunk]).result()
                except Exception:
                    log.exception("sequence %d failed on its own", seq.seq_id)
                    out_tokens, out_logprobs = ([FAILED], [0.0]) if last else ([], [])
                    if not last:
                        self._finish(seq, "error", error="internal error on this request")
            tokens += out_tokens
            logprobs += out_logprobs
        return tokens, logprobs

    def _emit(self) -> None:
        """Send the accepted tokens not sent yet, and finish what they finished."""
        accepted, self.unsent = self.unsent, []
        now = time.monotonic()
        for a in accepted:
            seq = a.seq
            if seq.finished:
                continue
            self.tally.token(seq, now)
            if a.reason is None:
                self.outbox.append(EngineOutput(seq.seq_id, a.token, a.logprob))
            else:
                self._finish(seq, a.reason, eos=a.eos, token=a.token, logprob=a.logprob)
        if accepted:
            self.tally.gauges()
        self._flush()  # before the wait for the device: these tokens are ready now

    def _flush(self) -> None:
        if not self.outbox:
            return
        outputs, self.outbox = self.outbox, []
        try:
            self.sink(outputs)
        except Exception:  # the HTTP side is gone or closing: nothing left to tell
            log.exception("sending %d outputs failed", len(outputs))

    def _why_failed(self, seq: Sequence) -> str:
        who = f"adapter {seq.adapter_key!r}" if seq.adapter is not None else "the base model"
        return f"{who} produced no valid next token for this request (non-finite logits)"

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        error: str | None = None,
        eos: bool = False,
        error_code: str = GENERATION_FAILED,
        token: int | None = None,
        logprob: float = 0.0,
    ) -> None:
        """End seq for reason; token is the one that ended it (EOS, or the last of length)."""
        if seq.finished:
            return
        was_queued = not seq.started
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.runner.sampler.forget(seq.seq_id)
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)
        self.tally.finished(seq, reason, was_queued)
        self.live.pop(seq.seq_id, None)
        self.outbox.append(
            EngineOutput(
                seq.seq_id,
                token,
                logprob,
                reason,
                eos,
                error,
                error_code if error else None,
            )
        )
        self.tally.gauges()

    def _fail_running(self, error: str) -> None:
        for seq in list(self.scheduler.running):
            self._finish(seq, "error", error=error)
