"""Every engine route and environment variable the daemon depends on, in one table.

Built from what the daemon actually uses — each backend's readiness and liveness
paths and sleep routes, and the OpenAI routes of `capabilities.ROUTES` — so it
cannot drift from the code. The contract tests (tests/contract/) check every row
against the real vLLM and SGLang packages (their route tables and environment
tables) and against llama-cpp-python; the README's "Engine contract" section is
`markdown()` verbatim (tests/test_readme.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from backends.capabilities import ROUTES, SERVED_TYPES
from backends.registry import backend_for

BACKENDS = ("vllm", "sglang", "llamacpp")
ALL_TYPES = frozenset({"llm", "embedding", "reranker"})


@dataclass(frozen=True)
class RouteUse:
    backend: str
    method: str
    path: str
    use: str
    condition: str = ""  # how the engine must be launched for the route to exist
    types: frozenset[str] = ALL_TYPES  # the model types it is used for


@dataclass(frozen=True)
class EnvUse:
    backend: str
    name: str
    use: str


# Launch conditions of the sleep routes (README "GPU sharing").
SLEEP_CONDITION = {
    "vllm": "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1",
    "sglang": "--enable-memory-saver (the route exists without it, and frees nothing)",
}

ENV: tuple[EnvUse, ...] = (
    EnvUse("vllm", "VLLM_API_KEY", "the launch key (an environment is private, a command line is not)"),
    EnvUse("vllm", "VLLM_SERVER_DEV_MODE", "attaches /sleep and /wake_up (on_idle: sleep)"),
    EnvUse("vllm", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "keeps the daemon's pooled connections open 75 s"),
    EnvUse("sglang", "SGLANG_TIMEOUT_KEEP_ALIVE", "keeps the daemon's pooled connections open 75 s"),
    EnvUse("llamacpp", "API_KEY", "the launch key (read by its settings)"),
)


def routes(backend: str) -> list[RouteUse]:
    """The routes of `backend` the daemon calls or proxies, with the method it uses."""
    b = backend_for(backend)
    found = [RouteUse(backend, "GET", b.readiness_path, "readiness, polled during start")]
    if b.liveness_path != b.readiness_path:
        found.append(RouteUse(backend, "GET", b.liveness_path, "liveness, polled while ready"))
    else:
        found[0] = RouteUse(backend, "GET", b.readiness_path, "readiness during start, liveness while ready")
    for daemon_path, route in ROUTES[backend].items():
        found.append(
            RouteUse(backend, "POST", route.path, f"serves {daemon_path}", types=SERVED_TYPES[daemon_path])
        )
    if b.sleep_routes is not None:
        condition = SLEEP_CONDITION[backend]
        found.append(RouteUse(backend, "POST", urlsplit(b.sleep_routes.sleep).path, "sleep", condition))
        found.append(RouteUse(backend, "POST", urlsplit(b.sleep_routes.wake).path, "wake", condition))
    return found


def env(backend: str) -> list[EnvUse]:
    return [e for e in ENV if e.backend == backend]


def markdown() -> str:
    """The README's table: one row per route or variable."""
    lines = [
        "| engine | what | method and path, or variable | used for | exists when |",
        "|---|---|---|---|---|",
    ]
    for backend in BACKENDS:
        for r in routes(backend):
            lines.append(
                f"| {backend} | route | `{r.method} {r.path}` | {r.use} | {r.condition or 'always'} |"
            )
        for e in env(backend):
            lines.append(f"| {backend} | environment | `{e.name}` | {e.use} | read at start |")
    return "\n".join(lines) + "\n"
