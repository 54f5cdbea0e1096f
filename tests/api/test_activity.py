"""The dashboard's ring buffers: bounded whatever the traffic, and what they report."""

from __future__ import annotations

from api.activity import BUCKET_SECONDS, BUCKETS, RECENT, Activity


def test_recent_requests_and_buckets_stay_bounded_and_add_up() -> None:
    now = [1_000_000.0]
    activity = Activity(clock=lambda: now[0])
    for i in range(RECENT * 3):
        now[0] += 1.0
        activity.record(
            "m", "m", 200 if i % 4 else 503, "" if i % 4 else "BACKEND_ERROR", 0.01, f"r{i}", 0.02
        )
    snap = activity.snapshot()
    assert len(snap["recent"]) == RECENT and snap["recent"][0]["request_id"] == f"r{RECENT * 3 - 1}"
    points = snap["series"]["m"]
    assert len(points) == min(BUCKETS, RECENT * 3 // BUCKET_SECONDS + 1)
    full = points[-2]  # a whole bucket: 10 requests, one in four an error
    assert full["rps"] == 1.0 and 0.2 <= full["errors_ps"] <= 0.3 and full["ttft_ms"] == 20.0
    activity.record("m", "", 404, "MODEL_NOT_FOUND", 0.0, "x", None)
    assert activity.snapshot()["recent"][0]["served"] is None


def test_an_hour_of_traffic_keeps_ten_minutes() -> None:
    now = [0.0]
    activity = Activity(clock=lambda: now[0])
    for _ in range(3600):
        now[0] += 1.0
        activity.record("m", "m", 200, "", 0.001, "r", None)
    points = activity.snapshot()["series"]["m"]
    assert len(points) == BUCKETS and points[0]["t"] >= 3600 - BUCKETS * BUCKET_SECONDS
    assert all(p["ttft_ms"] is None for p in points)
