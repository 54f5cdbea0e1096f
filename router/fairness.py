"""Who is admitted next when a model's slots are full: a pure, synchronous policy.

Requests waiting for a model (lifecycle/admission.py holds them) are ordered by:

1. **Priority class**, strictly: a waiting `high` request is always admitted before any
   `normal` one, and `normal` before `low`. (A lower class is not starved into a hang: the
   waiting mechanism turns it away with 429 at its model's `queue_timeout`.)
2. **Least recent service among tenants**, within a class: each tenant (an API key's
   `name`, or the client address without keys) has a virtual time `v`, the service it has
   been given divided by its `weight`. The tenant with the smallest `v` goes next (ties: the
   one whose head request came first); admitting a request adds `cost / weight` to its `v`.
   A tenant that starts waiting again after a pause takes `v = max(v, V)`, where `V` is
   the virtual time of the last admission: an idle tenant banks no credit, and a busy one
   cannot be punished for what it was given while nobody else wanted a slot. Over a period
   where every tenant waits, admissions are shared in proportion to the weights (weighted
   fair queueing, in the start-time form of Linux's CFS).
3. **Arrival order**, within a tenant (FIFO).

`cost` is the request's output bound in tokens (`max_tokens`; api/compute.py), so a
tenant of long generations is given fewer admissions than one of short ones for the same
share: a slot is held for about as long as the engine decodes, and decode time grows with
the tokens generated, which the bound caps and which is known before admission (the prompt
is prefilled in a batch, in a small part of that time). A request that names no bound
costs `DEFAULT_COST`.

Charging happens at admission, so a request that leaves the queue (timeout, disconnect)
costs its tenant nothing. No clock and no I/O here: the caller owns time and acts on
`pop()`'s answer in the same event-loop step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

PRIORITIES = ("high", "normal", "low")  # index = class; lower index goes first
DEFAULT_COST = 256.0  # tokens: a request without max_tokens (or one that generates nothing)

# Idle tenants' virtual times are forgotten once there are more than this many of them:
# first those no longer ahead of `V` (they would restart at `V` anyway), then, if still too
# many, those least ahead (which forgives each at most that small lead).
PRUNE_ABOVE = 256


class Waiting(Protocol):
    tenant: str
    priority: int  # an index into PRIORITIES
    weight: float  # > 0
    cost: float  # > 0
    seq: int  # arrival order, unique


W = TypeVar("W", bound=Waiting)


class FairQueue(Generic[W]):
    def __init__(self) -> None:
        self._classes: list[dict[str, deque[W]]] = [{} for _ in PRIORITIES]
        self._vtime: dict[str, float] = {}
        self._active: dict[str, int] = {}  # tenant -> requests waiting, every class
        self.virtual_time = 0.0  # V: the virtual time of the last admission
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[W]:
        for tenants in self._classes:
            for queue in tenants.values():
                yield from queue

    def counts(self) -> dict[str, int]:
        """Requests waiting, per priority class."""
        return {
            name: sum(len(q) for q in tenants.values())
            for name, tenants in zip(PRIORITIES, self._classes, strict=True)
        }

    def vtime(self, tenant: str) -> float:
        return self._vtime.get(tenant, self.virtual_time)

    def push(self, item: W) -> None:
        tenant = item.tenant
        if tenant not in self._active:  # (re)joining: no credit from having been idle
            self._vtime[tenant] = max(self._vtime.get(tenant, self.virtual_time), self.virtual_time)
            self._active[tenant] = 0
        self._active[tenant] += 1
        self._classes[item.priority].setdefault(tenant, deque()).append(item)
        self._len += 1

    def peek(self) -> W | None:
        """The request `pop()` would return."""
        for tenants in self._classes:
            if tenants:
                vtime = self._vtime
                tenant = min(tenants, key=lambda t: (vtime[t], tenants[t][0].seq))
                return tenants[tenant][0]
        return None

    def pop(self) -> W | None:
        """The next request to admit, charged to its tenant; None when nothing waits."""
        item = self.peek()
        if item is None:
            return None
        self._take(item)
        tenant = item.tenant
        v = self._vtime[tenant]
        self.virtual_time = max(self.virtual_time, v)
        self._vtime[tenant] = v + item.cost / item.weight
        if len(self._vtime) > PRUNE_ABOVE + len(self._active):
            self._prune()
        return item

    def remove(self, item: W) -> bool:
        """Take out a request that leaves without being admitted (uncharged)."""
        queue = self._classes[item.priority].get(item.tenant)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        self._take(item, popped=False)
        return True

    def _take(self, item: W, popped: bool = True) -> None:
        tenants = self._classes[item.priority]
        queue = tenants[item.tenant]
        if popped:
            queue.popleft()
        if not queue:
            del tenants[item.tenant]
        self._len -= 1
        left = self._active[item.tenant] - 1
        if left:
            self._active[item.tenant] = left
        else:
            del self._active[item.tenant]

    def _prune(self) -> None:
        idle = sorted((v, t) for t, v in self._vtime.items() if t not in self._active)
        excess = len(idle) - PRUNE_ABOVE // 2
        for i, (v, tenant) in enumerate(idle):
            if v > self.virtual_time and i >= excess:
                break
            del self._vtime[tenant]
