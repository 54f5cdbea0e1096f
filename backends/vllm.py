"""vLLM: `vllm serve MODEL ...` (see ENGINES.md)."""

from __future__ import annotations

import sys

from backends.base import (
    LaunchContext,
    LaunchSpec,
    SleepRoutes,
    ask_keep_alive,
    engine_env,
    gpu_flags,
)
from config.models import ModelSpec

# The `vllm` console script is this module; calling it through our own
# interpreter avoids depending on PATH.
DEFAULT_COMMAND = (sys.executable, "-m", "vllm.entrypoints.cli.main", "serve")


class VLLMBackend:
    name = "vllm"
    # /health answers 200 once the model is loaded, 503 only if the engine died.
    readiness_path = "/health"
    liveness_path = "/health"
    # Level 1: weights to CPU memory, KV cache dropped. The routes exist only with
    # VLLM_SERVER_DEV_MODE=1, and work only with --enable-sleep-mode.
    sleep_routes: SleepRoutes | None = SleepRoutes("/sleep?level=1", "/wake_up")
    # `--uds PATH`: its key guards only /v1 (and /v2, /inference, /cohere); /invocations,
    # /tokenize, /pooling and, in dev mode (sleep), /collective_rpc, /update_weights and
    # twenty more answer anyone who can connect. On a socket in the daemon's 0700 directory
    # that is the daemon alone (docs/engine-security.md).
    unix_socket = True

    def launch(self, spec: ModelSpec, ctx: LaunchContext) -> LaunchSpec:
        argv = [*(ctx.command or DEFAULT_COMMAND), ctx.model_path]
        if ctx.uds:  # host and port are then ignored: it serves on the socket alone
            argv += ["--uds", ctx.uds]
        else:  # vLLM binds all interfaces unless told otherwise
            argv += ["--host", ctx.host, "--port", str(ctx.port)]
        argv += ["--served-model-name", spec.served_name]
        if spec.format == "awq":
            argv += ["--quantization", "awq"]
        if spec.type in ("embedding", "reranker"):
            # `--task` is gone; pooling models use the pooling runner.
            argv += ["--runner", "pooling"]
        argv += gpu_flags(
            spec, ctx, "--tensor-parallel-size", "--gpu-memory-utilization", "--enable-sleep-mode"
        )
        argv += spec.args
        env = engine_env(spec, ctx)
        if spec.on_idle == "sleep":
            env["VLLM_SERVER_DEV_MODE"] = "1"  # attaches /sleep and /wake_up (and other dev routes)
        if ctx.api_key:  # by environment: other users can read a command line, not an environment
            env["VLLM_API_KEY"] = ctx.api_key
        keep_alive = ask_keep_alive(env, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE")
        return LaunchSpec(argv=tuple(argv), env=env, keep_alive=keep_alive)
