"""GPUs: what NVML (nvidia-ml-py) sees, and the inventory placement uses.

Without the package, a driver or a GPU, every NVML reader answers "nothing" (an empty list or
None), never an error: the daemon runs on CPU-only machines.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import psutil

from config.models import ConfigError, GpuDeclaration, ModelSpec, Registry
from lifecycle.capacity import Gpu, never_fits
from lifecycle.process import descendants

T = TypeVar("T")
GIB = 1 << 30


def _nvml(read: Callable[[Any], T]) -> T | None:
    """`read(pynvml)` between nvmlInit and nvmlShutdown; None without NVML or on its errors."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        return read(pynvml)
    except pynvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


@functools.cache
def nvml_present() -> bool:
    """Whether NVML answers on this machine (asked once: a driver does not come and go)."""
    return _nvml(lambda nvml: True) is True


def nvml_gpus() -> list[dict[str, float]]:
    """Index, memory used/total (bytes) and utilisation (0..1) per GPU; empty without NVML."""

    def read(nvml: Any) -> list[dict[str, float]]:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            gpus.append({"index": i, "used": memory.used, "total": memory.total, "util": util.gpu / 100})
        return gpus

    return _nvml(read) or []


def nvml_gpu_count() -> int:
    return len(nvml_gpus())


def gpu_processes(gpu_ids: Iterable[int]) -> list[tuple[int, int, int]] | None:
    """(gpu, pid, bytes) of every process NVML sees using `gpu_ids`; None without NVML."""

    def read(nvml: Any) -> list[tuple[int, int, int]]:
        found = []
        for gpu in gpu_ids:
            handle = nvml.nvmlDeviceGetHandleByIndex(gpu)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                found.append((gpu, int(proc.pid), int(proc.usedGpuMemory or 0)))
        return found

    return _nvml(read)


def group_memory(leaders: Mapping[str, int]) -> dict[str, int] | None:
    """GPU memory (bytes) of each engine's whole process group — its leader's pid and every
    descendant — in one NVML session; None without NVML. Blocks: call it off the event loop."""

    def read(nvml: Any) -> dict[str, int]:
        # Only once NVML answers: listing descendants scans every process on the machine.
        groups = {name: {pid, *(p.pid for p in descendants(pid))} for name, pid in leaders.items()}
        used = dict.fromkeys(groups, 0)
        for i in range(nvml.nvmlDeviceGetCount()):
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(i)):
                for name, pids in groups.items():
                    if proc.pid in pids and proc.usedGpuMemory is not None:
                        used[name] += int(proc.usedGpuMemory)
        return used

    return _nvml(read)


def inventory(
    declared: Sequence[GpuDeclaration], seen: Callable[[], list[dict[str, float]]] = nvml_gpus
) -> list[Gpu]:
    """The GPUs placement may use. With NVML: the driver's, each capped by a declaration
    that names it (its budget becomes declared / total). Without: the declared ones.
    Raises ValueError for a declared GPU the driver does not have."""
    caps = {d.id: int(d.memory_gb * GIB) for d in declared}
    found = seen()
    if not found:
        return [Gpu(i, cap) for i, cap in sorted(caps.items())]
    ids = {int(g["index"]) for g in found}
    absent = sorted(set(caps) - ids)
    if absent:
        raise ValueError(f"gpus: GPU {absent[0]} is declared but the driver sees only {sorted(ids)}")
    gpus = []
    for g in found:
        total = int(g["total"])
        cap = min(caps.get(int(g["index"]), total), total)
        gpus.append(Gpu(int(g["index"]), cap, budget=cap / total if total else 1.0))
    return gpus


def placement_problems(models: Iterable[ModelSpec], gpus: Sequence[Gpu]) -> list[str]:
    """Models that can never be placed: each names its model and field."""
    managed = [(i, m) for i, m in enumerate(models) if m.budgeted]
    pinned = [(m.name, m.share, m.gpu_ids) for _, m in managed if m.pinned and m.gpu_ids]
    problems = []
    for i, m in managed:
        if m.pooled and gpus and m.gpus_per_replica > len(m.gpu_ids or gpus):
            problems.append(
                f"models[{i}] '{m.name}': tensor_parallel_size: {m.gpus_per_replica} GPUs per replica, "
                f"and only {len(gpus)} GPU(s) are known"
            )
            continue
        why = never_fits(m.name, m.share, m.gpu_ids, pinned, gpus)
        if why is not None:
            problems.append(f"models[{i}] '{m.name}': {why}")
    return problems


def gpus_for(registry: Registry, seen: Callable[[], list[dict[str, float]]] = nvml_gpus) -> list[Gpu]:
    """The GPUs for this registry; ConfigError for a declaration the driver contradicts or
    a model that can never be placed."""
    try:
        gpus = inventory(registry.gpus, seen)
    except ValueError as exc:
        raise ConfigError(registry.source, [str(exc)]) from exc
    problems = placement_problems(registry.models.values(), gpus)
    if problems:
        raise ConfigError(registry.source, problems)
    return gpus


def describe_processes(found: list[tuple[int, int, int]] | None) -> str:
    """`found` (gpu_processes) for people: 'GPU 0: pid 812 (python) 20.5 GiB, ...'."""
    if not found:
        return ""
    parts = []
    for gpu, pid, used in found:
        try:
            name = psutil.Process(pid).name()
        except psutil.Error:
            name = "?"
        parts.append(f"GPU {gpu}: pid {pid} ({name}) {used / GIB:.1f} GiB")
    return "; NVML sees " + ", ".join(parts)
