"""The daemon against an independent OAuth 2.0 server (tests/oauth_servers.py), not the simulator.

Each case starts a real daemon (tests.harness) whose endpoints point at a
server written from RFC 6749 / RFC 7009 and Intuit's documented wire format,
with one behaviour switched on that a real server may legitimately show.
Everything goes over real HTTP on loopback: connect (token API, consent,
callback), two refreshes, the token API, disconnect. After its assertions
each case writes its row of the figure "independent-oauth" in
docs/reliability.md (a failing case removes its row).

The invariants checked in every case: a rotated refresh token is never lost
(the stored one is the server's live one); only ``invalid_grant`` marks an
account ``needs_reconnect``; ``invalid_client`` pauses without marking it;
no secret reaches a log line; the daemon keeps running and every live
account keeps a timer.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
from yarl import URL

from qbo_daemon.cli.demo import free_port
from qbo_daemon.core.models import AccountStatus
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.store.crypto import generate_key
from tests.engine.test_connect import Page, browse
from tests.figures import DOCS, write_figure
from tests.harness import InProcessDaemon, launch_daemon, next_refresh, wait_for
from tests.oauth_servers import OMIT, Answer, Behaviour, OAuthServer, Rotation

CLIENT_ID = "ABcd1234EFgh5678independent"
# Intuit's secrets are 40 letters and digits; a standards server may hand out any.
PLAIN_SECRET = "Zq8Xw2Lm4Np6Rt0Vb3Hc5Jd7Kf9Gs1Ya2Ue4Io6"
SPECIAL_SECRET = "s3:cr%2Ft+p@ss/w=rd&?~"
FIGURE = "independent-oauth"
TIMEOUT = 5.0


@dataclass
class Setup:
    server: OAuthServer
    daemon: InProcessDaemon
    logs: io.StringIO
    other: OAuthServer  # another origin, for redirects
    notes: list[str] = field(default_factory=list)

    async def api(self, method: str, path: str) -> tuple[int, Any]:
        return await self.daemon.api(method, path)

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]


Start = Callable[..., Awaitable[Setup]]


def config_text(
    server: OAuthServer, data_dir: Path, *, api_key: str, encryption_key: str, raw: bool
) -> str:
    callback_port = free_port()
    token_endpoint = server.raw_token_endpoint if raw else server.token_endpoint
    return f"""\
[intuit]
client_id = {json.dumps(server.client_id)}
client_secret = {json.dumps(server.client_secret)}
redirect_uri = "http://127.0.0.1:{callback_port}/accounts/oauth2_callback"
authorization_endpoint = "{server.authorization_endpoint}"
token_endpoint = "{token_endpoint}"
revocation_endpoint = "{server.revocation_endpoint}"
# No CompanyInfo here: the realm check answers 404 (transient, realm_verified false)
# on loopback instead of looking up Intuit's production host.
api_base = "{server.base_url}"
timeout = "{TIMEOUT:g}s"

[callback]
listen = "127.0.0.1:{callback_port}"

[api]
listen = "127.0.0.1:{free_port()}"
keys = ["{api_key}"]

[storage]
path = "{data_dir / "qbo-daemon.sqlite3"}"
encryption_keys = ["{encryption_key}"]

[refresh]
backoff_initial = "1s"
backoff_max = "5s"
invalid_client_retry = "1s"
shutdown_grace = "8s"

