"""Entry point: settings -> registry -> engine manager -> app -> uvicorn.

`python main.py` serves config/models.yaml (or MODELS_CONFIG_PATH) on
ROUTER_HOST:ROUTER_PORT. SIGTERM/SIGINT stop the server, then every engine
process group; a bad models.yaml stops the daemon before it binds, exit 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from api.app import create_app
from api.auth import Authenticator
from api.connections import ClientLimits, ConnectionTable, connection_cap
from api.context import AppContext
from api.metrics import Metrics
from api.request_log import configure_logging
from api.server import HttpProtocol
from backends.kserve import dump, kserve_manifests
from config.environment import engine_base_env
from config.keys import load_keys
from config.models import ConfigError, load_registry
from config.settings import Settings, resolve_execution_mode
from lifecycle.gpus import nvml_gpu_count
from lifecycle.manager import EngineManager
from lifecycle.ray_cluster import RayUnavailable

log = logging.getLogger("unified_inference")


def build(settings: Settings) -> AppContext:
    registry = load_registry(settings.models_config_path)
    for warning in registry.warnings():
        log.warning("%s: %s", registry.source, warning)
    mode = resolve_execution_mode(settings.execution_mode, nvml_gpu_count())
    metrics = Metrics()
    manager = EngineManager(registry, settings, engine_base_env(), events=metrics)
    try:
        manager.connect_cluster()  # only when a model is placed on Ray
    except RayUnavailable as exc:
        raise ConfigError(registry.source, [f"cluster: {exc}"]) from exc
    manager.may_start = lambda spec: (
        spec.name not in manager.registry.disabled and not (mode == "cpu" and spec.execution_mode == "gpu")
    )
    metrics.watch(manager)
    admin_key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    keys = load_keys(settings.api_keys.get_secret_value(), settings.api_keys_file, admin_key)
    if not keys.enforced:
        log.warning(
            "no API keys are configured (API_KEYS, API_KEYS_FILE): anyone who can reach %s:%d may use "
            "every model", settings.router_host, settings.router_port,
        )  # fmt: skip
    if keys.admin_sha256 is None:
        log.warning("ADMIN_API_KEY is not set: admin routes answer only requests from loopback")
    auth = Authenticator(keys, max_tokens=settings.max_tokens_limit, max_n=settings.max_n_limit)
    return AppContext(settings=settings, manager=manager, execution_mode=mode, metrics=metrics, auth=auth)


def client_limits(settings: Settings) -> ClientLimits:
    return ClientLimits(
        max_connections=connection_cap(settings.max_connections),
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        keep_alive=settings.client_keep_alive_timeout,
        header_timeout=settings.client_header_timeout,
        body_timeout=settings.client_body_timeout,
        write_timeout=settings.client_write_timeout,
    )


def export(args: list[str]) -> int:
    """`python main.py export kserve [--out FILE]`: KServe manifests of the GPU models."""
    if args[:1] != ["kserve"] or len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--out"):
        print("usage: python main.py export kserve [--out FILE]", file=sys.stderr)
        return 2
    settings = Settings()
    try:
        registry = load_registry(settings.models_config_path)
    except ConfigError as exc:
        print(f"unified-inference: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    manifests = kserve_manifests(registry)
    names = [m["metadata"]["name"] for m in manifests]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        print(f"unified-inference: models map to the same Kubernetes name: {clashes}", file=sys.stderr)
        return 2
    text = dump(manifests)
    if len(args) == 3:
        Path(args[2]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export(argv[1:])
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        ctx = build(settings)
    except ConfigError as exc:
        print(f"unified-inference: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    log.info(
        "serving %d model(s) from %s in %s mode on %s:%d",
        len(ctx.registry.models),
        ctx.registry.source,
        ctx.execution_mode,
        settings.router_host,
        settings.router_port,
    )
    for spec in ctx.registry.models.values():
        what = f": {spec.description}" if spec.description else ""
        log.info("model %s: %s on %s (%s), %s%s", spec.name, spec.type, spec.backend, spec.execution_mode,
                 spec.model_path, what)  # fmt: skip
    config = uvicorn.Config(
        create_app(ctx),
        host=settings.router_host,
        port=settings.router_port,
        log_level=settings.log_level,
        # uvicorn's httptools protocol, one write per response, and the client limits.
        http=HttpProtocol.bind(ConnectionTable(client_limits(settings))),
        ws="none",
        proxy_headers=False,  # applied by the Dispatcher to control routes only
        log_config=None,  # uvicorn's loggers go through ours (request IDs, JSON)
        access_log=False,  # replaced by our access log, which carries the request ID
        # SIGTERM: stop accepting, give requests in flight this long, then stop the engines.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_period)),
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
