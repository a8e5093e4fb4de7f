"""Incremental detokenization and stop strings, per sequence.

Decoding the whole output each step is quadratic but simple and exact. Two things are held
back from the stream until the next token decides them: a trailing U+FFFD (the next token may
complete the character) and a tail that could be the start of a stop string (text a client
has received cannot be taken back when the stop string completes).
"""

from __future__ import annotations

from typing import Any

from loraplane.runtime.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def update(self, seq: Sequence, final: bool) -> str:
        """Advance seq.text (the text streamed so far) by the newest token; return the delta."""
        full = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        stops = seq.params.stop
        longest = max((len(s) for s in stops), default=0)
        start = max(0, len(seq.text) - longest)
        hit: tuple[int, str] | None = None
        for stop in stops:
            at = full.find(stop, start)
            if at != -1 and (hit is None or at < hit[0]):
                hit = (at, stop)
        if hit is not None:
            seq.stop_hit = hit[1]
            end = hit[0]
        elif final:
            end = len(full)
        elif full.endswith("\ufffd"):
            return ""
        else:
            end = len(full) - _stop_prefix_len(full, stops)
        delta = full[len(seq.text) : end] if end > len(seq.text) else ""
        seq.text += delta
        return delta


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that begins some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-k:]):
                best = k
                break
    return best
