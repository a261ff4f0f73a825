"""The web console (``/ui``) in real headless Chromium (Debian's, through Playwright), against a
real ``sluice serve`` with keys made by ``sluice keys new``: log in through the form, watch a
pipeline's throughput series move while tasks run, filter and search its tasks, open a task
(its timeline with a bar per attempt, its kept payload), cancel a queued task, replay a dead
letter, and a tenant's key that sees only its own pipelines. Every page: no console errors, no
horizontal overflow at 1280x800 and 390x844. The screenshots in docs/img/console-*.png are
written here.

The browser is ``SLUICE_CHROMIUM`` (default ``/usr/bin/chromium``; ``scripts/browser``
installs it): a missing one fails the test, it is never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.server import Server, running_server

IMAGES = ROOT / "docs" / "img"
DESKTOP = {"width": 1280, "height": 800}
MOBILE = {"width": 390, "height": 844}
# An AIMD limit over a backend of capacity 6 (tests/e2e/console_handlers.py): a saw-tooth.
PIPELINE = """\
name: {name}
tenant: {tenant}
source: {{embedded: {{queue: {name}, lease_s: 5, poll_interval_s: 0.01}}}}
handler: {{python: tests.e2e.console_handlers:capped}}
consumer:
  concurrency: {{initial: 2, min: 1, max: 32, algorithm: aimd}}
  ordering: unordered
  timeout_s: 30
  retry: {{max_attempts: 3, initial_backoff_s: 0.02, max_backoff_s: 0.1}}
