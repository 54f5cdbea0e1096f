"""What can be checked of the Dockerfile and the README without a Docker engine."""

from __future__ import annotations

import re
import shlex

from tests.helpers import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^{name}\s+(.+)$", DOCKERFILE, re.MULTILINE)]


def test_every_copied_path_exists() -> None:
    copies = _instructions("COPY")
    assert copies
    for line in copies:
        *sources, _dest = shlex.split(line)
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def test_command_runs_the_copied_entry_point() -> None:
    (cmd,) = _instructions("CMD")
    assert cmd == '["python", "main.py"]'
    assert any(line.startswith("main.py ") for line in _instructions("COPY"))
    assert _instructions("WORKDIR") == ["/opt/unified-inference"], "code must not live under /app/config"


def test_default_config_path_matches_the_spec_mount() -> None:
    assert "MODELS_CONFIG_PATH=/app/config/models.yaml" in DOCKERFILE
    assert "config/models.yaml /app/config/models.yaml" in _instructions("COPY")


def test_gpu_engine_constraints_file_pins_both_engines() -> None:
    pins = (ROOT / "requirements-gpu.txt").read_text()
    assert re.search(r"^sglang\[all\]==", pins, re.MULTILINE)
    assert re.search(r"^vllm==", pins, re.MULTILINE)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in readme and "python -m pytest" in ci
    assert "pip install -r requirements-dev.txt" in readme
