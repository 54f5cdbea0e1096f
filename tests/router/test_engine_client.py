"""The daemon's engine client against a scripted HTTP server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from router import engine_client
from router.engine_client import (
    EngineClient,
    EngineConnectError,
    EngineConnectionLost,
    EngineResponse,
    request_head,
)
from router.ticker import Ticker

pytestmark = pytest.mark.anyio
LIMIT = 2**30  # the most an answer read whole may be

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Seen"], Awaitable[bool]]
StartServer = Callable[[Script], Awaitable[tuple[int, "Seen"]]]


@dataclass
class Seen:
    """What the server saw: requests (head, body) and how many connections."""

    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # a client closed a connection

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        self.requests.append((head, await reader.readexactly(length)))
        return True


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body,
    )  # fmt: skip


@pytest.fixture
async def server() -> AsyncIterator[StartServer]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> tuple[int, Seen]:
        seen = Seen()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.connections += 1
            try:
                while await seen.read_request(reader):
                    if not await script(reader, writer, seen):
                        break
                    await writer.drain()
                else:
                    seen.closed.set()  # the client closed its end
            except ConnectionError:
                seen.closed.set()
            finally:
                writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return srv.sockets[0].getsockname()[1], seen

    yield start
    for srv in servers:
        srv.close()


@pytest.fixture
async def client() -> AsyncIterator[EngineClient]:
    c = EngineClient(Ticker())
    yield c
    c.close()


def request(port: int, body: bytes = b'{"x": 1}', request_id: str = "rid-1") -> bytes:
    head = request_head("POST", "127.0.0.1", port, "/v1/completions", {"Authorization": "Bearer k"})
    return head + b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s" % (request_id.encode(), len(body), body)


async def post(
    client: EngineClient, port: int, request_id: str = "rid-1", keep_alive: float = 75
) -> EngineResponse:
    deadline = asyncio.get_running_loop().time() + 5
    return await client.post(
        "127.0.0.1", port, request(port, request_id=request_id),
        connect_timeout=1.0, keep_alive=keep_alive, deadline=deadline,
    )  # fmt: skip


async def answers(client: EngineClient, port: int, n: int, keep_alive: float = 75) -> list[bytes]:
    """`n` requests one after another; their bodies."""
    bodies = []
    for _ in range(n):
        resp = await post(client, port, keep_alive=keep_alive)
        bodies.append(await resp.read(LIMIT))
        resp.close()
    return bodies


async def test_answers_are_read_and_the_connection_is_kept(server: StartServer, client: EngineClient) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(ok(b'{"n": %d}' % len(seen.requests), b"X-Thing: a\r\n"))
        return True

    port, seen = await server(script)
    for n in (1, 2, 3):
        resp = await post(client, port, request_id=f"r{n}")
        assert resp.status == 200 and resp.content_type == "application/json"
        assert (b"x-thing", b"a") in resp.headers
        assert await resp.read(LIMIT) == b'{"n": %d}' % n
        resp.close()
    assert seen.connections == 1
    head, body = seen.requests[2]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
    assert b"Authorization: Bearer k\r\n" in head and b"X-Request-ID: r3\r\n" in head
    assert body == b'{"x": 1}'


async def test_an_answer_saying_close_is_not_reused(server: StartServer, client: EngineClient) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(ok(b"{}", b"Connection: close\r\n"))
        await w.drain()
        return False

    port, seen = await server(script)
    assert await answers(client, port, 2) == [b"{}", b"{}"]
    assert seen.connections == 2


async def test_bytes_after_an_answer_retire_its_connection(server: StartServer, client: EngineClient) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(ok(b"{}") + b"HTTP/1.1 200 OK\r\n")  # then something nobody asked for
        return True

    port, seen = await server(script)
    assert await answers(client, port, 2) == [b"{}", b"{}"]
    assert seen.connections == 2


async def test_a_large_answer_is_read_whole(server: StartServer, client: EngineClient) -> None:
    big = bytes(range(256)) * (4 * engine_client.HIGH_WATER // 256)  # reading pauses and resumes

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(ok(big))
        return True

    port, _ = await server(script)
    resp = await post(client, port)
    assert await resp.read(LIMIT) == big
    resp.close()


async def test_a_chunked_stream_arrives_as_it_is_sent(server: StartServer, client: EngineClient) -> None:
    go_on = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        w.write(b"7\r\ndata: 1\r\n")
        await w.drain()
        await go_on.wait()  # the second chunk is sent only after the client has the first
        w.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        return True

    port, _ = await server(script)
    resp = await post(client, port)
    assert resp.content_type == "text/event-stream"
    got = []
    async for chunk in resp.chunks():
        got.append(chunk)
        go_on.set()
    assert got == [b"data: 1", b"data: 2"]
    resp.close()


async def test_a_slow_reader_gets_every_byte_of_a_big_stream(
    server: StartServer, client: EngineClient
) -> None:
    piece = b"x" * 65536

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()  # blocks while the client has paused reading
        w.write(b"0\r\n\r\n")
        return True

    port, _ = await server(script)
    resp = await post(client, port)
    total = 0
    async for chunk in resp.chunks():
        total += len(chunk)
        await asyncio.sleep(0.001)  # a slow client, not synchronisation
    assert total == 40 * len(piece)
    resp.close()


async def test_an_engine_closing_mid_answer_is_an_error(server: StartServer, client: EngineClient) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await w.drain()
        return False

    port, _ = await server(script)
    resp = await post(client, port)
    with pytest.raises(EngineConnectionLost, match="before its answer ended"):
        await resp.read(LIMIT)
    resp.close()


async def test_an_answer_that_is_not_http_is_an_error(server: StartServer, client: EngineClient) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        return True

    port, _ = await server(script)
    with pytest.raises(EngineConnectionLost, match="invalid HTTP"):
        await post(client, port)


async def test_an_answer_delimited_by_close_is_complete(server: StartServer, client: EngineClient) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{"a": 1}')
        return False

    port, _ = await server(script)
    resp = await post(client, port)
    assert await resp.read(LIMIT) == b'{"a": 1}'
    resp.close()


async def test_a_kept_connection_closed_after_the_request_is_not_retried(
    server: StartServer, client: EngineClient
) -> None:
    """The engine read the request and closed (as an engine that crashes on it does): sending
    it again would crash a fresh engine too (issue 11, finding 8)."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        if len(seen.requests) == 2:  # the kept connection's second request: closed unanswered
            return False
        w.write(ok(b"{}"))
        return True

    port, seen = await server(script)
    assert await answers(client, port, 1) == [b"{}"]
    with pytest.raises(EngineConnectionLost):
        await post(client, port)
    assert seen.connections == 1 and len(seen.requests) == 2


