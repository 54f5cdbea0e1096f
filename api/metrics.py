"""Prometheus metrics (prometheus-client), all under `unified_inference_`.

Per-request series are recorded once, at the end of a request, through
label children cached per label set (no per-request label resolution).
Engine state, in-flight and queued counts, and GPU memory and utilisation
are read when /metrics is scraped, by collectors: they cost nothing per
request. Model labels only ever hold registered names, so a client sending
random model names cannot grow the label space.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lifecycle.gpus import nvml_gpus
from lifecycle.manager import EngineManager
from lifecycle.state import EngineState

P = "unified_inference"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STARTUP_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
UNKNOWN_MODEL = "_unknown"


class Metrics:
    """The daemon's metrics; also the lifecycle's EngineEvents sink."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{P}_requests", "Inference requests by model, backend, HTTP status and error code "
            "(code is empty on success; a stream that ends with an error event counts its code).",
            ["model", "backend", "status", "code"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            f"{P}_request_duration_seconds", "Inference request duration, to the last byte.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{P}_time_to_first_token_seconds", "Streaming requests: time to the first chunk of the answer.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            f"{P}_streamed_tokens", "SSE data events relayed to clients (the engines send one per token).",
            ["model"], registry=r,
        )  # fmt: skip
        self.offloads = Counter(
            f"{P}_offloads", "Requests for a GPU model served by its CPU twin.",
            ["model", "target"], registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            f"{P}_rejected_requests", "Requests refused with 429 (GPU_OVERLOADED, QUEUE_FULL).",
            ["model", "code"], registry=r,
        )  # fmt: skip
        engine_labels = ["model", "backend"]
        self.starts = Counter(
            f"{P}_engine_starts", "Engine starts that became ready.", engine_labels, registry=r
        )
        self.start_failures = Counter(
            f"{P}_engine_start_failures", "Engine starts that failed.", engine_labels, registry=r
        )
        self.stops = Counter(
            f"{P}_engine_stops", "Engine stops (idle, operator, reload).", engine_labels, registry=r
        )
        self.crashes = Counter(
            f"{P}_engine_crashes", "Engines that died or were killed as unresponsive.",
            engine_labels, registry=r,
        )  # fmt: skip
        self.startup = Histogram(
            f"{P}_engine_startup_seconds", "Engine start to ready.", ["model", "backend"],
            buckets=STARTUP_BUCKETS, registry=r,
        )  # fmt: skip
        self._children: dict[tuple[Any, ...], Any] = {}

    def watch(self, manager: EngineManager, gpus: Callable[[], list[dict[str, float]]] | None = None) -> None:
        """Add the scrape-time collectors."""
        self.registry.register(EngineCollector(manager))
        self.registry.register(GpuCollector(gpus or nvml_gpus))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ------------------------------------------------------------ data plane

    def request(self, model: str, backend: str, status: int, code: str, seconds: float) -> None:
        self._child(self.requests, model, backend, str(status), code).inc()
        self._child(self.latency, model).observe(seconds)
        if status == 429:
            self._child(self.rejections, model, code).inc()

    def stream(self, model: str, ttft: float | None, tokens: int) -> None:
        if ttft is not None:
            self._child(self.ttft, model).observe(ttft)
        if tokens:
            self._child(self.tokens, model).inc(tokens)

    def offload(self, model: str, target: str) -> None:
        self._child(self.offloads, model, target).inc()

    # --------------------------------------------------------- EngineEvents

    def started(self, model: str, backend: str, seconds: float) -> None:
        self._child(self.starts, model, backend).inc()
        self._child(self.startup, model, backend).observe(seconds)

    def start_failed(self, model: str, backend: str) -> None:
        self._child(self.start_failures, model, backend).inc()

    def stopped(self, model: str, backend: str) -> None:
        self._child(self.stops, model, backend).inc()

    def crashed(self, model: str, backend: str) -> None:
        self._child(self.crashes, model, backend).inc()


class EngineCollector(Collector):
    def __init__(self, manager: EngineManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(f"{P}_engine_state", "1 for the engine's current state.",
                                  labels=["model", "backend", "state"])  # fmt: skip
        in_flight = GaugeMetricFamily(
            f"{P}_engine_in_flight_requests", "Requests in flight.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            f"{P}_engine_queued_requests", "Requests waiting for the engine to start.", labels=["model"]
        )
        failures = GaugeMetricFamily(
            f"{P}_engine_consecutive_failures", "Failures since the engine last started.", labels=["model"]
        )
        for engine in list(self.manager.engines.values()):
            for s in EngineState:
                value = 1.0 if engine.state is s else 0.0
                state.add_metric([engine.name, engine.spec.backend, s.value], value)
            in_flight.add_metric([engine.name], engine.in_flight)
            queued.add_metric([engine.name], engine.waiting)
            failures.add_metric([engine.name], engine.failures)
        yield from (state, in_flight, queued, failures)


class GpuCollector(Collector):
    def __init__(self, read: Callable[[], list[dict[str, float]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        gpus = self.read()
        if not gpus:
            return  # no GPU: the series are absent, not zero
        used = GaugeMetricFamily(f"{P}_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily(f"{P}_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        util = GaugeMetricFamily(f"{P}_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["gpu"])
        for g in gpus:
            label = [str(int(g["index"]))]
            used.add_metric(label, g["used"])
            total.add_metric(label, g["total"])
            util.add_metric(label, g["util"])
        yield from (used, total, util)
