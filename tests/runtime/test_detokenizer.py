"""Incremental detokenization: stop strings across token boundaries, held-back partial chars."""

from __future__ import annotations

from loraplane.runtime.detokenizer import Detokenizer, TextState


class Chars:
    """A tokenizer whose tokens are strings, to place boundaries exactly where a test wants."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def feed(pieces: list[str], stop: tuple[str, ...] = ()) -> tuple[list[str], TextState]:
    detok = Detokenizer(Chars(pieces))
    s = TextState(stop)
    deltas = []
    for i in range(len(pieces)):
        s.output_ids.append(i)
        deltas.append(detok.update(s, final=i == len(pieces) - 1))
        if s.stop_hit:
            break
    return deltas, s


def test_stop_string_split_across_tokens_is_cut():
    deltas, s = feed(["hello ", "wo", "rld", " again"], stop=("world",))
    assert s.stop_hit == "world" and s.text == "hello "
    assert "".join(deltas) == "hello "


def test_partial_characters_are_held_back_until_complete_or_final():
    deltas, s = feed(["a", "\ufffd", "b"])
    assert deltas == ["a", "", "\ufffdb"]
    deltas, s = feed(["a", "\ufffd"])
    assert deltas == ["a", "\ufffd"] and s.text == "a\ufffd"


def test_a_tail_that_may_start_a_stop_string_is_held_then_released():
    deltas, s = feed(["hello ", "wo", "rk", " done"], stop=("world",))
    assert deltas == ["hello ", "", "work", " done"] and s.stop_hit is None


class LeadingSpace(Chars):
    """SentencePiece-like: '▁' is a space, and a decoded text never starts with one."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__(pieces)
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return super().decode(ids).replace("▁", " ").lstrip(" ")


def test_windowed_decoding_is_exact_and_stays_short():
    pieces = ["▁hello", "▁wor", "ld", "▁again", *["▁x"] * 200]
    tokenizer = LeadingSpace(pieces)
    detok = Detokenizer(tokenizer)
    s = TextState()
    streamed = ""
    for i in range(len(pieces)):
        s.output_ids.append(i)
        streamed += detok.update(s, final=i == len(pieces) - 1)
    assert streamed == "hello world again" + " x" * 200
    assert max(tokenizer.lengths) <= 3  # never the whole output


class Counting(Chars):
    def __init__(self, pieces: list[str]) -> None:
        super().__init__(pieces)
        self.work = 0  # token ids decoded in all

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.work += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_decoding_stays_linear_when_tokens_decode_to_nothing():
    # Skipped special tokens, or a run of partial characters, must not grow the window: each
    # step would then re-decode the whole output (quadratic: 2000 tokens, ~4 million ids).
    n = 2000
    for filler in ("", "\ufffd"):
        tok = Counting([filler] * n + ["end"])
        detok = Detokenizer(tok)
        s = TextState(("zz",))
        for i in range(n + 1):
            s.output_ids.append(i)
            detok.update(s, final=i == n)
        assert s.text.endswith("end")
        assert tok.work < 40 * n, (filler, tok.work)


def test_the_rust_decode_shortcut_equals_transformers_decode(demo_dir):
    import random

    from transformers import AutoTokenizer

    from loraplane.runtime.detokenizer import _fast_decode

    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir[0]))
    fast = _fast_decode(tokenizer)
    assert fast is not None, "the test tokenizer should take the shortcut"
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 12))]
        ids += rng.sample(special, k=min(len(special), rng.randrange(0, 2)))
        rng.shuffle(ids)
        assert fast(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids
    # A tokenizer that rewrites spaces keeps transformers' own decode.
    tokenizer.clean_up_tokenization_spaces = True
    assert _fast_decode(tokenizer) is None
