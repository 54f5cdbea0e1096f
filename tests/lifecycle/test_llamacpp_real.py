"""The real llama.cpp engine on the shipped Gemma 3 270M entry of config/models.yaml."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from config.environment import engine_base_env
from config.models import load_registry
from config.settings import DEFAULT_MODELS_CONFIG, Settings
from lifecycle.manager import EngineManager
from lifecycle.state import EngineState
from tests.helpers import pid_alive

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_default_gemma_model_starts_and_generates(settings_for: Callable[..., Settings]) -> None:
    manager = EngineManager(load_registry(DEFAULT_MODELS_CONFIG), settings_for(), engine_base_env())
    await manager.start()
    try:
        engine = manager.get("gemma-3-270m")
        assert engine is not None
        url = await engine.ensure_ready()
        pid = engine.pid
        body = {
            "model": "gemma-3-270m",
            "prompt": "The capital of France is",
            "max_tokens": 8,
            "temperature": 0,
        }
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            refused = await client.post("/v1/completions", json=body)
            assert refused.status_code == 401, "the engine refuses anyone without its launch key"
            headers = {"Authorization": f"Bearer {engine.api_key}"}
            resp = await client.post("/v1/completions", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        answer: dict[str, Any] = resp.json()
        assert answer["usage"]["completion_tokens"] > 0
        assert answer["choices"][0]["text"].strip()
    finally:
        await manager.shutdown()
    assert engine.state is EngineState.STOPPED
    assert pid is not None and not pid_alive(pid)
