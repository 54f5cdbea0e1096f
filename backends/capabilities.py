"""What each engine kind can run (formats, devices, model types) and what it serves
and understands of the OpenAI API.

A leaf module (no project imports) so that config validation can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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

# The engines whose GPU memory the daemon budgets (a share of the card) and can put to sleep.
GPU_BACKENDS = frozenset({"sglang", "vllm"})

# Flags the daemon owns: a model's `args` may not set them. The memory share comes
# from `gpu_memory`, sleep support from `on_idle: sleep`.
MANAGED_FLAGS = frozenset(
    {"--host", "--port", "--api-key", "--api_key", "--model", "--model-path", "--served-model-name",
     "--mem-fraction-static", "--gpu-memory-utilization", "--enable-sleep-mode", "--enable-memory-saver"}
)  # fmt: skip


def format_problem(backend: str, fmt: str) -> str | None:
    """Why `backend` cannot run `fmt`, or None if it can."""
    allowed = SUPPORTED_FORMATS[backend]
    if fmt in allowed:
        return None
    return f"format '{fmt}' is not supported by backend '{backend}' (supported: {', '.join(sorted(allowed))})"


# ---------------------------------------------------------------- the OpenAI API
#
# What each engine serves and understands of the OpenAI API (one table, no I/O).
#
# Read from the engines' sources: llama-cpp-python 0.3.36 (`server/app.py`,
# `server/types.py`), vLLM 0.33.0 (`entrypoints/openai/*/protocol.py`, `api_server.py`),
# SGLang 0.5.23 (`srt/entrypoints/openai/protocol.py`, `http_server.py`).
#
# For each backend: the daemon's routes it serves, at which path of its own, and per
# route what must be adapted. Engines parse requests with pydantic and ignore fields
# they do not know, so a field an engine lacks would be dropped without a word:
# - `max_completion_tokens` (what current clients send for chat) is read only by
#   vLLM's and SGLang's chat routes; elsewhere it becomes `max_tokens` (the smaller
#   of the two when both are given), or the engine would generate to its context's end.
# - What an engine cannot honour and would ignore at a cost to the answer is refused
#   with `400 PARAMETER_NOT_SUPPORTED`, naming the engine: llama.cpp returns one choice
#   (`n`, `best_of`), one prompt per request, no usage in streams, no `response_format`
#   on completions and no `dimensions` for embeddings.
# - `encoding_format: base64` (the openai SDK's default for embeddings) is translated for
#   llama.cpp and SGLang, which always answer floats: the daemon encodes them.
# The same table decides which routes a model's engine serves (`400
# ENDPOINT_NOT_SUPPORTED` otherwise) and which engines cannot cancel a non-streaming
# request when its client leaves.

# The daemon's proxied paths -> the model types that serve them.
SERVED_TYPES: dict[str, frozenset[str]] = {
    "/v1/completions": frozenset({"llm"}),
    "/v1/chat/completions": frozenset({"llm"}),
    "/v1/embeddings": frozenset({"embedding"}),
    "/v1/rerank": frozenset({"reranker"}),
    "/v1/score": frozenset({"reranker"}),
    "/v1/responses": frozenset({"llm"}),
    "/v1/tokenize": frozenset({"llm", "embedding"}),
    "/v1/detokenize": frozenset({"llm", "embedding"}),
}

ENGINE_NAMES = {"llamacpp": "llama.cpp (llama-cpp-python)", "vllm": "vLLM", "sglang": "SGLang"}


def _over_one(value: Any) -> bool:
    try:
        return value is not None and int(value) > 1
    except (TypeError, ValueError):
        return False  # the engine refuses it itself


def _several(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 1 and not all(isinstance(v, int) for v in value)


def _given(value: Any) -> bool:
    return value is not None


def _not_text(value: Any) -> bool:
    return not (isinstance(value, dict) and value.get("type") in (None, "text"))


def _asks_usage(value: Any) -> bool:
    return isinstance(value, dict) and value.get("include_usage") not in (None, False, "false", 0)


@dataclass(frozen=True)
class Refusal:
    field: str
    applies: Callable[[Any], bool]  # given the field's value: the engine cannot honour it
    lacks: str  # what the engine lacks, for the message


@dataclass(frozen=True)
class EngineRoute:
    """One of the daemon's routes as one engine serves it."""

    path: str  # the engine's own path
    # The route generates but ignores max_completion_tokens: it is given as max_tokens.
    lacks_max_completion_tokens: bool = False
    refusals: tuple[Refusal, ...] = ()
    # Embeddings: the engine answers floats whatever `encoding_format` says; the daemon
    # encodes them as base64 when asked (the openai SDK asks by default).
    lacks_base64: bool = False

    @property
    def adapts(self) -> bool:
        """Whether a request may need changing or refusing on its way to this engine."""
        return bool(self.refusals) or self.lacks_max_completion_tokens or self.lacks_base64


