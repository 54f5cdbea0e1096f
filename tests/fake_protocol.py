"""What the fake engine accepts, and how it refuses, in each engine's dialect.

Read from the pinned sources; the daemon depends on each of these:

- Request fields are pydantic models with `extra="allow"` (vLLM's
  OpenAIBaseModel; SGLang and llama-cpp-python ignore unknown fields), so
  numbers arrive through pydantic's lax parsing: `"40"`, `40.0` and `True`
  are integers, `"false"` is a boolean.
- How many tokens a request asks for:
  - vLLM 0.33.0 (`chat_completion/protocol.py` build_tok_params): chat takes
    `max_completion_tokens` when it is not None, else `max_tokens`;
    completions have `max_tokens` only (default 16). Below 1: 400.
  - SGLang 0.5.23 (`openai/protocol.py`): chat takes
    `max_completion_tokens or max_tokens`; completions `max_tokens` (default
    16, "max_tokens must be positive").
  - llama-cpp-python 0.3.36 (`server/types.py`, `llama.py`): `max_tokens` only
    (`max_completion_tokens` is ignored); None or <= 0 means "until the
    context is full" (here: FAKE_TOKENS).
- Streams: vLLM and SGLang send a last chunk with `"choices": []` and the
  `usage` when `stream_options.include_usage` is true (vLLM refuses
  `stream_options` without `stream`); SGLang's chunks carry `"usage": null`
  otherwise. llama-cpp-python has no `stream_options` and no usage in streams.
- Refusals: vLLM `400 {"error": {"message", "type", "param", "code": 400}}`;
  SGLang `400 {"object": "error", "message", "type": "Bad Request", "param",
  "code": 400}`; llama-cpp-python (FastAPI's default) `422 {"detail": [...]}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONTEXT = 4096  # the most tokens a request may ask for


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class Generation(_Lenient):
    model: str | None = None
    max_tokens: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    stop: str | list[str] | None = None


class Completion(Generation):
    prompt: str | list[str] | list[int] | list[list[int]] = ""


class Message(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None


class Chat(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class Responses(_Lenient):
    model: str | None = None
    input: str | list[Any]
    max_output_tokens: int | None = None
    stream: bool = False


class Embedding(_Lenient):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"  # vLLM answers base64 when asked; SGLang, llama.cpp ignore it


class Rerank(_Lenient):
    model: str | None = None
    query: str = ""
    documents: list[str]


class Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def refusal(dialect: str, message: str, errors: list[dict[str, Any]] | None = None) -> Refused:
    if dialect == "vllm":
        return Refused(
            400, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
        )
    if dialect == "sglang":
        return Refused(
            400, {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}
        )
    detail = errors or [{"type": "value_error", "loc": ["body"], "msg": message}]
    return Refused(422, {"detail": detail})


def parse(dialect: str, model: type[BaseModel], body: Any) -> Any:
    """The request as the engine reads it, or Refused in its dialect."""
    if not isinstance(body, dict):
        raise refusal(dialect, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise refusal(dialect, str(exc)[:2000], errors) from exc


def tokens_asked(dialect: str, request: Generation, default: int) -> int:
    """How many tokens the engine will generate for `request` (Refused if it would not run)."""
    if dialect == "llamacpp":
        asked = request.max_tokens
        if asked is None or asked <= 0:
            return min(default, CONTEXT)  # "until the context is full"
        return min(asked, CONTEXT)
    if request.stream_options is not None and not request.stream and dialect == "vllm":
        raise refusal(dialect, "Stream options can only be defined when `stream=True`.")
    if isinstance(request, Chat) and dialect == "vllm":
        asked = request.max_completion_tokens
        asked = request.max_tokens if asked is None else asked
    elif isinstance(request, Chat):
        asked = request.max_completion_tokens or request.max_tokens
    else:
        asked = request.max_tokens
    if asked is None:
        return min(default, CONTEXT)
    if asked < 1:
        raise refusal(dialect, "max_tokens must be at least 1")
    if asked > CONTEXT:
        raise refusal(dialect, f"max_tokens is {asked}; this model's context is {CONTEXT} tokens")
    return asked


def include_usage(dialect: str, request: Generation) -> bool:
    options = request.stream_options
    return dialect != "llamacpp" and options is not None and bool(options.include_usage)


def prompt_tokens(request: BaseModel) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word (at least 1)."""
    if isinstance(request, Completion):
        prompt = request.prompt
        if isinstance(prompt, str):
            return max(1, len(prompt.split()))
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        return max(1, sum(len(p) if isinstance(p, list) else len(str(p).split()) for p in prompt))
    if isinstance(request, Chat):
        words = 0
        for m in request.messages:
            parts = m.content if isinstance(m.content, list) else []
            text = (
                m.content if isinstance(m.content, str) else " ".join(str(p.get("text", "")) for p in parts)
            )
            words += len(text.split()) + 1
        return max(1, words)
    if isinstance(request, Responses):
        return max(1, len(str(request.input).split()))
    return 1
