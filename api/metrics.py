"""Prometheus metrics (prometheus-client), all under `unified_inference_`.

Per-request series are recorded once, at the end of a request, as plain
numbers (a dict update and a bisect): prometheus-client's own metric objects
take a lock per update, which a single-threaded event loop does not need,
and measurably slowed the data plane. prometheus-client renders them.
Engine state, in-flight and queued counts, and GPU memory and utilisation
are read when /metrics is scraped, by collectors: they cost nothing per
request. Model labels only ever hold registered names, so a client sending
random model names cannot grow the label space.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lifecycle.gpus import nvml_gpus
from lifecycle.manager import EngineManager
from lifecycle.state import EngineState
from router.fairness import PRIORITIES

P = "unified_inference"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STARTUP_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
UNKNOWN_MODEL = "_unknown"


class _Counter:
    """A counter family kept as plain numbers: the event loop is its only writer."""

    def __init__(self, name: str, doc: str, labels: list[str]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        return family


class _Histogram:
    """A histogram family: per label set, counts per bucket (found by bisect), sum, count."""

    def __init__(self, name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, buckets
        self.values: dict[tuple[str, ...], list[Any]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        state = self.values.get(labels)
        if state is None:
            state = self.values[labels] = [[0] * (len(self.bounds) + 1), 0.0]
        state[0][bisect_left(self.bounds, value)] += 1
        state[1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, (counts, total) in self.values.items():
            cumulative = list(accumulate(counts))
            buckets = [(_le(b), float(c)) for b, c in zip(self.bounds, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(labels), buckets, total)
        return family


def _le(bound: float) -> str:
    return repr(float(bound))


class Metrics(Collector):
    """The daemon's metrics; also the lifecycle's EngineEvents sink.

    Recording is a dict update (no locks: everything runs on the event loop);
    prometheus-client renders the families when /metrics is scraped.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        engine = ["model", "backend", "replica"]
        self.requests = _Counter(
            f"{P}_requests", "Inference requests by model, backend, HTTP status and error code "
            "(code is empty on success; a stream that ends with an error event counts its code).",
            ["model", "backend", "status", "code"],
        )  # fmt: skip
        self.latency = _Histogram(
            f"{P}_request_duration_seconds", "Inference request duration, to the last byte.", ["model"],
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttft = _Histogram(
            f"{P}_time_to_first_token_seconds", "Streaming requests: time to the first chunk of the answer.",
            ["model"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.tokens = _Counter(
            f"{P}_streamed_tokens",
            "SSE data events relayed to clients (the engines send one per token).",
            ["model"],
        )
        self.offloads = _Counter(f"{P}_offloads", "Requests for a GPU model served by its CPU twin.",
                                 ["model", "target"])  # fmt: skip
        self.rejections = _Counter(
            f"{P}_rejected_requests",
            "Requests refused with 429 (GPU_OVERLOADED, QUEUE_FULL).",
            ["model", "code"],
        )
        self.starts = _Counter(f"{P}_engine_starts", "Engine starts that became ready.", engine)
        self.start_failures = _Counter(f"{P}_engine_start_failures", "Engine starts that failed.", engine)
        self.stops = _Counter(f"{P}_engine_stops", "Engine stops (idle, operator, reload).", engine)
        self.crashes = _Counter(
            f"{P}_engine_crashes", "Engines that died or were killed as unresponsive.", engine
        )
        self.startup = _Histogram(
            f"{P}_engine_startup_seconds", "Engine start to ready.", ["model", "backend"], STARTUP_BUCKETS
        )
        self.evictions = _Counter(
            f"{P}_engine_evictions", "Idle engines slept or stopped to make room on a GPU.",
            ["model", "action", "replica"],
        )  # fmt: skip
        self.wakes = _Counter(
            f"{P}_engine_wakes", "Sleeping engines woken for a request.", ["model", "replica"]
        )
        self.warmup = _Histogram(
            f"{P}_engine_warmup_seconds", "An engine's warm-up request (models.yaml `warmup`), after its "
            "start; not in engine_startup_seconds.", ["model"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.routing = _Counter(
            f"{P}_routing_decisions",
            "Requests for a model with replicas, by how a replica was chosen: affinity, bounded_spill, "
            "least_loaded, round_robin, scale_up, offload, rejected.",
            ["model", "policy", "reason"],
        )
        self.wake_time = _Histogram(
            f"{P}_engine_wake_seconds", "Engine wake (placement included) to ready.", ["model"],
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.aliases = _Counter(
            f"{P}_alias_requests",
            "Requests naming an alias, by the version that served them.",
            ["alias", "model"],
        )
        self.admissions = _Counter(
            f"{P}_admissions",
            "Requests made with a client key and given a slot on an engine, by model, the key's name "
            "and priority.",
            ["model", "key", "priority"],
        )
        self.queue_wait = _Histogram(
            f"{P}_admission_queue_wait_seconds",
            "Time requests admitted from a saturated model's admission queue waited there.",
            ["model", "priority"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_exits = _Counter(
            f"{P}_admission_queue_exits",
            "Requests that left a model's admission queue: admitted, timeout (429), left (the client "
            "went away), closed (the model was removed, or the daemon stopped).",
            ["model", "priority", "outcome"],
        )
        self._families: list[_Counter | _Histogram] = [
            self.requests, self.latency, self.ttft, self.tokens, self.offloads, self.rejections,
            self.starts, self.start_failures, self.stops, self.crashes, self.startup,
            self.evictions, self.wakes, self.wake_time, self.routing, self.aliases, self.warmup,
            self.admissions, self.queue_wait, self.queue_exits,
        ]  # fmt: skip
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.family()

    def watch(self, manager: EngineManager, gpus: Callable[[], list[dict[str, float]]] | None = None) -> None:
        """Add the scrape-time collectors of live state."""
        self.registry.register(EngineCollector(manager))
        self.registry.register(GpuCollector(gpus or nvml_gpus))

    # ------------------------------------------------------------ data plane

    def request(self, model: str, backend: str, status: int, code: str, seconds: float) -> None:
        self.requests.inc((model, backend, str(status), code))
        self.latency.observe((model,), seconds)
        if status == 429:
            self.rejections.inc((model, code))

    def stream(self, model: str, ttft: float | None, tokens: int) -> None:
        if ttft is not None:
            self.ttft.observe((model,), ttft)
        if tokens:
            self.tokens.inc((model,), tokens)

    def offload(self, model: str, target: str) -> None:
        self.offloads.inc((model, target))

    def aliased(self, alias: str, model: str) -> None:
        self.aliases.inc((alias, model))

    def routed(self, model: str, policy: str, reason: str) -> None:
        self.routing.inc((model, policy, reason))

    def admitted(self, model: str, key: str, priority: int) -> None:
        self.admissions.inc((model, key, PRIORITIES[priority]))

    # --------------------------------------------------------- EngineEvents

    def started(self, model: str, backend: str, seconds: float, replica: int = 0) -> None:
        self.starts.inc((model, backend, str(replica)))
        self.startup.observe((model, backend), seconds)

    def start_failed(self, model: str, backend: str, replica: int = 0) -> None:
        self.start_failures.inc((model, backend, str(replica)))

    def stopped(self, model: str, backend: str, replica: int = 0) -> None:
        self.stops.inc((model, backend, str(replica)))

    def crashed(self, model: str, backend: str, replica: int = 0) -> None:
        self.crashes.inc((model, backend, str(replica)))

    def evicted(self, model: str, action: str, replica: int = 0) -> None:
        self.evictions.inc((model, action, str(replica)))

    def warmed(self, model: str, seconds: float, replica: int = 0) -> None:
        self.warmup.observe((model,), seconds)

    def queue_left(self, model: str, priority: str, outcome: str, seconds: float) -> None:
        self.queue_exits.inc((model, priority, outcome))
        if outcome == "admitted":
            self.queue_wait.observe((model, priority), seconds)

    def woke(self, model: str, seconds: float, replica: int = 0) -> None:
        self.wakes.inc((model, str(replica)))
        self.wake_time.observe((model,), seconds)


class EngineCollector(Collector):
    def __init__(self, manager: EngineManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(f"{P}_engine_state", "1 for the engine's current state.",
                                  labels=["model", "backend", "replica", "state"])  # fmt: skip
        in_flight = GaugeMetricFamily(
            f"{P}_engine_in_flight_requests", "Requests in flight.", labels=["model", "replica"]
        )
        queued = GaugeMetricFamily(
            f"{P}_engine_queued_requests", "Requests waiting for the engine to start.",
            labels=["model", "replica"],
        )  # fmt: skip
        failures = GaugeMetricFamily(
            f"{P}_engine_consecutive_failures",
            "Failures in a row, since the engine last proved healthy.",
            labels=["model", "replica"],
        )
        waiting = GaugeMetricFamily(
            f"{P}_admission_queue_requests",
            "Requests waiting in a saturated model's admission queue, by priority.",
            labels=["model", "priority"],
        )
        for replicas in self.manager.models.values():
            for priority, count in replicas.queue.counts().items():
                waiting.add_metric([replicas.name, priority], count)
        yield waiting
        for engine in self.manager.all_engines():
            labels = [engine.name, str(engine.replica)]
            for s in EngineState:
                value = 1.0 if engine.state is s else 0.0
                state.add_metric([engine.name, engine.spec.backend, labels[1], s.value], value)
            in_flight.add_metric(labels, engine.in_flight)
            queued.add_metric(labels, engine.waiting)
            failures.add_metric(labels, engine.failures)
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
