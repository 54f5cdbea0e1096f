"""Every failure a client can see, in one JSON shape the OpenAI SDK reads.

    RouterError                      {"error": {"code", "type", "message", ...}}
     ├── ModelRequired          400  MODEL_REQUIRED
     ├── InvalidRequest         400  INVALID_JSON, INVALID_BODY (malformed or non-object body, nested
     │                               too deep), ENDPOINT_NOT_SUPPORTED (e.g. chat with an embedding
     │                               model), LIMIT_EXCEEDED (max_tokens or n over a key's or the
     │                               global limit), INVALID_HTTP (not an HTTP request)
     ├── Unauthorized           401  UNAUTHORIZED (missing or wrong API key; + WWW-Authenticate)
     ├── Forbidden              403  FORBIDDEN (model not allowed for the key; client key on admin route)
     ├── NotFound               404  NOT_FOUND (no such route)
     ├── ModelNotFound          404  MODEL_NOT_FOUND (+ available_models, install_endpoint)
     ├── MethodNotAllowed       405  METHOD_NOT_ALLOWED (+ Allow)
     ├── Conflict               409  MODEL_BUSY (an admin action that needs an idle, ready engine)
     │    └── NotSleepable           SLEEP_NOT_ENABLED (an admin sleep of a model not launched for it)
     ├── RequestTimeout         408  REQUEST_TIMEOUT (a request head or body came too slowly)
     ├── PayloadTooLarge        413  REQUEST_TOO_LARGE
     ├── HeadersTooLarge        431  HEADERS_TOO_LARGE (MAX_HEADER_BYTES, MAX_HEADERS)
     ├── FormatNotSupported     422  FORMAT_NOT_SUPPORTED
     ├── InvalidConfig          400  INVALID_CONFIG (a reload found models.yaml invalid; + problems)
     ├── GpuOverloaded          429  GPU_OVERLOADED (+ Retry-After)
     ├── QueueFull              429  QUEUE_FULL (too many requests wait for one engine's start; + Retry-After)
     ├── RateLimited            429  RATE_LIMITED (a key's per-minute or concurrency limit; + Retry-After)
     ├── BackendError           4xx/502  BACKEND_ERROR (the engine refused or failed the request;
     │                               its status if 4xx, 502 for its 5xx; its message kept)
     ├── BackendUnavailable     502  BACKEND_UNAVAILABLE (connection to the engine failed or broke),
     │    └── ResponseTooLarge       RESPONSE_TOO_LARGE (an answer over MAX_RESPONSE_BODY_BYTES)
     ├── ModelUnavailable       503  MODEL_UNAVAILABLE (start failed, backing off, draining, or wrong mode)
     ├── ShuttingDown           503  SHUTTING_DOWN (a stream cut off when the shutdown grace ran out)
     ├── TooManyConnections     503  TOO_MANY_CONNECTIONS (MAX_CONNECTIONS are open; + Retry-After)
     └── BackendTimeout         504  BACKEND_TIMEOUT

Lifecycle and HTTP-client exceptions are translated into these once, where
they are caught (the proxy and the selection step), with `raise ... from`.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

INSTALL_ENDPOINT = "/v1/models/install"


class RouterError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.extra = extra

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> dict[str, Any]:
        error = {"code": self.code, "type": self.type, "message": self.message, **self.extra}
        return {"error": error}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def sse_event(self) -> bytes:
        """The error as one SSE event, for a stream that has already begun."""
        return b"event: error\ndata: " + self.json_bytes() + b"\n\n"


class ModelRequired(RouterError):
    status, code, type = 400, "MODEL_REQUIRED", "invalid_request_error"


class InvalidRequest(RouterError):
    status, code, type = 400, "INVALID_BODY", "invalid_request_error"


class InvalidJson(InvalidRequest):
    code = "INVALID_JSON"


class EndpointNotSupported(InvalidRequest):
    code = "ENDPOINT_NOT_SUPPORTED"


class ParameterNotSupported(InvalidRequest):
    code = "PARAMETER_NOT_SUPPORTED"


class LimitExceeded(InvalidRequest):
    code = "LIMIT_EXCEEDED"


class InvalidHttp(InvalidRequest):
    code = "INVALID_HTTP"


class InvalidHeader(InvalidRequest):
    code = "INVALID_HEADER"


class Unauthorized(RouterError):
    status, code, type = 401, "UNAUTHORIZED", "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(RouterError):
    status, code, type = 403, "FORBIDDEN", "permission_error"


class RateLimited(RouterError):
    status, code, type = 429, "RATE_LIMITED", "rate_limit_error"


class NotFound(RouterError):
    status, code, type = 404, "NOT_FOUND", "invalid_request_error"


class ModelNotFound(RouterError):
    status, code, type = 404, "MODEL_NOT_FOUND", "invalid_request_error"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"Model '{model}' is not registered",
            available_models=available,
            install_endpoint=INSTALL_ENDPOINT,
        )


class MethodNotAllowed(RouterError):
    status, code, type = 405, "METHOD_NOT_ALLOWED", "invalid_request_error"

    def __init__(self, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}


class Conflict(RouterError):
    status, code, type = 409, "MODEL_BUSY", "invalid_request_error"


class NotSleepable(Conflict):
    code = "SLEEP_NOT_ENABLED"


class RequestTimeout(RouterError):
    status, code, type = 408, "REQUEST_TIMEOUT", "invalid_request_error"


class HeadersTooLarge(RouterError):
    status, code, type = 431, "HEADERS_TOO_LARGE", "invalid_request_error"


class PayloadTooLarge(RouterError):
    status, code, type = 413, "REQUEST_TOO_LARGE", "invalid_request_error"


class FormatNotSupported(RouterError):
    status, code, type = 422, "FORMAT_NOT_SUPPORTED", "invalid_request_error"


class GpuOverloaded(RouterError):
    status, code, type = 429, "GPU_OVERLOADED", "rate_limit_error"


class BackendUnavailable(RouterError):
    status, code, type = 502, "BACKEND_UNAVAILABLE", "api_error"


class ResponseTooLarge(BackendUnavailable):
    code = "RESPONSE_TOO_LARGE"


class BackendError(RouterError):
    """The engine answered with an error: its status (5xx become 502), its message, and its
    own code when that is a string (e.g. llama.cpp's `context_length_exceeded`)."""

    code, type = "BACKEND_ERROR", "api_error"

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.status = status if 400 <= status < 500 else 502  # type: ignore[misc]
        if code:
            self.code = code  # type: ignore[misc]
        if status < 500:
            self.type = "invalid_request_error"  # type: ignore[misc]


class BackendConnectFailed(BackendUnavailable):
    """The engine refused the connection: it never saw the request, so a retry is safe."""


class ModelUnavailable(RouterError):
    status, code, type = 503, "MODEL_UNAVAILABLE", "api_error"


class QueueFull(RouterError):
    status, code, type = 429, "QUEUE_FULL", "rate_limit_error"


class ShuttingDown(RouterError):
    status, code, type = 503, "SHUTTING_DOWN", "api_error"


class TooManyConnections(RouterError):
    status, code, type = 503, "TOO_MANY_CONNECTIONS", "api_error"


class InvalidConfig(RouterError):
    status, code, type = 400, "INVALID_CONFIG", "invalid_request_error"


class BackendTimeout(RouterError):
    status, code, type = 504, "BACKEND_TIMEOUT", "timeout_error"
