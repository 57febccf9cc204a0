"""The snippets of docs/host-apps.md and docs/webhooks.md, run as a host app runs them.

Each snippet is cut out of the Markdown (so the page and the test cannot
drift) and run in its own process (python, ruby) against a real daemon in
this process, the real simulator, the stand-in QuickBooks API of
tests/host_app.py, and real signed webhook deliveries. The curl, requests and
Node snippets of host-apps.md are run by tests/test_cli.py.

Without ``ruby`` the Ruby snippets are skipped, with the reason shown; with
``CI=true`` a missing ``ruby`` fails instead (scripts/check installs it).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import qbo_daemon.client
from qbo_daemon.client import DEFAULT_MARGIN, DEFAULT_RETRY_AFTER, ClientError
from qbo_daemon.runtime.webhooks import EVENTS, WebhookNotifier
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon, wait_for
from tests.host_app import (
    STALE,
    QuickBooksApi,
    browse,
    import_account,
    import_stale,
    serve_quickbooks,
)

ROOT = Path(__file__).resolve().parents[1]
# The snippets must not pick up a developer's real settings.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("QBO_", "CREDENTIALS_"))}
WEBHOOK_SECRET = "whsec-docs-test-0123456789"


def snippet(doc: str, language: str, marker: str) -> str:
    """The one ``language`` block of docs/``doc`` that contains ``marker``."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"docs/{doc}: {len(found)} {language} blocks contain {marker!r}"
    return found[0]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{tool} is required in CI to run the documented snippets")
    pytest.skip(f"{tool} is not installed (apt-get install -y {tool}): its snippets are not run")