_ONE_CHOICE = Refusal("n", _over_one, "returns one choice per request (n must be 1)")
_NO_BEST_OF = Refusal("best_of", _over_one, "has no best_of")
_ONE_PROMPT = Refusal("prompt", _several, "takes one prompt per request")
_NO_DIMENSIONS = Refusal("dimensions", _given, "returns full-size vectors (no dimensions)")
_SGLANG_NO_DIMENSIONS = Refusal("dimensions", _given, "returns full-size vectors (it reads no dimensions)")
_NO_TEXT_FORMAT = Refusal("response_format", _not_text, "has response_format on chat only")
_NO_STREAM_USAGE = Refusal(
    "stream_options", _asks_usage, "sends no usage in streams (stream_options.include_usage)"
)

_OPENAI_COMMON = {
    "/v1/completions": EngineRoute("/v1/completions", lacks_max_completion_tokens=True),
    "/v1/chat/completions": EngineRoute("/v1/chat/completions"),
    "/v1/embeddings": EngineRoute("/v1/embeddings"),
    "/v1/rerank": EngineRoute("/v1/rerank"),
    "/v1/score": EngineRoute("/v1/score"),
    "/v1/responses": EngineRoute("/v1/responses"),
}

ROUTES: dict[str, dict[str, EngineRoute]] = {
    "llamacpp": {
        "/v1/completions": EngineRoute(
            "/v1/completions",
            True,
            (_ONE_CHOICE, _NO_BEST_OF, _ONE_PROMPT, _NO_STREAM_USAGE, _NO_TEXT_FORMAT),
        ),
        "/v1/chat/completions": EngineRoute("/v1/chat/completions", True, (_ONE_CHOICE, _NO_STREAM_USAGE)),
        "/v1/embeddings": EngineRoute("/v1/embeddings", refusals=(_NO_DIMENSIONS,), lacks_base64=True),
        "/v1/tokenize": EngineRoute("/extras/tokenize"),
        "/v1/detokenize": EngineRoute("/extras/detokenize"),
    },
    "vllm": {
        **_OPENAI_COMMON,
        "/v1/tokenize": EngineRoute("/tokenize"),
        "/v1/detokenize": EngineRoute("/detokenize"),
    },
    "sglang": {
        **_OPENAI_COMMON,
        # serving_embedding.py builds every answer of floats and reads no `dimensions`
        "/v1/embeddings": EngineRoute("/v1/embeddings", refusals=(_SGLANG_NO_DIMENSIONS,), lacks_base64=True),
        "/v1/tokenize": EngineRoute("/v1/tokenize"),
        "/v1/detokenize": EngineRoute("/v1/detokenize"),
    },
}

# Engines that send a last usage event in a stream when asked with `stream_options:
# {"include_usage": true}` (the daemon asks, to meter keys): a usage-only chunk
# ("choices": []) from vLLM's chat_completion/serving.py and SGLang's openai/serving_chat.py.
# llama-cpp-python 0.3.36 has no stream_options and no usage in streams.
STREAM_USAGE = frozenset({"sglang", "vllm"})

# Engines that finish a non-streaming generation whatever becomes of its connection
# (llama-cpp-python runs it in a thread it never interrupts); the daemon streams from
# them instead, so that a client that leaves stops the generation.
CANNOT_CANCEL_DOCUMENTS = frozenset({"llamacpp"})
