"""Alias splits and session pinning, without processes."""

from __future__ import annotations

from router.aliases import BUCKETS, RoundRobin, bucket, for_session, owner


def test_round_robin_follows_the_weights_exactly() -> None:
    rr = RoundRobin([("v1", 90), ("v2", 10)])
    picks = [rr.next() for _ in range(2000)]
    assert picks.count("v1") == 1800 and picks.count("v2") == 200
    assert "v2" in picks[:10], "smooth: the small version is not starved to the end of a cycle"


def test_a_session_keeps_its_version_and_a_changed_split_moves_only_moved_buckets() -> None:
    old, new = [("v1", 90), ("v2", 10)], [("v1", 50), ("v2", 50)]
    sessions = [f"user-{i}" for i in range(500)]
    before = {s: for_session(old, s) for s in sessions}
    assert all(for_session(old, s) == before[s] for s in sessions for _ in range(4))
    after = {s: for_session(new, s) for s in sessions}
    moved = {s for s in sessions if after[s] != before[s]}
    assert moved == {s for s in sessions if 5000 <= bucket(s) < 9000}
    assert all(after[s] == "v2" and before[s] == "v1" for s in moved)
    assert {s: for_session(old, s) for s in sessions} == before  # rollback restores all
    assert 0.85 <= sum(v == "v1" for v in before.values()) / 500 <= 0.95


def test_buckets_are_covered_in_the_order_written() -> None:
    weights = [("a", 1), ("b", 3)]
    assert owner(weights, 0) == "a" and owner(weights, BUCKETS // 4 - 1) == "a"
    assert owner(weights, BUCKETS // 4) == "b" and owner(weights, BUCKETS - 1) == "b"