async def test_a_fresh_connection_closed_unanswered_is_not_retried(
    server: StartServer, client: EngineClient
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        return False

    port, seen = await server(script)
    with pytest.raises(EngineConnectionLost):
        await post(client, port)
    assert len(seen.requests) == 1


async def test_idle_connections_expire_before_the_engine_closes_them(
    server: StartServer, client: EngineClient
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(ok(b"{}"))
        return True

    port, seen = await server(script)
    # An engine that keeps an idle connection for less than the margin: it is never reused.
    assert await answers(client, port, 2, keep_alive=0.5) == [b"{}", b"{}"]
    assert seen.connections == 2
    await asyncio.wait_for(seen.closed.wait(), 5)  # the expired one was closed, not leaked


async def test_closing_an_unfinished_answer_drops_the_connection(
    server: StartServer, client: EngineClient
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        w.write(b"7\r\ndata: 1\r\n")
        await w.drain()
        try:
            await r.read(LIMIT)  # until the client goes away
        finally:
            seen.closed.set()
        return False

    port, seen = await server(script)
    resp = await post(client, port)
    async for _ in resp.chunks():
        break
    resp.close()
    await asyncio.wait_for(seen.closed.wait(), 5)
    resp = await post(client, port)  # not the dropped connection
    assert seen.connections == 2
    resp.close()


async def test_no_engine_listening_is_a_connect_error(client: EngineClient) -> None:
    from lifecycle.ports import free_port

    port = free_port()
    with pytest.raises(EngineConnectError, match="cannot connect"):
        await post(client, port)


async def test_an_engine_that_never_answers_misses_its_deadline(
    server: StartServer, client: EngineClient
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        await r.read(LIMIT)  # never answers
        return False

    port, _ = await server(script)
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        await client.post(
            "127.0.0.1", port, request(port), connect_timeout=1.0, keep_alive=75, deadline=loop.time() + 0.2
        )


async def test_a_stream_lives_while_data_comes_and_dies_when_it_stalls_or_runs_too_long(
    server: StartServer, client: EngineClient
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: Seen) -> bool:
        stalls = len(seen.requests) == 3
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(1 if stalls else 6):
            w.write(b"7\r\ndata: x\r\n")
            await w.drain()
            await asyncio.sleep(0.1)  # the engine's pace, not synchronisation
        if not stalls:
            w.write(b"0\r\n\r\n")
            return True
        await r.read(LIMIT)  # the third stream stalls after one chunk
        return False

    port, _ = await server(script)
    loop = asyncio.get_running_loop()
    # The stream takes 0.6 s, longer than its 0.3 s idle limit: only arrivals keep it alive.
    resp = await client.post(
        "127.0.0.1", port, request(port), connect_timeout=1.0, keep_alive=75, deadline=loop.time() + 5
    )
    resp.until_idle(0.3, hard=loop.time() + 5)
    received = b""
    async for chunk in resp.chunks():
        received += chunk
    resp.close()
    assert received == b"data: x" * 6
    # A total limit shorter than the stream ends it, data flowing or not.
    resp = await client.post(
        "127.0.0.1", port, request(port), connect_timeout=1.0, keep_alive=75, deadline=loop.time() + 5
    )
    resp.until_idle(1.0, hard=loop.time() + 0.3)
    with pytest.raises(TimeoutError):
        async for _ in resp.chunks():
            pass
    resp.close()
    # A stream that stalls dies one idle limit after its last data.
    resp = await client.post(
        "127.0.0.1", port, request(port), connect_timeout=1.0, keep_alive=75, deadline=loop.time() + 5
    )
    resp.until_idle(0.3)
    with pytest.raises(TimeoutError):
        async for _ in resp.chunks():
            pass
    resp.close()
