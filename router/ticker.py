"""One coarse timer for every request's deadlines.

Each proxied request has an engine deadline and, after a short delay, starts
a client-disconnect watcher. Arming and cancelling a loop timer for each cost
~2.5 us apiece on uvloop (~8% of the daemon's CPU per request). Instead, what
has a deadline registers here (a set insert) and is looked at every
`interval` seconds while anything is registered; deadlines are therefore met
up to one interval late, which is nothing next to timeouts of seconds.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Tickable(Protocol):
    def tick(self, now: float) -> bool:
        """Called every interval with the loop's time; return False to be dropped."""
        ...


class Ticker:
    def __init__(self, interval: float = 0.025) -> None:
        self.interval = interval
        self._items: set[Tickable] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, item: Tickable) -> None:
        self._items.add(item)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def discard(self, item: Tickable) -> None:
        self._items.discard(item)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = None
        now = loop.time()
        for item in list(self._items):
            if not item.tick(now):
                self._items.discard(item)
        if self._items:
            self._handle = loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        self._items.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
