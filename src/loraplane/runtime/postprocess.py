"""After each step: a sequence's new token becomes text, and whether it is finished is decided.

The scheduler's counterpart on the way out (nano-vllm's postprocess): EOS (unless ignore_eos),
max_tokens or the sequence limit ("length"), and stop strings (found by the detokenizer, which
holds back a tail that may begin one). Plain decisions on a Sequence; the engine streams them.
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

    def advance(self, seq: Sequence, token: int) -> Advance:
        eos = token in self.eos_ids and not seq.params.ignore_eos
        if not eos:
            seq.output_ids.append(token)
        reason = None
        if eos:
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or len(seq) >= self.max_seq_len:
            reason = "length"
        # On the last token, flush text held back for an incomplete character.
        text = self.detok.update(seq, final=reason is not None)
        if seq.stop_hit is not None:
            reason = "stop"
        return Advance(text, eos, reason)
