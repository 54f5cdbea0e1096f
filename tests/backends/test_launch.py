from __future__ import annotations

import sys
from typing import Any

from backends.base import LaunchContext
from backends.registry import backend_for
from config.models import ModelSpec


def _spec(**fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "backend": "sglang", "model_path": "org/m", **fields})


def _ctx(**fields: Any) -> LaunchContext:
    values: dict[str, Any] = {"port": 31000, "model_path": "org/m", "base_env": {"PATH": "/bin"}}
    values.update(fields)
    return LaunchContext(**values)


def _flag(argv: tuple[str, ...], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_sglang_elastic_memory_passes_no_max_total_tokens() -> None:
    spec = backend_for("sglang").launch(_spec(gpu_id=1), _ctx())
    assert spec.argv[:3] == (sys.executable, "-m", "sglang.launch_server")
    assert _flag(spec.argv, "--host") == "127.0.0.1"
    assert _flag(spec.argv, "--port") == "31000"
    assert _flag(spec.argv, "--max-running-requests") == "3"
    assert "--max-total-tokens" not in spec.argv
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "1"


def test_sglang_options() -> None:
    spec = backend_for("sglang").launch(
        _spec(format="awq", type="embedding", gpu_id=[0, 1], served_model_name="q", args=["--x", "1"]),
        _ctx(sglang_max_total_tokens=8192, sglang_max_running_requests=5),
    )
    assert _flag(spec.argv, "--max-total-tokens") == "8192"
    assert _flag(spec.argv, "--max-running-requests") == "5"
    assert _flag(spec.argv, "--quantization") == "awq"
    assert _flag(spec.argv, "--tp-size") == "2"
    assert _flag(spec.argv, "--served-model-name") == "q"
    assert "--is-embedding" in spec.argv
    assert spec.argv[-2:] == ("--x", "1")
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_vllm_model_is_positional_and_host_is_loopback() -> None:
    spec = backend_for("vllm").launch(_spec(backend="vllm", type="embedding"), _ctx(api_key="k"))
    assert spec.argv[:5] == (sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "org/m")
    assert _flag(spec.argv, "--host") == "127.0.0.1"
    assert _flag(spec.argv, "--runner") == "pooling"
    assert spec.env["VLLM_API_KEY"] == "k" and "k" not in spec.argv, "keys go by environment, not argv"


def test_launch_keys() -> None:
    sglang = backend_for("sglang").launch(_spec(), _ctx(api_key="secret-k"))
    assert _flag(sglang.argv, "--api-key") == "secret-k"  # SGLang has no other way
    llama = backend_for("llamacpp").launch(_spec(backend="llamacpp"), _ctx(api_key="secret-k"))
    assert llama.env["API_KEY"] == "secret-k" and "secret-k" not in llama.argv


def test_llamacpp_never_interrupts_and_runs_on_cpu() -> None:
    spec = backend_for("llamacpp").launch(
        _spec(backend="llamacpp", model_path="/m.gguf", type="embedding"),
        _ctx(model_path="/m.gguf", base_env={"PATH": "/bin"}),
    )
    assert spec.argv[:3] == (sys.executable, "-m", "llama_cpp.server")
    assert _flag(spec.argv, "--model") == "/m.gguf"
    assert _flag(spec.argv, "--interrupt_requests") == "false"
    assert _flag(spec.argv, "--embedding") == "true"
    assert _flag(spec.argv, "--host") == "127.0.0.1"
    assert spec.env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": ""}


def test_override_command_and_env_layering() -> None:
    spec = backend_for("sglang").launch(
        _spec(env={"A": "model"}),
        _ctx(command=("my-sglang",), override_env={"A": "override", "B": "override"}),
    )
    assert spec.argv[0] == "my-sglang" and spec.argv[1] == "--model-path"
    assert spec.env["A"] == "model" and spec.env["B"] == "override"


def test_engines_are_asked_to_keep_idle_connections_and_say_for_how_long() -> None:
    sglang = backend_for("sglang").launch(_spec(), _ctx())
    assert sglang.env["SGLANG_TIMEOUT_KEEP_ALIVE"] == "75" and sglang.keep_alive == 75
    vllm = backend_for("vllm").launch(_spec(backend="vllm"), _ctx())
    assert vllm.env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "75" and vllm.keep_alive == 75
    llama = backend_for("llamacpp").launch(_spec(backend="llamacpp", model_path="/m.gguf"), _ctx())
    assert llama.keep_alive == 5  # uvicorn's default; llama-cpp-python takes no setting
    own = backend_for("sglang").launch(_spec(env={"SGLANG_TIMEOUT_KEEP_ALIVE": "20"}), _ctx())
    assert own.env["SGLANG_TIMEOUT_KEEP_ALIVE"] == "20" and own.keep_alive == 20  # the model's env wins