[log]
level = "debug"
"""


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    started: list[Setup] = []

    async def go(
        behaviour: Behaviour | None = None, *, secret: str = PLAIN_SECRET, raw: bool = False
    ) -> Setup:
        logs = io.StringIO()
        configure_logging("json", "debug", stream=logs)  # conftest resets it afterwards
        server = OAuthServer(CLIENT_ID, secret, behaviour)
        other = OAuthServer(CLIENT_ID, secret)
        await server.start()
        await other.start()
        data_dir = tmp_path / f"d{len(started)}"
        data_dir.mkdir()
        api_key = "test-api-key-" + generate_key()[:16]
        encryption_key = generate_key()
        config_path = data_dir / "config.toml"
        config_path.write_text(
            config_text(server, data_dir, api_key=api_key, encryption_key=encryption_key, raw=raw),
            encoding="utf-8",
        )
        daemon, config, stop, task = await launch_daemon(config_path)
        running = InProcessDaemon(
            daemon=daemon,
            config=config,
            config_path=config_path,
            api_key=api_key,
            encryption_key=encryption_key,
            stop=stop,
            task=task,
            session=aiohttp.ClientSession(),
        )
        setup = Setup(server, running, logs, other)
        started.append(setup)
        return setup

    yield go
    for setup in reversed(started):
        await setup.daemon.shutdown()
        await setup.server.close()
        await setup.other.close()


# -- the steps a user takes ----------------------------------------------------------------


async def consent(setup: Setup, account_id: str) -> URL:
    """The token API's authorization URL, and the server's redirect back to our callback."""
    status, body = await setup.api("POST", f"/v1/accounts/{account_id}/authorize-url")
    assert status == 200, body
    page = await browse(body["url"])
    assert page.status == 302, page.text
    return URL(page.headers["Location"], encoded=True)


async def connect(setup: Setup, account_id: str = "acme") -> Page:
    return await browse(await consent(setup, account_id))


async def stored(setup: Setup, account_id: str = "acme") -> Any:
    return await setup.daemon.services.storage.load(account_id)


async def account_json(setup: Setup, account_id: str = "acme") -> dict[str, Any]:
    status, body = await setup.api("GET", f"/v1/accounts/{account_id}")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


def near(value: datetime | None, expected: datetime, slack: float = 30.0) -> bool:
    return value is not None and abs((value - expected).total_seconds()) <= slack


def assert_no_secret_logged(setup: Setup, *texts: str) -> None:
    """No issued code or token, client secret or Basic credentials in a log line (or ``texts``)."""
    server = setup.server
    pair = f"{server.client_id}:{server.client_secret}".encode()
    encoded = f"{quote_plus(server.client_id)}:{quote_plus(server.client_secret)}".encode()
    secrets = [
        server.client_secret,
        quote_plus(server.client_secret),
        base64.b64encode(pair).decode(),
        base64.b64encode(encoded).decode(),
        setup.daemon.api_key,
        setup.daemon.encryption_key,
        *server.issued,
    ]
    text = "\n".join([setup.logs.getvalue(), *texts])
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:3]}...) reached the log or an answer"


async def assert_alive(setup: Setup, *account_ids: str) -> None:
    """The daemon runs, no task crashed, and every live account has a next refresh."""
    assert not setup.daemon.task.done()
    services = setup.daemon.services
    assert services.scheduler.running
    for account_id in account_ids:
        due = await next_refresh(services, account_id)
        assert due is not None, f"{account_id} lost its timer"
    crashes = [e for e in setup.log_events() if e.get("level") == "critical" or "exception" in e]
    assert crashes == []


# -- the figure ----------------------------------------------------------------------------

_ROWS: dict[str, str] = {}


def record(case: str, behaviour: str, seen: str) -> None:
    """This case's row of the figure, written after every assertion passed."""
    doc = DOCS / "reliability.md"
    match = re.search(
        rf"<!-- figure: {FIGURE} -->\n(.*?)<!-- /figure: {FIGURE} -->",
        doc.read_text(encoding="utf-8"),
        re.DOTALL,
    )
    assert match is not None, f"docs/reliability.md has no markers for figure {FIGURE!r}"
    rows = {
        cells[1].strip(" `"): line
        for line in match.group(1).splitlines()
        if (cells := line.split("|")) and len(cells) > 3 and cells[1].strip(" `") in CASE_ORDER
    }
    rows[case] = f"| `{case}` | {behaviour} | {seen} |"
    ordered = [rows[c] for c in CASE_ORDER if c in rows]
    header = (
        "| case | the server's behaviour | what the daemon did (asserted) |\n| --- | --- | --- |"
    )
    write_figure(FIGURE, header + "\n" + "\n".join(ordered) + "\n")


def unrecord(case: str) -> None:
    """Drop this case's row before it runs: a failing case leaves none."""
    doc = DOCS / "reliability.md"
    text = doc.read_text(encoding="utf-8")
    kept = "\n".join(line for line in text.split("\n") if not line.startswith(f"| `{case}` |"))
    if kept != text:
        doc.write_text(kept, encoding="utf-8")


