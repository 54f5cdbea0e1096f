"""On daemon start: the engines a previous daemon left on the Ray cluster.

Host actors are detached: they outlive a daemon that died without stopping them (SIGKILL, a
crash; a daemon stopped with SIGTERM stops its Ray engines itself). A new daemon finds them by
name in its namespace: an engine whose model entry is unchanged (the fingerprint it was
started with, lifecycle/ray_placement.py) and still running is taken over as it is — same
process, same port, no restart; every other one is stopped (its actor killed, and with it the
engine's process group).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from lifecycle.engine import Engine
from lifecycle.ray_cluster import RayCluster
from lifecycle.ray_placement import fingerprint

log = logging.getLogger(__name__)
INFO_TIMEOUT = 10.0


async def reconcile(cluster: RayCluster, engines: Mapping[str, Engine]) -> tuple[list[str], list[str]]:
    """Re-attach or stop every host actor in the namespace; (re-attached, stopped) engine keys."""
    kept, stopped = [], []
    for key in await asyncio.to_thread(cluster.hosts):
        actor = cluster.host(key)
        if actor is None:
            continue
        engine = engines.get(key)
        why = "its model is no longer in the registry"
        if engine is not None and engine.spec.placement == "ray":
            try:
                info = await asyncio.wait_for(_info(actor), INFO_TIMEOUT)
            except Exception as exc:  # an actor that cannot answer is stopped
                info, why = None, f"its host does not answer ({exc})"
            if info is not None:
                if info["fingerprint"] != fingerprint(engine.spec, engine.override):
                    why = "its model entry changed"
                elif info["pid"] is None or info["exit_code"] is not None:
                    why = "its engine is not running"
                else:
                    engine.reattach(actor, info)
                    kept.append(key)
                    continue
        log.info("stopping the Ray engine '%s' a previous daemon left: %s", key, why)
        cluster.kill(actor)
        stopped.append(key)
    return kept, stopped


async def _info(actor: object) -> dict[str, object]:
    return dict(await actor.info.remote())  # type: ignore[attr-defined]
