"""llama.cpp through llama-cpp-python's server (see ENGINES.md)."""

from __future__ import annotations

import sys

from backends.base import LaunchContext, LaunchSpec, SleepRoutes, engine_env
from config.models import ModelSpec

DEFAULT_COMMAND = (sys.executable, "-m", "llama_cpp.server")


class LlamaCppBackend:
    name = "llamacpp"
    # No /health route, and the model loads before the port opens, so any
    # answer means ready; /openapi.json takes no lock (a generation holds one).
    readiness_path = "/openapi.json"
    liveness_path = "/openapi.json"
    unix_socket = False  # no such option in its server
    sleep_routes: SleepRoutes | None = None  # llama-cpp-python's server cannot free its memory

    def launch(self, spec: ModelSpec, ctx: LaunchContext) -> LaunchSpec:
        argv = [*(ctx.command or DEFAULT_COMMAND)]
        argv += ["--model", ctx.model_path, "--model_alias", spec.served_name]
        argv += ["--host", ctx.host, "--port", str(ctx.port)]
        # With the default (true) any new request, even GET /v1/models,
        # cuts off the stream in progress.
        argv += ["--interrupt_requests", "false"]
        if spec.type == "embedding":
            argv += ["--embedding", "true"]
        argv += spec.args
        env = engine_env(spec, ctx)
        if ctx.api_key:  # its settings read API_KEY from the environment
            env["API_KEY"] = ctx.api_key
        return LaunchSpec(argv=tuple(argv), env=env)  # uvicorn's 5 s keep-alive: it takes no setting
