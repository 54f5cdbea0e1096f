"""The environment an engine inherits from the daemon.

Engines start with a clean environment: llama-cpp-python's server, for one,
reads `HOST`, `PORT`, `MODEL` and `API_KEY` from the environment and lets
them override its command line. Only the variables below pass through; a
model's `env` in models.yaml adds anything else it needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PASSED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "VIRTUAL_ENV",
        "XDG_CACHE_HOME",
        "CUDA_HOME",
        "CUDA_PATH",
        "NVIDIA_DRIVER_CAPABILITIES",
    }
)
# Hub credentials and caches, NCCL/Torch tuning, vLLM's own switches.
PASSED_PREFIXES = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_", "NCCL_", "TORCH_", "VLLM_")


def engine_base_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of `source` (the daemon's environment by default)."""
    env = os.environ if source is None else source
    return {
        key: value for key, value in env.items() if key in PASSED_NAMES or key.startswith(PASSED_PREFIXES)
    }
