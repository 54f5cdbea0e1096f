"""API keys, admin separation, per-key limits, and engines reachable only through the daemon."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from api.auth import Authenticator
from config.keys import digest, load_keys
from config.models import ConfigError
from router.errors import Forbidden, Unauthorized
from tests.helpers import Daemon, engine_request, fake_model, registry_doc

ALICE, BOB, CAROL, ADMIN = (
    "sk-alice-0123456789",
    "sk-bob-0123456789",
    "sk-carol-0123456789",
    "sk-admin-987654321",
)
PLAIN = "sk-plain-0123456789"
KEYS = {
    "keys": [
        {"key": ALICE, "name": "alice", "models": ["cpu"], "requests_per_minute": 20},
        {"key_sha256": digest(BOB), "name": "bob", "tokens_per_minute": 1200},
        {"key": CAROL, "name": "carol", "max_concurrent": 1, "max_tokens": 50},
    ]
}
DOC = registry_doc(
    fake_model("cpu", backend="llamacpp"),
    fake_model("gpu", backend="vllm"),
    fake_model("slow", backend="sglang", env={"FAKE_TOKEN_DELAY": "0.05"}),
)


@pytest.fixture
def daemon(daemon_for: Any, tmp_path: Path) -> Daemon:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(KEYS))
    started: Daemon = daemon_for(
        DOC, API_KEYS=PLAIN, API_KEYS_FILE=str(keys_file), ADMIN_API_KEY=ADMIN, MAX_N_LIMIT="2"
    ).start()
    return started


def _as(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _post(c: httpx.Client, key: str | None, model: str = "cpu", **body: Any) -> httpx.Response:
    return c.post(
        "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2, **body}, headers=_as(key)
    )


def _code(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["code"])


def _served_again(c: httpx.Client, send: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while (resp := send()).status_code == 429:
        assert time.monotonic() - t0 < timeout, "the bucket never refilled"
        time.sleep(0.1)
    assert resp.status_code == 200
    return time.monotonic() - t0


def test_keys_are_required_and_checked(daemon: Daemon) -> None:
    with daemon.client() as c:
        missing = _post(c, None)
        assert missing.status_code == 401 and _code(missing) == "UNAUTHORIZED"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert _code(_post(c, "sk-wrong-0123456789")) == "UNAUTHORIZED"
        assert _post(c, PLAIN).status_code == 200
        for near in (PLAIN[:-1] + "X", PLAIN + "0", PLAIN[:-1]):  # after PLAIN was accepted once
            assert _code(_post(c, near)) == "UNAUTHORIZED"
        assert _post(c, PLAIN).status_code == 200
        alt = c.post("/v1/completions", json={"model": "cpu", "prompt": "x", "max_tokens": 1},
                     headers={"x-api-key": PLAIN})  # fmt: skip
        assert alt.status_code == 200
        assert _post(c, BOB).status_code == 200, "a key given by its SHA-256 in the file works"
        forbidden = _post(c, ALICE, model="gpu")
        assert forbidden.status_code == 403 and _code(forbidden) == "FORBIDDEN"
        assert "alice" in forbidden.json()["error"]["message"] and ALICE not in forbidden.text
        assert c.get("/health").status_code == 200, "health stays open"
        assert c.get("/v1/status").status_code == 401
        assert c.get("/v1/status", headers=_as(PLAIN)).status_code == 200
        assert c.get("/metrics", headers=_as(ADMIN)).status_code == 200


def test_admin_routes_refuse_client_keys(daemon: Daemon) -> None:
    with daemon.client() as c:
        for path in ("/v1/admin/models/cpu/start", "/v1/admin/reload", "/v1/admin/models/cpu/stop"):
            assert c.post(path).status_code == 401
            client = c.post(path, headers=_as(PLAIN))
            assert client.status_code == 403 and _code(client) == "FORBIDDEN"
        assert c.get("/v1/admin/models/cpu/logs", headers=_as(ALICE)).status_code == 403
        assert c.post("/v1/admin/models/cpu/start", headers=_as(ADMIN)).json()["state"] == "ready"
        assert c.get("/v1/admin/models/cpu/logs", headers=_as(ADMIN)).status_code == 200


def test_request_rate_limit_then_refill(daemon: Daemon) -> None:
    with daemon.client() as c:
        for _ in range(20):
            assert _post(c, ALICE).status_code == 200
        over = _post(c, ALICE)
        assert over.status_code == 429 and _code(over) == "RATE_LIMITED"
        assert 1 <= int(over.headers["retry-after"]) <= 3  # 20 a minute: one every 3 s
        waited = _served_again(c, lambda: _post(c, ALICE), timeout=10)
        assert waited > 0.5, "served again only once the bucket refilled"


def test_token_rate_limit_counts_usage_and_stream_chunks(daemon: Daemon) -> None:
    with daemon.client() as c:
        with c.stream("POST", "/v1/completions", json={"model": "cpu", "prompt": "x", "max_tokens": 500,
                                                       "stream": True}, headers=_as(BOB)) as s:  # fmt: skip
            # 500 tokens and llama.cpp's finish event, charged one each with the prompt: ~700 left
            assert b"".join(s.iter_raw()).count(b"data: {") == 501
        assert _post(c, BOB, max_tokens=600).status_code == 200  # usage 604: 96 left
        assert _post(c, BOB, max_tokens=100).status_code == 200  # usage 104: in debt
        over = _post(c, BOB)
        assert over.status_code == 429 and "tokens per minute" in over.json()["error"]["message"]
        assert int(over.headers["retry-after"]) >= 1
        _served_again(c, lambda: _post(c, BOB), timeout=10)


def test_concurrency_and_compute_limits(daemon: Daemon) -> None:
    with daemon.client() as c:
        too_many = _post(c, CAROL, max_tokens=100)
        assert too_many.status_code == 400 and _code(too_many) == "LIMIT_EXCEEDED"
        assert _code(_post(c, PLAIN, n=3)) == "LIMIT_EXCEEDED", "global MAX_N_LIMIT"
        body = {"model": "slow", "prompt": "x", "max_tokens": 40, "stream": True}
        with c.stream("POST", "/v1/completions", json=body, headers=_as(CAROL)) as held:
            assert held.status_code == 200
            second = _post(c, CAROL, model="slow")
            assert second.status_code == 429 and "in flight" in second.json()["error"]["message"]
        # Closing the stream frees the slot as soon as the daemon sees the disconnect.
        _served_again(c, lambda: _post(c, CAROL, model="slow"), timeout=5)


def test_engines_refuse_requests_without_their_launch_key(daemon: Daemon) -> None:
    with daemon.client() as c:
        for model in ("cpu", "gpu", "slow"):  # llama.cpp (API_KEY), vLLM (VLLM_API_KEY), SGLang (--api-key)
            row = c.post(f"/v1/admin/models/{model}/start", headers=_as(ADMIN)).json()
            body = {"model": model, "prompt": "x", "max_tokens": 1}
            direct = engine_request(row, "POST", "/v1/completions", json=body)
            assert direct.status_code == 401, model
            guessed = engine_request(row, "POST", "/v1/completions", json=body, headers=_as(PLAIN))
            assert guessed.status_code == 401, model
            assert _post(c, PLAIN, model=model).status_code == 200


def test_a_local_vllm_engine_has_no_port_only_a_socket_in_the_daemons_own_directory(daemon: Daemon) -> None:
    """Issue 25, defect 8: vLLM's key guards /v1 (/v2, /inference, /cohere) only; its other routes
    (and in dev mode, for sleep, /collective_rpc, /update_weights and more) answer anyone who can
    connect, and any local user can connect to a loopback port. On a Unix socket in a 0700
    directory of the daemon's, only the daemon (its user) can."""
    with daemon.client() as c:
        row = c.post("/v1/admin/models/gpu/start", headers=_as(ADMIN)).json()
    assert row["port"] is None and row["host"] is None and row["socket"]
    sock = Path(row["socket"])
    assert sock.is_socket() and len(str(sock)) < 108
    folder = sock.parent.stat()
    assert folder.st_mode & 0o777 == 0o700 and folder.st_uid == os.getuid()
    engine = psutil.Process(row["pid"])
    tcp = [conn for conn in engine.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
    assert tcp == [], "it listens on no TCP port at all"
    # Through its socket it is still the engine it was: its key still guards /v1.
    assert engine_request(row, "GET", "/health").status_code == 200
    assert engine_request(row, "GET", "/v1/models").status_code == 401
    with daemon.client() as c:
        assert c.post("/v1/admin/models/gpu/stop", headers=_as(ADMIN)).status_code == 200
    assert not sock.exists(), "its socket file goes with it"


def test_no_key_appears_in_any_log(daemon: Daemon) -> None:
    with daemon.client() as c:
        for key in (PLAIN, ALICE, BOB, CAROL, "sk-wrong-0123456789"):
            _post(c, key)
            _post(c, key, model="gpu")
        c.post("/v1/admin/models/slow/start", headers=_as(ADMIN))
        c.post("/v1/admin/models/slow/start", headers=_as(PLAIN))
        launch_keys = []
        for row in c.get("/v1/status", headers=_as(PLAIN)).json()["models"]:
            proc = psutil.Process(row["pid"])
            env = proc.environ()
            argv = proc.cmdline()
            key = env.get("VLLM_API_KEY") or env.get("API_KEY") or argv[argv.index("--api-key") + 1]
            launch_keys.append(key)
    assert len(launch_keys) == 3
    logs = daemon.log() + "".join(p.read_text() for p in (daemon.workdir / "state" / "logs").glob("*.log"))
    assert "--api-key ***" in logs, "SGLang's flag is redacted in its log"
    for secret in (PLAIN, ALICE, BOB, CAROL, ADMIN, "sk-wrong-0123456789", *launch_keys):
        assert secret not in logs


def test_admin_without_admin_key_is_loopback_only() -> None:
    auth = Authenticator(load_keys(PLAIN, None, None))
    auth.admin({}, ("127.0.0.1", 5000))
    auth.admin({}, ("::1", 5000))
    with pytest.raises(Forbidden, match="loopback"):
        auth.admin({b"authorization": f"Bearer {PLAIN}".encode()}, ("10.1.2.3", 5000))


def test_only_configured_keys_are_remembered() -> None:
    """Accepted keys skip the hash next time; a flood of wrong keys must not grow that memory."""
    auth = Authenticator(load_keys(PLAIN, None, None))
    for i in range(1000):
        with pytest.raises(Unauthorized):
            auth.client({b"authorization": b"Bearer sk-guess-%d" % i})
    for _ in range(3):
        assert auth.client({b"x-api-key": PLAIN.encode()}) is not None
    assert len(auth._verified) == 1


def test_a_trusted_proxy_forwarding_a_remote_client_is_not_loopback(daemon_for: Any) -> None:
    """Without ADMIN_API_KEY, admin is loopback-only: a request relayed by a local proxy
    (trusted by default) for a remote client must be refused, and inference still works."""
    d = daemon_for(registry_doc(fake_model("m"))).start()
    with d.client() as c:
        remote = {"X-Forwarded-For": "203.0.113.9"}
        refused = c.get("/v1/admin/models/m/logs", headers=remote)
        assert refused.status_code == 403 and "loopback" in refused.json()["error"]["message"]
        assert c.get("/v1/admin/models/m/logs").status_code == 200
        body = {"model": "m", "prompt": "x", "max_tokens": 1}
        assert c.post("/v1/completions", json=body, headers=remote).status_code == 200


def test_priority_and_weight_come_from_the_keys_file(tmp_path: Path) -> None:
    from api.tenancy import request_priority, tenant_of
    from router.errors import InvalidHeader

    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n"
        "  - {key: sk-high-0123456789, name: ops, priority: high, weight: 4}\n"
        "  - {key: sk-low-0123456789, name: batch, priority: low, priority_header: false}\n"
    )
    auth = Authenticator(load_keys("", keys, None))
    ops = auth.client({b"x-api-key": b"sk-high-0123456789"})
    batch = auth.client({b"x-api-key": b"sk-low-0123456789"})
    assert tenant_of(ops, ("10.0.0.1", 1)) == ("ops", 4.0)
    assert tenant_of(None, ("10.0.0.1", 1)) == ("10.0.0.1", 1.0)  # no keys: the client address
    assert request_priority(ops, None) == 0 and request_priority(ops, b" Normal ") == 1
    assert request_priority(None, b"high") == 1, "without a key the header may only lower"
    assert request_priority(batch, b"high") == 2 and request_priority(batch, b"bogus") == 2
    with pytest.raises(InvalidHeader, match="X-Priority"):
        request_priority(ops, b"urgent")
    keys.write_text("keys:\n  - {key: sk-bad-0123456789, name: x, priority: urgent, weight: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_keys("", keys, None)
    assert len(err.value.problems) == 2


def test_with_a_tmpdir_too_long_for_a_socket_a_vllm_engine_still_gets_one(
    daemon_for: Any, tmp_path: Path
) -> None:
    """Found by the review of issue 25: a TMPDIR over ~61 characters made every local vLLM
    model answer 503 (its engine died at bind). Its socket goes in /tmp then (and where no
    directory is short enough, on a loopback port: tests/lifecycle/test_sockets.py)."""
    long_tmp = tmp_path / ("t" * 80)
    long_tmp.mkdir()
    daemon: Daemon = daemon_for(DOC, TMPDIR=str(long_tmp)).start()
    with daemon.client() as c:
        assert _post(c, None, model="gpu").status_code == 200
        row = next(r for r in c.get("/v1/status").json()["models"] if r["name"] == "gpu")
    assert row["socket"].startswith("/tmp/unified-inference-") and row["port"] is None
