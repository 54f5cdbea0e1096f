"""Where an engine listens, as a URL: `http://host:port`, or an engine on a Unix socket.

An engine on a Unix socket is `http+unix://<the socket's path, percent-encoded>`, so that
`base_url + path` works for both; the data plane keys its pooled connections to it by
(path, UNIX). Standard library only: the engine contracts import it beside the engines.
"""

from __future__ import annotations

import urllib.parse

UNIX = 0  # the "port" of an engine on a Unix socket (its "host" is then the socket's path)
UNIX_SCHEME = "http+unix"


def unix_url(path: str) -> str:
    """The base URL of an engine serving on the Unix socket `path`."""
    return f"{UNIX_SCHEME}://{urllib.parse.quote(path, safe='')}"


def split_unix(url: str) -> tuple[str, str] | None:
    """For an `http+unix` URL, the socket's path and the rest (path and query); else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != UNIX_SCHEME:
        return None
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return urllib.parse.unquote(parts.netloc), rest or "/"
