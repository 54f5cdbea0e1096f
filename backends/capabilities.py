"""What each engine kind can run: formats, devices, model types.

A leaf module (no project imports) so that config validation can use it.
"""

from __future__ import annotations

from typing import Literal

BackendName = Literal["sglang", "vllm", "llamacpp"]
ModelFormat = Literal["hf", "awq", "gguf"]
ModelType = Literal["llm", "embedding", "reranker"]
Device = Literal["gpu", "cpu"]

SUPPORTED_FORMATS: dict[str, frozenset[str]] = {
    # GGUF is not supported by SGLang (spec); vLLM's GGUF path is experimental
    # and single-file only, so we do not offer it.
    "sglang": frozenset({"hf", "awq"}),
    "vllm": frozenset({"hf", "awq"}),
    "llamacpp": frozenset({"gguf"}),
}

SUPPORTED_DEVICES: dict[str, frozenset[str]] = {
    "sglang": frozenset({"gpu"}),
    "vllm": frozenset({"gpu"}),
    # llama.cpp runs on the CPU, or offloads layers to a GPU with --n_gpu_layers.
    "llamacpp": frozenset({"cpu", "gpu"}),
}

# llama-cpp-python's server has no rerank endpoint.
SUPPORTED_TYPES: dict[str, frozenset[str]] = {
    "sglang": frozenset({"llm", "embedding", "reranker"}),
    "vllm": frozenset({"llm", "embedding", "reranker"}),
    "llamacpp": frozenset({"llm", "embedding"}),
}

DEFAULT_DEVICE: dict[str, Device] = {"sglang": "gpu", "vllm": "gpu", "llamacpp": "cpu"}
DEFAULT_FORMAT: dict[str, ModelFormat] = {"sglang": "hf", "vllm": "hf", "llamacpp": "gguf"}

# Flags the daemon owns: a model's `args` may not set them.
MANAGED_FLAGS = frozenset(
    {"--host", "--port", "--api-key", "--api_key", "--model", "--model-path", "--served-model-name"}
)


def format_problem(backend: str, fmt: str) -> str | None:
    """Why `backend` cannot run `fmt`, or None if it can."""
    allowed = SUPPORTED_FORMATS[backend]
    if fmt in allowed:
        return None
    return f"format '{fmt}' is not supported by backend '{backend}' (supported: {', '.join(sorted(allowed))})"
