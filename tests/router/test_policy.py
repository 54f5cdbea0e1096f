from __future__ import annotations

from typing import Any

import pytest

from config.models import ModelSpec
from router.errors import FormatNotSupported, GpuOverloaded, ModelUnavailable
from router.policy import OffloadPolicy, Route, choose_route, ready_eta

GPU = ModelSpec.model_validate(
    {"name": "g", "backend": "sglang", "model_path": "m", "cpu_offload_model": "c"}
)
LONE = ModelSpec.model_validate({"name": "lone", "backend": "vllm", "model_path": "m"})
CPU = ModelSpec.model_validate({"name": "c", "backend": "llamacpp", "model_path": "m.gguf"})


def _route(spec: ModelSpec, load: int, mode: str = "gpu", offload: bool = True, **kw: Any) -> Route:
    policy = OffloadPolicy(mode=mode, threshold=3, offload_enabled=offload)  # type: ignore[arg-type]
    return choose_route(spec, policy=policy, disabled=kw.get("disabled", {}), in_flight={spec.name: load})


def test_below_the_threshold_the_gpu_model_serves() -> None:
    assert _route(GPU, 2) == Route("g", offloaded=False)


def test_at_the_threshold_the_cpu_twin_serves() -> None:
    assert _route(GPU, 3) == Route("c", offloaded=True)


def test_at_the_threshold_without_a_twin_is_429_with_retry_after() -> None:
    with pytest.raises(GpuOverloaded) as info:
        _route(LONE, 3)
    assert info.value.status == 429 and info.value.headers() == {"Retry-After": "1"}


def test_offload_disabled_means_429_even_with_a_twin() -> None:
    with pytest.raises(GpuOverloaded):
        _route(GPU, 3, offload=False)


def test_cpu_models_are_never_offloaded() -> None:
    assert _route(CPU, 100) == Route("c", offloaded=False)


def test_cpu_mode_uses_the_twin_or_refuses() -> None:
    assert _route(GPU, 0, mode="cpu") == Route("c", offloaded=True)
    with pytest.raises(ModelUnavailable, match="cpu execution mode"):
        _route(LONE, 0, mode="cpu")
    with pytest.raises(ModelUnavailable, match="twin 'c' cannot run"):
        _route(GPU, 0, mode="cpu", disabled={"c": "bad format"})


def test_a_disabled_model_is_format_not_supported() -> None:
    with pytest.raises(FormatNotSupported, match="bad format"):
        _route(GPU, 0, disabled={"g": "bad format"})


def test_ready_eta_is_the_last_starts_remainder_or_as_long_again_and_at_least_a_second() -> None:
    assert ready_eta(30.0, 10.0) == 20.0  # the last start took 30 s; this one has run 10
    assert ready_eta(30.0, 29.5) == 1.0 and ready_eta(30.0, 45.0) == 1.0  # late: retry soon
    assert ready_eta(None, 4.0) == 4.0 and ready_eta(None, 0.1) == 1.0  # nothing to go by