# -- 1. the whole life of a connection against each well-behaved server --------------------


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    behaviour: Callable[[], Behaviour]
    secret: str = PLAIN_SECRET
    raw: bool = False
    access_life: int = 3600
    refresh_life: timedelta = timedelta(days=100)
    revoked: str = "revoked"


LIFECYCLE = [
    Case("content-type-no-space", "`Content-Type: application/json;charset=UTF-8`",
         lambda: Behaviour(content_type="application/json;charset=UTF-8")),
    Case("content-type-space", "`Content-Type: application/json; charset=utf-8`",
         lambda: Behaviour(content_type="application/json; charset=utf-8")),
    Case("expires-in-string", '`"expires_in": "3600"` (a JSON string)',
         lambda: Behaviour(expires_in="3600")),
    Case("expires-in-number", '`"expires_in": 1800` (a number, not 3600)',
         lambda: Behaviour(expires_in=1800), access_life=1800),
    Case("expires-in-short", '`"expires_in": 120`, shorter than the 10-minute lead',
         lambda: Behaviour(expires_in=120), access_life=120),
    Case("expires-in-absent", "no `expires_in` (RFC 6749 §5.1: RECOMMENDED only)",
         lambda: Behaviour(expires_in=OMIT)),
    Case("token-type-lower", '`"token_type": "bearer"`', lambda: Behaviour(token_type="bearer")),
    Case("token-type-capital", '`"token_type": "Bearer"`', lambda: Behaviour(token_type="Bearer")),
    Case("token-type-absent", "no `token_type`", lambda: Behaviour(token_type=OMIT)),
    Case("extra-fields", "unknown fields (`id_token`, `scope`, nested objects)",
         lambda: Behaviour(extra={"scope": "com.intuit.quickbooks.accounting", "id_token": "e.y.j",
                                  "x_vendor": {"nested": [1, None, "x"]}})),
    Case("refresh-life-absent", "no `x_refresh_token_expires_in` (a standard server)",
         lambda: Behaviour(x_refresh_token_expires_in=OMIT)),
    Case("refresh-life-intuit", '`"x_refresh_token_expires_in": 8726400`',
         lambda: Behaviour(x_refresh_token_expires_in=8_726_400),
         refresh_life=timedelta(seconds=8_726_400)),
    Case("rotate-always", "a new refresh token on every refresh; the old one dies at once",
         lambda: Behaviour(rotation="always")),
    Case("rotate-never-same", "never rotates: the same refresh token sent back",
         lambda: Behaviour(rotation="same")),
    Case("rotate-never-omitted", "never rotates: no `refresh_token` in a refresh answer (§6)",
         lambda: Behaviour(rotation="omit")),
    Case("gzip", "every answer `Content-Encoding: gzip`", lambda: Behaviour(gzip=True)),
    Case("chunked", "every answer `Transfer-Encoding: chunked`, 7-byte chunks",
         lambda: Behaviour(chunked=True)),
    Case("connection-close", "`Connection: close` on every answer", lambda: Behaviour(close=True)),
    Case("http-1.0", "token answers as HTTP/1.0: no length, the body ends at close",
         lambda: Behaviour(wire="http10"), raw=True),
    Case("no-store", "`Cache-Control: no-store, no-cache, max-age=0`, `Pragma`, `Expires: 0`",
         lambda: Behaviour(headers={"Cache-Control": "no-store, no-cache, max-age=0",
                                    "Pragma": "no-cache", "Expires": "0"})),
    Case("slow", f"every token answer after 1.5 s (timeout {TIMEOUT:g} s)",
         lambda: Behaviour(delay=1.5)),
    Case("basic-rfc6749", "client_secret_basic only, credentials form-decoded (§2.3.1); "
         "a secret with `:%+/=&?~`; credentials in a body refused",
         lambda: Behaviour(basic_decoding="rfc6749"), secret=SPECIAL_SECRET),
    Case("basic-raw", "Basic credentials compared as sent (as Intuit's SDKs send them)",
         lambda: Behaviour(basic_decoding="raw")),
    Case("revoke-200-empty", "revocation answers 200 with an empty body",
         lambda: Behaviour(revocation_answer=Answer(200))),
    Case("revoke-200-json", "revocation answers 200 with `{}` (JSON)",
         lambda: Behaviour(revocation_answer=Answer.of_json(200, {}))),
    Case("revoke-204", "revocation answers 204 No Content",
         lambda: Behaviour(revocation_answer=Answer(204))),
    Case("revoke-400", "revocation answers 400 `invalid_request`",
         lambda: Behaviour(revocation_answer=Answer.error(400, "invalid_request")),
         revoked="failed"),
    Case("revoke-rfc7009-form", "revocation reads only an RFC 7009 form body, not Intuit's JSON",
         lambda: Behaviour(revocation_body="form")),
    Case("callback-extra-params", "the redirect back adds `scope`, `iss`, `session_state`",
         lambda: Behaviour(callback_extra=[("scope", "com.intuit.quickbooks.accounting"),
                                           ("iss", "https://issuer.example"),
                                           ("session_state", "abc.def")])),
    Case("callback-code-base64", "codes with `+`, `/` and `=` (standard base64), "
         "percent-encoded in the redirect", lambda: Behaviour(code_prefix="c+/=")),
    Case("callback-realmid-lower", "the redirect back says `realmid=`",
         lambda: Behaviour(realm_param="realmid")),
    Case("callback-realmID", "the redirect back says `realmID=` (as Intuit's prose spells it)",
         lambda: Behaviour(realm_param="realmID")),
]  # fmt: skip


