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
    assert main["args"][-2:] == ["--context-length", "8192"] and main["env"] == [
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


def _options(argv: list[str]) -> dict[str, str]:
    """`--flag value` pairs (the exported lines spell every flag with its value apart)."""
    flags = [i for i, a in enumerate(argv) if a.startswith("--")]
    return {argv[i]: argv[i + 1] for i in flags}


def test_each_manifest_runs_its_engine_on_the_model_kserve_mounts_at_the_port_it_probes(
    tmp_path: Path,
) -> None:
    """Issue 25, defect 11: the SGLang container ran `python -m sglang.launch_server` with the
    model's own args only: no --model-path, no --port (and SGLang listens on loopback unless
    told). KServe's strategic merge replaces a container's command and args with the ones given,
    so each manifest must carry the whole line. (tests/contract/ parses these same lines with
    the real engines' parsers.)"""
    assert export(tmp_path, MODELS).returncode == 0
    qwen, llama = yaml.safe_load_all((tmp_path / "kserve.yaml").read_text())
    sglang = qwen["spec"]["template"]["containers"][0]
    assert sglang["command"] == ["python", "-m", "sglang.launch_server"]
    assert _options(sglang["args"]) == {
        "--model-path": "/mnt/models", "--served-model-name": "Qwen_Coder", "--port": "8000",
        "--host": "0.0.0.0", "--tp-size": "2", "--context-length": "8192",
    }  # fmt: skip
    vllm = llama["spec"]["template"]["containers"][0]
    assert vllm["command"] == ["vllm", "serve"] and vllm["args"][0] == "/mnt/models"
    assert _options(vllm["args"]) == {
        "--served-model-name": "llama-3", "--port": "8000", "--host": "0.0.0.0",
        "--tensor-parallel-size": "2",
    }  # fmt: skip


def test_a_manifest_keeps_what_the_models_type_and_format_need(tmp_path: Path) -> None:
    """Found by the review of issue 25: the export dropped --is-embedding, --runner pooling and
    --quantization awq, which the daemon's own launch passes: an exported SGLang embedding model
    would have been served as a generating one. It now takes the daemon's launch line, less what
    only the daemon needs (key, memory share, sleep, its in-flight bound)."""
    doc = {"models": [
        {"name": "emb", "backend": "sglang", "model_path": "org/emb", "type": "embedding",
         "gpu_memory": 0.3, "on_idle": "sleep"},
        {"name": "rr", "backend": "vllm", "model_path": "org/rr", "type": "reranker"},
        {"name": "q", "backend": "vllm", "model_path": "org/q", "format": "awq", "on_idle": "sleep"},
    ]}  # fmt: skip
    assert export(tmp_path, doc).returncode == 0
    emb, rr, q = (d["spec"]["template"]["containers"][0]["args"]
                  for d in yaml.safe_load_all((tmp_path / "kserve.yaml").read_text()))  # fmt: skip
    assert "--is-embedding" in emb and "--runner" in rr and _options(rr)["--runner"] == "pooling"
    assert _options(q)["--quantization"] == "awq"
    daemons_own = {"--mem-fraction-static", "--gpu-memory-utilization", "--enable-memory-saver",
                   "--enable-sleep-mode", "--api-key", "--max-running-requests", "--uds"}  # fmt: skip
    for args in (emb, rr, q):
        assert not daemons_own & set(args)
