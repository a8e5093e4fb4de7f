"""After each step: whether a sequence's new token finishes it, decided on token ids alone.

The scheduler's counterpart on the way out (nano-vllm's postprocess): EOS (unless
ignore_eos), max_tokens or the sequence limit ("length"), known as soon as the token is, since
the scheduler needs them before the next step. The text and the stop strings are not decided
here: the HTTP side makes the text (outputs.RequestStream) and tells the engine when a stop
string ends a sequence. Plain decisions on a Sequence; the engine sends them.
"""

from __future__ import annotations

from loraplane.runtime.sequence import Sequence


class PostProcessor:
    def __init__(self, eos_ids: set[int], max_seq_len: int) -> None:
        self.eos_ids = eos_ids
        self.max_seq_len = max_seq_len

    def accept(self, seq: Sequence, token: int) -> tuple[bool, str | None]:
        """Take token into seq: is it EOS, and is seq finished ("stop", "length" or None)?"""
        if token in self.eos_ids and not seq.params.ignore_eos:
            return True, "stop"
        seq.output_ids.append(token)
        if seq.room(self.max_seq_len) <= 0:  # the rule async scheduling looks ahead with
            return False, "length"
        return False, None
