"""Which model serves a request: a pure function of the registry and a load snapshot.

No I/O and no clock: the caller takes the snapshot and acts on the decision
in the same event-loop step (so no other request can slip in between the
decision and the lease that makes it count).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from config.models import ModelSpec
from config.settings import ExecutionMode
from router.errors import FormatNotSupported, GpuOverloaded, ModelUnavailable

RETRY_AFTER_SECONDS = 1.0


@dataclass(frozen=True)
class Route:
    target: str  # the registry model that will serve the request
    offloaded: bool  # True when it is the CPU twin standing in for a GPU model


@dataclass(frozen=True)
class OffloadPolicy:
    mode: ExecutionMode
    threshold: int  # OFFLOAD_QUEUE_THRESHOLD: in-flight requests that saturate a GPU engine
    offload_enabled: bool  # ENABLE_CPU_OFFLOAD


def choose_route(
    spec: ModelSpec,
    *,
    policy: OffloadPolicy,
    disabled: Mapping[str, str],
    in_flight: Mapping[str, int],
    no_room: bool = False,
) -> Route:
    """Serve `spec` itself, its CPU twin, or raise the error the client gets.

    `no_room`: the GPU engine must start or wake and only busy engines hold its GPUs;
    with a usable twin and offload enabled the twin serves at once (without one the
    request waits for room in the lifecycle).
    """
    if spec.name in disabled:
        raise FormatNotSupported(f"Model '{spec.name}' cannot run: {disabled[spec.name]}")
    twin = spec.cpu_offload_model
    twin_usable = twin is not None and twin not in disabled
    if spec.execution_mode == "gpu" and policy.mode == "cpu":
        if twin is not None and twin_usable:
            return Route(twin, offloaded=True)
        raise ModelUnavailable(
            f"Model '{spec.name}' runs on GPU and the daemon runs in cpu execution mode"
            + ("" if twin is None else f"; its CPU twin '{twin}' cannot run")
            + " (set cpu_offload_model to a CPU model, or EXECUTION_MODE=gpu)"
        )
    if no_room and policy.offload_enabled and twin is not None and twin_usable:
        return Route(twin, offloaded=True)
    if spec.execution_mode == "gpu" and in_flight.get(spec.name, 0) >= policy.threshold:
        busy = in_flight.get(spec.name, 0)
        why = f"Model '{spec.name}' has {busy} requests in flight (limit {policy.threshold})"
        return overflow(spec, policy, disabled, why)
    return Route(spec.name, offloaded=False)


def overflow(spec: ModelSpec, policy: OffloadPolicy, disabled: Mapping[str, str], why: str) -> Route:
    """A saturated GPU model (`why` says how): its CPU twin when offload may use it, else 429."""
    twin = spec.cpu_offload_model
    if policy.offload_enabled and twin is not None and twin not in disabled:
        return Route(twin, offloaded=True)
    raise GpuOverloaded(f"{why} and no CPU offload is available", retry_after=RETRY_AFTER_SECONDS)


def ready_eta(last: float | None, elapsed: float) -> float:
    """Seconds a start (or wake) that has run `elapsed` seconds is expected to still take, for
    the Retry-After of a caller turned away meanwhile: what the last one of its kind took, less
    `elapsed`; with none to go by, as long again as it has run. At least 1 s."""
    remaining = last - elapsed if last is not None else elapsed
    return max(RETRY_AFTER_SECONDS, remaining)
