"""The spill chain over a model's replicas, without processes: snapshot in, decision out."""

from __future__ import annotations

from router.balance import HashRing
from router.scaling import Overflow, Serve, Start, View, Wait, decide, least_loaded_any

CAP = 4.0


def ready(i: int, load: int) -> View:
    return View(i, "ready", load)


def idle(i: int, *, startable: bool = True, asleep: bool = False) -> View:
    return View(i, "idle", 0, startable=startable, asleep=asleep)


def test_a_ready_replica_under_the_threshold_serves_by_policy() -> None:
    views = [ready(0, 3), ready(1, 1), idle(2)]
    assert decide(views, policy="least_loaded", cap=CAP, turn=0) == Serve(1, "least_loaded")
    # Round robin skips a replica at the threshold and takes the others in turn.
    full = [ready(0, 4), ready(1, 0), ready(2, 0)]
    picks = [decide(full, policy="round_robin", cap=CAP, turn=t) for t in range(4)]
    assert [p.replica for p in picks if isinstance(p, Serve)] == [1, 2, 1, 2]


def test_a_cold_model_starts_one_replica_and_the_request_waits_for_it() -> None:
    assert decide([idle(0), idle(1)], policy="least_loaded", cap=CAP, turn=0) == Start(0, wait=False)
    # A sleeping replica wakes faster than a stopped one starts.
    assert decide([idle(0), idle(1, asleep=True)], policy="least_loaded", cap=CAP, turn=0) == Start(
        1, wait=False
    )
    # While it starts, requests queue on it up to the threshold, then a second one starts.
    starting = View(0, "starting", 2)
    assert decide([starting, idle(1)], policy="least_loaded", cap=CAP, turn=0) == Serve(0, "least_loaded")
    full = View(0, "starting", 4)
    assert decide([full, idle(1)], policy="least_loaded", cap=CAP, turn=0) == Start(1, wait=False)


def test_all_at_the_threshold_starts_one_replica_for_a_burst_then_waits() -> None:
    views = [ready(0, 4), ready(1, 4), idle(2), idle(3)]
    assert decide(views, policy="least_loaded", cap=CAP, turn=0) == Start(2, wait=True)
    # Once that start runs, the next overflowing requests wait: one start for a burst.
    views[2] = View(2, "starting", 0)
    assert decide(views, policy="least_loaded", cap=CAP, turn=0) == Wait()


def test_at_max_or_when_none_can_start_the_request_overflows() -> None:
    assert decide([ready(0, 4), ready(1, 4)], policy="least_loaded", cap=CAP, turn=0) == Overflow()
    backing_off = [ready(0, 4), idle(1, startable=False)]
    assert decide(backing_off, policy="prefix_affinity", cap=CAP, turn=0) == Overflow()
    assert least_loaded_any([ready(0, 9), ready(1, 7), idle(2)]) == 1


def test_prefix_affinity_keeps_a_key_on_its_replica_and_spills_at_the_bound() -> None:
    ring = HashRing([0, 1, 2])
    views = [ready(0, 0), ready(1, 0), ready(2, 0)]
    home = decide(views, policy="prefix_affinity", cap=100, turn=0, key="chat:hello", ring=ring)
    assert isinstance(home, Serve) and home.reason == "affinity"
    loads = [ready(i, 6 if i == home.replica else 1) for i in range(3)]  # bound: 1.25 * 9/3 + 1 = 4.75
    spilled = decide(loads, policy="prefix_affinity", cap=100, turn=0, key="chat:hello", ring=ring)
    assert (
        isinstance(spilled, Serve) and spilled.replica != home.replica and spilled.reason == "bounded_spill"
    )
    # No key (a request without messages or prompt): by load.
    keyless = decide(loads, policy="prefix_affinity", cap=100, turn=0, key=None, ring=ring)
    assert isinstance(keyless, Serve) and keyless.reason == "least_loaded"
