"""Backend lookup by the `backend:` name of a model entry."""

from __future__ import annotations

from backends.base import Backend
from backends.llamacpp import LlamaCppBackend
from backends.sglang import SGLangBackend
from backends.vllm import VLLMBackend

_BACKENDS: dict[str, Backend] = {
    "sglang": SGLangBackend(),
    "vllm": VLLMBackend(),
    "llamacpp": LlamaCppBackend(),
}


def backend_for(name: str) -> Backend:
    return _BACKENDS[name]