@pytest.mark.parametrize("case", LIFECYCLE, ids=[c.id for c in LIFECYCLE])
async def test_a_connection_lives_its_whole_life(start: Start, case: Case) -> None:
    unrecord(case.id)
    setup = await start(case.behaviour(), secret=case.secret, raw=case.raw)
    server = setup.server

    # Connect: authorization URL, consent, callback, code exchange.
    before = datetime.now(UTC)
    page = await connect(setup)
    assert page.status == 200, page.text
    assert "QuickBooks is connected" in page.text
    assert server.grant_types() == ["authorization_code"]
    exchange = server.calls("token")[0]
    assert exchange.answered == 200
    assert "client_secret" not in exchange.params()
    account = await stored(setup)
    assert account.status is AccountStatus.ACTIVE
    assert account.realm_id == server.realm_id
    assert account.refresh_token == server.live_refresh_token()
    assert near(account.token_expires_at, before + timedelta(seconds=case.access_life))
    assert near(account.refresh_token_expires_at, before + case.refresh_life)

    # Two refreshes: each presents the newest refresh token, which is then stored.
    presented: list[str] = []
    for _ in range(2):
        held = (await stored(setup)).refresh_token
        status, body = await setup.api("POST", "/v1/accounts/acme/refresh")
        assert status == 200, body
        presented.append(server.calls("token")[-1].params()["refresh_token"])
        assert presented[-1] == held
        account = await stored(setup)
        assert account.refresh_token == server.live_refresh_token()
        assert account.status is AccountStatus.ACTIVE
        assert account.failure_count == 0
    assert server.grant_types() == ["authorization_code", "refresh_token", "refresh_token"]
    if case.behaviour().rotation == "always":
        assert len(set(presented)) == 2
    await assert_alive(setup, "acme")
    assert (await account_json(setup))["next_refresh_at"] is not None

    # The token API serves the access token the server issued last.
    status, token = await setup.api("GET", "/v1/accounts/acme/token")
    assert status == 200, token
    assert token["access_token"] == account.access_token
    assert server.is_access_token_valid(token["access_token"])
    assert token["realm_id"] == server.realm_id

    # Disconnect: revoked at the server (best effort), forgotten here either way.
    refresh_token = account.refresh_token
    status, body = await setup.api("DELETE", "/v1/accounts/acme")
    assert status == 200, body
    assert body["status"] == "disconnected"
    assert body["revoke"] == case.revoked
    assert server.is_revoked(refresh_token) is (case.revoked == "revoked")
    gone = await stored(setup)
    assert gone.refresh_token is None
    assert gone.access_token is None
    assert await next_refresh(setup.daemon.services, "acme") is None

    assert_no_secret_logged(setup)
    await assert_alive(setup)
    assert not setup.other.seen
    revoke = "revoked there" if case.revoked == "revoked" else "revoke failed, forgotten here"
    record(case.id, case.what, f"connected, 2 refreshes, token served; {revoke}")


# -- 2. a refresh answered with an error, then the server recovers -------------------------

