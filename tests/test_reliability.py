"""Fault injection through a real daemon: kills, hangs, start failures, reloads, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import Daemon, fake_model, pid_alive, registry_doc, wait_until

pytestmark = pytest.mark.anyio

STREAMING = {"FAKE_TOKEN_DELAY": "0.05"}


def _row(c: httpx.Client, name: str) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in c.get("/v1/status").json()["models"] if r["name"] == name)
    return row


def _events(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


def _error_event(data: bytes) -> dict[str, Any] | None:
    last = _events(data)[-1]
    if not last.startswith(b"event: error\ndata: "):
        return None
    error: dict[str, Any] = json.loads(last.split(b"data: ", 1)[1])["error"]
    return error


async def _stream_until(c: httpx.AsyncClient, model: str, tokens: int, on_chunks: int, action: Any) -> bytes:
    """Stream from `model`; after `on_chunks` events run `action()`; return the whole body."""
    body = {"model": model, "prompt": "x", "max_tokens": tokens, "stream": True}
    data = b""
    acted = False
    async with c.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for chunk in resp.aiter_raw():
            data += chunk
            if not acted and data.count(b"data: {") >= on_chunks:
                acted = True
                action()
    return data


async def _signal_mid_stream(daemon: Daemon, sig: signal.Signals) -> tuple[int, bytes, float]:
    """Start model `m`, stream from it, send its engine `sig` after 3 tokens.

    Returns the engine's pid, the whole streamed body, and the seconds from the
    signal to the stream's end.
    """
    with daemon.client() as sync:
        sync.post("/v1/admin/models/m/start")
        pid = _row(sync, "m")["pid"]
    sent_at: list[float] = []

    def send_signal() -> None:
        os.kill(pid, sig)
        sent_at.append(time.monotonic())

    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        data = await _stream_until(c, "m", 200, 3, send_signal)
    return pid, data, time.monotonic() - sent_at[0]


async def test_engine_killed_mid_stream(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(registry_doc(fake_model("m", env=STREAMING))).start()
    pid, data, ended_after = await _signal_mid_stream(daemon, signal.SIGKILL)
    error = _error_event(data)
    assert error is not None and error["code"] == "BACKEND_UNAVAILABLE"
    assert ended_after < 2.0, "the stream must end within 2 s of the engine's death"
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
        resp = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert resp.status_code == 200
    with daemon.client() as sync:
        row = _row(sync, "m")
        assert row["starts"] == 2 and row["pid"] != pid


async def test_hung_engine_times_out_and_is_replaced(daemon_for: Any) -> None:
    doc = registry_doc(fake_model("m", env=STREAMING, timeouts={"idle": 1, "first_byte": 2}))
    daemon: Daemon = daemon_for(
        doc, HEALTH_CHECK_INTERVAL="0.3", HEALTH_CHECK_FAILURES="2", STOP_GRACE_PERIOD="0.5"
    ).start()
    pid, data, waited = await _signal_mid_stream(daemon, signal.SIGSTOP)
    error = _error_event(data)
    assert error is not None and error["code"] == "BACKEND_TIMEOUT"
    assert waited < 1.0 + 1.5, "no request may wait past its timeout"

    with daemon.client() as sync:
        # Health monitor: unhealthy -> group killed -> failed.
        wait_until(lambda: _row(sync, "m")["state"] == "failed", timeout=15)
        assert not pid_alive(pid)
        assert "unresponsive" in _row(sync, "m")["last_error"]
        resp = sync.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert resp.status_code == 200
        assert _row(sync, "m")["starts"] == 2


def test_five_failed_starts_back_off_and_the_daemon_stays_healthy(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(registry_doc(fake_model("bad", env={"FAKE_EXIT_DURING_START": "1"}))).start()
    with daemon.client() as c:
        for _ in range(5):
            assert c.post("/v1/admin/models/bad/start").status_code == 503
        row = _row(c, "bad")
        assert row["failures"] == 5 and row["state"] == "failed"
        assert row["retry_at"] > time.time() + 5, "five failures back off for 8 s"
        assert "exited with code 1" in row["last_error"]
        refused = c.post("/v1/completions", json={"model": "bad", "prompt": "x"})
        assert refused.status_code == 503 and "next start in" in refused.json()["error"]["message"]
        assert _row(c, "bad")["failures"] == 5, "a request during the back-off starts nothing"
        assert c.get("/health").status_code == 200


def test_start_queue_is_bounded(daemon_for: Any) -> None:
    doc = registry_doc(
        fake_model("slow", backend="llamacpp", env={"FAKE_START_DELAY": "1"}, max_queued_requests=3)
    )
    daemon: Daemon = daemon_for(doc).start()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
            body = {"model": "slow", "prompt": "x", "max_tokens": 1}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

    statuses = sorted(r.status_code for r in asyncio.run(burst()))
    assert statuses == [200, 200, 200, 429, 429, 429]


def test_reload(daemon_for: Any) -> None:
    doc = registry_doc(fake_model("keep"), fake_model("drop", env=STREAMING), fake_model("change"))
    daemon: Daemon = daemon_for(doc).start()
    with daemon.client() as c:
        before = c.get("/v1/models").json()

        daemon.config.write_text("models:\n  - name: x\n    colour: red\n")
        refused = c.post("/v1/admin/reload")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_CONFIG"
        assert any("colour: unknown field" in p for p in refused.json()["error"]["problems"])
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in daemon.log(), timeout=10)
        assert c.get("/v1/models").json() == before, "a broken file changes nothing"

        c.post("/v1/admin/models/change/start")
        old_pid = _row(c, "change")["pid"]
        with c.stream("POST", "/v1/completions", json={"model": "drop", "prompt": "x", "max_tokens": 40,
                                                       "stream": True}) as stream:  # fmt: skip
            new = registry_doc(
                fake_model("keep"),
                fake_model("change", args=["--context-length", "4096"]),
                fake_model("added"),
            )
            daemon.config.write_text(yaml.safe_dump(new))
            report = c.post("/v1/admin/reload").json()
            assert report == {"added": ["added"], "removed": ["drop"], "changed": ["change"],
                              "unchanged": ["keep"], "split_overrides_reset": []}  # fmt: skip
            gone = c.post("/v1/completions", json={"model": "drop", "prompt": "x"})
            assert gone.status_code == 404
            data = b"".join(stream.iter_raw())
        assert data.endswith(b"data: [DONE]\n\n"), "the removed model's request in flight finished"
        assert data.count(b"data: {") == 40
        assert (
            c.post("/v1/completions", json={"model": "added", "prompt": "x", "max_tokens": 1}).status_code
            == 200
        )
        wait_until(lambda: not pid_alive(old_pid), timeout=10)  # idle: restarted with the new entry
        assert (
            c.post("/v1/completions", json={"model": "change", "prompt": "x", "max_tokens": 1}).status_code
            == 200
        )
        assert "--context-length 4096" in (daemon.workdir / "state" / "logs" / "change.log").read_text()


def test_admin_stop_drains_unless_forced(daemon_for: Any) -> None:
    daemon: Daemon = daemon_for(registry_doc(fake_model("m", backend="llamacpp", env=STREAMING))).start()
    body = {"model": "m", "prompt": "x", "max_tokens": 30, "stream": True}
    with daemon.client() as c, daemon.client() as admin:
        with c.stream("POST", "/v1/completions", json=body) as stream:
            chunks = stream.iter_raw()
            first = next(chunks)
            stopping = admin.build_request("POST", "/v1/admin/models/m/stop", params={"timeout": 10})

            async def stop_and_probe() -> tuple[httpx.Response, httpx.Response]:
                async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as ac:
                    stop = asyncio.ensure_future(ac.send(stopping))
                    while not (await ac.get("/v1/status")).json()["models"][0]["draining"]:
                        assert not stop.done(), "the stop returned without draining"
                        await asyncio.sleep(0.02)  # a poll; the stop's own timeout bounds it
                    probe = await ac.post(
                        "/v1/completions", json={"model": "m", "prompt": "y", "max_tokens": 1}
                    )
                    return await stop, probe

            data = first
            stop_resp, probe = asyncio.run(stop_and_probe())
            data += b"".join(chunks)
        assert probe.status_code == 503 and "being stopped" in probe.json()["error"]["message"]
        assert data.endswith(b"data: [DONE]\n\n") and data.count(b"data: {") == 31  # + the finish event
        assert stop_resp.json()["state"] == "stopped"

        with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 200}) as stream:
            chunks = stream.iter_raw()
            data = next(chunks)
            assert admin.post("/v1/admin/models/m/stop", params={"force": True}).json()["state"] == "stopped"
            data += b"".join(chunks)
        error = _error_event(data)
        assert error is not None and error["code"] == "BACKEND_UNAVAILABLE"


@pytest.mark.parametrize("grace", ["10", "1"])
async def test_sigterm_during_20_streams(daemon_for: Any, grace: str) -> None:
    """grace 10: every stream finishes; grace 1: streams are cut with an error event."""
    daemon: Daemon = daemon_for(
        registry_doc(fake_model("m", backend="llamacpp", env=STREAMING)), SHUTDOWN_GRACE_PERIOD=grace
    ).start()
    with daemon.client() as c:
        c.post("/v1/admin/models/m/start")
        pid = _row(c, "m")["pid"]
    body = {"model": "m", "prompt": "x", "max_tokens": 60, "stream": True}  # 3 s each
    started = asyncio.Event()
    opened = 0

    async def one(c: httpx.AsyncClient) -> bytes:
        nonlocal opened
        data = b""
        async with c.stream("POST", "/v1/completions", json=body) as resp:
            async for chunk in resp.aiter_raw():
                if not data:
                    opened += 1
                    if opened == 20:
                        started.set()
                data += chunk
        return data

    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60, limits=limits) as ac:
        streams = [asyncio.ensure_future(one(ac)) for _ in range(20)]
        await asyncio.wait_for(started.wait(), 20)
        daemon.signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)

    done = [d for d in results if d.endswith(b"data: [DONE]\n\n")]
    cut = [d for d in results if (e := _error_event(d)) is not None and e["code"] == "SHUTTING_DOWN"]
    assert len(done) + len(cut) == 20, "every stream finishes or ends with an error event"
    assert len(done) == 20 if grace == "10" else len(cut) == 20
    daemon.wait(timeout=30)
    assert not pid_alive(pid)
