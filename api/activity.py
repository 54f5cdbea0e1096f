"""What the dashboard shows beyond /v1/status: the last requests and a few minutes of rates.

Bounded memory: the last RECENT requests in a ring, and per model BUCKETS buckets of
BUCKET_SECONDS each (requests, errors, time to first token). Model names are registered
names or `_unknown` (api/metrics.py), so the per-model series cannot grow without bound.
Recording is a deque append and a few additions, once per request, at its end.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

RECENT = 200  # requests kept for the recent-requests table
BUCKET_SECONDS = 10
BUCKETS = 60  # ten minutes of history per model


class Activity:
    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self.recent: deque[tuple[float, str, str, int, str, float, str]] = deque(maxlen=RECENT)
        # model -> buckets of [start, requests, errors, ttft_sum_seconds, ttft_count]
        self.series: dict[str, deque[list[float]]] = {}

    def record(
        self, model: str, served: str, status: int, code: str, seconds: float, request_id: str,
        ttft: float | None,
    ) -> None:  # fmt: skip
        now = self._clock()
        self.recent.append((now, model, served, status, code, seconds, request_id))
        buckets = self.series.get(model)
        if buckets is None:
            buckets = self.series[model] = deque(maxlen=BUCKETS)
        start = now - now % BUCKET_SECONDS
        if not buckets or buckets[-1][0] != start:
            buckets.append([start, 0, 0, 0.0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        if status >= 400:
            bucket[2] += 1
        if ttft is not None:
            bucket[3] += ttft
            bucket[4] += 1

    def snapshot(self) -> dict[str, Any]:
        """JSON for the dashboard: newest requests first; per model, per bucket, requests per
        second, errors per second and mean TTFT (ms, null when no stream started)."""
        recent = [
            {"time": t, "model": m, "served": s or None, "status": st, "code": c,
             "duration_ms": round(d * 1000, 2), "request_id": rid}
            for t, m, s, st, c, d, rid in reversed(self.recent)
        ]  # fmt: skip
        series = {model: [_point(b) for b in buckets] for model, buckets in self.series.items()}
        return {"bucket_seconds": BUCKET_SECONDS, "recent": recent, "series": series}


def _point(b: list[float]) -> dict[str, float | None]:
    return {
        "t": b[0],
        "rps": b[1] / BUCKET_SECONDS,
        "errors_ps": b[2] / BUCKET_SECONDS,
        "ttft_ms": round(b[3] / b[4] * 1000, 2) if b[4] else None,
    }
