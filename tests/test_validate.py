"""POST /v1/models/validate against a real daemon: each problem with its code, no engine
started, and the same answer as the real request then gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.helpers import Daemon, fake_model, registry_doc

OPEN = "validate-open-key-000000000001"
NARROW = "validate-narrow-key-0000000001"
KEYS = {"keys": [{"key": OPEN, "name": "open", "max_tokens": 50, "max_n": 2},
                 {"key": NARROW, "name": "narrow", "models": ["emb"]}]}  # fmt: skip
DOC = {
    **registry_doc(
        fake_model("chat-v1"), fake_model("emb", type="embedding"),
        fake_model("llama", backend="llamacpp", execution_mode="cpu"), fake_model("bad", format="gguf"),
    ),
    "aliases": {"chat": "chat-v1"},
}  # fmt: skip
CASES: list[tuple[str, str, dict[str, Any], str | None]] = [
    # (key, path, body, the code expected; None: valid)
    (OPEN, "/v1/completions", {"model": "chat", "prompt": "hi", "max_tokens": 2}, None),
    (OPEN, "/v1/completions", {"model": "nope", "prompt": "hi"}, "MODEL_NOT_FOUND"),
    (OPEN, "/v1/completions", {"model": "emb", "prompt": "hi"}, "ENDPOINT_NOT_SUPPORTED"),
    (NARROW, "/v1/completions", {"model": "chat-v1", "prompt": "hi", "max_tokens": 2}, "FORBIDDEN"),
    (OPEN, "/v1/completions", {"model": "chat-v1", "prompt": "hi", "max_tokens": 500}, "LIMIT_EXCEEDED"),
    (
        OPEN,
        "/v1/completions",
        {"model": "llama", "prompt": "hi", "max_tokens": 2, "n": 2},
        "PARAMETER_NOT_SUPPORTED",
    ),
    (OPEN, "/v1/completions", {"model": "bad", "prompt": "hi"}, "FORMAT_NOT_SUPPORTED"),
    (OPEN, "/v1/completions", {"prompt": "hi"}, "MODEL_REQUIRED"),
]


def test_validate_reports_each_problem_starts_nothing_and_agrees_with_the_real_request(
    daemon_for: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    daemon: Daemon = daemon_for(DOC, API_KEYS_FILE=str(keys)).start()
    with daemon.client() as c:
        answers = []
        for key, path, body, code in CASES:
            resp = c.post("/v1/models/validate", json={"path": path, "body": body},
                          headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            answers.append(answer)
            codes = [p["code"] for p in answer["problems"]]
            assert answer["valid"] is (code is None) and (codes[:1] == [code] if code else codes == []), (
                answer
            )
        assert answers[0]["resolved"] == "chat-v1" and answers[0]["model"] == "chat"
        status = c.get("/v1/status", headers={"Authorization": f"Bearer {OPEN}"}).json()
        states = {m["name"]: m["state"] for m in status["models"]}
        assert set(states.values()) == {"stopped", "disabled"}, "validate starts no engine"

        for (key, path, body, code), answer in zip(CASES, answers, strict=True):
            real = c.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
            if code is None:
                assert real.status_code == 200, real.text
            else:
                assert real.json()["error"]["code"] == code, (body, real.text)
                assert real.status_code == answer["problems"][0]["status"]
        bad_path = c.post("/v1/models/validate", json={"path": "/v1/nope", "body": {}},
                          headers={"Authorization": f"Bearer {OPEN}"}).json()  # fmt: skip
        assert not bad_path["valid"] and bad_path["problems"][0]["code"] == "INVALID_BODY"
        assert c.post("/v1/models/validate", json={"path": "/v1/completions", "body": {}}).status_code == 401
        # Issue 25, defect 7: an X-Priority the real request refuses was `valid: true`.
        body = {"model": "chat", "prompt": "hi", "max_tokens": 2}
        urgent = {"Authorization": f"Bearer {OPEN}", "X-Priority": "urgent"}
        answer = c.post("/v1/models/validate", json={"path": "/v1/completions", "body": body},
                        headers=urgent).json()  # fmt: skip
        assert not answer["valid"] and [p["code"] for p in answer["problems"]] == ["INVALID_HEADER"]
        real = c.post("/v1/completions", json=body, headers=urgent)
        assert real.status_code == 400 and real.json()["error"]["code"] == "INVALID_HEADER"
        low = c.post("/v1/models/validate", json={"path": "/v1/completions", "body": body},
                     headers={**urgent, "X-Priority": "low"}).json()  # fmt: skip
        assert low["valid"] is True
