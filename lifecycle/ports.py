"""Free loopback ports for engines whose models.yaml entry names none."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    # The kernel picks an unused port; another process could take it before
    # the engine binds, in which case the engine exits and the start fails
    # with its own "address in use" line.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
