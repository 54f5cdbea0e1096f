"""Control-plane routes hold no more of a body than their limit (issue 25, defect 2: a 300 MiB
body to /v1/models/validate was read whole, +1.5 GiB of daemon memory)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from api.dispatch import CONTROL_BODY_BYTES
from tests.helpers import Daemon, fake_model, registry_doc

MIB = 1 << 20
SENT = 96 * MIB  # several times every limit: what is held would show
MAX_GROWTH = 48 * MIB  # one validate limit (16 MiB), its chunks joined, and the allocator's slack
DOC = {
    **registry_doc(fake_model("v1"), fake_model("v2")),
    "aliases": {"chat": {"split": {"v1": 90, "v2": 10}}},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("bodies"), DOC).start()
    yield d
    d.stop()


class PeakRss:
    """The daemon's peak resident memory while the block runs (sampled every 5 ms)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _chunks(total: int) -> Iterator[bytes]:
    """A JSON-looking body with no Content-Length (chunked): only counting can bound it."""
    yield b'{"path": "/v1/completions", "body": {"model": "v1", "prompt": "'
    piece = b"x" * MIB
    for _ in range(total // MIB):
        yield piece
    yield b'"}}'


READ = ["/v1/models/validate", "/v1/admin/aliases/chat"]  # routes that read a body
IGNORED = ["/v1/admin/reload", "/v1/admin/models/v1/stop"]  # routes that take none


@pytest.mark.parametrize("path", READ + IGNORED)
def test_control_plane_bodies_are_bounded(daemon: Daemon, path: str) -> None:
    """A route that reads a body refuses it past its limit (413 in our shape); one that takes
    none answers as usual while the body is dropped as it comes. Neither holds it."""
    assert daemon.proc is not None
    with daemon.client(timeout=120) as c, PeakRss(daemon.proc.pid) as rss:
        resp = c.post(path, content=_chunks(SENT))
    if path in READ:
        assert resp.status_code == 413, resp.text
        error = resp.json()["error"]
        assert error["code"] == "REQUEST_TOO_LARGE" and path in error["message"]
    else:
        assert resp.status_code == 200, resp.text
    assert rss.growth < MAX_GROWTH, f"daemon grew by {rss.growth / MIB:.0f} MiB"
    with daemon.client() as c:  # and it still answers
        assert c.get("/health").status_code == 200


def test_a_declared_length_over_the_limit_is_refused_before_reading(daemon: Daemon) -> None:
    with daemon.client() as c:
        body = b'{"split": {"v1": 1}, "pad": "' + b"x" * CONTROL_BODY_BYTES + b'"}'
        resp = c.post("/v1/admin/aliases/chat", content=body)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "REQUEST_TOO_LARGE"
        # Within the limit the route works as before.
        ok = c.post("/v1/admin/aliases/chat", json={"split": {"v1": 1}})
        assert ok.status_code == 200 and ok.json()["split"] == {"v1": 1}
        assert c.post("/v1/admin/reload").status_code == 200  # models.yaml wins again


def test_validate_takes_what_the_inference_route_takes(daemon: Daemon) -> None:
    """A body the inference route accepts (here 8 MiB of prompt) is validated, not refused."""
    prompt = "x" * (8 * MIB)
    body: dict[str, Any] = {"path": "/v1/completions", "body": {"model": "v1", "prompt": prompt}}
    with daemon.client(timeout=60) as c:
        resp = c.post("/v1/models/validate", json=body)
    assert resp.status_code == 200 and resp.json()["valid"] is True, resp.text[:300]


def test_unparseable_control_bodies_get_our_error(daemon: Daemon) -> None:
    with daemon.client() as c:
        for path in ("/v1/models/validate", "/v1/admin/aliases/chat"):
            resp = c.post(path, content=b"{not json")
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_BODY"


def test_a_body_sent_to_a_streamed_answer_is_dropped_without_an_error(daemon: Daemon) -> None:
    """Found by the review of issue 25: a log followed with a chunked body over the limit raised
    REQUEST_TOO_LARGE inside the streaming answer (a traceback, the stream cut)."""
    with daemon.client() as c:
        assert c.post("/v1/admin/models/v1/start").status_code == 200
    with httpx.Client(base_url=daemon.url, timeout=30) as c, c.stream(
        "GET", "/v1/admin/models/v1/logs", params={"follow": "true"}, content=_chunks(4 * MIB)
    ) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert first  # the log's head came, and the stream is still open
    with daemon.client() as c:
        assert c.post("/v1/admin/models/v1/stop").status_code == 200
    assert "Exception in ASGI application" not in daemon.log()
