"""The daemon's private directory for its engines' Unix sockets (docs/engine-security.md).

Made on first use with mkdtemp (mode 0700, so only the daemon's user can reach a socket in it),
in TMPDIR or else /tmp, and removed at shutdown. It is made anew when it has gone (an age-based
/tmp cleaner) or is no longer the daemon's own and private. A socket's path must fit in
AF_UNIX's 108 bytes: where no directory short enough can be made, engines listen on loopback
ports as before, and the daemon says so once.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "unified-inference-"
MAX_PATH = 107  # sun_path is 108 bytes with its terminating NUL
NAME = len("0123456789ab.sock")  # a socket's file name (lifecycle/placement.py)


class SocketDir:
    def __init__(self, bases: tuple[str, ...] | None = None) -> None:
        self._bases = bases
        self._path: Path | None = None
        self._made: list[Path] = []
        self._warned = False

    def path(self) -> Path | None:
        """The directory to put a new socket in; None: use a port."""
        if self._path is not None and _private(self._path):
            return self._path
        for base in self._bases or (tempfile.gettempdir(), "/tmp"):
            if len(os.path.join(base, PREFIX + "x" * 8, "x" * NAME)) > MAX_PATH:
                continue
            try:
                self._path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
            except OSError:
                continue
            self._made.append(self._path)
            return self._path
        if not self._warned:
            self._warned = True
            log.warning(
                "no directory short enough for a Unix socket could be made (TMPDIR %s): local "
                "vLLM engines listen on loopback ports, where other local users can reach the "
                "routes vLLM leaves open (docs/engine-security.md)", tempfile.gettempdir(),
            )  # fmt: skip
        return None

    def remove(self) -> None:
        for made in self._made:
            shutil.rmtree(made, ignore_errors=True)
        self._made.clear()
        self._path = None


def _private(path: Path) -> bool:
    """Still there, a directory of this user's that no one else may enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
