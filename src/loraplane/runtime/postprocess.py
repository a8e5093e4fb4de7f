"""After each step: a sequence's new token becomes text, and whether it is finished is decided.

The scheduler's counterpart on the way out (nano-vllm's postprocess), in two halves so the
engine can run the second while the GPU computes the next step:
- `accept`, as soon as the token is known: EOS (unless ignore_eos), max_tokens or the sequence
  limit ("length"). Token-id decisions only: the scheduler needs them before the next step.
- `emit`, one step later: the token becomes text and stop strings are found (the detokenizer
  holds back a tail that may begin one). A stop string ends the sequence a step late; the
  token it computed meanwhile is dropped, never counted nor streamed.
Plain decisions on a Sequence; the engine streams them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplane.runtime.detokenizer import Detokenizer
from loraplane.runtime.sequence import Sequence


@dataclass
class Advance:
    text: str  # new text to stream (may be empty: held back, or an EOS)
    eos: bool  # the token was end-of-sequence: it is not part of the output
    finish_reason: str | None  # "stop", "length", or None to go on


class PostProcessor:
    def __init__(self, tokenizer: Any, eos_ids: set[int], max_seq_len: int) -> None:
        self.detok = Detokenizer(tokenizer)
        self.eos_ids = eos_ids
        self.max_seq_len = max_seq_len

    def accept(self, seq: Sequence, token: int) -> tuple[bool, str | None]:
        """Take token into seq: is it EOS, and is seq finished ("stop", "length" or None)?"""
        if token in self.eos_ids and not seq.params.ignore_eos:
            return True, "stop"
        seq.output_ids.append(token)
        if len(seq.output_ids) >= seq.params.max_tokens or len(seq) >= self.max_seq_len:
            return False, "length"
        return False, None

    def emit(self, seq: Sequence, eos: bool, reason: str | None) -> Advance:
        """The text of the tokens accepted since the last emit; a stop string ends seq."""
        # On the last token, flush text held back for an incomplete character.
        text = self.detok.update(seq, final=reason is not None)
        if seq.stop_hit is not None:
            reason = "stop"
        return Advance(text, eos, reason)