async def run(argv: list[str], env: dict[str, str], timeout: float = 60) -> str:
    """Run a snippet's process while this loop keeps serving the daemon; its stdout."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode()
    return out.decode()


def daemon_env(running: RunningDaemon, **more: str) -> dict[str, str]:
    return {**ENV, "QBO_DAEMON_URL": running.api_url, "QBO_API_KEY": running.api_key, **more}


@pytest.fixture
async def quickbooks(running: RunningDaemon) -> AsyncIterator[QuickBooksApi]:
    async with serve_quickbooks(running.simulator) as api:
        yield api


@pytest.fixture
async def running(daemon_factory: StartDaemon) -> RunningDaemon:
    return await daemon_factory()


# -- docs/host-apps.md ---------------------------------------------------------------


async def test_the_client_snippets_call_quickbooks_and_ask_for_a_connection(
    running: RunningDaemon, quickbooks: QuickBooksApi, tmp_path: Path
) -> None:
    acme = await import_stale(running, "acme")  # QuickBooks refuses its token: one retry
    beta = await import_stale(running, "beta")
    env = daemon_env(running, QUICKBOOKS_API=quickbooks.url)

    script = tmp_path / "host_app.py"
    script.write_text(
        snippet("host-apps.md", "python", "def company_name(account_id: str)")
        + "\nprint(company_name('acme'))\n"
        + "try:\n    company_name('ghost')\nexcept ConnectRequired as exc:\n"
        + "    print(exc.authorize_url)\n",
        encoding="utf-8",
    )
    name, url = (await run([sys.executable, str(script)], env)).splitlines()
    assert name == f"Company {acme['realm_id']}"
    assert url.startswith(running.simulator.authorization_endpoint + "?")

    script = tmp_path / "host_app_async.py"
    script.write_text(
        snippet("host-apps.md", "python", "async def company_name(")
        + "\nimport asyncio\nfrom qbo_daemon.client import ConnectRequired\n\n\n"
        + "async def drive() -> None:\n"
        + "    async with (\n"
        + "        AsyncTokenClient(os.environ['QBO_DAEMON_URL'], os.environ['QBO_API_KEY'])"
        + " as qbo_daemon,\n"
        + "        aiohttp.ClientSession() as quickbooks,\n"
        + "    ):\n"
        + "        print(await company_name(qbo_daemon, quickbooks, 'beta'))\n"
        + "        try:\n"
        + "            await company_name(qbo_daemon, quickbooks, 'ghost')\n"
        + "        except ConnectRequired as exc:\n"
        + "            print(exc.authorize_url)\n\n\n"
        + "asyncio.run(drive())\n",
        encoding="utf-8",
    )
    name, url = (await run([sys.executable, str(script)], env)).splitlines()
    assert name == f"Company {beta['realm_id']}"
    assert url.startswith(running.simulator.authorization_endpoint + "?")

    assert [(s.access_token == STALE, s.status) for s in quickbooks.seen] == [
        (True, 401),
        (False, 200),
    ] * 2


async def test_the_ruby_token_snippet(running: RunningDaemon, tmp_path: Path) -> None:
    ruby = need("ruby")
    grant = await import_account(running, "doc-1")
    second = await import_account(running, "doc-2")
    assert (await running.api("GET", "/v1/accounts/doc-2/token"))[0] == 200  # refreshed
    running.simulator.inject("invalid_grant", 1)
    assert (await running.api("POST", "/v1/accounts/doc-2/refresh"))[0] == 409

    script = tmp_path / "host_app.rb"
    script.write_text(
        snippet("host-apps.md", "ruby", "def quickbooks_token")
        + "\nputs JSON.generate(quickbooks_token('doc-1'))\n"
        + "%w[ghost doc-2].each do |id|\n"
        + "  quickbooks_token(id)\n"
        + "rescue ReconnectNeeded => e\n"
        + "  puts e.url\n"
        + "end\n",
        encoding="utf-8",
    )
    token, never_connected, must_reconnect = (
        await run([ruby, str(script)], daemon_env(running))
    ).splitlines()
    assert json.loads(token)["realm_id"] == grant["realm_id"]
    assert running.simulator.is_access_token_valid(json.loads(token)["access_token"])
    for url in (never_connected, must_reconnect):
        assert url.startswith(running.simulator.authorization_endpoint + "?")
    running.simulator.choose_realm(second["realm_id"])  # the same company again
    assert await browse(must_reconnect) == 200  # the URL really reconnects doc-2
    assert (await running.api("GET", "/v1/accounts/doc-2/token"))[0] == 200


def test_the_client_section_matches_the_client() -> None:
    text = (ROOT / "docs" / "host-apps.md").read_text(encoding="utf-8")
    flat = " ".join(text.split())
    minutes = DEFAULT_MARGIN / timedelta(minutes=1)
    assert f"keeps each tenant's token until {minutes:g} minutes before its `expires_at`" in flat
    assert f"client's advice: {DEFAULT_RETRY_AFTER:g} seconds unless you pass" in flat
    errors = [
        name
        for name in qbo_daemon.client.__all__
        if isinstance(getattr(qbo_daemon.client, name), type)
        and issubclass(getattr(qbo_daemon.client, name), ClientError)
        and name not in ("ClientError", "ConnectRequired")
    ]
    assert len(errors) == 7
    for name in errors:
        assert f"| `{name}` |" in text, name


# -- docs/webhooks.md ----------------------------------------------------------------


@dataclass
class Receiver:
    url: str = ""
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.deliveries.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    def events(self) -> list[str]:
        return [json.loads(body)["event"] for _, body in self.deliveries]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hooks = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/qbo-daemon", hooks.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    hooks.url = f"http://{host}:{port}/hooks/qbo-daemon"
    yield hooks
    await runner.cleanup()


def documented_events() -> dict[str, set[str]]:
    """Event → its documented ``data`` fields, from the events table of webhooks.md."""
    text = (ROOT / "docs" / "webhooks.md").read_text(encoding="utf-8")
    events: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("| `account."):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            events[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[2]))
    return events


async def signed_deliveries(daemon_factory: StartDaemon, hooks: Receiver) -> list[dict[str, Any]]:
    """Every event, really caused, delivered by a daemon; as {headers, body} in order."""
    extra = f'\n[notify]\nwebhook_url = "{hooks.url}"\nsecret = "{WEBHOOK_SECRET}"\n'
    running = await daemon_factory(extra=extra)
    simulator = running.simulator
    # Intuit's 5-year limit is 10 days away for connections made from now on.
    simulator.settings.update(hard_expires_in=10 * 86400)

    assert await running.connect("acme") == 200  # account.connected
    assert (await running.api("POST", "/v1/accounts/acme/refresh"))[0] == 200  # hard_expiry_soon
    simulator.inject("503", 1)
    assert (await running.api("POST", "/v1/accounts/acme/refresh"))[0] == 503
    await wait_for(lambda: "account.recovered" in hooks.events())  # the timer's retry worked
    assert await running.connect("beta") == 200
    # beta moves to another company, as its authorize-url request allows: realm_changed.
    status, body = await running.api(
        "POST", "/v1/accounts/beta/authorize-url", json={"allow_realm_change": True}
    )
    assert status == 200, body
    assert await browse(body["url"]) == 200
    simulator.inject("invalid_grant", 1)
    assert (await running.api("POST", "/v1/accounts/beta/refresh"))[0] == 409  # needs_reconnect
    assert (await running.api("DELETE", "/v1/accounts/acme"))[0] == 200  # disconnected
    await wait_for(lambda: set(hooks.events()) == EVENTS)
    return [
        {"header": headers["Qbo-Daemon-Signature"], "body": body.decode("utf-8")}
        for headers, body in hooks.deliveries
    ]


def check_script(language: str, deliveries: Path) -> str:
    """A driver that checks every delivery, then each way of spoiling it; one line each."""
    secret = WEBHOOK_SECRET
    if language == "python":
        return (
            "\nimport json\n"
            f"for d in json.load(open({str(deliveries)!r}, encoding='utf-8')):\n"
            "    body = d['body'].encode()\n"
            "    t = int(d['header'].split(',')[0].removeprefix('t='))\n"
            f"    secret = {secret!r}.encode()\n"
            "    print(qbo_daemon_signature_valid(secret, d['header'], body),\n"
            "          qbo_daemon_signature_valid(secret, d['header'], body + b' '),\n"
            "          qbo_daemon_signature_valid(secret, d['header'], 'é'.encode() + body[1:]),\n"
            "          qbo_daemon_signature_valid(b'another secret', d['header'], body),\n"
            "          qbo_daemon_signature_valid(secret, d['header'], body, now=t + 301),\n"
            "          qbo_daemon_signature_valid(secret, '', body))\n"
        )
    return (
        '\nrequire "json"\n'
        f"JSON.parse(File.read({json.dumps(str(deliveries))})).each do |d|\n"
        '  body, header = d["body"], d["header"]\n'
        '  t = header.split(",").first.delete_prefix("t=").to_i\n'
        f"  secret = {json.dumps(secret)}\n"
        "  puts [qbo_daemon_signature_valid?(secret, header, body),\n"
        '        qbo_daemon_signature_valid?(secret, header, body + " "),\n'
        '        qbo_daemon_signature_valid?(secret, header, "é" + body[1..]),\n'
        '        qbo_daemon_signature_valid?("another secret", header, body),\n'
        "        qbo_daemon_signature_valid?(secret, header, body, now: t + 301),\n"
        '        qbo_daemon_signature_valid?(secret, "", body)].join(" ")\n'
        "end\n"
    )


async def test_the_webhook_contract_matches_real_deliveries(
    daemon_factory: StartDaemon, receiver: Receiver, tmp_path: Path
) -> None:
    deliveries = await signed_deliveries(daemon_factory, receiver)

    documented = documented_events()
    assert set(documented) == EVENTS
    for headers, raw in receiver.deliveries:
        body = json.loads(raw)
        assert set(body) == {"id", "event", "account_id", "occurred_at", "data"}
        assert set(body["data"]) == documented[body["event"]], body["event"]
        assert headers["Content-Type"] == "application/json"
        assert headers["Qbo-Daemon-Event"] == body["event"]
        assert headers["Qbo-Daemon-Delivery"] == body["id"]
        assert body["occurred_at"].endswith("Z")
    text = " ".join((ROOT / "docs" / "webhooks.md").read_text(encoding="utf-8").split())
    defaults = inspect.signature(WebhookNotifier).parameters
    assert f"up to {defaults['max_attempts'].default} attempts" in text
    assert f"at most {defaults['queue_size'].default:,} events" in text
    assert defaults["backoff_initial"].default == 1.0
    assert defaults["backoff_max"].default == 300.0
    assert "(1 s doubling up to 5 minutes)" in text
    [refused] = [json.loads(raw) for _, raw in receiver.deliveries if b"reconnect_needed" in raw]
    assert f"`{refused['data']['reason']}`" in text  # the documented example is a real one

    saved = tmp_path / "deliveries.json"
    saved.write_text(json.dumps(deliveries), encoding="utf-8")
    expected = ["True False False False False False"] * len(deliveries)

    script = tmp_path / "verify.py"
    script.write_text(
        snippet("webhooks.md", "python", "def qbo_daemon_signature_valid(")
        + check_script("python", saved),
        encoding="utf-8",
    )
    assert (await run([sys.executable, str(script)], ENV)).splitlines() == expected

    ruby = need("ruby")
    script = tmp_path / "verify.rb"
    script.write_text(
        snippet("webhooks.md", "ruby", "def qbo_daemon_signature_valid?")
        + check_script("ruby", saved),
        encoding="utf-8",
    )
    answer = (await run([ruby, str(script)], ENV)).splitlines()
    assert [line.replace("true", "True").replace("false", "False") for line in answer] == expected
