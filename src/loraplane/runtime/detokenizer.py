"""Incremental detokenization and stop strings, per sequence.

Each step decodes a short window of the newest tokens, not the whole output (which would
make long generations quadratic): the window starts one decode back so tokenizers that
change a token's text by what precedes it (SentencePiece's leading spaces) stay exact. Two
things are held back from the stream until the next token decides them: a trailing U+FFFD
(the next token may complete the character) and a tail that could be the start of a stop
string (text a client has received cannot be taken back when the stop string completes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraplane.runtime.sequence import Sequence

MAX_PENDING = 8  # no character needs more tokens than this (UTF-8 has at most 4 bytes)


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decode = _fast_decode(tokenizer) or self._hf_decode

    def _hf_decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def update(self, seq: Sequence, final: bool) -> str:
        """Advance seq.text (the text streamed so far) by the newest token; return the delta."""
        self._decode_window(seq, final)
        full = seq.decoded
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
        else:
            end = len(full) - _stop_prefix_len(full, stops)
        delta = full[len(seq.text) : end] if end > len(seq.text) else ""
        seq.text += delta
        return delta

    def _decode_window(self, seq: Sequence, final: bool) -> None:
        ids = seq.output_ids
        before = self.decode(ids[seq.prefix_offset : seq.read_offset])
        after = self.decode(ids[seq.prefix_offset :])
        # Tokens that decode to nothing (skipped special tokens) or to an endless run of
        # partial characters would grow the window forever: every step would decode all of
        # it, quadratic in the output. Past MAX_PENDING tokens the window moves on regardless.
        stuck = len(ids) - seq.read_offset > MAX_PENDING
        if stuck or (len(after) > len(before) and (final or not after.endswith("\ufffd"))):
            seq.decoded += after[len(before) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def _fast_decode(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """The Rust tokenizer's own decode, when transformers' would add nothing to it.

    transformers' decode converts its input, then calls this same function and, only when
    clean_up_tokenization_spaces is set, rewrites spaces. Twice per token per sequence its
    Python layers cost more than the decode itself."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode"):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None

    def decode(ids: list[int]) -> str:
        return str(backend.decode(ids, skip_special_tokens=True))

    return decode


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that begins some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-k:]):
                best = k
                break
    return best
