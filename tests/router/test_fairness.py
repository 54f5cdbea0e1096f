"""router/fairness.py: who is admitted next, without processes or clocks."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from router.fairness import DEFAULT_COST, PRUNE_ABOVE, FairQueue

_seq = itertools.count()
HIGH, NORMAL, LOW = 0, 1, 2


@dataclass(eq=False)
class Req:
    tenant: str
    priority: int = NORMAL
    weight: float = 1.0
    cost: float = 1.0
    seq: int = field(default_factory=lambda: next(_seq))


def drain(q: FairQueue[Req], n: int | None = None) -> list[Req]:
    out: list[Req] = []
    while (n is None or len(out) < n) and (item := q.pop()) is not None:
        out.append(item)
    return out


def test_a_flooding_tenant_does_not_starve_a_newcomer() -> None:
    q: FairQueue[Req] = FairQueue()
    for _ in range(45):
        q.push(Req("a"))
    assert [r.tenant for r in drain(q, 5)] == ["a"] * 5
    q.push(Req("b"))
    assert q.pop().tenant == "b"  # type: ignore[union-attr]
    # and b, waiting again after being served, goes next once more, every other slot
    order = []
    for _ in range(4):
        q.push(Req("b"))
        order += [r.tenant for r in drain(q, 2)]
    assert order == ["a", "b"] * 4 or order == ["b", "a"] * 4


def test_weights_share_admissions_in_proportion() -> None:
    q: FairQueue[Req] = FairQueue()
    counts: Counter[str] = Counter()
    for _ in range(10):
        q.push(Req("a", weight=3))
        q.push(Req("b", weight=1))
    for _ in range(400):  # both keep requests waiting all the time
        item = q.pop()
        assert item is not None
        counts[item.tenant] += 1
        q.push(Req(item.tenant, weight=item.weight))
    assert counts == {"a": 300, "b": 100}


def test_cost_is_charged_so_long_generations_get_fewer_admissions() -> None:
    q: FairQueue[Req] = FairQueue()
    counts: Counter[str] = Counter()
    q.push(Req("long", cost=1000))
    q.push(Req("short", cost=100))
    for _ in range(110):
        item = q.pop()
        assert item is not None
        counts[item.tenant] += 1
        q.push(Req(item.tenant, cost=item.cost))
    assert counts == {"long": 10, "short": 100}


def test_a_higher_class_always_goes_first_and_fifo_within_a_tenant() -> None:
    q: FairQueue[Req] = FairQueue()
    normal = [Req("a") for _ in range(3)]
    low = Req("b", priority=LOW)
    high = Req("c", priority=HIGH)
    for r in (low, *normal, high):
        q.push(r)
    assert q.counts() == {"high": 1, "normal": 3, "low": 1}
    assert drain(q) == [high, *normal, low]
    assert len(q) == 0 and q.pop() is None


def test_an_idle_tenant_banks_no_credit() -> None:
    q: FairQueue[Req] = FairQueue()
    q.push(Req("idle"))
    q.pop()  # served once, long ago
    for _ in range(20):
        q.push(Req("busy"))
    drain(q, 10)  # busy alone: 10 admissions
    for _ in range(3):
        q.push(Req("idle"))
    order = [r.tenant for r in drain(q, 6)]
    assert order.count("idle") == 3 and order[:2] != ["idle", "idle"], order  # alternates, no burst


def test_a_request_that_leaves_costs_its_tenant_nothing() -> None:
    q: FairQueue[Req] = FairQueue()
    gone = Req("a", cost=DEFAULT_COST * 100)
    q.push(gone)
    assert q.remove(gone) and not q.remove(gone)
    assert len(q) == 0 and q.vtime("a") == 0.0
    q.push(Req("a"))
    q.push(Req("b"))
    assert q.pop().tenant == "a"  # type: ignore[union-attr]  # not pushed back by the removed request


def test_idle_tenants_are_forgotten() -> None:
    q: FairQueue[Req] = FairQueue()
    for i in range(PRUNE_ABOVE * 3):
        q.push(Req(f"client-{i}"))
        q.pop()
    assert len(q._vtime) <= PRUNE_ABOVE + 2
