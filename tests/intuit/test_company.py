"""CompanyInfoClient and the OAuth client's PKCE, against the simulator (and a tiny fake
where the simulator cannot go: odd answers, an echoed token)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from qbo_daemon.config.load import IntuitConfig
from qbo_daemon.core.clock import SystemClock
from qbo_daemon.core.errors import InvalidGrantError
from qbo_daemon.intuit import pkce
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.intuit.company import CompanyInfoClient, RealmVerdict
from qbo_daemon.simulator.app import IntuitSimulator
from tests.intuit.test_client import REDIRECT, intuit_config


@dataclass
class Settings:
    """What CompanyInfoClient reads its configuration from (the OAuth client, in the daemon)."""

    config: IntuitConfig


@pytest.fixture
async def simulator() -> AsyncIterator[IntuitSimulator]:
    sim = IntuitSimulator()
    await sim.start()
    yield sim
    await sim.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def company(session: aiohttp.ClientSession, api_base: str, **changes: Any) -> CompanyInfoClient:
    config = replace(intuit_config(api_base), api_base=api_base, **changes)
    return CompanyInfoClient(session, Settings(config))


async def test_the_simulators_answers_become_verdicts(
    simulator: IntuitSimulator, session: aiohttp.ClientSession
) -> None:
    client = company(session, simulator.api_base)
    mine, other = simulator.grant(), simulator.grant()

    confirmed = await client.check(mine["access_token"], mine["realm_id"])
    assert (confirmed.verdict, confirmed.status) == (RealmVerdict.CONFIRMED, 200)
    assert confirmed.intuit_tid

    foreign = await client.check(mine["access_token"], other["realm_id"])
    assert (foreign.verdict, foreign.status) == (RealmVerdict.REFUSED, 403)
    assert "ApplicationAuthorizationFailed" in foreign.detail

    dead = await client.check("sim-at-not-a-token", mine["realm_id"])
    assert (dead.verdict, dead.status) == (RealmVerdict.REFUSED, 401)
    assert "AuthenticationFailed" in dead.detail

    for fault in ("503", "429", "500", "html", "malformed"):
        simulator.inject(fault, endpoint="companyinfo", retry_after=0)
        unknown = await client.check(mine["access_token"], mine["realm_id"])
        assert unknown.verdict is RealmVerdict.UNKNOWN, fault
    for result in (confirmed, foreign, dead, unknown):
        assert mine["access_token"] not in result.detail


async def test_a_timeout_or_no_server_decides_nothing(
    simulator: IntuitSimulator, session: aiohttp.ClientSession
) -> None:
    grant = simulator.grant()
    simulator.inject("hang", endpoint="companyinfo")
    slow = company(session, simulator.api_base, timeout=timedelta(seconds=0.3))
    result = await slow.check(grant["access_token"], grant["realm_id"])
    assert result.verdict is RealmVerdict.UNKNOWN
    assert "did not answer within 0.3s" in result.detail

    nobody = company(session, "http://127.0.0.1:9")  # discard port: refused
    result = await nobody.check(grant["access_token"], grant["realm_id"])
    assert result.verdict is RealmVerdict.UNKNOWN
    assert "cannot reach" in result.detail


async def test_an_odd_answer_is_unknown_and_an_echoed_token_is_never_repeated(
    session: aiohttp.ClientSession,
) -> None:
    answers: list[tuple[int, bytes]] = []
    seen: list[web.Request] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request)
        status, body = answers.pop(0)
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v3/company/{realm}/companyinfo/{id}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        client = company(session, base)
        token = "at-" + "s" * 40
        echo = {"Fault": {"Error": [{"Message": f"bad token {token}", "code": "3200"}]}}
        answers[:] = [
            (401, json.dumps(echo).encode()),
            (200, b'{"QueryResponse": {}}'),
            (200, b"[1, 2]"),
            (404, b"<html>not here</html>"),
        ]
        refused = await client.check(token, "4620816365")
        assert refused.verdict is RealmVerdict.REFUSED
        assert token not in refused.detail
        assert "[redacted]" in refused.detail
        for _ in range(3):
            assert (await client.check(token, "4620816365")).verdict is RealmVerdict.UNKNOWN
        request = seen[0]
        assert request.path == "/v3/company/4620816365/companyinfo/4620816365"
        assert request.headers["Authorization"] == f"Bearer {token}"
        assert request.headers["Accept"] == "application/json"
    finally:
        await runner.cleanup()


async def test_api_base_is_read_at_every_call(
    simulator: IntuitSimulator, session: aiohttp.ClientSession
) -> None:
    """A reload replaces the OAuth client's configuration; the next check follows it."""
    settings = Settings(replace(intuit_config("http://127.0.0.1:9"), api_base="http://127.0.0.1:9"))
    client = CompanyInfoClient(session, settings)
    grant = simulator.grant()
    assert (await client.check(grant["access_token"], grant["realm_id"])).verdict == "unknown"
    settings.config = replace(settings.config, api_base=simulator.api_base)
    assert (await client.check(grant["access_token"], grant["realm_id"])).verdict == "confirmed"


# -- PKCE on the OAuth client -----------------------------------------------------------------


def test_a_challenge_is_s256_of_the_verifier() -> None:
    # RFC 7636, appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce.challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    fresh = {pkce.new_verifier() for _ in range(20)}
    assert len(fresh) == 20
    assert all(43 <= len(v) <= 128 and v.isascii() for v in fresh)


async def test_the_code_is_traded_only_with_its_verifier(
    simulator: IntuitSimulator, session: aiohttp.ClientSession
) -> None:
    client = IntuitClient(session, intuit_config(simulator.base_url), SystemClock())
    verifier = pkce.new_verifier()
    url = URL(
        client.authorization_url("state-" + "x" * 20, code_challenge=pkce.challenge(verifier))
    )
    assert url.query["code_challenge"] == pkce.challenge(verifier)
    assert url.query["code_challenge_method"] == "S256"
    assert "code_challenge" not in URL(client.authorization_url("state-" + "y" * 20)).query

    async with session.get(url, allow_redirects=False) as answer:
        location = URL(answer.headers["Location"])
    assert str(location.with_query(None)) == REDIRECT
    code = location.query["code"]
    with pytest.raises(InvalidGrantError):
        await client.exchange_code(code)
    with pytest.raises(InvalidGrantError):
        await client.exchange_code(code, code_verifier=pkce.new_verifier())
    result = await client.exchange_code(code, code_verifier=verifier)
    assert simulator.is_access_token_valid(result.tokens.access_token)
