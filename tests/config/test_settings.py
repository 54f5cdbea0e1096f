from __future__ import annotations

import pytest

from config.environment import engine_base_env
from config.settings import DEFAULT_MODELS_CONFIG, Settings, resolve_execution_mode


def test_spec_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("EXECUTION_MODE", "ROUTER_PORT", "MODELS_CONFIG_PATH", "SGLANG_MAX_TOTAL_TOKENS"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert (s.execution_mode, s.router_host, s.router_port) == ("auto", "0.0.0.0", 3001)
    assert (s.sglang_max_running_requests, s.sglang_max_total_tokens) == (3, 0)
    assert s.models_config_path == DEFAULT_MODELS_CONFIG
    assert (s.default_idle_timeout, s.health_check_interval, s.startup_timeout) == (300, 10, 120)
    assert (s.enable_cpu_offload, s.offload_queue_threshold) == (True, 3)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECUTION_MODE", "cpu")
    monkeypatch.setenv("ENABLE_CPU_OFFLOAD", "false")
    monkeypatch.setenv("OFFLOAD_QUEUE_THRESHOLD", "7")
    s = Settings()
    assert (s.execution_mode, s.enable_cpu_offload, s.offload_queue_threshold) == ("cpu", False, 7)


def test_auto_mode_follows_the_gpu_count() -> None:
    assert resolve_execution_mode("auto", 0) == "cpu"
    assert resolve_execution_mode("auto", 2) == "gpu"
    assert resolve_execution_mode("gpu", 0) == "gpu"
    assert resolve_execution_mode("cpu", 8) == "cpu"


def test_engine_env_drops_variables_engines_would_misread() -> None:
    env = engine_base_env(
        {
            "PATH": "/bin",
            "HOST": "0.0.0.0",
            "PORT": "1",
            "MODEL": "x",
            "API_KEY": "k",
            "HF_TOKEN": "t",
            "ROUTER_PORT": "3001",
        }
    )
    assert env == {"PATH": "/bin", "HF_TOKEN": "t"}


def test_engine_commands_are_split_like_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_COMMAND", "/opt/sglang/bin/python -m sglang.launch_server")
    s = Settings()
    assert s.engine_command("sglang") == ("/opt/sglang/bin/python", "-m", "sglang.launch_server")
    assert s.engine_command("vllm") is None
