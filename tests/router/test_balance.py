"""Replica balancing, without processes: loads in, a replica out."""

from __future__ import annotations

import random
from collections import Counter

from router.balance import (
    HashRing,
    Replica,
    affinity_key,
    least_loaded,
    limit,
    prefix_affinity,
    round_robin,
)


def idle(*ids: int) -> list[Replica]:
    return [Replica(i, 0) for i in ids]


def test_round_robin_spreads_sequential_requests_exactly_evenly() -> None:
    counts = Counter(round_robin(idle(0, 1, 2), turn).replica for turn in range(300))
    assert counts == {0: 100, 1: 100, 2: 100}


def test_least_loaded_takes_the_emptiest_and_breaks_ties_in_turn() -> None:
    assert least_loaded([Replica(0, 3), Replica(1, 1), Replica(2, 2)], turn=7).replica == 1
    assert [least_loaded(idle(0, 1, 2), t).replica for t in range(4)] == [0, 1, 2, 0]


def test_least_loaded_keeps_concurrent_load_within_the_bound() -> None:
    load = {0: 0, 1: 0, 2: 0}
    rng = random.Random(5)
    for turn in range(300):
        choice = least_loaded([Replica(i, n) for i, n in load.items()], turn)
        load[choice.replica] += 1
        if rng.random() < 0.6:  # some finish meanwhile
            busiest = max(load, key=lambda i: load[i])
            load[busiest] -= 1
        assert max(load.values()) <= 1.25 * (sum(load.values()) / 3) + 1


def test_a_prefix_keeps_its_replica_while_under_the_bound() -> None:
    ring = HashRing([0, 1, 2])
    loads = idle(0, 1, 2)
    keys = [f"prompt:conversation {n}" for n in range(200)]
    first = {k: prefix_affinity(k, ring, loads).replica for k in keys}
    again = {k: prefix_affinity(k, ring, loads).replica for k in keys}
    assert first == again
    assert all(prefix_affinity(k, ring, loads).reason == "affinity" for k in keys)
    shares = Counter(first.values())
    assert min(shares.values()) >= 40, shares  # the ring spreads keys over every replica


def test_a_hot_key_spills_past_full_replicas_and_the_bound_holds() -> None:
    ring = HashRing([0, 1, 2])
    load = {0: 0, 1: 0, 2: 0}
    reasons: Counter[str] = Counter()
    for _ in range(60):  # one key, no request finishes
        choice = prefix_affinity("session:hot", ring, [Replica(i, n) for i, n in load.items()])
        load[choice.replica] += 1
        reasons[choice.reason] += 1
        mean = sum(load.values()) / 3
        assert max(load.values()) <= 1.25 * mean + 1
    assert reasons["affinity"] >= 1 and reasons["bounded_spill"] >= 1
    assert limit([Replica(0, 2), Replica(1, 0)]) == 1.25 * 1.5 + 1


def test_a_replica_leaving_the_ring_moves_only_its_own_keys() -> None:
    keys = [f"prompt:{n}" for n in range(500)]
    before = HashRing([0, 1, 2])
    after = HashRing([0, 2])
    moved = [k for k in keys if next(before.walk(k)) != next(after.walk(k))]
    assert moved and all(next(before.walk(k)) == 1 for k in moved)
    joined = HashRing([0, 1, 2, 3])
    moved = [k for k in keys if next(before.walk(k)) != next(joined.walk(k))]
    assert moved and all(next(joined.walk(k)) == 3 for k in moved)


def test_a_replica_missing_from_the_snapshot_is_walked_past() -> None:
    ring = HashRing([0, 1, 2])
    key = next(k for k in (f"prompt:{n}" for n in range(100)) if next(ring.walk(k)) == 1)
    choice = prefix_affinity(key, ring, idle(0, 2))  # replica 1 is stopping
    assert choice.replica in (0, 2) and choice.reason == "affinity"


def test_the_affinity_key_is_the_session_or_the_conversation_start() -> None:
    turns = [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "more")]
    chat = {"messages": [{"role": role, "content": text} for role, text in turns]}
    first_turn = {"messages": chat["messages"][:2]}
    assert affinity_key(chat, None) == affinity_key(first_turn, None)
    assert affinity_key(chat, "abc") == "session:abc"
    long = "x" * 300
    assert affinity_key({"prompt": long + "a"}, None) == affinity_key({"prompt": long + "b"}, None)
    assert affinity_key({"prompt": [1, 2, 3]}, None) is None