NGINX_502 = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"  # noqa: E501
NGINX_503 = NGINX_502.replace(b"502 Bad Gateway", b"503 Service Temporarily Unavailable")
HTML = {"Content-Type": "text/html"}


@dataclass(frozen=True)
class Failure:
    id: str
    what: str
    answer: Callable[[Setup], Answer | None]  # None: the behaviour change does it
    expect: str  # needs_reconnect | paused | retrying
    change: Callable[[Setup], None] = lambda setup: None
    raw: bool = False
    rotation: Rotation = "always"


def redirect_elsewhere(setup: Setup) -> None:
    setup.server.behaviour.redirect_token_to = setup.other.token_endpoint


def cut_mid_answer(setup: Setup) -> None:
    setup.server.behaviour.wire = "cut"


FAILURES = [
    Failure("invalid-grant", "400 `{\"error\": \"invalid_grant\"}`, `application/json`",
            lambda s: Answer.error(400, "invalid_grant"), "needs_reconnect"),
    Failure("invalid-grant-description", "400 `invalid_grant` with Intuit's `error_description`",
            lambda s: Answer.error(400, "invalid_grant", "Incorrect or invalid refresh token"),
            "needs_reconnect"),
    Failure("invalid-client-401", "401 `invalid_client` with `WWW-Authenticate: Basic`",
            lambda s: Answer.error(401, "invalid_client",
                                   **{"WWW-Authenticate": 'Basic realm="x"'}), "paused"),
    Failure("invalid-client-400", "400 `invalid_client` (no `WWW-Authenticate`)",
            lambda s: Answer.error(400, "invalid_client"), "paused"),
    Failure("unauthorized-401-empty", "401 with an empty body",
            lambda s: Answer(401, b"", {"WWW-Authenticate": "Basic"}), "paused"),
    Failure("invalid-request", "400 `invalid_request`",
            lambda s: Answer.error(400, "invalid_request", "missing parameter"), "retrying"),
    Failure("unsupported-grant-type", "400 `unsupported_grant_type`",
            lambda s: Answer.error(400, "unsupported_grant_type"), "retrying"),
    Failure("html-502", "nginx's HTML 502 page",
            lambda s: Answer(502, NGINX_502, HTML), "retrying"),
    Failure("html-503-retry-after", "nginx's HTML 503 page with `Retry-After: 2`",
            lambda s: Answer(503, NGINX_503, {**HTML, "Retry-After": "2"}), "retrying"),
    Failure("429", "429 `{\"error\": \"rate_limited\"}` with `Retry-After: 1`",
            lambda s: Answer.of_json(429, {"error": "rate_limited"}, **{"Retry-After": "1"}),
            "retrying"),
    Failure("empty-200", "200 with an empty body",
            lambda s: Answer(200, b"", {"Content-Type": "application/json"}), "retrying"),
    Failure("200-error-transient", "200 `{\"error\": \"temporarily_unavailable\"}`",
            lambda s: Answer.of_json(200, {"error": "temporarily_unavailable"}), "retrying"),
    Failure("200-error-invalid-grant", "200 `{\"error\": \"invalid_grant\"}` (an error in a 200)",
            lambda s: Answer.of_json(200, {"error": "invalid_grant",
                                           "error_description": "Token invalid"}),
            "needs_reconnect"),
    Failure("echoing-server", "400 `invalid_request` whose `error_description` echoes the "
            "request: Basic header, secret, refresh token",
            lambda s: Answer.error(400, "invalid_request", echo(s)), "retrying"),
    Failure("redirect-307", "307 to another origin (`Location` on a second server)",
            lambda s: None, "retrying", change=redirect_elsewhere),
    Failure("cut-mid-answer", "a 200 cut off halfway through its body, connection closed",
            lambda s: None, "retrying", change=cut_mid_answer, raw=True, rotation="same"),
]  # fmt: skip


def echo(setup: Setup) -> str:
    """What a careless server says back: everything it was sent."""
    server = setup.server
    pair = f"{quote_plus(server.client_id)}:{quote_plus(server.client_secret)}"
    held = server.live_refresh_token() or ""
    return (
        f"bad request: Authorization=Basic {base64.b64encode(pair.encode()).decode()} "
        f"client_secret={server.client_secret} refresh_token={held} "
        f"body=grant_type=refresh_token&refresh_token={quote_plus(held)}"
    )


