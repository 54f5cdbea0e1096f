"""Which replica of a model takes a request, or whether a replica must start: a pure function.

lifecycle/replicas.py gives it a snapshot of the model's replicas (`View`) and acts on
the answer in the same event-loop step. The spill chain, in order:

1. A ready replica under OFFLOAD_QUEUE_THRESHOLD (`cap`), chosen by the routing policy
   (router/balance.py): `Serve`.
2. No replica ready (a cold model, or one whose replicas are all starting): a starting
   one under the cap takes the request, which waits for its start (`Serve`); else a
   replica is started for it (`Start(wait=False)`: the request waits for that start).
3. Replicas ready but all at the cap: if one is already starting, the request waits for
   whichever frees first, a running replica or the new one (`Wait`); else, below the
   model's `max`, one replica is started and the request waits likewise
   (`Start(wait=True)`): one start for a burst.
4. At `max` (or none can start): `Overflow` — the CPU twin, else 429 (a CPU model then
   queues on its least loaded replica, as a single llama.cpp engine always has).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from router.balance import Choice, HashRing, Policy, Replica, choose

Status = Literal["ready", "starting", "idle"]


@dataclass(frozen=True)
class View:
    id: int
    status: Status  # ready: serving; starting: a start or wake runs; idle: no process serving
    in_flight: int
    startable: bool = False  # idle, and it may start now (not backing off, not stopping)
    asleep: bool = False  # idle but sleeping: a wake is faster than a start


@dataclass(frozen=True)
class Serve:
    replica: int
    reason: str


@dataclass(frozen=True)
class Start:
    replica: int
    wait: bool  # True: the request waits for whichever replica frees first


@dataclass(frozen=True)
class Wait:
    pass


@dataclass(frozen=True)
class Overflow:
    pass


Decision = Serve | Start | Wait | Overflow


def decide(
    views: Sequence[View],
    *,
    policy: Policy,
    cap: float,
    turn: int,
    key: str | None = None,
    ring: HashRing | None = None,
) -> Decision:
    ready = [Replica(v.id, v.in_flight) for v in views if v.status == "ready"]
    starting = [v for v in views if v.status == "starting"]
    if ready:
        choice: Choice | None = choose(policy, ready, turn=turn, key=key, ring=ring, cap=cap)
        if choice is not None:
            return Serve(choice.replica, choice.reason)
        if starting:
            return Wait()
    else:
        open_ = [v for v in starting if v.in_flight < cap]
        if open_:
            least = min(open_, key=lambda v: (v.in_flight, v.id))
            return Serve(least.id, "least_loaded")
    idle = [v for v in views if v.startable]
    if not idle:
        return Overflow()
    first = min(idle, key=lambda v: (not v.asleep, v.id))
    return Start(first.id, wait=bool(ready))


def least_loaded_any(views: Sequence[View]) -> int | None:
    """For a CPU model at its `max`: the least loaded running replica, over the cap."""
    running = [v for v in views if v.status != "idle"]
    if not running:
        return None
    return min(running, key=lambda v: (v.in_flight, v.id)).id
