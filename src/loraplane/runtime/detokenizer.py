"""Incremental detokenization and stop strings, per sequence.

Decoding the whole output each step is quadratic but simple and exact; a text that ends in
U+FFFD is held back because the next token may complete the character.
"""

from __future__ import annotations

from typing import Any

from loraplane.runtime.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def update(self, seq: Sequence, final: bool) -> str:
        """Advance seq.text by the newest token; returns the text delta to stream."""
        full = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        if full.endswith("\ufffd") and not final:
            return ""
        delta_start = len(seq.text)
        for stop in seq.params.stop:
            # Only look where a new match could start: the delta plus a stop's length back.
            at = full.find(stop, max(0, delta_start - len(stop) + 1))
            if at != -1:
                seq.stop_hit = stop
                full = full[:at]
                break
        delta = full[delta_start:] if len(full) >= delta_start else ""
        seq.text = full if len(full) >= delta_start else seq.text
        return delta