@pytest.mark.parametrize("failure", FAILURES, ids=[f.id for f in FAILURES])
async def test_a_refresh_refused_or_garbled_keeps_the_account_right(
    start: Start, failure: Failure
) -> None:
    unrecord(failure.id)
    setup = await start(Behaviour(rotation=failure.rotation), raw=failure.raw)
    server = setup.server
    page = await connect(setup)
    assert page.status == 200, page.text
    before = await stored(setup)

    answer = failure.answer(setup)
    if answer is not None:
        server.behaviour.token_answers.append(answer)
    failure.change(setup)
    status, body = await setup.api("POST", "/v1/accounts/acme/refresh")
    server.behaviour.token_answers.clear()
    server.behaviour.redirect_token_to = None
    server.behaviour.wire = None

    account = await stored(setup)
    said = [json.dumps(body), account.last_error or "", json.dumps(await account_json(setup))]
    if failure.change is redirect_elsewhere:
        # The operator is told where it pointed, and that it was not followed.
        assert f"redirect to {setup.other.base_url} (not followed)" in (account.last_error or "")
    assert server.grant_types()[-1] == "refresh_token"
    events = [e["event"] for e in setup.log_events()]
    if failure.expect == "needs_reconnect":
        assert status == 409, body
        assert body["error"] == "needs_reconnect"
        assert account.status is AccountStatus.NEEDS_RECONNECT
        assert await next_refresh(setup.daemon.services, "acme") is None
        assert "account.reconnect_needed" in events
        seen = "`needs_reconnect`, timer stopped"
    else:
        # The refresh token was neither lost nor replaced; the access token is still good.
        assert status == 503, body
        assert account.status is AccountStatus.ACTIVE
        assert account.refresh_token == before.refresh_token
        assert account.access_token == before.access_token
        assert "account.reconnect_needed" not in events
        await assert_alive(setup, "acme")
        status, token = await setup.api("GET", "/v1/accounts/acme/token")
        assert status == 200, token
        assert token["access_token"] == before.access_token
        if failure.expect == "paused":
            assert body["error"] == "invalid_client"
            assert not setup.daemon.services.scheduler.credentials_ok
            status, _ = await setup.api("GET", "/readyz")
            assert status == 503
            assert "intuit.client_refused" in events
            seen = "paused, not marked, token still served; resumed by the probe"
            # The timed probe (invalid_client_retry = 1 s) finds the credentials good again.
            await wait_for(lambda: setup.daemon.services.scheduler.credentials_ok)
        else:
            assert body["error"] == "unavailable"
            assert "refresh.retry_scheduled" in events
            seen = "transient: retried with backoff, tokens kept, token still served"
        # The server is well again: the account refreshes and goes on.
        status, body = await setup.api("POST", "/v1/accounts/acme/refresh")
        assert status == 200, body
        account = await stored(setup)
        assert account.refresh_token == server.live_refresh_token()
        assert account.failure_count == 0
        await assert_alive(setup, "acme")
    assert not setup.other.seen, "a token request followed a redirect to another origin"
    assert_no_secret_logged(setup, *said)
    assert not setup.daemon.task.done()
    record(failure.id, failure.what, seen)


async def test_a_refresh_on_a_connection_the_server_dropped_is_retried_by_the_scheduler(
    start: Start,
) -> None:
    """A keep-alive connection closed unanswered as it is reused: a transient failure."""
    case = "keep-alive-dropped"
    unrecord(case)
    setup = await start(Behaviour(wire="drop-reused"), raw=True)
    server = setup.server
    assert (await connect(setup)).status == 200
    before = await stored(setup)
    status, body = await setup.api("POST", "/v1/accounts/acme/refresh")  # reuses: dropped
    assert status == 503, body
    assert "ServerDisconnectedError" in body["detail"]
    account = await stored(setup)
    assert (account.status, account.failure_count) == (AccountStatus.ACTIVE, 1)
    assert account.refresh_token == before.refresh_token
    await assert_alive(setup, "acme")
    # The scheduler's retry (backoff_initial 1 s) opens a new connection and succeeds.
    await wait_for(lambda: server.grant_types().count("refresh_token") == 1, timeout=10)

    async def retimed() -> bool:
        due = await next_refresh(setup.daemon.services, "acme")
        return bool(due != account.reconnect_token_at)

    await wait_for(retimed)

    async def recovered() -> bool:
        now = await stored(setup)
        return bool(now.failure_count == 0 and now.refresh_token == server.live_refresh_token())

    await wait_for(recovered, timeout=10)
    assert [s.params()["grant_type"] for s in server.calls("token-dropped")] == ["refresh_token"]
    assert_no_secret_logged(setup)
    await assert_alive(setup, "acme")
    record(
        case,
        "keeps connections alive, then closes one unanswered when the next request arrives "
        "on it (an idle timeout striking just as the client reuses it)",
        "a refresh: transient, retried by the scheduler on a new connection, tokens kept",
    )


