"""A forced tool call streamed as it is generated: whatever the chunking, the deltas put
together give the call's name and exactly its arguments' text."""

from __future__ import annotations

import json

import pytest

from gateway.chat_stream import CallStream

CALL = '{ "name": "get_weather", "arguments": {"city": "Paris}", "days": {"n": 2}} }\n'


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(CALL)])
def test_deltas_put_together_give_the_call(size):
    stream, deltas = CallStream(), []
    pieces = [CALL[i : i + size] for i in range(0, len(CALL), size)]
    for k, piece in enumerate(pieces):
        deltas += stream.feed(piece, k == len(pieces) - 1)
    head, *rest = deltas
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert head["id"].startswith("call_") and head["type"] == "function"
    arguments = "".join(d["function"]["arguments"] for d in rest)
    assert arguments == '{"city": "Paris}", "days": {"n": 2}}'
    assert json.loads(arguments) == {"city": "Paris}", "days": {"n": 2}}
    if size == 1:
        assert len(rest) > 10  # sent as it came, not at the end


def test_nothing_is_sent_before_the_name_is_complete():
    stream = CallStream()
    assert stream.feed('{"name": "get_wea', False) == []
    assert stream.sent is None
    assert stream.feed('ther", "arguments": {', False)[0]["function"]["name"] == "get_weather"
