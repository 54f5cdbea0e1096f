"""The admission queue of one model: requests that wait for a slot instead of a 429.

A GPU model is saturated when each of its engines (replicas) holds
OFFLOAD_QUEUE_THRESHOLD requests. With no CPU twin and no replica left to start, a
request then waits here for up to its model's `queue_timeout` (QUEUE_TIMEOUT; 0 keeps the
immediate 429 and never reaches this module). Who goes next is router/fairness.py's
decision; this module only holds the waiters and hands them slots:

- **Hand-off, not a race:** when a lease on one of the model's engines is released, the
  release itself (Engine.on_release) admits the next waiter in the same event-loop step:
  it takes a lease on that engine for it and wakes it. The engine's in-flight count never
  dips below the bound while requests wait, so a request that arrives meanwhile finds the
  model saturated and queues behind them.
- **No timer per request:** the daemon's Ticker looks at the queue every interval while
  anything waits; it turns away requests past their deadline and admits any waiter an
  engine has room for (a slot that freed other than by a release).
- **Nothing lost:** a waiter that leaves (its client disconnected: the task is cancelled)
  is taken out at once, uncharged; one admitted in the same instant gives its lease
  straight back, which admits the next.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from lifecycle.state import EngineError, EngineEvents
from router.fairness import PRIORITIES, FairQueue
from router.ticker import Ticker

if TYPE_CHECKING:
    from lifecycle.engine import Engine, Lease


class QueueTimeout(EngineError):
    def __init__(self, model: str, message: str, retry_after: float) -> None:
        super().__init__(model, message)
        self.retry_after = retry_after


class QueueClosed(EngineError):
    pass


class Ticket:
    """One waiting request (router/fairness.py's `Waiting`)."""

    __slots__ = ("cost", "deadline", "future", "joined", "priority", "seq", "tenant", "weight")

    def __init__(self, tenant: str, priority: int, weight: float, cost: float, seq: int,
                 joined: float, deadline: float) -> None:  # fmt: skip
        self.tenant, self.priority, self.weight, self.cost, self.seq = tenant, priority, weight, cost, seq
        self.joined, self.deadline = joined, deadline
        self.future: asyncio.Future[tuple[Engine, Lease]] = asyncio.get_running_loop().create_future()


class AdmissionQueue:
    def __init__(self, name: str, engines: list[Engine], events: EngineEvents) -> None:
        self.name = name
        self.engines = engines  # the ReplicaSet's own list: resized in place on reload
        self._events = events
        self._fair: FairQueue[Ticket] = FairQueue()
        self._seq = itertools.count()
        self.cap = 1  # requests per engine: set by each join (OFFLOAD_QUEUE_THRESHOLD)
        self._gap = 1.0  # seconds between admissions, smoothed: what Retry-After is made of
        self._last_admit: float | None = None

    @property
    def waiting(self) -> int:
        return len(self._fair)

    def counts(self) -> dict[str, int]:
        return self._fair.counts()

    def join(self, tenant: str, priority: int, weight: float, cost: float, *,
             timeout: float, cap: int, ticker: Ticker) -> Ticket:  # fmt: skip
        """Queue a request; `wait()` for its slot. The caller checked the queue's bound."""
        now = asyncio.get_running_loop().time()
        ticket = Ticket(tenant, priority, weight, cost, next(self._seq), now, now + timeout)
        self.cap = cap
        self._fair.push(ticket)
        self._hook(self._released)
        ticker.add(self)
        return ticket

    async def wait(self, ticket: Ticket) -> tuple[Engine, Lease]:
        """The engine and the lease taken for the request, once admitted; QueueTimeout past
        its deadline, QueueClosed when the model goes away. Cancelled (its client left): it
        leaves the queue at once, and gives back a slot it was given in the same instant."""
        try:
            return await ticket.future
        except asyncio.CancelledError:
            future = ticket.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result()[1].release()
            elif self._fair.remove(ticket):
                self._left(ticket, "left")
            raise

    # ------------------------------------------------------------ admitting

    def _released(self, engine: Engine) -> None:
        """Engine.on_release: a slot freed on `engine`; hand it to the next waiter."""
        while self._fair and engine.in_flight < self.cap:
            self._admit(engine)

    def _admit(self, engine: Engine) -> None:
        ticket = self._fair.pop()
        assert ticket is not None
        if ticket.future.done():  # cancelled, its task not yet resumed to leave the queue
            self._left(ticket, "left")
            return
        lease = engine.acquire()
        ticket.future.set_result((engine, lease))
        now = asyncio.get_running_loop().time()
        if self._last_admit is not None:
            self._gap = 0.8 * self._gap + 0.2 * (now - self._last_admit)
        self._last_admit = now
        self._left(ticket, "admitted", now)

    def tick(self, now: float) -> bool:
        """The Ticker's look: turn away waiters past their deadline, then admit any waiter
        an engine has room for. False (dropped from the Ticker) once nothing waits."""
        expired = [t for t in self._fair if t.deadline <= now]
        for ticket in expired:
            self._fair.remove(ticket)
            if not ticket.future.done():
                message = self._timeout_message(ticket, now)
                ticket.future.set_exception(QueueTimeout(self.name, message, self._retry_after()))
            self._left(ticket, "timeout", now)
        several = len(self.engines) > 1
        for engine in sorted(self.engines, key=lambda e: e.in_flight):
            if not several or engine.up:  # a stopped replica is started by scaling, not the queue
                self._released(engine)
        if self._fair:
            return True
        self._hook(None)
        return False

    def close(self, reason: str) -> None:
        """The model is gone (removed by a reload) or the daemon stops: every waiter is told."""
        for ticket in list(self._fair):
            self._fair.remove(ticket)  # uncharged: nobody was served
            if not ticket.future.done():
                ticket.future.set_exception(QueueClosed(self.name, reason))
            self._left(ticket, "closed")
        self._hook(None)

    def _hook(self, on_release: Callable[[Engine], None] | None) -> None:
        for engine in self.engines:
            engine.on_release = on_release

    # ------------------------------------------------------------- reporting

    def _left(self, ticket: Ticket, outcome: str, now: float | None = None) -> None:
        if now is None:
            now = asyncio.get_running_loop().time()
        self._events.queue_left(self.name, PRIORITIES[ticket.priority], outcome, now - ticket.joined)

    def _timeout_message(self, ticket: Ticket, now: float) -> str:
        return (
            f"Model '{self.name}' is saturated ({len(self.engines) * self.cap} requests in flight) and "
            f"this request waited {now - ticket.joined:.1f}s for a slot (its queue_timeout); "
            f"{len(self._fair)} still wait"
        )

    def _retry_after(self) -> float:
        """About when a slot would be free for a new request: the waiters ahead of it times
        the recent gap between admissions (at least 1 s, at most 60 s)."""
        return float(min(60, max(1, math.ceil((len(self._fair) + 1) * self._gap))))
