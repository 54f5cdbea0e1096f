"""SGLang: `python -m sglang.launch_server --model-path ...` (see ENGINES.md)."""

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

DEFAULT_COMMAND = (sys.executable, "-m", "sglang.launch_server")


class SGLangBackend:
    name = "sglang"
    # /health runs a one-token generation and answers 503 until warm-up ends.
    readiness_path = "/health"
    liveness_path = "/health"
    # With --enable-memory-saver; the routes exist without it too, but then free nothing
    # (a no-op memory saver). Their body is a ReleaseMemoryOccupationReqInput: {} = all.
    unix_socket = False  # no such option in its server
    sleep_routes: SleepRoutes | None = SleepRoutes(
        "/release_memory_occupation", "/resume_memory_occupation", {}
    )

    def launch(self, spec: ModelSpec, ctx: LaunchContext) -> LaunchSpec:
        argv = [*(ctx.command or DEFAULT_COMMAND)]
        argv += ["--model-path", ctx.model_path, "--host", ctx.host, "--port", str(ctx.port)]
        argv += ["--served-model-name", spec.served_name]
        if ctx.sglang_max_running_requests is not None:
            argv += ["--max-running-requests", str(ctx.sglang_max_running_requests)]
        # 0 = elastic: any value given caps the KV pool, and 0 would fail start-up.
        if ctx.sglang_max_total_tokens > 0:
            argv += ["--max-total-tokens", str(ctx.sglang_max_total_tokens)]
        if spec.format == "awq":
            argv += ["--quantization", "awq"]
        if spec.type in ("embedding", "reranker"):
            argv += ["--is-embedding"]
        argv += gpu_flags(spec, ctx, "--tp-size", "--mem-fraction-static", "--enable-memory-saver")
        if ctx.api_key:  # SGLang takes it only as a flag; the daemon redacts it from logs
            argv += ["--api-key", ctx.api_key]
        argv += spec.args
        env = engine_env(spec, ctx)
        keep_alive = ask_keep_alive(env, "SGLANG_TIMEOUT_KEEP_ALIVE")
        return LaunchSpec(argv=tuple(argv), env=env, keep_alive=keep_alive)
