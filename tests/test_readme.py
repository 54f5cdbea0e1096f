"""The README's API examples, run as written against a daemon on the shipped registry."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import DEFAULT_MODELS_CONFIG
from tests.helpers import ROOT, Daemon

pytestmark = pytest.mark.slow

API = (ROOT / "README.md").read_text().split("## API\n", 1)[1].split("\n## ", 1)[0]
CURLS = [b for b in re.findall(r"```bash\n(.*?)```", API, re.DOTALL) if b.startswith("curl ")]
PYTHON = re.findall(r"```python\n(.*?)```", API, re.DOTALL)


def test_the_readme_carries_the_engine_contract_table() -> None:
    from backends.contract import markdown

    assert markdown() in (ROOT / "README.md").read_text()


def test_the_readme_has_the_examples() -> None:
    assert len(CURLS) == 4 and len(PYTHON) == 1


def test_readme_examples_work_as_written(daemon_for: Any, tmp_path: Path) -> None:
    doc = yaml.safe_load(Path(DEFAULT_MODELS_CONFIG).read_text())
    daemon: Daemon = daemon_for(doc, EXECUTION_MODE="auto").start()

    def here(text: str) -> str:
        return text.replace("http://localhost:3001", daemon.url)

    text, stream, embed, chat = (
        subprocess.run(["bash", "-c", here(c)], capture_output=True, text=True, timeout=120) for c in CURLS
    )
    assert json.loads(text.stdout)["choices"][0]["text"]
    assert json.loads(chat.stdout)["choices"][0]["message"]["content"] is not None
    assert stream.stdout.count("data: {") >= 2 and "data: [DONE]" in stream.stdout
    assert len(json.loads(embed.stdout)["data"]) == 2

    script = tmp_path / "example.py"
    script.write_text(here(PYTHON[0]))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("2 vectors of 640 floats")
