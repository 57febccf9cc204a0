"""The status page over plain HTTP against a real daemon: sign-in, sessions, CSRF, headers.

The browser tests (test_ui_browser.py) walk the same pages in Chromium; these
need no browser and pin down each security rule on its own.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from qbo_daemon.config.load import load_config
from qbo_daemon.http.ui import session as sessions
from qbo_daemon.http.ui.guard import CSP
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon
from tests.ui_support import UiClient, api_statuses, csrf_of, populate, secrets_of


@pytest.fixture
async def running(daemon_factory: StartDaemon) -> RunningDaemon:
    return await daemon_factory()


@pytest.fixture
async def client(running: RunningDaemon) -> AsyncIterator[UiClient]:
    ui = UiClient.open(running)
    yield ui
    await ui.close()


async def test_every_page_redirects_to_sign_in_until_signed_in(client: UiClient) -> None:
    for path in ("/ui/", "/ui/accounts?status=active", "/ui/accounts/acme"):
        status, _, response = await client.get(path)
        assert status == 303
        assert response.headers["Location"].startswith("/ui/login?next=/ui/")
    status, page, _ = await client.get("/ui/login")
    assert status == 200
    assert 'name="key"' in page


async def test_the_api_key_signs_in_with_a_signed_httponly_strict_cookie(
    running: RunningDaemon, client: UiClient
) -> None:
    status, _, response = await client.sign_in(running.api_key)
    assert status == 303
    assert response.headers["Location"] == "/ui/"
    cookie = response.cookies[sessions.COOKIE_NAME]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/ui/"
    assert int(cookie["max-age"]) == int(sessions.SESSION_TTL.total_seconds())
    assert running.api_key not in cookie.value  # only the key's short id travels
    assert cookie.value.split(".")[1] == sessions.key_id(running.config.api.keys[0])
    status, page, _ = await client.get("/ui/")
    assert status == 200
    assert "Overview" in page


async def test_a_wrong_key_is_refused_and_sets_no_session(
    running: RunningDaemon, client: UiClient
) -> None:
    status, page, response = await client.sign_in("not-" + running.api_key)
    assert status == 401
    assert "That key is not accepted here." in page
    assert sessions.COOKIE_NAME not in response.cookies
    assert "not-" + running.api_key not in page  # the attempt is not echoed
    status, _, _ = await client.get("/ui/")
    assert status == 303


async def test_a_sign_in_without_its_form_token_is_refused(
    running: RunningDaemon, client: UiClient
) -> None:
    await client.get("/ui/login")
    status, page, response = await client.post(
        "/ui/login", {"csrf": "forged-forged-forged-forged-forg", "key": running.api_key}
    )
    assert status == 403
    assert "security token" in page
    assert sessions.COOKIE_NAME not in response.cookies


async def test_repeated_wrong_keys_lock_the_address_out_for_a_while(
    running: RunningDaemon, client: UiClient
) -> None:
    _, page, _ = await client.get("/ui/login")
    token = csrf_of(page)
    statuses = []
    for _ in range(11):
        status, _, _ = await client.post("/ui/login", {"csrf": token, "key": "wrong"})
        statuses.append(status)
    assert statuses == [401] * 10 + [429]
    # Locked out even with the right key, until the window passes.
    status, page, response = await client.post("/ui/login", {"csrf": token, "key": running.api_key})
    assert status == 429
    assert "Too many failed sign-ins" in page
    assert int(response.headers["Retry-After"]) >= 1


async def test_a_form_without_its_csrf_token_changes_nothing(
    running: RunningDaemon, client: UiClient
) -> None:
    assert await running.connect("acme") == 200
    before = await running.services.storage.load("acme")
    await client.sign_in(running.api_key)
    for data in ({}, {"csrf": ""}, {"csrf": "x" * 43}):
        status, page, _ = await client.post("/ui/accounts/acme/refresh", data)
        assert status == 403
        assert "Form rejected" in page
        status, _, _ = await client.post("/ui/accounts/acme/disconnect", data)
        assert status == 403
    after = await running.services.storage.load("acme")
    assert after.version == before.version
    assert after.status == before.status
    assert await running.services.status.attempts("acme") == []
    # With the page's token the same form works.
    _, page, _ = await client.get("/ui/accounts/acme")
    status, _, response = await client.post("/ui/accounts/acme/refresh", {"csrf": csrf_of(page)})
    assert status == 303
    assert response.headers["Location"] == "/ui/accounts/acme?notice=refreshed"


async def test_another_sessions_csrf_token_is_rejected(
    running: RunningDaemon, client: UiClient
) -> None:
    assert await running.connect("acme") == 200
    other = UiClient.open(running)
    try:
        await other.sign_in(running.api_key)
        _, page, _ = await other.get("/ui/accounts/acme")
        foreign = csrf_of(page)
    finally:
        await other.close()
    await client.sign_in(running.api_key)
    status, _, _ = await client.post("/ui/accounts/acme/refresh", {"csrf": foreign})
    assert status == 403


async def test_a_tampered_or_expired_cookie_is_no_session(
    running: RunningDaemon, client: UiClient
) -> None:
    await client.sign_in(running.api_key)
    value = client.cookie(sessions.COOKIE_NAME)
    assert value is not None
    version, kid, expires, session_id, mac = value.split(".")
    later = str(int(expires) + 86400)  # a longer life, without the key to sign it
    for forged in (
        f"{version}.{kid}.{later}.{session_id}.{mac}",
        f"{version}.{kid}.{expires}.{session_id}.{mac[:-2]}AA",
        "",
    ):
        client.set_cookie(sessions.COOKIE_NAME, forged)
        status, _, _ = await client.get("/ui/")
        assert status == 303, forged
    # A genuine cookie whose time is up.
    key = running.config.api.keys[0]
    cookie, _ = sessions.issue(
        key, running.services.clock.now() - sessions.SESSION_TTL - sessions.SESSION_TTL
    )
    client.set_cookie(sessions.COOKIE_NAME, cookie)
    status, _, _ = await client.get("/ui/")
    assert status == 303


async def test_removing_a_key_from_the_configuration_ends_its_sessions(
    running: RunningDaemon, client: UiClient
) -> None:
    await client.sign_in(running.api_key)
    assert (await client.get("/ui/"))[0] == 200
    text = running.config_path.read_text(encoding="utf-8")
    running.config_path.write_text(
        text.replace(f'keys = ["{running.api_key}"]', 'keys = ["a-new-key-for-everyone-else"]'),
        encoding="utf-8",
    )
    await running.daemon.reload(load_config(running.config_path, {}))
    status, _, response = await client.get("/ui/")
    assert status == 303
    assert response.headers["Location"].startswith("/ui/login")


async def test_sessions_need_no_daemon_state_any_daemon_with_the_key_accepts_them(
    running: RunningDaemon, client: UiClient, daemon_factory: StartDaemon
) -> None:
    """A cookie from one daemon works at another configured with the same key."""
    await client.sign_in(running.api_key)
    cookie = client.cookie(sessions.COOKIE_NAME)
    other = await daemon_factory("other")
    text = other.config_path.read_text(encoding="utf-8")
    other.config_path.write_text(
        text.replace(f'keys = ["{other.api_key}"]', f'keys = ["{running.api_key}"]'),
        encoding="utf-8",
    )
    await other.daemon.reload(load_config(other.config_path, {}))
    visitor = UiClient.open(other)
    try:
        visitor.set_cookie(sessions.COOKIE_NAME, cookie or "")
        status, page, _ = await visitor.get("/ui/")
        assert status == 200
        assert "Overview" in page
    finally:
        await visitor.close()


async def test_every_answer_carries_the_security_headers(
    running: RunningDaemon, client: UiClient
) -> None:
    assert await running.connect("acme") == 200
    await client.get("/ui/login")
    await client.get("/ui/")  # a redirect
    await client.sign_in(running.api_key)
    for path in (
        "/ui/",
        "/ui/accounts",
        "/ui/accounts/acme",
        "/ui/accounts/acme/disconnect",
        "/ui/accounts/nobody",
        "/ui/no-such-page",
        "/ui/static/app.css",
    ):
        await client.get(path)
    for path, _status, _ in client.served:
        async with client.http.get(client.base + path, allow_redirects=False) as response:
            headers = response.headers
        assert headers["Content-Security-Policy"] == CSP, path
        assert "'unsafe-inline'" not in CSP
        assert "frame-ancestors 'none'" in CSP
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        if not path.startswith("/ui/static/"):
            assert headers["Cache-Control"] == "no-store", path
    statuses = {path: status for path, status, _ in client.served}
    assert statuses["/ui/accounts/nobody"] == 404
    assert statuses["/ui/no-such-page"] == 404


async def test_pages_carry_no_inline_script_or_style(
    running: RunningDaemon, client: UiClient
) -> None:
    await populate(running)
    await client.sign_in(running.api_key)
    for path in ("/ui/", "/ui/accounts", "/ui/accounts/acme-expired", "/ui/login"):
        _, page, _ = await client.get(path)
        scripts = re.findall(r"<script\b[^>]*>", page)
        assert scripts
        assert all(" src=" in tag for tag in scripts), scripts
        assert "</script>" in page
        assert re.search(r"<script[^>]*>[^<]+</script>", page) is None
        assert "style=" not in page
        assert "<style" not in page
        assert re.search(r"\son[a-z]+=", page) is None  # no event handler attributes


async def test_the_api_still_wants_its_bearer_key_and_the_page_does_not_open_it(
    running: RunningDaemon, client: UiClient
) -> None:
    await client.sign_in(running.api_key)
    # A signed-in browser's cookie is no key for the API.
    async with client.http.get(client.base + "/v1/accounts") as response:
        assert response.status == 401
    async with client.http.get(client.base + "/uix") as response:
        assert response.status == 401


async def test_the_pages_show_what_the_api_reports(
    running: RunningDaemon, client: UiClient
) -> None:
    expected = await populate(running)
    assert await api_statuses(running) == expected
    await client.sign_in(running.api_key)
    _, page, _ = await client.get("/ui/accounts")
    for account_id, status in expected.items():
        row = page.split(f'data-account="{account_id}"', 1)[1].split("</tr>", 1)[0]
        assert f"badge-{status}" in row, (account_id, status)
    _, page, _ = await client.get("/ui/")
    for status in set(expected.values()):
        stat = page.split(f'data-status="{status}"', 1)[1].split("</a>", 1)[0]
        assert '<span class="stat-number" data-count>1</span>' in stat, status


async def test_no_served_page_contains_a_token_or_key(
    running: RunningDaemon, client: UiClient
) -> None:
    await populate(running)
    secrets = await secrets_of(running)
    await client.sign_in(running.api_key)
    for path in (
        "/ui/",
        "/ui/?history=12h",
        "/ui/accounts",
        "/ui/accounts?status=expired&sort=failures",
        "/ui/accounts?q=acme",
        "/ui/accounts/acme-active",
        "/ui/accounts/acme-expired",
        "/ui/accounts/acme-revoked",
        "/ui/accounts/acme-gone",
        "/ui/accounts/acme-active/disconnect",
    ):
        assert (await client.get(path))[0] == 200, path
    _, page, _ = await client.get("/ui/accounts/acme-active")
    status, link_page, _ = await client.post(
        "/ui/accounts/acme-active/connect-link", {"csrf": csrf_of(page)}
    )
    assert status == 200
    assert "/connect/oauth2" in link_page or "authorize" in link_page
    await client.post("/ui/accounts/acme-active/refresh", {"csrf": csrf_of(page)})
    secrets |= await secrets_of(running)  # the refresh minted new tokens
    for path, _, text in client.served:
        for secret in secrets:
            assert secret not in text, f"a secret in {path}"
