"""The front reads the engine's pipe in whatever pieces the OS hands it and cuts them into
the messages Connection.send framed, however the pieces split them."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

from strata.engine.messages import Events, Result
from strata.engine.process import _take_frames
from strata.engine.request import RequestOutput


def test_messages_come_whole_however_the_reads_split_them():
    reader, writer = mp.Pipe(duplex=False)
    sent = [Events([RequestOutput(f"r{i}", [i, i + 1], "x" * i)]) for i in range(50)]
    sent.append(Result(7, True, "y" * 200_000))  # past one pipe buffer
    sent.append(Events([]))
    sender = threading.Thread(target=lambda: [writer.send(m) for m in sent])
    sender.start()
    raw = bytearray()
    while sender.is_alive() or reader.poll(0):
        if reader.poll(0.05):
            raw += os.read(reader.fileno(), 1 << 16)
    writer.close()
    for piece in (1, 3, 7, 4096, len(raw)):
        buffer, got = bytearray(), []
        for at in range(0, len(raw), piece):
            buffer += raw[at : at + piece]
            got += _take_frames(buffer)
        assert got == sent, piece
        assert not buffer  # nothing left over once every message is in
    buffer = bytearray(raw[:-1])  # a message short of its last byte stays in the buffer
    assert _take_frames(buffer) == sent[:-1]
    assert len(buffer) > 0
