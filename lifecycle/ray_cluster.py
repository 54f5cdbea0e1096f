"""The daemon's connection to a Ray cluster (models.yaml `cluster:`), for `placement: ray`.

Ray is imported only here, and only when a registry has a `cluster:` section (it is an
optional requirement: requirements-ray.txt). Ray does cluster membership, node health, GPU
bookkeeping and placement; the daemon asks it for one detached, named actor per engine
(lifecycle/ray_host.py's EngineHost) with the engine's resources, and the actor runs the
engine on its node.

- An open Ray port runs anyone's code: the daemon refuses to connect unless token auth is
  configured (RAY_AUTH_MODE=token, with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or Ray's default
  token file), and Ray refuses a driver whose Ray or Python version differs from the
  cluster's (the daemon reports it and exits).
- Actors are named `engine:<engine key>` in the cluster's namespace, so a daemon started
  again after a crash finds the engines of the last one (`hosts()`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from config.cluster import ClusterSpec
from config.models import ModelSpec

log = logging.getLogger(__name__)
PREFIX = "engine:"
PREFLIGHT_TIMEOUT = 5.0  # seconds to open a TCP connection to the cluster's GCS
GCS_TIMEOUT = 10.0  # seconds for it to answer as one (a live GCS does in milliseconds)


class RayUnavailable(Exception):
    """The cluster cannot be used: not installed, no token, unreachable, versions differ."""


def token_configured(env: Mapping[str, str] = os.environ) -> str | None:
    """None when Ray token auth is configured in `env`; otherwise what is missing."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return "RAY_AUTH_MODE=token is not set"
    if env.get("RAY_AUTH_TOKEN"):
        return None
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return None if Path(path).is_file() else f"RAY_AUTH_TOKEN_PATH {path} is not a file"
    if (Path.home() / ".ray" / "auth_token").is_file():
        return None
    return "no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"