async def test_a_code_exchange_on_a_connection_the_server_dropped_still_connects(
    start: Start,
) -> None:
    """A user's connect is not lost to a keep-alive connection closed as it was reused."""
    case = "keep-alive-dropped-exchange"
    unrecord(case)
    setup = await start(Behaviour(wire="drop-reused"), raw=True)
    server = setup.server
    assert (await connect(setup, "acme")).status == 200
    server.realm_id = str(int(server.realm_id) + 1)  # beta's user picks another company
    page = await connect(setup, "beta")  # its exchange reuses acme's connection
    assert page.status == 200, page.text
    assert "QuickBooks is connected" in page.text
    [dropped] = server.calls("token-dropped")
    assert dropped.params()["grant_type"] == "authorization_code"
    assert server.grant_types() == ["authorization_code", "authorization_code"]
    beta = await stored(setup, "beta")
    assert beta.status is AccountStatus.ACTIVE
    assert beta.refresh_token == server.live_refresh_token()
    events = [e["event"] for e in setup.log_events()]
    assert events.count("intuit.connection_dropped") == 1
    assert_no_secret_logged(setup)
    await assert_alive(setup, "acme", "beta")
    record(
        case,
        "the same, met by a second user's code exchange",
        "sent again on a new connection once; connected",
    )


# -- 3. callbacks that are not what the flow expects ---------------------------------------

CONFLICTS = [
    ("callback-two-realms", "the redirect back carries `realmId` twice, with different values",
     [("realmId", "4620816365000000000")]),
    ("callback-realm-casings-disagree", "`realmId` and `realmid` with different values",
     [("realmid", "4620816365000000000")]),
    ("callback-two-states", "the redirect back carries a second, different `state`",
     [("state", "A" * 43)]),
    ("callback-two-codes", "the redirect back carries a second, different `code`",
     [("code", "c-another-code-entirely")]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "what", "extra"), CONFLICTS, ids=[c[0] for c in CONFLICTS])
async def test_an_ambiguous_callback_is_refused_and_changes_nothing(
    start: Start, case: str, what: str, extra: list[tuple[str, str]]
) -> None:
    unrecord(case)
    setup = await start(Behaviour(callback_extra=extra))
    page = await connect(setup)
    assert page.status == 400, page.text
    assert setup.server.grant_types() == []
    assert await setup.daemon.services.storage.find("acme") is None
    assert_no_secret_logged(setup)
    await assert_alive(setup)
    record(case, what, "400 page, no code exchanged, nothing stored")


async def test_a_user_who_declines_gets_a_clear_page_and_nothing_is_stored(
    start: Start,
) -> None:
    case = "callback-access-denied"
    unrecord(case)
    setup = await start(Behaviour(deny=True))
    page = await connect(setup)
    assert page.status == 400, page.text
    assert "QuickBooks was not connected" in page.text
    assert "The user denied access" not in page.text  # the server's words are not echoed
    assert setup.server.grant_types() == []
    assert await setup.daemon.services.storage.find("acme") is None
    assert any(e["event"] == "connect.denied" for e in setup.log_events())
    await assert_alive(setup)
    record(
        case,
        "the user declines: `error=access_denied` with `error_description`",
        "400 page saying nothing was connected; nothing stored",
    )


CASE_ORDER = [
    *(c.id for c in LIFECYCLE),
    "keep-alive-dropped",
    "keep-alive-dropped-exchange",
    *(f.id for f in FAILURES),
    *(c[0] for c in CONFLICTS),
    "callback-access-denied",
]