on_success: [{{embedded: {{queue: {name}.done}}}}]
on_failure: [{{embedded: {{queue: {name}.failed}}}}]
"""


def chromium_path() -> str:
    path = os.environ.get("SLUICE_CHROMIUM", "/usr/bin/chromium")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no Chromium at {path}: run scripts/browser (it installs Debian's "
                    "chromium package) and set SLUICE_CHROMIUM to the path it prints")
    return path


@dataclass
class Console:
    server: Server
    keys: dict[str, str]  # who → API key
    browser: Browser
    errors: list[str]

    def context(self, viewport: dict[str, int] = DESKTOP, *,
                watched: bool = True) -> BrowserContext:
        context = self.browser.new_context(viewport={"width": viewport["width"],
                                                     "height": viewport["height"]})
        if watched:
            context.on("page", self.watch)
        return context

    def watch(self, page: Page) -> None:
        page.on("console", lambda m: self.errors.append(f"{page.url}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))

    def login(self, context: BrowserContext, who: str) -> Page:
        page = context.new_page()
        page.goto(self.server.url + "/ui/")
        expect(page).to_have_url(self.server.url + "/ui/login")
        page.fill("#key", self.keys[who])
        page.click("button[type=submit]")
        expect(page).to_have_url(self.server.url + "/ui/")
        return page

    def submit(self, pipeline: str, payload: Any, task_id: str | None = None,
               delay_s: float | None = None) -> None:
        headers = {"Authorization": f"Bearer {self.keys['admin']}",
                   "Content-Type": "application/json"}
        if task_id is not None:
            headers["Task-Id"] = task_id
        if delay_s is not None:
            headers["Delay-S"] = str(delay_s)
        request = urllib.request.Request(f"{self.server.url}/v1/pipelines/{pipeline}/tasks",
                                         data=json.dumps(payload).encode(), headers=headers,
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202

    def state(self, task_id: str) -> str:
        request = urllib.request.Request(f"{self.server.url}/v1/tasks/{task_id}",
                                         headers={"Authorization":
                                                  f"Bearer {self.keys['admin']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["state"])


def new_key(keys_file: Path, tenant: str | None) -> str:
    who = ["--admin"] if tenant is None else ["--tenant", tenant]
    made = subprocess.run([*sluice_cmd(), "keys", "new", *who, "--append", str(keys_file)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=30, check=True)
    return made.stdout.strip()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    browser_path = chromium_path()
    tmp = tmp_path_factory.mktemp("console")
    files = []
    for name, tenant in (("orders", "alpha"), ("invoices", "alpha"), ("billing", "beta")):
        file = tmp / f"{name}.yaml"
        file.write_text(PIPELINE.format(name=name, tenant=tenant))
        files.append(file)
    keys_file = tmp / "keys.yaml"
    keys = {"alpha": new_key(keys_file, "alpha"), "beta": new_key(keys_file, "beta"),
            "admin": new_key(keys_file, None)}
    with running_server(tmp, "--auth-file", str(keys_file), files=tuple(files),
                        auth=False) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True)
        try:
            yield Console(server, keys, browser, [])
        finally:
            browser.close()


def no_overflow(page: Page) -> None:
    width, inner = page.evaluate(
        "[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"{page.url}: the page is {width} px wide in a {inner} px window"


def shot(page: Page, name: str) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / f"console-{name}.png"), full_page=True)


def series(page: Page, pipeline: str, field: str) -> list[float | None]:
    found: list[float | None] = page.evaluate(
        "([p, f]) => (window.sluiceConsole && window.sluiceConsole.series[p] || {})[f] || []",
        [pipeline, field])
    return found


def test_the_console_in_a_browser(console: Console) -> None:
    started = time.monotonic()
    # A wrong key is refused on the form (401, which Chromium logs as a failed load: this
    # context's console is not watched).
    refused = console.context(watched=False)
    page = refused.new_page()
    page.goto(console.server.url + "/ui/login")
    page.fill("#key", "sk_not-a-key")
    page.click("button[type=submit]")
    expect(page.locator(".flash.error")).to_contain_text("not valid")
    refused.close()
    # The right one logs in, and no key is in any URL.
    context = console.context()
    page = console.login(context, "alpha")
    assert console.keys["alpha"] not in page.url
    (cookie,) = [c for c in context.cookies() if c["name"] == "sluice_ui"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert console.keys["alpha"] not in cookie["value"]  # encrypted

    # The overview: alpha's pipelines only; the throughput series moves while tasks run.
    expect(page.locator("tr[data-row]")).to_have_count(2)
    expect(page.locator("tr[data-row='billing']")).to_have_count(0)
    page.wait_for_function("() => window.sluiceConsole && window.sluiceConsole.connected")
    for i in range(240):
        console.submit("orders", {"sleep_s": 0.1}, task_id=f"order-{i:03d}")
    page.wait_for_function(
        "() => (window.sluiceConsole.series.orders.rate_per_s || []).some(v => v > 0)",
        timeout=15_000)
    before = len(series(page, "orders", "t"))
    page.wait_for_timeout(3_200)
    rates = series(page, "orders", "rate_per_s")
    assert len(rates) >= before + 2, "the series did not grow with the ticks"
    assert any(r for r in rates if r), rates
    assert any(v for v in series(page, "orders", "limit") if v)
    expect(page.locator("[data-chart='rate'][data-pipeline='orders'] canvas")).to_have_count(1)
    no_overflow(page)
    shot(page, "overview")

    # A task that fails for good, and one that waits (delayed): for the pipeline's lists.
    # And one that fails twice, then succeeds (its attempts on its page).
    console.submit("orders", {"fail": True}, task_id="order-broken")
    console.submit("orders", {"sleep_s": 0.1}, task_id="order-later", delay_s=600)
    console.submit("orders", {"fail_attempts": 2, "sleep_s": 0.05}, task_id="order-flaky")
    deadline = time.monotonic() + 15
    while (console.state("order-broken"), console.state("order-flaky")) != ("FAILED",
                                                                            "SUCCEEDED"):
        assert time.monotonic() < deadline, "order-broken did not fail, or order-flaky succeed"
        time.sleep(0.2)

    # A pipeline: filter by state, search an id.
    page.click("a[href='/ui/pipelines/orders']")
    expect(page.locator("h1")).to_contain_text("orders")
    page.select_option("#state", "QUEUED")
    page.click("form.filters button[type=submit]")
    expect(page.locator("tr[data-task='order-later']")).to_have_count(1)
    expect(page.locator("tr[data-task] .badge")).to_have_text(["queued"] * page.locator(
        "tr[data-task]").count())
    page.select_option("#state", "")
    page.fill("#id", "order-007")
    page.click("form.filters button[type=submit]")
    expect(page.locator("tr[data-task]")).to_have_count(1)
    expect(page.locator("tr[data-task='order-007']")).to_have_count(1)
    page.goto(console.server.url + "/ui/pipelines/orders")
    expect(page.locator("tr[data-letter='order-broken']")).to_have_count(1)
    no_overflow(page)
    shot(page, "pipeline")

    # Replay the dead letter from the console.
    page.click("tr[data-letter='order-broken'] button")
    expect(page.locator(".flash")).to_contain_text("Replayed order-broken as "
                                                   "order-broken.replay-1")

    # A task: its timeline (a bar per attempt: the three failed), its error with the
    # traceback, its payload (kept with its record).
    page.click("tr[data-letter='order-broken'] td.id a")
    expect(page.locator("[data-timeline] .tl-bar")).not_to_have_count(0)
    expect(page.locator("[data-state]")).to_have_text("failed")
    expect(page.locator("pre.code").first).to_contain_text("RuntimeError")
    attempts = page.locator("[data-timeline] .tl-row[data-attempt]")
    expect(attempts).to_have_count(3)
    expect(attempts.locator(".tl-label")).to_have_text([
        "attempt 1: failed, retried: RuntimeError", "attempt 2: failed, retried: RuntimeError",
        "attempt 3: failed for good: RuntimeError"])
    expect(page.locator("[data-payload]")).to_have_text('{\n  "fail": true\n}')
    expect(page.locator("[data-payload-note]")).to_have_text("application/json · 14 bytes")
    expect(page.locator(".tl-bar.deliver")).to_have_count(1)  # its failure record's delivery
    no_overflow(page)
    shot(page, "task")

    # A task retried twice, then succeeded: two failed attempts, then the one that ran; the
    # retry waits are the gaps between them.
    page.goto(console.server.url + "/ui/pipelines/orders/tasks/order-flaky")
    expect(page.locator("[data-state]")).to_have_text("succeeded")
    expect(attempts.locator(".tl-label")).to_have_text([
        "attempt 1: failed, retried: RuntimeError", "attempt 2: failed, retried: RuntimeError",
        "attempt 3: succeeded"])
    expect(page.locator("[data-timeline] .tl-bar.retry")).to_have_count(2)
    expect(page.locator("[data-payload]")).to_contain_text('"fail_attempts": 2')
    no_overflow(page)
    shot(page, "task-retried")

    # Cancel a queued task: its state changes on the page and in the store.
    page.goto(console.server.url + "/ui/pipelines/orders/tasks/order-later")
    expect(page.locator("[data-state]")).to_have_text("queued")
    page.click("button[data-action='cancel']")
    expect(page.locator("[data-state]")).to_have_text("cancelled")
    expect(page.locator(".flash")).to_contain_text("order-later cancelled")
    assert console.state("order-later") == "CANCELLED"
    expect(page.locator("button[data-action]")).to_have_count(0)

    # Another tenant's pipeline and task read as missing ones.
    assert context.request.get(console.server.url + "/ui/pipelines/billing").status == 404
    context.close()

    # Tenant beta sees only its own pipeline.
    beta = console.context()
    page = console.login(beta, "beta")
    expect(page.locator("tr[data-row]")).to_have_count(1)
    expect(page.locator("tr[data-row='billing']")).to_have_count(1)
    assert beta.request.get(console.server.url
                            + "/ui/pipelines/orders/tasks/order-007").status == 404
    # Logged out: the pages ask for the key again.
    page.goto(console.server.url + "/ui/")
    page.click("form[action='/ui/logout'] button")
    expect(page).to_have_url(console.server.url + "/ui/login")
    page.goto(console.server.url + "/ui/pipelines/billing")
    expect(page).to_have_url(console.server.url + "/ui/login")
    beta.close()

    # On a phone's screen: every page fits its width.
    phone = console.context(MOBILE)
    page = console.login(phone, "admin")
    page.wait_for_function("() => window.sluiceConsole && window.sluiceConsole.ticks > 1")
    no_overflow(page)
    shot(page, "overview-mobile")
    for path in ("/ui/pipelines/orders", "/ui/pipelines/orders/tasks/order-broken"):
        page.goto(console.server.url + path)
        no_overflow(page)
    phone.close()

    assert console.errors == [], console.errors
    assert time.monotonic() - started < 60


def test_the_console_refuses_forms_without_the_sessions_token(console: Console) -> None:
    """A POST without the CSRF token (another site's form, or a script) changes nothing."""
    context = console.context()
    console.login(context, "alpha")
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in context.cookies())
    context.close()
    console.submit("orders", {}, task_id="order-kept", delay_s=600)
    request = urllib.request.Request(
        f"{console.server.url}/ui/pipelines/orders/tasks/order-kept/cancel",
        data=b"csrf=guessed", headers={"Cookie": cookie,
                                       "Content-Type": "application/x-www-form-urlencoded"},
        method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert console.state("order-kept") == "QUEUED"
