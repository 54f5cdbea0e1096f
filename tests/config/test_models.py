from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from config.models import ConfigError, load_registry, parse_registry

SRC = Path("conf/models.yaml")


def _problems(doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_registry(doc, SRC)
    assert str(info.value).startswith(f"{SRC}: ")
    return info.value.problems


def _m(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "backend": "sglang", "model_path": "org/m", **fields}


def test_defaults_follow_the_backend() -> None:
    cpu = {"name": "c", "backend": "llamacpp", "model_path": "x.gguf"}
    reg = parse_registry({"models": [_m("g"), cpu]}, SRC)
    assert (reg.models["g"].execution_mode, reg.models["g"].format) == ("gpu", "hf")
    assert (reg.models["c"].execution_mode, reg.models["c"].format) == ("cpu", "gguf")
    assert reg.models["g"].served_name == "g"


def test_unknown_key_names_model_and_field() -> None:
    assert _problems({"models": [_m("a"), _m("b", colour="red")]}) == ["models[1] 'b': colour: unknown field"]


def test_unknown_top_level_key() -> None:
    assert _problems({"models": [], "modles": []}) == ["modles: unknown field"]


def test_duplicate_names_and_ports_are_all_reported() -> None:
    problems = _problems({"models": [_m("a", port=30001), _m("a", port=30002), _m("c", port=30001)]})
    assert problems == [
        "models[1] 'a': name: duplicate of models[0]",
        "models[2] 'c': port: 30001 is also used by models[0] 'a'",
    ]


def test_offload_model_must_name_a_cpu_model() -> None:
    assert _problems({"models": [_m("a", cpu_offload_model="nope")]}) == [
        "models[0] 'a': cpu_offload_model: 'nope' is not a model in this file"
    ]
    assert _problems({"models": [_m("a", cpu_offload_model="b"), _m("b")]}) == [
        "models[0] 'a': cpu_offload_model: 'b' is not a CPU model (execution_mode: gpu)"
    ]


def test_gpu_backend_on_cpu_and_managed_flags_are_refused() -> None:
    problems = _problems({"models": [_m("a", execution_mode="cpu", args=["--port", "1"])]})
    assert problems == [
        "models[0] 'a': execution_mode: backend 'sglang' cannot run on cpu",
        "models[0] 'a': args: --port is set by the daemon",
    ]


def test_bad_value_types_are_named() -> None:
    problems = _problems({"models": [_m("a", port="high")]})
    assert len(problems) == 1 and problems[0].startswith("models[0] 'a': port: ")


def test_format_the_backend_cannot_run_disables_the_model() -> None:
    reg = parse_registry({"models": [_m("gg", format="gguf"), _m("ok")]}, SRC)
    assert list(reg.disabled) == ["gg"]
    assert "format 'gguf' is not supported by backend 'sglang'" in reg.disabled["gg"]


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_registry(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_registry(bad)


def test_shipped_models_yaml_is_valid() -> None:
    reg = load_registry(Path(__file__).resolve().parents[2] / "config" / "models.yaml")
    assert reg.models["gemma-3-270m"].backend == "llamacpp"
    assert reg.models["gemma-3-270m-embed"].type == "embedding"
    assert reg.disabled == {}


def test_request_defaults_are_checked() -> None:
    reg = parse_registry({"models": [_m("a", defaults={"max_tokens": 64, "temperature": 0.2})]}, SRC)
    assert reg.models["a"].defaults == {"max_tokens": 64, "temperature": 0.2}
    for bad in ({"max_tokens": 0}, {"max_tokens": "64"}, {"max_completion_tokens": 8}):
        (problem,) = _problems({"models": [_m("a", defaults=bad)]})
        assert problem.startswith("models[0] 'a': defaults:"), problem
    shipped = load_registry(Path(__file__).resolve().parents[2] / "config" / "models.yaml")
    assert shipped.models["gemma-3-270m"].defaults["max_tokens"] == 256  # a CPU engine's bound
