"""Contract tests run only in an interpreter where their engine's package is installed.

The GPU engines cannot share the daemon's environment (their torch pins differ): `.ci/run`
makes one virtual environment per engine from requirements-gpu.txt and runs
`tests/contract/` with each; a file whose engine is absent is not collected there. The
llama.cpp contract runs in the main suite, where llama-cpp-python is installed.
"""

from __future__ import annotations

import importlib.util

ENGINE_OF = {"test_vllm.py": "vllm", "test_sglang.py": "sglang", "test_llamacpp.py": "llama_cpp"}

collect_ignore = [name for name, package in ENGINE_OF.items() if importlib.util.find_spec(package) is None]
