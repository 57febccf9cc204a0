"""The simulator's CompanyInfo call, PKCE on the code exchange, and a chosen company.

Driven over real HTTP, as the daemon's realm check and connect flow drive them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

import aiohttp

from qbo_daemon.simulator.app import IntuitSimulator
from tests.manual_clock import ManualClock
from tests.simulator.test_simulator import (
    REDIRECT,
    Answer,
    authorize,
    call,
    callback_query,
    connect,
    revoke,
    token,
)


async def company_info(
    http: aiohttp.ClientSession,
    sim: IntuitSimulator,
    realm_id: str,
    access_token: str | None,
    *,
    company_id: str | None = None,
) -> Answer:
    headers = {"Accept": "application/json"}
    if access_token is not None:
        headers["Authorization"] = f"Bearer {access_token}"
    url = f"{sim.api_base}/v3/company/{realm_id}/companyinfo/{company_id or realm_id}"
    return await call(http, "GET", url, headers=headers)


def challenge_of(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def exchange(
    http: aiohttp.ClientSession, sim: IntuitSimulator, code: str, verifier: str | None
) -> Answer:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    if verifier is not None:
        data["code_verifier"] = verifier
    return await token(http, sim, data)


# -- CompanyInfo ------------------------------------------------------------------------------


async def test_company_info_answers_for_the_tokens_own_company_only(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    mine, other = await connect(http, sim), sim.grant()

    ok = await company_info(http, sim, mine["realm_id"], mine["access_token"])
    assert ok.status == 200
    assert ok.headers["intuit_tid"]
    info = ok.json()["CompanyInfo"]
    assert info["CompanyName"]
    assert info["Id"] == "1"

    foreign = await company_info(http, sim, other["realm_id"], mine["access_token"])
    assert foreign.status == 403
    [error] = foreign.json()["Fault"]["Error"]
    assert "ApplicationAuthorizationFailed" in error["Message"]
    assert error["code"] == "003100"

    unknown = await company_info(http, sim, mine["realm_id"], "sim-at-" + secrets.token_hex(8))
    none = await company_info(http, sim, mine["realm_id"], None)
    for answer in (unknown, none):
        assert answer.status == 401
        [error] = answer.json()["Fault"]["Error"]
        assert "AuthenticationFailed" in error["Message"]
        assert "errorCode=003200" in error["Message"]

    entries = [e for e in sim.request_log if e.endpoint == "companyinfo"]
    assert [(e.status, e.realm_id) for e in entries] == [
        (200, mine["realm_id"]),
        (403, other["realm_id"]),
        (401, mine["realm_id"]),
        (401, mine["realm_id"]),
    ]
    assert sim.stats()["companyinfo"] == {
        "ok": 1,
        "ApplicationAuthorizationFailed": 1,
        "AuthenticationFailed": 2,
    }


async def test_company_info_refuses_an_expired_or_revoked_token(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    short, revoked = sim.grant(), sim.grant()
    assert (await revoke(http, sim, revoked["refresh_token"])).status == 200
    revoked_answer = await company_info(http, sim, revoked["realm_id"], revoked["access_token"])
    assert revoked_answer.status == 401

    clock.advance(sim.settings.expires_in)
    expired = await company_info(http, sim, short["realm_id"], short["access_token"])
    assert expired.status == 401


async def test_company_info_wants_the_company_id_of_its_realm(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    grant = sim.grant()
    answer = await company_info(
        http, sim, grant["realm_id"], grant["access_token"], company_id="42"
    )
    assert answer.status == 400
    assert answer.json()["Fault"]["type"] == "ValidationFault"


async def test_company_info_takes_injected_faults(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    grant = sim.grant()
    sim.inject("503", endpoint="companyinfo", retry_after=1)
    sim.inject("502_html", endpoint="companyinfo")
    first = await company_info(http, sim, grant["realm_id"], grant["access_token"])
    second = await company_info(http, sim, grant["realm_id"], grant["access_token"])
    third = await company_info(http, sim, grant["realm_id"], grant["access_token"])
    assert (first.status, first.headers["Retry-After"]) == (503, "1")
    assert second.status == 502
    assert second.text.startswith("<html>")
    assert third.status == 200
    assert sim.stats()["companyinfo"] == {"fault:503": 1, "fault:502_html": 1, "ok": 1}
    # The token endpoint was not touched by those faults.
    assert sim.stats()["pending_faults"]["token"] == []


# -- PKCE -----------------------------------------------------------------------------------


async def test_a_code_issued_with_a_challenge_needs_its_verifier(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    verifier = secrets.token_urlsafe(48)
    query = callback_query(
        await authorize(
            http, sim, code_challenge=challenge_of(verifier), code_challenge_method="S256"
        )
    )
    code = query["code"]

    missing = await exchange(http, sim, code, None)
    wrong = await exchange(http, sim, code, secrets.token_urlsafe(48))
    for answer in (missing, wrong):
        assert answer.status == 400
        assert answer.json()["error"] == "invalid_grant"

    # A failed verification does not use the code up.
    right = await exchange(http, sim, code, verifier)
    assert right.status == 200, right.text
    assert sim.is_access_token_valid(right.json()["access_token"])


async def test_a_code_without_a_challenge_ignores_a_verifier(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    code = callback_query(await authorize(http, sim))["code"]
    assert (await exchange(http, sim, code, secrets.token_urlsafe(48))).status == 200


async def test_authorization_refuses_a_pkce_request_it_cannot_honour(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    good = challenge_of("x" * 43)
    for params in (
        {"code_challenge": good, "code_challenge_method": "plain"},
        {"code_challenge": good},
        {"code_challenge": "too-short", "code_challenge_method": "S256"},
        {"code_challenge_method": "S256"},
    ):
        answer = await authorize(http, sim, **params)
        assert answer.status == 400, params
        assert "code_challenge" in answer.text
    assert [e.status for e in sim.request_log] == [400] * 4


# -- the company the user picks ---------------------------------------------------------------


async def test_the_next_user_can_pick_an_existing_company(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    existing = sim.grant()
    sim.choose_realm(existing["realm_id"])
    chosen = callback_query(await authorize(http, sim))
    fresh = callback_query(await authorize(http, sim))
    assert chosen["realmId"] == existing["realm_id"]
    assert fresh["realmId"] != existing["realm_id"]

    # The code's token is the chosen company's: CompanyInfo confirms it.
    answer = await exchange(http, sim, chosen["code"], None)
    access = answer.json()["access_token"]
    assert (await company_info(http, sim, existing["realm_id"], access)).status == 200

    # Over the control API too.
    picked = await call(
        http,
        "POST",
        f"{sim.base_url}/_sim/choose-realm",
        json={"realm_id": existing["realm_id"]},
    )
    assert picked.status == 200
    assert callback_query(await authorize(http, sim))["realmId"] == existing["realm_id"]
    bad = await call(http, "POST", f"{sim.base_url}/_sim/choose-realm", json={"realm_id": ""})
    assert bad.status == 400
