"""Cancelling a request whose client went away, without a task per request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from router.ticker import Ticker

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def _watch_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# A request still running after this long gets a disconnect watcher (a task
# waiting on `receive()`). Most non-streaming answers come back sooner, and
# a watcher per request cost ~15% of the daemon's throughput; 0.025 s put the
# watchers of a burst of streams right in their time-to-first-token window.
# A client that leaves is noticed within this delay plus one Ticker interval.
WATCH_AFTER = 0.1


class DisconnectGuard:
    """Cancel the request's own task when the client goes away.

    The watcher (a task waiting on `receive()` for `http.disconnect`) starts
    only once the request has run for WATCH_AFTER seconds, looked at by the
    shared Ticker (no timer of its own). `close()` must be called as soon as
    the forward ends: a done-callback may already be scheduled, and the flag
    stops it from cancelling a task that moved on.
    """

    def __init__(self, receive: Receive, ticker: Ticker, after: float = WATCH_AFTER) -> None:
        self._receive = receive
        self._ticker = ticker
        self._task = asyncio.current_task()
        self._open = True
        self.disconnected = False
        self._watcher: asyncio.Future[None] | None = None
        self._watch_at = asyncio.get_running_loop().time() + after
        ticker.add(self)

    def tick(self, now: float) -> bool:
        if not self._open:
            return False
        if now < self._watch_at:
            return True
        self._watcher = asyncio.ensure_future(_watch_disconnect(self._receive))
        self._watcher.add_done_callback(self._on_disconnect)
        return False

    def _on_disconnect(self, watcher: asyncio.Future[None]) -> None:
        if self._open and not watcher.cancelled() and watcher.exception() is None:
            self.disconnected = True
            assert self._task is not None
            self._task.cancel()

    def close(self) -> None:
        self._open = False
        self._ticker.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()
