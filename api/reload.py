"""Reloading models.yaml: validate first, then apply (admin route and SIGHUP)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from api.context import AppContext
from config.models import ConfigError, load_registry
from lifecycle.gpus import gpus_for
from lifecycle.ray_cluster import RayUnavailable
from router.errors import InvalidConfig

log = logging.getLogger(__name__)


def reload_registry(ctx: AppContext) -> dict[str, Any]:
    """Load MODELS_CONFIG_PATH again. A file with any problem changes nothing."""
    try:
        registry = load_registry(ctx.settings.models_config_path)
        gpus = gpus_for(registry)
        try:
            ctx.manager.connect_cluster(registry)  # a first Ray model: join its cluster now
        except RayUnavailable as exc:
            raise ConfigError(registry.source, [f"cluster: {exc}"]) from exc
    except ConfigError as exc:
        log.error("reload refused, nothing changed:\n%s", exc)
        raise InvalidConfig(
            f"{exc.source} is invalid; nothing was changed", problems=[str(p) for p in exc.problems]
        ) from exc
    for warning in registry.warnings():
        log.warning("%s: %s", registry.source, warning)
    report: dict[str, Any] = asdict(ctx.manager.reload(registry, gpus))
    report["split_overrides_reset"] = ctx.aliases.reloaded()  # models.yaml's splits win
    log.info("reloaded %s: %s", registry.source, report)
    return report
