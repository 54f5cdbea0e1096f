"""Every way the daemon builds an engine's command line, for the contract tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from backends.base import LaunchContext, LaunchSpec
from backends.registry import backend_for
from config.models import ModelSpec

PORT = 31234
SOCKET = "/tmp/unified-inference-test/0123456789ab.sock"
KEY = "0123456789abcdef" * 3


@dataclass(frozen=True)
class Launch:
    spec: ModelSpec
    ctx: LaunchContext
    launched: LaunchSpec

    @property
    def argv(self) -> list[str]:
        """The engine's own arguments, after the command that runs it."""
        command = len(self.ctx.command) if self.ctx.command else _default_length(self.spec.backend)
        return list(self.launched.argv[command:])

    @property
    def env(self) -> dict[str, str]:
        return dict(self.launched.env)


def _default_length(backend: str) -> int:
    import importlib

    module = importlib.import_module(f"backends.{backend}")
    return len(module.DEFAULT_COMMAND)


def _types(backend: str) -> tuple[str, ...]:
    return ("llm", "embedding") if backend == "llamacpp" else ("llm", "embedding", "reranker")


def launches(backend: str) -> Iterator[Launch]:
    """backend x model type x format x tensor parallel x API key x served name x memory share
    x sleep x a Unix socket (where the engine can serve on one) x the model's own keep-alive:
    every combination the daemon can produce."""
    formats = ("gguf",) if backend == "llamacpp" else ("hf", "awq")
    gpu = backend != "llamacpp"
    sockets = (None, SOCKET) if backend_for(backend).unix_socket else (None,)
    choices = itertools.product(
        _types(backend), formats, ((), (0,), (0, 1)) if gpu else ((),), (None, KEY),
        (None, "served-name"), (None, 0.45) if gpu else (None,), ("stop", "sleep") if gpu else ("stop",),
        sockets,
    )  # fmt: skip
    for kind, fmt, gpus, key, served, share, on_idle, uds in choices:
        entry: dict[str, Any] = {
            "name": "m", "type": kind, "backend": backend, "format": fmt,
            "model_path": "/models/m.gguf" if backend == "llamacpp" else "org/model",
            "served_model_name": served, "gpu_memory": share, "on_idle": on_idle,
        }  # fmt: skip
        if not gpu:
            entry = {k: v for k, v in entry.items() if k not in ("gpu_memory", "on_idle")}
        spec = ModelSpec.model_validate(entry)
        ctx = LaunchContext(
            port=0 if uds else PORT, uds=uds, model_path=spec.model_path, base_env={"PATH": "/usr/bin"},
            api_key=key, gpu_ids=gpus, sglang_max_total_tokens=4096 if key else 0,
        )  # fmt: skip
        yield Launch(spec, ctx, backend_for(backend).launch(spec, ctx))


def flags(argv: list[str]) -> set[str]:
    """The option strings a launch line spells out (an abbreviation argparse would accept
    today could turn ambiguous with the engine's next flag: each must be spelt in full)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("-")}
