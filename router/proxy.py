"""The data plane: send one request to an engine and relay its answer (router/relay.py).

- The request is the daemon's own: a fixed head per engine launch (Host,
  Content-Type, the launch key, `Accept-Encoding: identity`) plus the request
  ID and the body. Nothing the client sent in its headers reaches an engine.
- Engine connection errors and timeouts are translated into RouterErrors
  here, once. Before anything was sent they are raised (the client gets an
  error answer); once a stream has begun they end it with an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import urllib.parse

from config.models import Timeouts
from router.address import UNIX, UNIX_SCHEME
from router.engine_client import EngineClient, EngineConnectError, request_head
from router.errors import BackendConnectFailed, BackendTimeout, BackendUnavailable, RouterError, ShuttingDown
from router.relay import Relay
from router.ticker import Ticker


class Upstream:
    """Every request the daemon forwards goes through one pooled EngineClient."""

    def __init__(self, ticker: Ticker) -> None:
        self._client = EngineClient(ticker)

    async def close(self) -> None:
        self._client.close()

    async def forward(
        self,
        relay: Relay,
        *,
        base_url: str,
        path: str,
        api_key: str,
        keep_alive: float,
        request_id: str,
        body: bytes,
        timeouts: Timeouts,
    ) -> None:
        """POST `body` to the engine at `base_url` and relay its answer through `relay`.

        Raises RouterError if nothing was sent yet. Once a stream has begun, a
        failure (engine gone, BACKEND_TIMEOUT, the daemon shutting down) ends it
        with one SSE error event instead; `relay` says how it went.

        One deadline per request: a document must be complete, a stream must
        begin, within `first_byte`; then each chunk must come within `idle` of
        the last (time spent relaying to a slow client does not count), and all
        of it within `total` (if set).
        """
        host, port, head = _request_head(base_url, path, api_key)
        request = b"%sX-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            head, request_id.encode("latin-1"), len(body), body,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        now = loop.time()
        hard = now + timeouts.total if timeouts.total else math.inf
        try:
            resp = await self._client.post(
                host, port, request,
                connect_timeout=timeouts.connect, keep_alive=keep_alive,
                deadline=min(now + timeouts.first_byte, hard),
            )  # fmt: skip
            try:
                if resp.content_type == "text/event-stream" and resp.status < 400:
                    resp.until_idle(timeouts.idle, hard)
                    await relay.stream(resp)
                else:
                    await relay.document(resp)
            finally:
                resp.close()  # an unfinished answer drops the connection: the engine sees the cancel
        except Exception as exc:
            error = exc if isinstance(exc, RouterError) else _translate(exc, relay.doing)
            if not relay.started:
                raise error from exc
            await relay.fail(error)
        except asyncio.CancelledError:
            # The client left (sending is then a no-op) or the daemon's shutdown
            # grace ran out: say so in the stream before the connection closes.
            if relay.started:
                with contextlib.suppress(Exception):
                    await relay.fail(ShuttingDown("The daemon is shutting down; the stream was cut off"))
            raise


@functools.lru_cache(maxsize=256)
def _request_head(base_url: str, path: str, api_key: str) -> tuple[str, int, bytes]:
    """Host, port and the constant part of every request to one engine launch's path. An engine
    on a Unix socket is `http+unix://<the socket's path, percent-encoded>` (port UNIX)."""
    url = urllib.parse.urlsplit(base_url)
    if url.scheme == UNIX_SCHEME:
        host, port = urllib.parse.unquote(url.netloc), UNIX
    else:
        host, port = url.hostname or "127.0.0.1", url.port or 80
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return host, port, request_head("POST", host, port, path, headers)


def _translate(exc: Exception, doing: str) -> RouterError:
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"The engine did not answer in time while {doing}")
    if isinstance(exc, EngineConnectError):
        return BackendConnectFailed(f"The engine refused the connection: {exc}")
    detail = str(exc) or type(exc).__name__
    return BackendUnavailable(f"The engine connection failed while {doing}: {detail}")
