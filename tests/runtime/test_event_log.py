"""The daemon's log as an operator reads it: access lines, triggers, start-up, OAuth states.

A real daemon in this process against the real simulator; its lines are read
back as JSON from the stream logging writes to.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from qbo_daemon import __version__
from qbo_daemon.config.load import load_config
from qbo_daemon.core.models import iso
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon, run_daemon, wait_for
from tests.manual_clock import ManualClock

Line = dict[str, Any]


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    configure_logging("json", "debug", stream=out)
    return out


def lines(stream: io.StringIO) -> list[Line]:
    return [json.loads(text) for text in stream.getvalue().splitlines() if text.strip()]


async def line_where(stream: io.StringIO, test: Callable[[Line], bool]) -> Line:
    found: list[Line] = []

    def seen() -> bool:
        found[:] = [line for line in lines(stream) if test(line)]
        return bool(found)

    await wait_for(seen)
    return found[0]


async def get(running: RunningDaemon, path: str, **headers: str) -> int:
    """One request on a connection of its own (aiohttp decides per connection)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.api_url + path, headers={**running.headers, **headers}) as answer,
    ):
        return answer.status


# -- access lines -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["info", "debug", "off"])
async def test_access_lines_follow_the_setting_and_name_the_account(
    daemon_factory: StartDaemon, stream: io.StringIO, setting: str
) -> None:
    running = await daemon_factory(extra=f'access = "{setting}"\n')
    for path in ("/healthz", "/readyz", "/metrics", "/v1/accounts/ghost", "/v1/accounts"):
        await get(running, path)
    await get(running, "/healthz")  # a line to wait for: the ones before it are written
    if setting == "off":
        await asyncio.sleep(0.2)
        assert not [line for line in lines(stream) if line["event"] == "http.request_served"]
        return
    await line_where(
        stream, lambda line: line["event"] == "http.request_served" and line["path"] == "/healthz"
    )
    access = {
        line["path"]: line for line in lines(stream) if line["event"] == "http.request_served"
    }
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert access[probe]["level"] == "debug"
    assert access["/v1/accounts/ghost"]["level"] == setting
    assert access["/v1/accounts/ghost"]["status"] == 404
    assert access["/v1/accounts/ghost"]["account_id"] == "ghost"
    assert "account_id" not in access["/v1/accounts"]


