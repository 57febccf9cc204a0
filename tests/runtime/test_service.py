"""The daemon as a service, end to end: sd_notify, health, metrics and webhooks.

Each test runs a real daemon in this process against the real simulator; the
service manager is a datagram socket the test binds, the webhook receiver a
real aiohttp app on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from qbo_daemon.cli.demo import free_port
from qbo_daemon.config.load import load_config
from qbo_daemon.core.metrics import MAX_ERROR_CLASSES, Metrics
from qbo_daemon.runtime import daemon as daemon_module
from qbo_daemon.runtime.webhooks import EVENTS
from qbo_daemon.simulator.app import IntuitSimulator
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon, wait_for

WEBHOOK_SECRET = "whsec-service-test-0123456789"


# -- sd_notify -------------------------------------------------------------------


class ServiceManager:
    """Stands in for systemd: collects the daemon's notifications in arrival order.

    When ``READY=1`` arrives it checks at once, before anything else, that the
    API answers and that the stored account is already scheduled.
    """

    def __init__(self, config_path: Path) -> None:
        self.name = f"qbo-daemon-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.setblocking(False)
        self.config_path = config_path
        self.messages: list[str] = []
        self.at_ready: dict[str, Any] = {}
        self.errors: list[BaseException] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return "@" + self.name

    def start(self) -> None:
        self._task = asyncio.create_task(self._collect())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close()

    def count(self, prefix: str) -> int:
        return sum(1 for m in self.messages if m.startswith(prefix))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = (await loop.sock_recv(self.sock, 4096)).decode()
            self.messages.append(message)
            if message.startswith("READY=1"):
                try:
                    await self._check_ready()
                except Exception as exc:  # reported by the test, not lost in this task
                    self.errors.append(exc)

    async def _check_ready(self) -> None:
        config = load_config(self.config_path, {})
        # A bare TCP connect first: the listener must already be bound.
        _, writer = await asyncio.open_connection(config.api.host, config.api.port)
        writer.close()
        await writer.wait_closed()
        headers = {"Authorization": f"Bearer {config.api.keys[0].reveal()}"}
        answers = {}
        async with aiohttp.ClientSession(base_url=config.api.url, headers=headers) as http:
            for path in ("/healthz", "/readyz", "/v1/accounts/acme"):
                async with http.get(path) as response:
                    answers[path] = (response.status, await response.json())
        self.at_ready = answers


@pytest.fixture
def fast_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """STATUS= every 0.2 s instead of every 15 s, so a test sees several."""
    monkeypatch.setattr(daemon_module, "STATUS_INTERVAL", 0.2)


@pytest.mark.usefixtures("fast_status")
async def test_ready_status_watchdog_stopping_in_order(
    daemon_factory: StartDaemon, tmp_path: Path
) -> None:
    first = await daemon_factory("svc")
    assert await first.connect("acme") == 200
    await first.shutdown()

    # The same database again, now under a "service manager" with a 0.2 s watchdog.
    manager = ServiceManager(tmp_path / "svc" / "config.toml")
    manager.start()
    try:
        running = await daemon_factory(
            "svc",
            encryption_key=first.encryption_key,
            environ={
                "NOTIFY_SOCKET": manager.address,
                "WATCHDOG_USEC": "200000",
                "WATCHDOG_PID": str(os.getpid()),
            },
        )
        await wait_for(lambda: manager.at_ready or manager.errors)
        assert not manager.errors, manager.errors
        assert manager.at_ready["/healthz"][0] == 200
        assert manager.at_ready["/readyz"] == (
            200,
            {
                "ready": True,
                "checks": {"database": "ok", "scheduler": "ok", "intuit_credentials": "ok"},
            },
        )
        status, account = manager.at_ready["/v1/accounts/acme"]
        assert status == 200
        assert account["next_refresh_at"] is not None, "READY=1 before the account was scheduled"

        # Live counts: a second connection shows up in a later STATUS=.
        assert await running.connect("beta") == 200
        await wait_for(lambda: any("2 active" in m for m in manager.messages[1:]))
        await wait_for(lambda: manager.count("WATCHDOG=1") >= 3)
        await running.shutdown()
        await wait_for(lambda: manager.count("STOPPING=1") == 1)
    finally:
        await manager.close()

    messages = manager.messages
    assert messages[0] == "READY=1\nSTATUS=1 active, 0 expired, 0 need reconnect, 0 refreshing"
    assert manager.count("READY=1") == 1
    assert messages[-1] == "STOPPING=1"
    middle = messages[1:-1]
    assert middle
    assert all(m == "WATCHDOG=1" or m.startswith("STATUS=") for m in middle), middle
    assert "STATUS=2 active, 0 expired, 0 need reconnect, 0 refreshing" in middle


async def test_no_notifications_without_notify_socket(daemon_factory: StartDaemon) -> None:
    """Started by hand (no $NOTIFY_SOCKET), the daemon runs the same and sends nothing."""
    running = await daemon_factory()
    status, body = await running.api("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})


# -- health ------------------------------------------------------------------------


async def test_readyz_follows_intuit_client_credentials(daemon_factory: StartDaemon) -> None:
    running = await daemon_factory()
    assert await running.connect("acme") == 200
    assert (await running.api("GET", "/readyz"))[0] == 200

    running.simulator.inject("invalid_client", 1)
    status, body = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 503
    assert body["error"] == "invalid_client"

    status, body = await running.api("GET", "/readyz", headers={})
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["scheduler"] == "ok"
    assert "invalid_client" in body["checks"]["intuit_credentials"]
    assert await running.api("GET", "/healthz", headers={}) == (200, {"status": "ok"})
    assert sample(await scrape(running), "qbo_up") == 0
    # A fault of the daemon's credentials marks no account.
    assert (await running.api("GET", "/v1/accounts/acme"))[1]["status"] == "active"

    # The operator fixes the credentials and reloads (SIGHUP): the paused refreshes
    # resume at once, Intuit accepts them, and the daemon is ready again.
    refreshes = running.simulator.stats()["token"]["ok"]
    await running.daemon.reload(load_config(running.config_path, {}))

    async def ready() -> bool:
        return (await running.api("GET", "/readyz", headers={}))[0] == 200

    await wait_for(ready)
    assert sample(await scrape(running), "qbo_up") == 1
    assert running.simulator.stats()["token"]["ok"] == refreshes + 1
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200
    assert running.simulator.is_access_token_valid(token["access_token"])


# -- metrics -----------------------------------------------------------------------


async def scrape(running: RunningDaemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` without a key, parsed: (sample name, sorted labels) -> value."""
    async with running.session.get(running.api_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_real_refreshes(daemon_factory: StartDaemon) -> None:
    running = await daemon_factory()
    simulator = running.simulator
    before = await scrape(running)
    assert sample(before, "qbo_accounts", status="active") == 0
    assert ("qbo_next_refresh_due_seconds", ()) not in before

    # A 2 s token is refreshed by its timer at half life: a timer-driven refresh.
    simulator.settings.update(expires_in=2)
    assert await running.connect("acme") == 200
    found = await scrape(running)
    assert sample(found, "qbo_callback_total", outcome="connected") == 1
    assert sample(found, "qbo_accounts", status="active") == 1, "account gauges are stale"
    await wait_for(
        lambda: running.services.metrics.registry.get_sample_value(
            "qbo_refresh_attempts_total", {"outcome": "success"}
        ),
        timeout=15,
    )
    simulator.settings.update(expires_in=3600)
    # A call to Intuit shows on the in-flight gauge while it lasts, and only then.
    simulator.settings.update(latency=0.5)
    refresh = asyncio.ensure_future(running.api("POST", "/v1/accounts/acme/refresh"))

    async def calling() -> bool:
        return sample(await scrape(running), "qbo_refreshes_in_flight") == 1

    await wait_for(calling)
    status, _ = await refresh
    simulator.settings.update(latency=0)
    assert status == 200

    found = await scrape(running)
    assert found[("qbo_refreshes_in_flight", ())] == 0
    successes = sample(found, "qbo_refresh_attempts_total", outcome="success")
    assert successes >= 2
    assert sample(found, "qbo_refresh_duration_seconds_count") == successes
    assert sample(found, "qbo_refresh_duration_seconds_bucket", le="+Inf") == successes
    assert sample(found, "qbo_refresh_lateness_seconds_count") >= 1
    # On time: a timer refresh starts well within a second of its due time.
    assert sample(found, "qbo_refresh_lateness_seconds_bucket", le="1.0") >= 1
    # The next refresh is 50 minutes away: beyond the timers' 10-minute window.
    assert ("qbo_next_refresh_due_seconds", ()) not in found

    # A 500 from Intuit: an error by class, a retry, and the retry succeeds.
    simulator.inject("500", 1)
    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 503
    found = await scrape(running)
    assert sample(found, "qbo_intuit_errors_total", **{"class": "internal_server_error"}) == 1
    assert sample(found, "qbo_refresh_attempts_total", outcome="transient") == 1
    assert sample(found, "qbo_refresh_retries_total") == 1
    await wait_for(
        lambda: (
            running.services.metrics.registry.get_sample_value(
                "qbo_refresh_attempts_total", {"outcome": "success"}
            )
            == successes + 1
        )
    )

    # invalid_grant: the account needs a reconnect, and the gauges say so at once.
    simulator.inject("invalid_grant", 1)
    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 409
    found = await scrape(running)
    assert sample(found, "qbo_intuit_errors_total", **{"class": "invalid_grant"}) == 1
    assert sample(found, "qbo_refresh_attempts_total", outcome="invalid_grant") == 1
    assert sample(found, "qbo_accounts", status="needs_reconnect") == 1
    assert sample(found, "qbo_accounts", status="active") == 0

    # A callback with a state the daemon never issued.
    async with running.session.get(
        running.callback_url, params={"code": "c", "state": "forged", "realmId": "1"}
    ) as page:
        assert page.status == 400
    found = await scrape(running)
    assert sample(found, "qbo_callback_total", outcome="invalid_state") == 1
    assert sample(found, "qbo_callback_total", outcome="connected") == 1


def test_intuit_error_classes_are_bounded() -> None:
    """Intuit's error codes become label values; a proxy answering anything must not
    grow the series without bound."""
    metrics = Metrics()
    for n in range(MAX_ERROR_CLASSES + 10):
        metrics.intuit_error(f"code_{n}")
    metrics.intuit_error("<html><body>502</body></html>")
    metrics.intuit_error("code_0")
    found = {
        s.labels["class"]: s.value
        for family in text_string_to_metric_families(metrics.render()[0].decode())
        for s in family.samples
        if s.name == "qbo_intuit_errors_total"
    }
    assert len(found) == MAX_ERROR_CLASSES + 1
    assert found["other"] == 11
    assert found["code_0"] == 2


# -- webhooks ----------------------------------------------------------------------


@dataclass
class Receiver:
    """The host app's webhook endpoint: answers 500 to the first ``fail_first`` posts."""

    fail_first: int
    posts: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 500 if len(self.posts) < self.fail_first else 204
        self.posts.append((status, dict(request.headers), body))
        return web.Response(status=status)

    def delivered(self) -> list[dict[str, Any]]:
        """Bodies of accepted deliveries, in arrival order."""
        return [json.loads(body) for status, _, body in self.posts if status == 204]

    def events(self) -> list[str]:
        return [d["event"] for d in self.delivered()]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hooks = Receiver(fail_first=1)
    app = web.Application()
    app.router.add_post("/hooks", hooks.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield hooks, f"http://127.0.0.1:{port}/hooks"
    await runner.cleanup()


def signature_ok(header: str, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    t = fields["t"]
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), t.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return abs(time.time() - int(t)) <= 300 and hmac.compare_digest(expected, fields["v1"])


def issued_tokens(simulator: IntuitSimulator) -> set[str]:
    tokens: set[str] = set()
    for entry in simulator.request_log:
        tokens.update(t for t in (entry.presented_refresh_token, entry.issued_refresh_token) if t)
    return tokens


async def test_webhooks_from_real_daemon_events(
    daemon_factory: StartDaemon, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    extra = f'\n[notify]\nwebhook_url = "{url}"\nsecret = "{WEBHOOK_SECRET}"\n'
    running = await daemon_factory(extra=extra)
    simulator = running.simulator

    # Connected; the receiver fails the first delivery, which is retried.
    assert await running.connect("acme") == 200
    await wait_for(lambda: hooks.events() == ["account.connected"])
    (first_status, first_headers, first_body), (_, retry_headers, retry_body) = hooks.posts
    assert first_status == 500
    assert first_body == retry_body
    assert first_headers["Qbo-Daemon-Delivery"] == retry_headers["Qbo-Daemon-Delivery"]
    assert hooks.delivered()[0]["account_id"] == "acme"

    # invalid_grant: the user must reconnect.
    assert await running.connect("beta") == 200
    simulator.inject("invalid_grant", 1)
    status, _ = await running.api("POST", "/v1/accounts/beta/refresh")
    assert status == 409
    await wait_for(lambda: "account.reconnect_needed" in hooks.events())

    # A transient failure, then the timer's retry succeeds: recovered.
    simulator.inject("503", 1)
    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 503
    await wait_for(lambda: "account.recovered" in hooks.events())
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200
    access_tokens = {token["access_token"]}

    status, _ = await running.api("DELETE", "/v1/accounts/acme")
    assert status == 200
    await wait_for(lambda: "account.disconnected" in hooks.events())

    delivered = {d["event"]: d for d in hooks.delivered()}
    assert delivered["account.reconnect_needed"]["account_id"] == "beta"
    assert delivered["account.recovered"]["account_id"] == "acme"
    assert delivered["account.recovered"]["data"]["after_failures"] == 1
    assert delivered["account.disconnected"]["account_id"] == "acme"
    # A hard expiry ahead and a change of company have tests of their own.
    assert sorted(delivered) == sorted(
        EVENTS - {"account.hard_expiry_approached", "account.realm_changed"}
    )
    assert hooks.events().count("account.connected") == 2

    secrets = issued_tokens(simulator) | access_tokens
    assert secrets, "the simulator issued no tokens?"
    for _, headers, body in hooks.posts:
        assert headers["Content-Type"] == "application/json"
        assert signature_ok(headers["Qbo-Daemon-Signature"], body)
        assert json.loads(body)["event"] == headers["Qbo-Daemon-Event"]
        text = body.decode()
        assert not [name for name in json.loads(body)["data"] if "token" in name]
        assert not [s for s in secrets if s in text], "a token in a webhook body"
        assert WEBHOOK_SECRET not in text


# -- the unit and the deployment guide ---------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "qbo-daemon.service"
DEPLOY = ROOT / "docs" / "deploy.md"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_stop_timeout_covers_the_whole_shutdown() -> None:
    """systemd must not SIGKILL the daemon while it drains (the order of daemon.run)."""
    [stop_timeout] = unit_settings()["TimeoutStopSec"]
    grace = load_config(None, {}).refresh.shutdown_grace.total_seconds()
    # Two listeners closed one after the other; aiohttp waits shutdown_timeout for open
    # requests, then as long again for their cancellation, each deadline rounded up.
    listeners = 2 * 2 * (math.ceil(daemon_module.HTTP_SHUTDOWN_TIMEOUT) + 1)
    webhooks, database = 5.0, 1.0
    assert int(stop_timeout) >= grace + listeners + webhooks + database


def test_deploy_guide_matches_the_unit() -> None:
    unit = unit_settings()
    guide = DEPLOY.read_text(encoding="utf-8")
    [exec_start] = unit["ExecStart"]
    binary, config_path = exec_start.split(" run --config ")
    assert binary == "/opt/qbo-daemon/venv/bin/qbo-daemon"
    assert binary in guide
    assert config_path in guide
    for credential in unit["LoadCredential"]:
        name, path = credential.split(":")
        assert path == f"/etc/qbo-daemon/{name}"
        assert path in guide
    for key in ("TimeoutStopSec", "WatchdogSec", "RestartPreventExitStatus"):
        [value] = unit[key]
        assert f"{key}={value}" in guide, key
    assert unit["StateDirectory"] == ["qbo-daemon"]
    assert "/var/lib/qbo-daemon/qbo-daemon.sqlite3" in guide
    assert unit["SyslogIdentifier"] == ["qbo-daemon"]
    assert "journalctl -u qbo-daemon -f -o cat | jq" in guide
