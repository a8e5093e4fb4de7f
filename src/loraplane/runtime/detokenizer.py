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
from dataclasses import dataclass, field
from typing import Any

MAX_PENDING = 8  # no character needs more tokens than this (UTF-8 has at most 4 bytes)


@dataclass(eq=False)
class TextState:
    """One request's output as text: kept where the text is made (the HTTP side), not in the
    engine, which only ever sees token ids."""

    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # streamed so far (a stop string cut off)
    decoded: str = ""  # decoded so far, some of it maybe not streamed yet
    prefix_offset: int = 0  # output_ids[prefix_offset:read_offset] is decoded already and
    read_offset: int = 0  # is re-decoded as context for the next token
    stop_hit: str | None = None


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decode = _fast_decode(tokenizer) or self._hf_decode

    def _hf_decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def update(self, state: TextState, final: bool) -> str:
        """Advance state.text (the text streamed so far) by the newest token; return the delta."""
        self._decode_window(state, final)
        full = state.decoded
        stops = state.stop
        longest = max((len(s) for s in stops), default=0)
        start = max(0, len(state.text) - longest)
        hit: tuple[int, str] | None = None
        for stop in stops:
            at = full.find(stop, start)
            if at != -1 and (hit is None or at < hit[0]):
                hit = (at, stop)
        if hit is not None:
            state.stop_hit = hit[1]
            end = hit[0]
        elif final:
            end = len(full)
        else:
            end = len(full) - _stop_prefix_len(full, stops)
        delta = full[len(state.text) : end] if end > len(state.text) else ""
        state.text += delta
        return delta

    def _decode_window(self, state: TextState, final: bool) -> None:
        ids = state.output_ids
        before = self.decode(ids[state.prefix_offset : state.read_offset])
        after = self.decode(ids[state.prefix_offset :])
        # Tokens that decode to nothing (skipped special tokens) or to an endless run of
        # partial characters would grow the window forever: every step would decode all of
        # it, quadratic in the output. Past MAX_PENDING tokens the window moves on regardless.
        stuck = len(ids) - state.read_offset > MAX_PENDING
        if stuck or (len(after) > len(before) and (final or not after.endswith("\ufffd"))):
            state.decoded += after[len(before) :]
            state.prefix_offset, state.read_offset = state.read_offset, len(ids)


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
