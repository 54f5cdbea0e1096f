"""The dashboard (/ui) in real headless Chromium (Debian's `chromium`, driven by Playwright),
against a real daemon on fake engines. The page may load nothing from another origin.

UPDATE_SCREENSHOT=1 writes the README's screenshot (api/ui/dashboard.png) from this test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright import sync_api

from tests.helpers import ROOT, Daemon, fake_model, registry_doc

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN = "admin-key-for-the-dashboard-test-0001"
DOC = registry_doc(
    fake_model("gpu-model", gpu_memory=0.5, env={"FAKE_START_DELAY": "0.3"}),
    fake_model("cpu-model", backend="llamacpp", execution_mode="cpu"),
    fake_model("bad-format", backend="vllm", format="gguf"),
)


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page whose console errors and foreign requests are recorded."""

    def __init__(self, browser: Any, daemon: Daemon, width: int, height: int) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def guard(route: Any) -> None:
            if route.request.url.startswith(daemon.url) or route.request.url.startswith("data:"):
                route.continue_()
            else:
                self.foreign.append(route.request.url)
                route.abort()

        self.page.route("**/*", guard)
        self.page.goto(daemon.url + "/ui")

    def badge(self, model: str) -> Any:
        return self.page.locator(f'tr[data-model="{model}"] .badge')

    def button(self, model: str, action: str) -> Any:
        return self.page.locator(f'button[data-model="{model}"][data-action="{action}"]')


def test_the_dashboard_shows_models_starts_and_stops_them_and_follows_traffic_and_logs(
    daemon_for: Any, browser: Any, tmp_path: Path
) -> None:
    daemon: Daemon = daemon_for({**DOC, "gpus": [{"id": 0, "memory_gb": 80}]}).start()
    w = Watched(browser, daemon, 1280, 800)
    page = w.page
    sync_api.expect(w.badge("gpu-model")).to_have_text("stopped", timeout=10_000)
    sync_api.expect(w.badge("cpu-model")).to_have_text("stopped")
    sync_api.expect(page.locator('[data-gpu="0"]')).to_contain_text("0% reserved")
    # A model that cannot run says so, and why, and offers no buttons (issue 25, defect 7).
    sync_api.expect(w.badge("bad-format")).to_have_text("disabled")
    sync_api.expect(page.locator('tr:has(td.error)')).to_contain_text("cannot run: format 'gguf'")
    sync_api.expect(page.locator('button[data-model="bad-format"]')).to_have_count(0)

    w.button("gpu-model", "start").click()
    sync_api.expect(w.badge("gpu-model")).to_have_text("ready", timeout=15_000)  # no reload
    sync_api.expect(page.locator('[data-gpu="0"]')).to_contain_text("50% reserved by gpu-model")

    body = {"model": "gpu-model", "prompt": "hello", "max_tokens": 3, "stream": True}
    with httpx.Client(base_url=daemon.url) as c:
        resp = c.post("/v1/completions", json=body, headers={"X-Request-ID": "dashboard-test-1"})
        assert resp.status_code == 200
    sync_api.expect(page.locator('#recent tr[data-request-id="dashboard-test-1"]')).to_have_count(
        1, timeout=5_000
    )
    page.select_option("#chartmodel", "gpu-model")
    points = page.wait_for_function(
        "() => (window.uiState.data.series['gpu-model'] || []).reduce((n, p) => n + p.rps * 10, 0) >= 1"
    )
    assert points
    sync_api.expect(page.locator("#chart-rps")).not_to_have_attribute("data-points", "0")

    page.select_option("#logmodel", "gpu-model")
    sync_api.expect(page.locator("#log")).to_contain_text("fake engine 'gpu-model'", timeout=5_000)

    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        page.screenshot(path=str(ROOT / "api" / "ui" / "dashboard.png"))
    else:
        page.screenshot(path=str(tmp_path / "dashboard.png"))

    w.button("gpu-model", "stop").click()
    sync_api.expect(w.badge("gpu-model")).to_have_text("stopped", timeout=15_000)
    page.click("#reload")
    sync_api.expect(page.locator("#notice")).to_contain_text("reloaded: added none", timeout=5_000)

    narrow = Watched(browser, daemon, 390, 844)
    sync_api.expect(narrow.badge("cpu-model")).to_have_text("stopped", timeout=10_000)
    overflow = narrow.page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page does not scroll sideways at 390 px (its tables scroll inside)"
    narrow.button("cpu-model", "start").click()
    sync_api.expect(narrow.badge("cpu-model")).to_have_text("ready", timeout=15_000)

    for watched in (w, narrow):
        assert watched.foreign == [], watched.foreign
        assert watched.errors == [], watched.errors


def test_with_an_admin_key_the_buttons_fail_cleanly_without_it_and_work_with_it(
    daemon_for: Any, browser: Any
) -> None:
    daemon: Daemon = daemon_for(DOC, ADMIN_API_KEY=ADMIN).start()
    w = Watched(browser, daemon, 1280, 800)
    page = w.page
    sync_api.expect(w.badge("cpu-model")).to_have_text("stopped", timeout=10_000)
    w.button("cpu-model", "start").click()
    sync_api.expect(page.locator("#notice")).to_contain_text("Not allowed", timeout=5_000)
    sync_api.expect(page.locator("#keyform")).to_be_visible()
    sync_api.expect(w.badge("cpu-model")).to_have_text("stopped")

    page.fill("#keyinput", ADMIN)
    page.click("#keyform button[type=submit]")
    w.button("cpu-model", "start").click()
    sync_api.expect(w.badge("cpu-model")).to_have_text("ready", timeout=15_000)
    stored = page.evaluate("() => sessionStorage.getItem('ui-admin-key')")
    assert stored == ADMIN  # the tab's session storage, nothing longer-lived
    assert page.evaluate("() => localStorage.length") == 0 and page.context.cookies() == []
    # The only errors are the browser's own notes of the refused (401/403) calls.
    assert all("status of 40" in e for e in w.errors), w.errors
    assert w.foreign == []


def test_with_client_keys_the_page_asks_for_one_and_serves_no_data_without_it(
    daemon_for: Any, browser: Any
) -> None:
    daemon: Daemon = daemon_for(DOC, API_KEYS="client-key-for-dashboard-0001").start()
    assert httpx.get(daemon.url + "/v1/dashboard").status_code == 401
    w = Watched(browser, daemon, 1280, 800)
    page = w.page
    sync_api.expect(page.locator("#keyform")).to_be_visible(timeout=10_000)
    assert page.locator("#models tbody tr").count() == 0
    page.fill("#keyinput", "client-key-for-dashboard-0001")
    page.click("#keyform button[type=submit]")
    sync_api.expect(w.badge("cpu-model")).to_have_text("stopped", timeout=10_000)
