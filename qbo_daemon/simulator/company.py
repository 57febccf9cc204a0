"""The one Accounting API call the daemon makes: ``GET /v3/company/{realm}/companyinfo/{realm}``.

With ``Authorization: Bearer <access token>`` it answers 200 and
``{"CompanyInfo": {...}, "time": ...}`` for the company the token was granted
for; 401 (``AuthenticationFailed``, code 3200) for a token that is unknown,
expired or revoked; 403 (``ApplicationAuthorizationFailed``, code 003100) for
a live token of another company. Error bodies take Intuit's ``Fault`` shape.
A pending fault (endpoint ``companyinfo``) answers in its place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from aiohttp import web

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.models import iso
from qbo_daemon.simulator.faults import FaultPlan
from qbo_daemon.simulator.grants import Grants
from qbo_daemon.simulator.log import RequestLog
from qbo_daemon.simulator.oauth import OAuthEndpoints

__all__ = ["COMPANY_INFO_PATH", "CompanyEndpoint"]

COMPANY_INFO_PATH: Final = "/v3/company/{realm_id}/companyinfo/{company_id}"


class CompanyEndpoint:
    """``GET /v3/company/{realm}/companyinfo/{realm}`` over the simulator's grants."""

    def __init__(
        self,
        clock: Clock,
        grants: Grants,
        faults: FaultPlan,
        log: RequestLog,
        oauth: OAuthEndpoints,
    ) -> None:
        self._clock = clock
        self._grants = grants
        self._faults = faults
        self._log = log
        self._oauth = oauth  # for intuit_tids and fault answers

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(COMPANY_INFO_PATH, self.company_info)

    async def company_info(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock.now()
        tid = self._oauth.new_tid()
        realm_id = request.match_info["realm_id"]
        fault = self._faults.take("companyinfo")
        if fault is not None:
            return await self._oauth.faulted(
                request, "companyinfo", fault, arrived, tid, None, None
            )
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        granted = None
        if scheme.lower() == "bearer" and token.strip():
            granted = self._grants.access_realm(token.strip(), arrived.timestamp())
        if granted is None:
            status, error = 401, "AuthenticationFailed"
            body = _fault(
                "AUTHENTICATION", error, "3200", status, "Token expired or invalid", arrived
            )
        elif granted != realm_id:
            status, error = 403, "ApplicationAuthorizationFailed"
            body = _fault("SERVICE", error, "003100", status, "", arrived)
        elif request.match_info["company_id"] != realm_id:
            status, error = 400, "ObjectNotFound"
            body = _fault("ValidationFault", "Object Not Found", "610", status, "", arrived)
        else:
            status, error = 200, None
            body = {"CompanyInfo": _company(realm_id), "time": _time(arrived)}
        self._log.record("companyinfo", arrived, tid, status, error=error, realm_id=realm_id)
        return web.json_response(body, status=status, headers={"intuit_tid": tid})


def _company(realm_id: str) -> dict[str, Any]:
    return {
        "CompanyName": f"Simulated Company {realm_id[-4:]}",
        "LegalName": f"Simulated Company {realm_id[-4:]} LLC",
        "Country": "US",
        "Id": "1",
        "SyncToken": "0",
        "domain": "QBO",
        "sparse": False,
    }


def _fault(
    kind: str, message: str, code: str, status: int, detail: str, at: datetime
) -> dict[str, Any]:
    text = f"message={message}; errorCode={code.zfill(6)}; statusCode={status}"
    return {
        "Fault": {"Error": [{"Message": text, "Detail": detail, "code": code}], "type": kind},
        "time": _time(at),
    }


def _time(at: datetime) -> str:
    return iso(at) or ""
