"""Property-based fuzzing of every route of a live daemon: no 5xx, no crash, one error shape."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Daemon, fake_model, registry_doc

ROUTES = [
    "/health", "/v1/models", "/v1/status", "/v1/models/install",
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/rerank", "/v1/score",
    "/v1/admin/models/{}/start", "/v1/admin/models/{}/stop", "/v1/admin/reload",
]  # fmt: skip
MODELS = ["llm", "emb", "rr", "nope", "", "../etc", "llm\x00", "ü"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
openai_like = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS) | json_values},
    optional={
        k: json_values for k in ("prompt", "messages", "input", "documents", "max_tokens", "stream", "n")
    },
).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    openai_like,
    st.just(b"[" * 5000 + b"]" * 5000),
    st.just(b'{"model": "llm", "prompt": "\\ud800"}'),
)
queries = st.dictionaries(
    st.sampled_from(["model", "force", "timeout", "tail", "x"]),
    st.sampled_from(MODELS) | st.text(max_size=10) | st.sampled_from(["-1", "1e309", "nan", "true", "0"]),
    max_size=3,
)
requests = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    st.sampled_from(ROUTES),
    st.sampled_from(MODELS) | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12),
    queries,
    bodies,
    st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
)


def test_no_route_answers_5xx_to_any_input(daemon_for: Any) -> None:
    doc = registry_doc(
        fake_model("llm", backend="llamacpp"),
        fake_model("emb", backend="llamacpp", type="embedding"),
        fake_model("rr", type="reranker"),
    )
    daemon: Daemon = daemon_for(doc).start()
    seen: set[int] = set()
    with httpx.Client(base_url=daemon.url, timeout=30) as client:

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
        @given(requests)
        def check(request: tuple[str, str, str, dict[str, str], bytes, str]) -> None:
            method, route, name, params, body, content_type = request
            path = route.format(quote(name, safe="")) if "{}" in route else route
            headers = {"content-type": content_type} if content_type else {}
            resp = client.request(method, path, params=params, content=body, headers=headers)
            seen.add(resp.status_code)
            assert resp.status_code < 500, (method, path, params, body[:200], resp.text[:500])
            if resp.status_code >= 400:
                error = resp.json()["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str), resp.text

        check()
        assert client.get("/health").status_code == 200
    assert {200, 400, 404, 405} <= seen, f"the fuzzer reached too few outcomes: {seen}"
