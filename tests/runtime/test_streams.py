"""RequestStream and Streams: the engine's token ids become text on the HTTP side."""

from __future__ import annotations

import asyncio

from test_detokenizer import Chars

from loraplane.runtime.detokenizer import Detokenizer
from loraplane.runtime.outputs import ENGINE_GONE, EngineOutput, Streams
from loraplane.runtime.sampling import SamplingParams


def run(pieces, outputs, stop=(), submit=None):
    """Open one stream, deliver outputs (built from its seq_id) and read it to the end."""
    released: list[tuple[int, str]] = []

    async def main():
        streams = Streams(Detokenizer(Chars(pieces)))
        params = SamplingParams(max_tokens=50, stop=stop)
        (stream,) = streams.submit(
            [[0, 1]],
            params,
            submit or (lambda ids: None),
            lambda i, r: released.append((i, r)),
            asyncio.get_running_loop(),
        )
        streams.deliver([EngineOutput(stream.seq_id, *o) for o in outputs])
        got = [out async for out in stream]
        return got, streams, stream

    got, streams, stream = asyncio.run(main())
    return got, released, streams, stream


def test_tokens_become_text_and_the_last_one_ends_the_stream():
    got, released, streams, _ = run(["he", "llo", "!"], [(0,), (1,), (2, 0.0, "length")])
    assert [o.text for o in got] == ["he", "llo", "!", ""]
    assert [o.token_id for o in got] == [0, 1, 2, None]
    assert got[-1].finished and got[-1].finish_reason == "length"
    assert got[-1].prompt_tokens == 2 and got[-1].completion_tokens == 3
    assert released == [] and streams.open == {}  # the engine ended it: nothing to tell


def test_a_stop_string_ends_the_stream_at_once_and_tells_the_engine_once():
    # The engine goes on for two more tokens before the release reaches it: both dropped.
    outputs = [(0,), (1,), (2,), (3,), (3, 0.0, "abort")]
    got, released, streams, stream = run(["he", "llo wo", "rld", "x"], outputs, stop=("world",))
    assert "".join(o.text for o in got) == "hello "
    assert got[-1].finish_reason == "stop" and got[-1].stop_hit == "world"
    assert got[-1].completion_tokens == 3  # the token that completed the stop string counts
    assert released == [(stream.seq_id, "stop")]
    stream.abort()  # the handler's finally: no second message
    assert len(released) == 1 and streams.open == {}


def test_eos_flushes_held_back_text_and_is_not_part_of_the_output():
    got, _, _, _ = run(["a", "\ufffd", "<eos>"], [(0,), (1,), (2, 0.0, "stop", True)])
    assert "".join(o.text for o in got) == "a\ufffd"
    assert all(o.token_id != 2 for o in got)
    assert got[-1].eos and got[-1].finish_reason == "stop" and got[-1].completion_tokens == 2


def test_an_error_ends_the_text_where_it_was():
    outputs = [(0,), (None, 0.0, "error", False, "boom", "generation_failed")]
    got, released, _, _ = run(["a", "\ufffd"], outputs)
    assert [o.text for o in got] == ["a", ""]
    assert got[-1].error == "boom" and got[-1].error_code == "generation_failed"
    assert released == []


def test_a_refused_request_leaves_no_stream_open():
    def refuse(ids):
        raise ValueError("no")

    async def main():
        streams = Streams(Detokenizer(Chars(["a"])))
        try:
            streams.submit(
                [[0], [1]],
                SamplingParams(max_tokens=5),
                refuse,
                lambda i, r: None,
                asyncio.get_running_loop(),
            )
        except ValueError:
            return streams
        raise AssertionError("submit should have raised")

    assert asyncio.run(main()).open == {}


def test_fail_all_ends_every_open_stream_with_the_reason():
    async def main():
        streams = Streams(Detokenizer(Chars(["a"])))
        made = streams.submit(
            [[0], [0]],
            SamplingParams(max_tokens=5),
            lambda ids: None,
            lambda i, r: None,
            asyncio.get_running_loop(),
        )
        streams.fail_all("the engine process exited", ENGINE_GONE)
        return [[o async for o in s] for s in made], streams

    per_stream, streams = asyncio.run(main())
    for outs in per_stream:
        assert outs[-1].error == "the engine process exited"
        assert outs[-1].error_code == ENGINE_GONE
    assert streams.open == {}
