"""`python main.py export kserve`: the GPU models of models.yaml as KServe manifests.

For Kubernetes users who want the same models served by KServe's `LLMInferenceService`
(serving.kserve.io/v1alpha2, the vendored CRD in config/kserve/). One manifest per GPU
model (SGLang or vLLM on a GPU), as a multi-document YAML stream:

- `metadata.name`: the model's name, made a DNS-1123 label; `spec.model.uri`: a hub id
  becomes `hf://<id>`, any other path is kept (point it at a PVC or bucket: `pvc://`, `s3://`);
  `spec.model.name`: the served name.
- `spec.replicas`: `replicas` (its `min` for a range, at least 1); `spec.parallelism.tensor`:
  `tensor_parallel_size`, or the number of GPUs in `gpu_id`.
- `spec.template.containers[0]` ("main"): the engine's image for SGLang (vLLM is KServe's
  default runtime, configured by its well-known LLMInferenceServiceConfig), the whole command
  line, the model's `env`, and `nvidia.com/gpu` limits for its GPUs.

The command line is complete in the manifest: KServe merges `template` over its well-known
config with a strategic merge, where a container's `command` and `args` given here replace
the config's (lists of strings are not merged). It is the line the daemon's own launch code
builds (backends/), for the model where KServe's storage initializer puts it (MODEL_DIR), on
the port its config's probes use (PORT), on every interface, over its GPUs (tensor
parallelism) — the model's type, format and own `args` included — without what only the
daemon's way of running it needs: a launch key, memory shares, sleep support, a socket, the
daemon's in-flight bound.

What does not carry over (KServe has no equivalent): start on first request and idle stop
(`idle_timeout`, `on_idle: sleep`), CPU spill (`cpu_offload_model`), GPU memory shares
(`gpu_memory`), admission queues and priorities, aliases and splits, and CPU models.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from backends.base import LaunchContext
from backends.registry import backend_for
from config.models import ModelSpec, Registry

API_VERSION = "serving.kserve.io/v1alpha2"
SGLANG_IMAGE = "lmsysorg/sglang:latest"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts spec.model.uri
PORT = 8000  # the port of KServe's LLM configs: their containerPort and probes
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def k8s_name(name: str) -> str:
    """A DNS-1123 label: lower case alphanumerics and '-', at most 63, alphanumeric ends."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return out or "model"


def model_uri(path: str) -> str:
    if "://" in path:
        return path
    return f"hf://{path}" if HUB_ID.match(path) else path


def manifest(spec: ModelSpec) -> dict[str, Any]:
    tensor = spec.tensor_parallel_size or max(1, len(spec.gpu_ids))
    container: dict[str, Any] = {
        "name": "main",
        "resources": {"limits": {"nvidia.com/gpu": str(tensor)}, "requests": {"nvidia.com/gpu": str(tensor)}},
    }
    if spec.backend == "sglang":
        container["image"] = SGLANG_IMAGE
    container["command"], container["args"] = command_line(spec, tensor)
    if spec.env:
        container["env"] = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    low, _ = spec.replica_range
    body: dict[str, Any] = {
        "model": {"uri": model_uri(spec.model_path), "name": spec.served_name},
        "replicas": max(1, low),
        "template": {"containers": [container]},
    }
    if tensor > 1:
        body["parallelism"] = {"tensor": tensor}
    return {
        "apiVersion": API_VERSION,
        "kind": "LLMInferenceService",
        "metadata": {
            "name": k8s_name(spec.name),
            "labels": {"app.kubernetes.io/managed-by": "unified-inference"},
            "annotations": {"unified-inference/model": spec.name, "unified-inference/backend": spec.backend},
        },
        "spec": body,
    }


COMMANDS = {"sglang": ("python", "-m", "sglang.launch_server"), "vllm": ("vllm", "serve")}


def command_line(spec: ModelSpec, tensor: int) -> tuple[list[str], list[str]]:
    """The container's command and args: the daemon's launch line, as KServe runs it."""
    kserved = spec.model_copy(update={"gpu_memory": None, "on_idle": "stop", "gpu_id": None})
    command = COMMANDS[spec.backend]
    ctx = LaunchContext(
        port=PORT, host="0.0.0.0", model_path=MODEL_DIR, base_env={}, command=command,
        gpu_ids=tuple(range(tensor)), sglang_max_running_requests=None,
    )  # fmt: skip
    argv = backend_for(spec.backend).launch(kserved, ctx).argv
    return list(command), list(argv[len(command) :])


def kserve_manifests(registry: Registry) -> list[dict[str, Any]]:
    """A manifest per GPU model (SGLang or vLLM on a GPU) that is not disabled."""
    return [
        manifest(spec) for spec in registry.models.values()
        if spec.gpu_managed and spec.name not in registry.disabled
    ]  # fmt: skip


def dump(manifests: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False)
