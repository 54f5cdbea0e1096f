"""What the relay does to an engine's answer: pure functions on its headers and bytes.

- Headers: hop-by-hop ones are dropped, including any the engine names in its
  own `Connection` header (RFC 9110 7.6.1) and `Proxy-Connection`.
- Content encodings: the daemon asks engines for `identity`; one that
  compresses anyway is decoded here (gzip, deflate), because the relay must
  read the answer (the model's name, the usage); others are refused.
- Engine errors: whatever shape the engine uses (vLLM's, SGLang's, FastAPI's
  `detail`, plain text) becomes the daemon's one error shape (BackendError),
  keeping the engine's message.
- Usage and the `model` name are found with byte searches, never by parsing a
  whole document (an answer may be tens of megabytes of embeddings); the one
  parse is for base64 embeddings an engine cannot encode itself.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from router.errors import BackendError, BackendUnavailable, ResponseTooLarge

# Never forwarded: connection-level, or set by the daemon's own server.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"content-encoding",  # what is relayed is always decoded
        b"date",
        b"server",
    }
)
NO_BODY = frozenset({204, 304})
MESSAGE_CHARS = 2000  # of an engine's error text kept in ours


def forwarded_headers(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The engine's headers a client may see (names are lower-case), and the answer's content
    encoding (b"" for none or identity)."""
    kept = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
    index = dict(headers)
    connection = index.get(b"connection")
    if connection:
        named = {token.strip().lower() for token in connection.split(b",")}
        kept = [(k, v) for k, v in kept if k not in named]
    encoding = index.get(b"content-encoding", b"").strip().lower()
    return kept, b"" if encoding == b"identity" else encoding


class Decoder:
    """Undo the answer's content encoding, piece by piece, at most `limit` bytes in all."""

    def __init__(self, encoding: bytes, limit: int) -> None:
        if encoding not in (b"gzip", b"x-gzip", b"deflate"):
            raise BackendUnavailable(
                f"The engine sent an answer in an encoding the daemon cannot read: {encoding!r}"
            )
        # 47: gzip or zlib, told apart by the header; a raw deflate stream is tried on the first error.
        self._inflate = zlib.decompressobj(47)
        self._raw = encoding == b"deflate"
        self._limit = limit
        self._total = 0

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._inflate.decompress(data, self._limit - self._total + 1)
        except zlib.error as exc:
            if not (self._raw and self._total == 0):
                raise BackendUnavailable(f"The engine's compressed answer is broken: {exc}") from exc
            self._raw = False
            self._inflate = zlib.decompressobj(-15)
            return self.feed(data)
        self._total += len(out)
        if self._total > self._limit or self._inflate.unconsumed_tail:
            raise ResponseTooLarge(f"The engine's answer decompresses to over {self._limit} bytes")
        return out


def engine_error(status: int, data: bytes) -> BackendError:
    """An engine's error answer in the daemon's shape."""
    message, code, param = _error_fields(data)
    if not message:
        message = data[:MESSAGE_CHARS].decode("utf-8", "replace").strip() or f"HTTP {status} with no body"
    extra: dict[str, Any] = {"engine_status": status}
    if param is not None:
        extra["param"] = param
    if status in (401, 403, 407):  # the engine refused the daemon's own credentials
        return BackendError(502, f"The engine refused the daemon's request ({status}): {message}", **extra)
    if status >= 500:
        message = f"The engine failed the request ({status}): {message}"
    return BackendError(status, message, code, **extra)


def _error_fields(data: bytes) -> tuple[str, str | None, Any]:
    """(message, string code, param) from vLLM, SGLang, llama.cpp or FastAPI error bodies."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "", None, None
    if not isinstance(doc, dict):
        return "", None, None
    error = doc.get("error")
    fields: dict[str, Any] = error if isinstance(error, dict) else doc  # SGLang: at the top level
    message = fields.get("message")
    if isinstance(error, str):
        message = error
    detail = doc.get("detail")
    if not isinstance(message, str) and detail is not None:  # FastAPI's validation errors
        message = _describe_detail(detail)
    code = fields.get("code")
    text = message if isinstance(message, str) else ""
    return text[:MESSAGE_CHARS], code if isinstance(code, str) and code else None, fields.get("param")


def _describe_detail(detail: Any) -> str:
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail[:5]:
        if isinstance(item, dict):
            where = ".".join(str(p) for p in item.get("loc", []))
            parts.append(f"{where}: {item.get('msg', '')}")
    return "; ".join(parts) or json.dumps(detail)[:MESSAGE_CHARS]


_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


def usage_total(data: bytes) -> int:
    """usage.total_tokens of an answer (0 if none): the last one, found without parsing the
    whole document. A JSON string cannot hold an unescaped `"total_tokens"`, so it is a key."""
    at = data.rfind(b'"total_tokens"')
    if at < 0:
        return 0
    match = _TOTAL_TOKENS.match(data, at)
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class Rename:
    """Rewrites `"model": "<served>"` to `"model": "<requested>"` in answer bytes."""

    pattern: re.Pattern[bytes]
    replacement: bytes

    @classmethod
    def of(cls, served: str, requested: str) -> Rename:
        pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(served).encode()))
        return cls(pattern, rb"\g<1>" + json.dumps(requested).encode().replace(b"\\", b"\\\\"))

    def apply(self, data: bytes) -> bytes:
        return self.pattern.sub(self.replacement, data)


def embeddings_as_base64(data: bytes) -> bytes:
    """An embeddings answer with each vector of floats given as base64 of little-endian
    float32s, as OpenAI sends it for `encoding_format: base64`."""
    doc = orjson.loads(data)
    for item in doc.get("data") or []:
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, list):
            item["embedding"] = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return orjson.dumps(doc)
