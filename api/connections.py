"""Client connections: how many may be open, and how long each may keep the daemon waiting.

A client holds a file descriptor and memory for as long as its connection is
open, and an engine slot while one of its requests runs. Honest clients give
those back quickly; these limits make careless and hostile ones do the same:

- MAX_CONNECTIONS open at once (never more than the fd limit leaves room for:
  each proxied request also holds a connection to an engine, which is kept
  for reuse after it). At the limit a
  new connection takes the place of the one that has waited longest without
  sending a request head (an idle keep-alive, or a head still trickling in)
  once that wait passes EVICT_AFTER; with none, it is answered `503
  TOO_MANY_CONNECTIONS` at once and closed. Connections already serving are
  never touched.
- CLIENT_HEADER_TIMEOUT for a request head, counted from the connection's
  start or its last answer (slowloris; a new connection that sends nothing is
  closed then), and CLIENT_KEEP_ALIVE_TIMEOUT for a kept connection that sends
  nothing after an answer; CLIENT_BODY_TIMEOUT of silence while a request body
  comes; CLIENT_WRITE_TIMEOUT for a write to a client that does not read (its
  request is then ended and cancelled at the engine).

One timer sweeps every open connection (`ConnectionTable.sweep`, at most once
a second, so a limit may be overrun by up to a second); nothing is armed per
request (uvicorn's own per-response keep-alive timer is not used either). The
protocol that keeps the per-connection clocks is api/server.py.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

EVICT_AFTER = 1.0  # seconds without a request head before a connection may be displaced
FD_RESERVE = 64  # descriptors kept for everything that is not a client connection
MAX_LINGERING = 64  # refused connections still delivering their 503


@dataclass(frozen=True)
class ClientLimits:
    max_connections: int = 1024
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    keep_alive: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    write_timeout: float = 60.0

    @property
    def sweep_interval(self) -> float:
        shortest = min(self.keep_alive, self.header_timeout, self.body_timeout, self.write_timeout)
        return min(1.0, shortest / 4)


def connection_cap(wanted: int) -> int:
    """MAX_CONNECTIONS, lowered to what the fd limit can hold (raised to its hard limit first).
    A client connection may hold up to three descriptors: its own, its request's engine
    connection, and that connection once it idles in the pool."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    room = max(1, (soft - FD_RESERVE) // 3) if soft != resource.RLIM_INFINITY else wanted
    if room < wanted:
        log.warning("MAX_CONNECTIONS %d lowered to %d: the fd limit is %d", wanted, room, soft)
    return min(wanted, room)


class Guarded(Protocol):
    """What the table asks of a connection (api.server.HttpProtocol)."""

    def waiting_since(self) -> float | None:
        """Loop time since which it has waited for a request head; None while one is served."""
        ...

    def check(self, now: float) -> None:
        """Close the connection if it broke one of the time limits."""
        ...

    def evict(self) -> None: ...


class ConnectionTable:
    """Every open client connection of one server, and the sweep that enforces the limits."""

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.open: set[Guarded] = set()
        self.lingering = 0
        self.refused = 0  # connections answered 503 TOO_MANY_CONNECTIONS, for logs and tests
        self._handle: asyncio.TimerHandle | None = None

    def admit(self, conn: Guarded, loop: asyncio.AbstractEventLoop) -> Literal["open", "refuse", "drop"]:
        """Take a new connection: "open" it, "refuse" it with a 503, or "drop" it unanswered."""
        if len(self.open) >= self.limits.max_connections and not self._make_room(loop.time()):
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("%d connections open (MAX_CONNECTIONS): refusing new ones", len(self.open))
            return "refuse" if self.lingering < MAX_LINGERING else "drop"
        self.open.add(conn)
        if self._handle is None:
            self._handle = loop.call_later(self.limits.sweep_interval, self.sweep, loop)
        return "open"

    def _make_room(self, now: float) -> bool:
        """Evict the connection that has waited longest for a request head, if long enough."""
        victim, oldest = None, now - EVICT_AFTER
        for conn in self.open:
            since = conn.waiting_since()
            if since is not None and since <= oldest:
                victim, oldest = conn, since
        if victim is None:
            return False
        self.open.discard(victim)
        victim.evict()
        return True

    def discard(self, conn: Guarded) -> None:
        self.open.discard(conn)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now = loop.time()
        for conn in list(self.open):
            conn.check(now)
        if self.open:
            self._handle = loop.call_later(self.limits.sweep_interval, self.sweep, loop)
