"""The engine: one thread steps the scheduler and the model runner, and feeds request streams.

HTTP handlers call submit() from the event loop and read Outputs from an asyncio queue; the
engine thread pushes to it with call_soon_threadsafe. Requests and aborts reach the thread
through an inbox, so the scheduler's state (KV blocks, LoRA slots, queues) is only ever
touched by that thread. Decisions live elsewhere: what runs (scheduler.py), when a sequence
is finished (postprocess.py), what is counted (tally.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from loraplane.runtime.adapters.manager import AdapterEntry, AdapterManager
from loraplane.runtime.block_manager import BlockManager
from loraplane.runtime.config import RuntimeConfig
from loraplane.runtime.lora_slot_manager import LoraSlotManager
from loraplane.runtime.metrics import Metrics
from loraplane.runtime.model_runner import ModelRunner
from loraplane.runtime.outputs import (
    ADAPTER_FAILED,
    GENERATION_FAILED,
    SHUT_DOWN,
    InvalidRequest,
    Outbox,
    Output,
    QueueFull,
    RequestStream,
    ShuttingDown,
)
from loraplane.runtime.postprocess import PostProcessor
from loraplane.runtime.sampler import FAILED
from loraplane.runtime.sampling import SamplingParams
from loraplane.runtime.scheduler import Scheduler, Step
from loraplane.runtime.sequence import Sequence, Status
from loraplane.runtime.tally import Tally

log = logging.getLogger(__name__)

__all__ = ["Engine", "Output", "QueueFull", "RequestStream", "ShuttingDown"]


@dataclass
class Accepted:
    """A token taken into its sequence, to be turned into text and streamed (PostProcessor)."""

    seq: Sequence
    token: int
    logprob: float
    eos: bool
    reason: str | None  # "stop" (EOS) or "length" when the token finishes the sequence


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
        eos = set(runner.model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.max_seq_len = runner.max_seq_len
        self.post = PostProcessor(tokenizer, eos, self.max_seq_len)
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
        self.streams: dict[int, RequestStream] = {}
        self.unsent: list[Accepted] = []  # tokens taken from the device, not streamed yet
        self.outbox = Outbox()  # Outputs of this iteration, flushed to the streams at once
        self.inbox: deque[tuple[str, Sequence]] = deque()
        self.wake = threading.Condition()
        self.shutting_down = False  # under tally.lock: admission reads it with the counters
        self.shutdown_deadline: float | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # -- called from the event loop -----------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(
        self, prompts: list[list[int]], params: SamplingParams, adapter: str | None
    ) -> list[RequestStream]:
        """Queue the prompts of one request all together, or none of them: raises
        InvalidRequest, AdapterNotFound, QueueFull or ShuttingDown."""
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
        streams = []
        for prompt_ids, entry in zip(prompts, entries, strict=True):
            seq = Sequence(list(prompt_ids), params, entry, arrival=time.monotonic())
            stream = RequestStream(seq, asyncio.get_running_loop(), self.abort)
            self.streams[seq.seq_id] = stream
            streams.append(stream)
            self._post("add", seq)
        self.tally.gauges()
        return streams

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

    def abort(self, seq: Sequence) -> None:
        self._post("abort", seq)

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
                idle = not (self.inbox or self.unsent or self.scheduler.has_work())
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
                self._fail_running("internal error in the engine step")
            self.outbox.flush()
        self._emit()
        for seq in self._all_seqs():
            self._finish(seq, "abort")
        self.outbox.flush()

    def _all_seqs(self) -> list[Sequence]:
        waiting = [s for q in self.scheduler.waiting.values() for s in q]
        return list(self.scheduler.running) + waiting

    def _iterate(self, inbox: list[tuple[str, Sequence]]) -> None:
        for verb, seq in inbox:
            if verb == "add":
                self.scheduler.add(seq)
            elif not seq.finished:
                self._finish(seq, "abort")
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
        self.tally.step(step)
        sampled = [s for s, last in zip(step.seqs, step.samples, strict=True) if last]
        pending = None
        try:
            pending = self.runner.launch(step.seqs, step.lora_slots, step.chunks)
        except Exception:
            log.exception("a step of %d sequences failed; running them one by one", len(step.seqs))
        # The previous step's tokens become text and reach their streams while the device
        # runs this one; a stop string found now ends a sequence whose token this step drops.
        self._emit()
        try:
            tokens, logprobs = pending.result() if pending else self._run_alone(step)
        except Exception:
            log.exception("a step of %d sequences failed; running them one by one", len(step.seqs))
            tokens, logprobs = self._run_alone(step)
        for seq in step.seqs:
            self.blocks.commit(seq)  # its newly computed full blocks, for later prompts
        self.tally.cache(self.blocks, self.scheduler.preemptions)
        for seq, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            if seq.finished:
                continue  # ended while the step ran: a stop string, an abort
            if token == FAILED:
                self._finish(seq, "error", error=self._why_failed(seq))
                continue
            try:
                eos, reason = self.post.accept(seq, token)
            except Exception:
                log.exception("sequence %d failed after its step", seq.seq_id)
                self._finish(seq, "error", error="internal error on this request")
                continue
            if reason is not None:
                self.scheduler.remove(seq)  # done: never scheduled again, finished on emit
            self.unsent.append(Accepted(seq, token, logprob, eos, reason))
        self.tally.gauges()

    def _run_alone(self, step: Step) -> tuple[list[int], list[float]]:
        """Each sequence of a failed step in its own forward: only the culprit fails."""
        tokens, logprobs = [], []
        for seq, slot, chunk, last in zip(
            step.seqs, step.lora_slots, step.chunks, step.samples, strict=True
        ):
            if seq.finished:
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
        """Stream the accepted tokens not streamed yet, and finish what they finished."""
        accepted, self.unsent = self.unsent, []
        now = time.monotonic()
        for a in accepted:
            seq = a.seq
            if seq.finished:
                continue
            try:
                self.tally.token(seq, now)
                step = self.post.emit(seq, a.eos, a.reason)
                stream = self.streams.get(seq.seq_id)
                if stream is not None and (step.text or not step.eos):
                    token_id = None if step.eos else a.token
                    self.outbox.put(
                        stream,
                        Output(
                            step.text,
                            token_id,
                            a.logprob,
                            completion_tokens=len(seq.output_ids),
                        ),
                    )
                if step.finish_reason is not None:
                    self._finish(seq, step.finish_reason, eos=step.eos)
            except Exception:
                log.exception("sequence %d failed after its step", seq.seq_id)
                self._finish(seq, "error", error="internal error on this request")
        if accepted:
            self.tally.gauges()
        self.outbox.flush()  # before the wait for the device: these tokens are ready now

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
        self.tally.finished(seq, reason, was_queued)
        stream = self.streams.pop(seq.seq_id, None)
        if stream is not None:
            self.outbox.put(
                stream,
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
                ),
            )
        self.tally.gauges()

    def _fail_running(self, error: str) -> None:
        for seq in list(self.scheduler.running):
            self._finish(seq, "error", error=error)
