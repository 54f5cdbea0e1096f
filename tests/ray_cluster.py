"""A fake Ray cluster for tests: a head and two nodes with declared GPUs, on this machine.

`ray.cluster_utils.Cluster` runs real raylets (one per node), each with its own resources:
Ray schedules actors by them and sets CUDA_VISIBLE_DEVICES from the declared GPUs, though
no GPU exists. Token auth is on, and Ray writes under the test's own directory.

    head     num_cpus 1, no GPU,  resources {head: 1}
    node-a   num_cpus 1, 2 GPUs,  resources {node_a: 1, fast_link: 1}
    node-b   num_cpus 1, 1 GPU,   resources {node_b: 1}
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

NODES: list[dict[str, Any]] = [
    {"num_cpus": 1, "num_gpus": 2, "resources": {"node_a": 1, "fast_link": 1}},
    {"num_cpus": 1, "num_gpus": 1, "resources": {"node_b": 1}},
]
TOTAL_GPUS = sum(n["num_gpus"] for n in NODES)


@dataclass
class FakeCluster:
    address: str
    env: dict[str, str]  # what a daemon needs to join it (token included)
    node_ids: list[str]  # head, node-a, node-b
    ray: Any = None  # the ray.cluster_utils.Cluster, for tests that add and remove nodes


@contextmanager
def fake_cluster(tmp: Path) -> Iterator[FakeCluster]:
    env = {
        "RAY_TMPDIR": str(tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(24),
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before Ray is imported: it reads its auth mode once
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "resources": {"head": 1}, "include_dashboard": False},
    )
    try:
        nodes = [cluster.head_node] + [cluster.add_node(**node) for node in NODES]
        cluster.wait_for_nodes()
        yield FakeCluster(
            cluster.address, {**env, "RAY_ADDRESS": cluster.address}, [n.node_id for n in nodes], cluster
        )
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def is_ray_process(p: psutil.Process) -> bool:
    """Ray's own processes (raylets, GCS, workers), which outlive a test by design; never an
    engine a worker spawned."""
    try:
        line = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "fake_engine.py" not in line and ("ray::" in line or "/ray/" in line or "raylet" in line)


def engine_processes() -> list[psutil.Process]:
    """Every fake engine process (and its children) on this machine: every node's."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "fake_engine.py" in line or "time.sleep(3600)" in line:  # an engine, or a child of one
            out.append(p)
    return out