def _preflight(address: str) -> None:
    """Say at once, and plainly, what ray.init says after ~20 s as "Failed to connect": that
    nothing answers at `address`, or that the cluster refused this daemon's token. Anything
    else (an address Ray resolves itself, a Ray client URL) is left to ray.init."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PREFLIGHT_TIMEOUT).close()
    except OSError as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # answers at once when reachable
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray: ray.init says what it says
        return
    # In a thread of its own: at an address that accepts connections but is not a GCS (Ray's
    # dashboard port, say) it blocks for ~40 s, and ray.init after it retries for ever.
    answer: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            GcsClient(address=address)
            answer["error"] = None
        except BaseException as exc:  # said below, in the daemon's words
            answer["error"] = exc

    thread = threading.Thread(target=ask, name="ray-preflight", daemon=True)
    thread.start()
    thread.join(GCS_TIMEOUT)
    if "error" not in answer:
        raise RayUnavailable(
            f"{address} accepts connections but did not answer as a Ray cluster's GCS within "
            f"{GCS_TIMEOUT:g}s (cluster.address or RAY_ADDRESS: the head node's GCS port, 6379 by default)"
        )
    error = answer["error"]
    if isinstance(error, AuthenticationError):
        raise RayUnavailable(
            f"the Ray cluster at {address} refused this daemon's token ({_token_source()}): {error}"
        ) from error
    if error is not None:
        raise RayUnavailable(f"{address} does not answer as a Ray cluster's GCS: {error}") from error


def _token_source(env: Mapping[str, str] = os.environ) -> str:
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH {env['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token"


def _where(spec: ClusterSpec) -> tuple[str | None, str]:
    return spec.address, spec.namespace


class RayCluster:
    """Made for every daemon; used (and Ray imported) only once a model is placed on Ray."""

    def __init__(self, spec: ClusterSpec | None) -> None:
        self._spec = spec
        self._ray: Any = None

    @property
    def spec(self) -> ClusterSpec:
        assert self._spec is not None, "no cluster: section (models.yaml validation)"
        return self._spec

    def configure(self, spec: ClusterSpec | None) -> None:
        """A reloaded `cluster:` section; a connected daemon keeps its cluster and namespace."""
        old = self._spec
        moved = (
            spec is not None
            and old is not None
            and (spec.address, spec.namespace) != (old.address, old.namespace)
        )
        if self._ray is not None and moved:
            assert spec is not None and old is not None
            log.warning("cluster: a new address or namespace takes effect when the daemon restarts")
            spec = spec.model_copy(update={"address": old.address, "namespace": old.namespace})
        if spec is not None:
            self._spec = spec

    @property
    def connected(self) -> bool:
        return self._ray is not None

    def connect(self) -> None:
        """Join the cluster as a driver (blocking: done once, at start-up or on the reload that
        adds the first Ray model)."""
        if self._ray is not None:
            return
        missing = token_configured()
        if missing:
            raise RayUnavailable(f"Ray models need Ray token authentication ({missing})")
        try:
            import ray
            from ray import cloudpickle

            import lifecycle.ray_host
        except ImportError as exc:
            raise RayUnavailable(
                f"Ray is not installed (pip install -r requirements-ray.txt): {exc}"
            ) from exc
        cloudpickle.register_pickle_by_value(lifecycle.ray_host)  # type: ignore[no-untyped-call]
        address = self.spec.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise RayUnavailable("no Ray cluster address: set cluster.address or RAY_ADDRESS")
        _preflight(address)
        try:
            ray.init(
                address=address, namespace=self.spec.namespace, logging_level=logging.WARNING,
                log_to_driver=False, configure_logging=False,
            )  # fmt: skip
        except Exception as exc:  # Ray raises plain exceptions: version mismatch, unreachable
            raise RayUnavailable(f"cannot join the Ray cluster at {address}: {exc}") from exc
        self._ray = ray
        log.info("joined the Ray cluster at %s (Ray %s, namespace %s)", address, ray.__version__,
                 self.spec.namespace)  # fmt: skip

    @property
    def ray(self) -> Any:
        assert self._ray is not None, "not connected to the Ray cluster"
        return self._ray

    def create_host(self, key: str, spec: ModelSpec, fingerprint: str, api_key: str) -> Any:
        """A new detached, named EngineHost actor asking for the model's resources (it stays
        pending until a node has them)."""
        ray = self.ray
        from lifecycle.ray_host import EngineHost

        options: dict[str, Any] = {
            "name": PREFIX + key, "namespace": self.spec.namespace, "lifetime": "detached",
            "num_cpus": 0, "max_restarts": 0, "max_concurrency": 64,
            "num_gpus": spec.gpus_per_replica if spec.execution_mode == "gpu" else 0,
        }  # fmt: skip
        if spec.ray_resources:
            options["resources"] = dict(spec.ray_resources)
        if spec.node:
            options["scheduling_strategy"] = self._node_affinity(spec.node)
        return ray.remote(EngineHost).options(**options).remote(fingerprint, api_key)

    def _node_affinity(self, node: str) -> Any:
        """Hard affinity to `node`, a Ray node id or a node's IP."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node_id = node
        for n in self.ray.nodes():
            if n.get("Alive") and node in (n.get("NodeID"), n.get("NodeManagerAddress")):
                node_id = n["NodeID"]
                break
        return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)

    def host(self, key: str) -> Any | None:
        """The running EngineHost of engine `key`, if any."""
        try:
            return self.ray.get_actor(PREFIX + key, namespace=self.spec.namespace)
        except ValueError:
            return None

    def hosts(self) -> list[str]:
        """Engine keys of every EngineHost in the namespace (this daemon's, or a previous one's)."""
        from ray.util import list_named_actors

        names = list_named_actors(all_namespaces=True)
        return [
            a["name"][len(PREFIX):] for a in names
            if a.get("namespace") == self.spec.namespace and a["name"].startswith(PREFIX)
        ]  # fmt: skip

    def kill(self, handle: Any) -> None:
        try:
            self.ray.kill(handle, no_restart=True)
        except Exception as exc:  # already gone
            log.debug("ray.kill: %s", exc)
