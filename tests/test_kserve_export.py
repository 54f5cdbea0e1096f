"""`python main.py export kserve`: manifests for the GPU models, valid against KServe's CRD
(vendored in config/kserve/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import ROOT

CRD = ROOT / "config" / "kserve" / "serving.kserve.io_llminferenceservices.yaml"
MODELS = {
    "models": [
        {"name": "Qwen_Coder", "backend": "sglang", "model_path": "Qwen/Qwen2.5-Coder-7B-Instruct",
         "replicas": {"min": 2, "max": 4}, "tensor_parallel_size": 2, "args": ["--context-length", "8192"],
         "env": {"HF_HOME": "/models/hf"}, "idle_timeout": 600},
        {"name": "llama", "backend": "vllm", "model_path": "/models/llama", "gpu_id": [0, 1],
         "served_model_name": "llama-3"},
        {"name": "tiny-cpu", "backend": "llamacpp", "model_path": "/models/tiny.gguf"},
    ]
}  # fmt: skip


def validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2")
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def export(tmp_path: Path, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump(doc))
    out = tmp_path / "kserve.yaml"
    env = {"MODELS_CONFIG_PATH": str(config), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "main.py", "export", "kserve", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


def test_export_kserve_writes_valid_manifests_for_the_gpu_models(tmp_path: Path) -> None:
    done = export(tmp_path, MODELS)
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all((tmp_path / "kserve.yaml").read_text()))
    assert [d["metadata"]["name"] for d in docs] == ["qwen-coder", "llama"], "GPU models only"
    check = validator()
    for doc in docs:
        errors = [e.message for e in check.iter_errors(doc)]
        assert not errors, errors
        assert doc["apiVersion"] == "serving.kserve.io/v1alpha2" and doc["kind"] == "LLMInferenceService"
    qwen, llama = docs
    assert qwen["spec"]["model"] == {"uri": "hf://Qwen/Qwen2.5-Coder-7B-Instruct", "name": "Qwen_Coder"}
    assert qwen["spec"]["replicas"] == 2 and qwen["spec"]["parallelism"] == {"tensor": 2}
    main = qwen["spec"]["template"]["containers"][0]
    assert main["args"] == ["--context-length", "8192"] and main["env"] == [
        {"name": "HF_HOME", "value": "/models/hf"}
    ]
    assert main["resources"]["limits"] == {"nvidia.com/gpu": "2"} and "sglang" in main["image"]
    assert llama["spec"]["model"] == {"uri": "/models/llama", "name": "llama-3"}
    assert (
        llama["spec"]["parallelism"] == {"tensor": 2}
        and "image" not in llama["spec"]["template"]["containers"][0]
    )


def test_the_schema_check_can_fail() -> None:
    """The vendored schema is really applied: a manifest KServe would refuse is refused."""
    bad = {"apiVersion": "serving.kserve.io/v1alpha2", "kind": "LLMInferenceService",
           "metadata": {"name": "x"}, "spec": {"model": {"name": "no-uri"}, "replicas": "two"}}  # fmt: skip
    messages = [e.message for e in validator().iter_errors(bad)]
    assert any("'uri' is a required property" in m for m in messages), messages
    assert any("'two' is not of type 'integer'" in m for m in messages), messages


@pytest.mark.parametrize("args", [["export"], ["export", "kubernetes"], ["export", "kserve", "--to", "x"]])
def test_export_usage(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "usage: python main.py export kserve" in done.stderr
