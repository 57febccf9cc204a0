"""Confirming a company with Intuit: ``GET {api_base}/v3/company/{realm}/companyinfo/{realm}``.

The callback's ``realmId`` comes from a browser, so anyone can forge it. The
access token a code exchange returns was granted for one company only, and
Intuit answers CompanyInfo for that company alone: 200 confirms the realm; 401
(``AuthenticationFailed``) or 403 (``ApplicationAuthorizationFailed``) says
the token is not this company's. Anything else (a timeout, a connection error,
5xx, 429, another 4xx, a body that is not a CompanyInfo object) decides
nothing: the verdict is ``unknown`` and the caller checks again later.

The access token is sent only in the ``Authorization`` header and never
appears in a verdict's detail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import quote

import aiohttp

from qbo_daemon.config.load import IntuitConfig

__all__ = ["CompanyInfoClient", "RealmCheckResult", "RealmVerdict"]


class RealmVerdict(StrEnum):
    CONFIRMED = "confirmed"  # the token is this company's
    REFUSED = "refused"  # 401/403: the token is not this company's
    UNKNOWN = "unknown"  # Intuit could not tell us now; check again later


@dataclass(frozen=True, slots=True)
class RealmCheckResult:
    verdict: RealmVerdict
    detail: str  # for logs and last_error: the status and Intuit's own words, never a token
    status: int | None = None
    intuit_tid: str | None = None


class _Configured(Protocol):
    """Where the current Intuit settings live (the OAuth client; a reload replaces them)."""

    config: IntuitConfig


class CompanyInfoClient:
    """Asks Intuit whether an access token belongs to a company.

    ``settings`` is read at every call, so a reload's new ``api_base`` or
    ``timeout`` applies at once. The session is the process's shared one.
    """

    def __init__(self, session: aiohttp.ClientSession, settings: _Configured) -> None:
        self._session = session
        self._settings = settings

    def url(self, realm_id: str) -> str:
        realm = quote(realm_id, safe="")
        return f"{self._settings.config.api_base}/v3/company/{realm}/companyinfo/{realm}"

    async def check(self, access_token: str, realm_id: str) -> RealmCheckResult:
        """Whether ``access_token`` was granted for ``realm_id``."""
        config = self._settings.config
        timeout = aiohttp.ClientTimeout(total=config.timeout.total_seconds())
        headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
        try:
            async with self._session.get(
                self.url(realm_id), headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                body = await response.read()
                status, tid = response.status, response.headers.get("intuit_tid")
        except TimeoutError:
            seconds = config.timeout.total_seconds()
            return RealmCheckResult(
                RealmVerdict.UNKNOWN, f"CompanyInfo did not answer within {seconds:g}s"
            )
        except aiohttp.ClientError as exc:
            return RealmCheckResult(
                RealmVerdict.UNKNOWN, f"cannot reach Intuit's CompanyInfo: {type(exc).__name__}"
            )
        return _verdict(status, body, tid, access_token)


def _verdict(status: int, body: bytes, tid: str | None, access_token: str) -> RealmCheckResult:
    data = _json_object(body)
    if status == 200:
        if data is not None and isinstance(data.get("CompanyInfo"), dict):
            return RealmCheckResult(RealmVerdict.CONFIRMED, "CompanyInfo confirmed", status, tid)
        return RealmCheckResult(
            RealmVerdict.UNKNOWN, "CompanyInfo answered 200 without a CompanyInfo", status, tid
        )
    said = _fault_message(data, access_token)
    detail = f"CompanyInfo answered HTTP {status}" + (f" ({said})" if said else "")
    if status in (401, 403):
        return RealmCheckResult(RealmVerdict.REFUSED, detail, status, tid)
    return RealmCheckResult(RealmVerdict.UNKNOWN, detail, status, tid)


def _fault_message(data: dict[str, object] | None, access_token: str) -> str:
    """Intuit's ``Fault.Error[0].Message`` in one short line, if the body has one."""
    fault = data.get("Fault") if data else None
    errors = fault.get("Error") if isinstance(fault, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else None
    message = first.get("Message") if isinstance(first, dict) else None
    if not isinstance(message, str):
        return ""
    # A server (or a proxy) may echo what it was sent: never repeat the token.
    message = message.replace(access_token, "[redacted]")
    return " ".join(message.split())[:200]


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