async def test_a_reload_changes_the_access_level(
    daemon_factory: StartDaemon, stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await daemon_factory()
    await get(running, "/v1/accounts/loud")
    await line_where(stream, lambda line: line.get("path") == "/v1/accounts/loud")
    text = running.config_path.read_text(encoding="utf-8")
    running.config_path.write_text(
        text.replace('level = "info"\n', 'level = "info"\naccess = "off"\n'), encoding="utf-8"
    )
    capsys.readouterr()
    await running.daemon.reload(load_config(running.config_path, {}))  # logs to stderr
    [reloaded] = [
        line
        for line in map(json.loads, capsys.readouterr().err.splitlines())
        if line["event"] == "daemon.reloaded"
    ]
    assert reloaded["access_log"] == "off"
    configure_logging("json", "debug", stream=stream)
    await get(running, "/v1/accounts/quiet")
    await get(running, "/healthz")
    await asyncio.sleep(0.3)
    assert not [line for line in lines(stream) if line["event"] == "http.request_served"][1:]


# -- what started a refresh --------------------------------------------------------------------


async def test_refresh_lines_say_what_triggered_them(
    simulator: IntuitSimulator, daemon_factory: StartDaemon, stream: io.StringIO
) -> None:
    running = await daemon_factory()
    grants = {name: simulator.grant() for name in ("imp", "timer", "asked", "cli", "late")}

    async def put(name: str, expires_in: timedelta | None) -> None:
        grant = grants[name]
        body = {"refresh_token": grant["refresh_token"], "realm_id": grant["realm_id"]}
        if expires_in is not None:
            body["access_token"] = grant["access_token"]
            body["token_expires_at"] = iso(datetime.now(UTC) + expires_in)
        status, answer = await running.api("PUT", f"/v1/accounts/{name}/tokens", json=body)
        assert status == 201, answer

    def succeeded(name: str) -> Callable[[Line], bool]:
        return lambda line: line["event"] == "refresh.succeeded" and line.get("account_id") == name

    lead = timedelta(minutes=10)
    await put("imp", None)  # no live access token: due at once
    await put("timer", lead + timedelta(seconds=1))  # its timer fires in a second
    await put("asked", timedelta(minutes=50))
    await put("cli", timedelta(minutes=50))
    assert (await running.api("POST", "/v1/accounts/asked/refresh"))[0] == 200
    status, _ = await running.api(
        "POST",
        "/v1/accounts/cli/refresh",
        headers={**running.headers, "User-Agent": "qbo-daemon-cli/9"},
    )
    assert status == 200
    assert (await line_where(stream, succeeded("imp")))["trigger"] == "import"
    assert (await line_where(stream, succeeded("asked")))["trigger"] == "api"
    assert (await line_where(stream, succeeded("cli")))["trigger"] == "cli"
    assert (await line_where(stream, succeeded("timer")))["trigger"] == "scheduled"

    # "late" falls due while the daemon is down: the start-up catch-up refreshes it.
    await put("late", lead + timedelta(seconds=3))
    due = asyncio.get_running_loop().time() + 3.5
    running.stop.set()
    await running.task
    await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
    assert not [line for line in lines(stream) if succeeded("late")(line)]
    again = await run_daemon(
        running.config_path,
        simulator,
        api_key=running.api_key,
        encryption_key=running.encryption_key,
    )
    try:
        assert (await line_where(stream, succeeded("late")))["trigger"] == "catch_up"
        ready = [line for line in lines(stream) if line["event"] == "daemon.started"][-1]
        assert ready["version"] == __version__
        assert ready["database"] == str(running.database.resolve())
        assert ready["accounts"] == {"active": 5}
    finally:
        await again.shutdown()
    # Every refresh and account line names its account.
    for line in lines(stream):
        if line["event"].startswith(("refresh.", "account.")):
            assert isinstance(line.get("account_id"), str), line


# -- OAuth states ----------------------------------------------------------------------------------


async def test_forged_and_replayed_states_have_their_own_events(
    daemon_factory: StartDaemon, stream: io.StringIO
) -> None:
    running = await daemon_factory()
    status, body = await running.api("POST", "/v1/accounts/acme/authorize-url")
    assert status == 200
    async with aiohttp.ClientSession() as browser:
        async with browser.get(body["url"], allow_redirects=False) as consent:
            callback = consent.headers["Location"]
        for _ in range(2):  # the second is a replay: no second exchange, its own event
            async with browser.get(callback) as page:
                assert page.status == 200
        for state in ("short", "x" * 43):
            url = f"{running.callback_url}?state={state}&code=c&realmId=1"
            async with browser.get(url) as page:
                assert page.status == 400
    replayed = await line_where(stream, lambda line: line["event"] == "connect.state_replayed")
    assert (replayed["level"], replayed["account_id"]) == ("warning", "acme")
    assert replayed["first_outcome"] == "connected"
    forged = [line for line in lines(stream) if line["event"] == "connect.state_forged"]
    assert [(line["level"], line["reason"]) for line in forged] == [
        ("warning", "malformed"),
        ("warning", "unknown"),
    ]
    assert "x" * 43 not in stream.getvalue()


async def test_an_expired_state_names_its_account(
    daemon_factory: StartDaemon, stream: io.StringIO
) -> None:
    clock = ManualClock(datetime.now(UTC))
    running = await daemon_factory(clock=clock)
    status, body = await running.api("POST", "/v1/accounts/slow/authorize-url")
    assert status == 200
    clock.jump_wall(timedelta(minutes=11))  # states live ten minutes
    async with aiohttp.ClientSession() as browser:
        async with browser.get(body["url"], allow_redirects=False) as consent:
            callback = consent.headers["Location"]
        async with browser.get(callback) as page:
            assert page.status == 400
    expired = await line_where(stream, lambda line: line["event"] == "connect.state_expired")
    assert (expired["level"], expired["account_id"]) == ("info", "slow")
