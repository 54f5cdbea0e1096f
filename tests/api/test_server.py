"""The daemon's HTTP protocol: a response's writes in one loop step leave as one write."""

from __future__ import annotations

import asyncio

import pytest

from api.server import CoalescingTransport

pytestmark = pytest.mark.anyio


class Recorder(asyncio.Transport):
    """The transport under the wrapper: records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")


async def _next_step() -> None:
    await asyncio.sleep(0)


async def test_writes_in_one_step_become_one_write() -> None:
    inner = Recorder()
    t = CoalescingTransport(inner, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"")
    t.write(b"body")
    assert inner.writes == [] and t.get_write_buffer_size() == 23
    await _next_step()
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"chunk")  # a later step: its own write, without waiting for anything else
    await _next_step()
    assert inner.writes[1:] == [b"chunk"]


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    inner = Recorder()
    t = CoalescingTransport(inner, asyncio.get_running_loop())
    t.write(b"last words")
    t.close()
    assert inner.events == ["write", "close"] and inner.writes == [b"last words"]
    await _next_step()  # the scheduled flush finds nothing left
    assert inner.writes == [b"last words"]

    inner = Recorder()
    t = CoalescingTransport(inner, asyncio.get_running_loop())
    t.write(b"never sent")
    t.abort()
    await _next_step()
    assert inner.events == ["abort"]
