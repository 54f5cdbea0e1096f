"""Request IDs and the daemon's log format.

Every request carries an ID: the client's `X-Request-ID` if it sent a sane
one, else a new one. It is returned to the client, passed to the engine, and
— through a context variable that a logging filter reads — put on every log
line written while that request runs, engine start-up lines included.
`LOG_FORMAT=json` writes one JSON object per line.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time
from collections.abc import Mapping
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
access_log = logging.getLogger("unified_inference.access")
MAX_ID_LENGTH = 128

# IDs need to be unique, not secret: a random per-process prefix and a counter
# (uuid4 costs a getrandom() system call per request on the hot path).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def request_id_from(headers: Mapping[bytes, bytes]) -> str:
    """The client's X-Request-ID if sane, else a new one. `headers`: dict(scope["headers"])."""
    value = headers.get(b"x-request-id")
    if value:
        text = value.decode("latin-1")
        if len(text) <= MAX_ID_LENGTH and text.isascii() and text.isprintable():
            return text
    return new_request_id()


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
