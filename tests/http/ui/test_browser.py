"""The status page in a real Chromium, against a real daemon and the Intuit simulator.

A person signs in, reads the statuses, presses the buttons and watches the page
keep itself current; every screenshot is kept under ``test-artifacts/ui/``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from qbo_daemon.core.models import iso
from qbo_daemon.http.ui.session import COOKIE_NAME
from tests.browser import Seen, browser, open_page  # noqa: F401 (browser: a fixture)
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon
from tests.ui_support import api_statuses, populate, secrets_of

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The page polls every 5 s; give it two rounds.
LIVE_TIMEOUT = 12_000


@pytest.fixture
async def running(daemon_factory: StartDaemon) -> RunningDaemon:
    return await daemon_factory()


async def sign_in(seen: Seen, running: RunningDaemon, key: str | None = None) -> None:
    page = seen.page
    await seen.visit(running.api_url + "/ui/")
    assert "/ui/login" in page.url  # not signed in yet: sent to the form
    await page.fill("#key", key or running.api_key)
    await page.click("form[action='/ui/login'] button[type=submit]")
    await page.wait_for_load_state()


async def test_sign_in_and_see_the_statuses_the_api_reports(
    browser: Browser,  # noqa: F811
    running: RunningDaemon,
) -> None:
    expected = await populate(running)
    seen = await open_page(browser, "statuses")
    await sign_in(seen, running)
    page = seen.page
    assert page.url == running.api_url + "/ui/"
    await seen.shot("overview")

    reported = await api_statuses(running)
    assert reported == expected
    counts = Counter(reported.values())
    for status in ("active", "expired", "needs_reconnect", "disconnected"):
        shown = await page.inner_text(f".stat[data-status='{status}'] [data-count]")
        assert int(shown) == counts[status], status
    # Readiness with its reasons, as /readyz gives them.
    _, ready = await running.api("GET", "/readyz")
    verdict = await page.inner_text("#readiness")
    assert ("Ready" if ready["ready"] else "Not ready") in verdict
    for name, check in ready["checks"].items():
        assert f"{name.replace('_', ' ')} {check}" in verdict

    await page.click("nav a[href='/ui/accounts']")
    await page.wait_for_selector("table.accounts-table")
    await seen.shot("accounts")
    for account_id, status in reported.items():
        badge = page.locator(f"tr[data-account='{account_id}'] [data-col=status] .badge")
        assert await badge.get_attribute("class") == f"badge badge-{status}", account_id
    # A status filter shows exactly the API's accounts of that status.
    await page.click("#status-tabs a[data-status='needs_reconnect']")
    await page.wait_for_load_state()
    rows = await page.locator("tr[data-account]").evaluate_all(
        "rows => rows.map(r => r.dataset.account)"
    )
    assert rows == [a for a, s in reported.items() if s == "needs_reconnect"]

    await page.click("a.account-link")
    await page.wait_for_selector("#explanation")
    assert "the user must connect again" in (await page.inner_text("body")).lower() or (
        "reconnect" in await page.inner_text("#explanation")
    )
    assert "invalid_grant" in await page.inner_text("#explanation")
    await seen.shot("account-needs-reconnect")


async def test_refresh_now_updates_the_row(
    browser: Browser,  # noqa: F811
    running: RunningDaemon,
) -> None:
    assert await running.connect("acme") == 200
    assert await running.connect("zenith") == 200
    seen = await open_page(browser, "refresh")
    await sign_in(seen, running)
    page = seen.page
    await page.goto(running.api_url + "/ui/accounts")
    refreshed = page.locator("tr[data-account='acme'] [data-col=refreshed] time")
    before = await refreshed.get_attribute("datetime")
    other_before = await page.locator(
        "tr[data-account='zenith'] [data-col=refreshed] time"
    ).get_attribute("datetime")

    await page.click("tr[data-account='acme'] button[type=submit]")
    await page.wait_for_selector("#notice")
    assert await page.inner_text("#notice") == "Refreshed: a new access token is stored."
    assert "/ui/accounts" in page.url
    after = await refreshed.get_attribute("datetime")
    assert after is not None
    assert after != before
    _, account = await running.api("GET", "/v1/accounts/acme")
    assert account["last_refreshed_at"] == after  # the row shows what the API reports
    assert (
        await page.locator("tr[data-account='zenith'] [data-col=refreshed] time").get_attribute(
            "datetime"
        )
        == other_before
    )
    await seen.shot("table-after-refresh")

    # The account page's button: a new attempt, with Intuit's transaction id.
    await page.goto(running.api_url + "/ui/accounts/acme")
    await page.click("#refresh-now")
    await page.wait_for_selector("#notice")
    attempts = await running.services.status.attempts("acme")
    assert attempts[0].outcome == "success"
    assert attempts[0].intuit_tid
    table = await page.inner_text("#attempts")
    assert attempts[0].intuit_tid in table
    assert await page.locator("#attempts svg rect.bar-ok").count() == len(attempts)
    await seen.shot("account-after-refresh")


async def test_the_page_keeps_itself_current_through_an_outage(
    browser: Browser,  # noqa: F811
    running: RunningDaemon,
) -> None:
    assert await running.connect("acme") == 200
    seen = await open_page(browser, "live")
    await sign_in(seen, running)
    page = seen.page
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    # Another account connects while the overview is open: its count moves by itself.
    active = page.locator(".stat[data-status='active'] [data-count]")
    assert await active.inner_text() == "1"
    assert await running.connect("zenith") == 200
    await page.wait_for_function(
        "() => document.querySelector(\".stat[data-status='active'] [data-count]\")"
        ".textContent === '2'",
        timeout=LIVE_TIMEOUT,
    )

    # Intuit fails a refresh, then recovers; the table shows both without a reload.
    await page.goto(running.api_url + "/ui/accounts")
    navigations.clear()
    failures = "document.querySelector(\"tr[data-account='acme'] [data-col=failures]\")"
    running.simulator.inject("503", 1, retry_after=600)
    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 503
    await page.wait_for_function(f"() => {failures}.textContent === '1'", timeout=LIVE_TIMEOUT)
    assert "HTTP 503" in await page.inner_text("tr[data-account='acme'] .error-cell")
    await seen.shot("during-outage")
    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 200
    await page.wait_for_function(f"() => {failures}.textContent === '0'", timeout=LIVE_TIMEOUT)
    await seen.shot("after-outage")
    assert navigations == []  # all of it without leaving the page
    assert "Live" in await page.inner_text("#live-state")


async def test_disconnect_asks_first(
    browser: Browser,  # noqa: F811
    running: RunningDaemon,
) -> None:
    assert await running.connect("acme") == 200
    seen = await open_page(browser, "disconnect")
    await sign_in(seen, running)
    page = seen.page
    await page.goto(running.api_url + "/ui/accounts/acme")

    await page.click("#disconnect")
    await page.wait_for_selector("#confirm-disconnect")
    assert "Disconnect acme?" in await page.inner_text("h1")
    await seen.shot("confirm")
    await page.click("text=Cancel")
    await page.wait_for_selector("#refresh-now")
    assert (await api_statuses(running))["acme"] == "active"  # nothing happened

    await page.click("#disconnect")
    await page.click("#confirm-disconnect")
    await page.wait_for_selector("#notice")
    assert "Disconnected" in await page.inner_text("#notice")
    assert await page.inner_text("#status-badge") == "Disconnected"
    assert (await api_statuses(running))["acme"] == "disconnected"
    revoked = running.simulator.stats()["revoke"]
    assert revoked.get("ok") == 1
    await seen.shot("disconnected")


async def test_a_wrong_key_is_refused_and_a_form_without_its_token_rejected(
    browser: Browser,  # noqa: F811
    running: RunningDaemon,
) -> None:
    assert await running.connect("acme") == 200
    seen = await open_page(browser, "refused")
    page = seen.page
    await sign_in(seen, running, key="not-the-key")
    assert "/ui/login" in page.url
    assert await page.inner_text("#signin-error") == "That key is not accepted here."
    assert COOKIE_NAME not in {c["name"] for c in await page.context.cookies()}
    await seen.shot("wrong-key")

    await page.fill("#key", running.api_key)
    await page.click("form[action='/ui/login'] button[type=submit]")
    await page.wait_for_selector("#stats")
    cookie = next(c for c in await page.context.cookies() if c["name"] == COOKIE_NAME)
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert await page.evaluate("document.cookie") == ""  # out of the script's reach

    before = await running.services.storage.load("acme")
    await page.goto(running.api_url + "/ui/accounts/acme")
    await page.eval_on_selector(
        "form[action$='/refresh'] input[name=csrf]", "field => field.remove()"
    )
    async with page.expect_navigation() as navigation:
        await page.click("#refresh-now")
    response = await navigation.value
    assert response is not None
    assert response.status == 403
    assert "Form rejected" in await page.inner_text("h1")
    await seen.shot("no-csrf")
    after = await running.services.storage.load("acme")
    assert after.version == before.version
    assert after.last_refreshed_at == before.last_refreshed_at


async def test_no_served_page_holds_a_token_and_the_policy_is_never_broken(
    browser: Browser,  # noqa: F811
    running: RunningDaemon,
) -> None:
    await populate(running)
    secrets = await secrets_of(running)
    seen = await open_page(browser, "secrets")
    await sign_in(seen, running)
    page = seen.page
    base = running.api_url
    await seen.settle()
    for path in ("/ui/?history=1h", "/ui/accounts", "/ui/accounts?sort=failures"):
        await seen.visit(base + path)
    for account_id in ("acme-active", "acme-expired", "acme-revoked", "acme-gone"):
        await seen.visit(f"{base}/ui/accounts/{account_id}")
    await page.click("#connect-link")
    await page.wait_for_selector("#connect-url")
    await seen.settle()
    url = await page.input_value("#connect-url")
    assert url.startswith(running.config.intuit.authorization_endpoint)
    await seen.shot("connect-link")
    await seen.visit(base + "/ui/accounts/acme-active/disconnect")
    await seen.visit(base + "/ui/accounts/acme-active")
    await page.click("#refresh-now")
    await page.wait_for_selector("#notice")
    await asyncio.sleep(6)  # one round of the page polling itself
    await seen.settle()
    secrets |= await secrets_of(running)

    pages = [url for url, _ in seen.bodies if "/ui/" in url and "/static/" not in url]
    assert len(pages) >= 12, pages
    assert any(b"connect-url" in body for _, body in seen.bodies)  # bodies were read
    for url, body in seen.bodies:
        # A static file the browser asked for while leaving a page may go unread; those are
        # the package's own files, checked below.
        if "/ui/static/" not in url:
            assert not body.startswith(b"<unavailable"), url
        for secret in secrets:
            assert secret.encode() not in body, f"a secret in {url}"
    html = await page.content()
    statics = [running.api_url + f"/ui/static/{name}" for name in ("app.css", "app.js")]
    for secret in secrets:
        assert secret not in html
        for static in statics:
            async with running.session.get(static) as response:
                assert secret not in await response.text()
    # The policy held: no inline script or style was ever blocked, no script failed.
    assert seen.errors == []
    assert not [line for line in seen.console if "Content Security Policy" in line], seen.console
    assert not [line for line in seen.console if line.startswith("error")], seen.console
    assert iso(running.services.clock.now())  # the daemon is still up and answering
