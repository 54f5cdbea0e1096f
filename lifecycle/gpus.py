"""GPU discovery through NVML (nvidia-ml-py); no GPU or no driver means none."""

from __future__ import annotations

import contextlib


def nvml_gpus() -> list[dict[str, float]]:
    """Index, memory used/total (bytes) and utilisation (0..1) per GPU; empty without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpus.append({"index": i, "used": memory.used, "total": memory.total, "util": util.gpu / 100})
        return gpus
    except pynvml.NVMLError:
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def nvml_gpu_count() -> int:
    return len(nvml_gpus())
