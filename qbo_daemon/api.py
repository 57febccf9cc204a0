"""The private token API the host app calls (JSON, bearer keys, loopback by default).

Every error answers ``{"error": "<code>", "detail": "..."}``; no answer ever
carries a refresh token, and only ``GET .../token`` carries an access token.
``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/openapi.json`` need no key:
the listener is private.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from qbo_daemon.errors import AccountNotFoundError, StorageError
from qbo_daemon.models import ACCOUNT_ID_RULE, Account, iso, parse_iso, valid_account_id
from qbo_daemon.openapi import openapi_document
from qbo_daemon.refresher import OutcomeKind
from qbo_daemon.services import Services
from qbo_daemon.storage import ImportItem
from qbo_daemon.tokens import TokenUnavailableError

SERVICES = web.AppKey("services", Services)
MAX_BODY = 64 * 1024
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/openapi.json"})
_NO_STORE = {"Cache-Control": "no-store"}
_IMPORT_FIELDS = frozenset(
    {"refresh_token", "realm_id", "access_token", "token_expires_at", "refresh_token_expires_at"}
)

log = structlog.get_logger("qbo_daemon.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def error_response(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=_NO_STORE)


def make_api_app(services: Services) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors, _auth])
    app[SERVICES] = services
    r = app.router
    r.add_get("/healthz", _healthz)
    r.add_get("/readyz", _readyz)
    r.add_get("/metrics", _metrics)
    r.add_get("/v1/openapi.json", _openapi)
    r.add_get("/v1/accounts", _list_accounts)
    r.add_get("/v1/accounts/{account_id}", _show_account)
    r.add_delete("/v1/accounts/{account_id}", _disconnect)
    r.add_post("/v1/accounts/{account_id}/authorize-url", _authorize_url)
    r.add_get("/v1/accounts/{account_id}/token", _token)
    r.add_post("/v1/accounts/{account_id}/refresh", _refresh)
    r.add_put("/v1/accounts/{account_id}/tokens", _import_tokens)
    r.add_post("/v1/keys/rotate", _rotate_keys)
    return app


# -- middlewares ----------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.detail)
    except AccountNotFoundError as exc:
        return error_response(404, "not_found", str(exc))
    except TokenUnavailableError as exc:
        status = 503 if exc.code == "unavailable" else 409
        return error_response(status, exc.code, exc.detail)
    except StorageError as exc:
        log.error("api.storage_error", error=str(exc), path=request.path)
        return error_response(503, "storage_unavailable", "the database cannot be used right now")
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "too_large", f"request bodies are limited to {MAX_BODY} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = (exc.reason or "error").lower().replace(" ", "_")
        return error_response(exc.status, code, exc.reason or "error")
    except Exception as exc:  # a boundary: answer, and log the cause
        log.exception("api.error", error=str(exc), path=request.path)
        return error_response(500, "internal", "internal error; see the daemon's log")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    keys = request.app[SERVICES].config.api.keys
    ok = False
    if scheme.lower() == "bearer" and presented:
        given = presented.strip().encode()
        # Compare against every key, in constant time, without stopping early.
        for key in keys:
            ok |= hmac.compare_digest(given, key.reveal().encode())
    if not ok:
        raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer ...)")
    return await handler(request)


# -- handlers -------------------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, checks = await request.app[SERVICES].readiness()
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[SERVICES].metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _list_accounts(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    accounts = await services.storage.list_accounts()
    return web.json_response({"accounts": [_account_json(services, a) for a in accounts]})


async def _show_account(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account = await services.storage.get_account(_account_id(request))
    return web.json_response(_account_json(services, account))


async def _authorize_url(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    url = await services.connect.authorize_url(_account_id(request))
    return web.json_response({"url": url}, headers=_NO_STORE)


async def _token(request: web.Request) -> web.Response:
    token = await request.app[SERVICES].tokens.get(_account_id(request))
    return web.json_response(
        {
            "access_token": token.access_token,
            "realm_id": token.realm_id,
            "expires_at": iso(token.expires_at),
        },
        headers=_NO_STORE,
    )


async def _refresh(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = _account_id(request)
    await services.storage.get_account(account_id)  # 404 before anything else
    outcome = await services.scheduler.refresh(account_id)
    if outcome.kind is OutcomeKind.SUCCESS and outcome.account is not None:
        return web.json_response(_account_json(services, outcome.account))
    if outcome.kind in (OutcomeKind.INVALID_GRANT, OutcomeKind.REFRESH_TOKEN_EXPIRED):
        raise ApiError(
            409,
            "needs_reconnect",
            f"Intuit refused the refresh token; the user must reconnect through "
            f"POST /v1/accounts/{account_id}/authorize-url",
        )
    if outcome.kind is OutcomeKind.INVALID_CLIENT:
        raise ApiError(503, "invalid_client", "Intuit refused the daemon's client credentials")
    if outcome.kind is OutcomeKind.SKIPPED:
        account = await services.storage.get_account(account_id)
        raise ApiError(
            409, account.status.value, f"account {account_id!r} is {account.status.value}"
        )
    detail = str(outcome.error) if outcome.error else (outcome.message or "refresh failed")
    raise ApiError(503, "unavailable", f"refresh failed, will be retried: {detail}")


async def _import_tokens(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = _account_id(request)
    body = await _json_object(request)
    item = parse_import(account_id, body)
    existed = await services.storage.find_account(account_id) is not None
    [account] = await services.accounts.import_tokens([item])
    return web.json_response(_account_json(services, account), status=200 if existed else 201)


async def _disconnect(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account = await services.accounts.disconnect(_account_id(request))
    return web.json_response(_account_json(services, account))


async def _rotate_keys(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await _json_object(request, allow_empty=True)
    batch = body.get("batch", 500)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 10_000:
        raise ApiError(400, "invalid_field", "batch: expected an integer from 1 to 10000")
    done, remaining = await services.accounts.rotate_keys(batch)
    return web.json_response(
        {
            "reencrypted": done,
            "remaining": remaining,
            "primary_key_id": services.storage.cipher.primary_key_id,
        }
    )


# -- helpers --------------------------------------------------------------------


def _account_id(request: web.Request) -> str:
    account_id = request.match_info["account_id"]
    if not valid_account_id(account_id):
        raise ApiError(400, "invalid_account_id", f"account_id must be {ACCOUNT_ID_RULE}")
    return account_id


def _account_json(services: Services, account: Account) -> dict[str, Any]:
    data = account.public_dict()
    data["next_refresh_at"] = iso(services.scheduler.due_at(account.account_id))
    hard = account.refresh_token_hard_expires_at
    warn = services.config.refresh.hard_expiry_warning
    data["hard_expiry_soon"] = hard is not None and hard - services.clock.now() <= warn
    return data


async def _json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip() and allow_empty:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return data


def parse_import(account_id: str, body: dict[str, Any]) -> ImportItem:
    """Validate an import body; a bad one is an :class:`ApiError` naming the field."""
    unknown = sorted(set(body) - _IMPORT_FIELDS)
    if unknown:
        raise ApiError(400, "invalid_field", f"{unknown[0]}: unknown field")
    refresh_token = _text(body, "refresh_token", required=True)
    realm_id = _text(body, "realm_id", required=True)
    access_token = _text(body, "access_token", required=False)
    if refresh_token is None or realm_id is None:  # _text raised already; for the type checker
        raise ApiError(400, "invalid_field", "refresh_token and realm_id are required")
    return ImportItem(
        account_id=account_id,
        realm_id=realm_id,
        refresh_token=refresh_token,
        access_token=access_token,
        token_expires_at=_time(body, "token_expires_at"),
        refresh_token_expires_at=_time(body, "refresh_token_expires_at"),
    )


def _text(body: dict[str, Any], field: str, *, required: bool) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise ApiError(400, "invalid_field", f"{field}: required")
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 4096:
        raise ApiError(400, "invalid_field", f"{field}: expected a non-empty string")
    if not value.isprintable():
        raise ApiError(400, "invalid_field", f"{field}: contains control characters")
    return value.strip()


def _time(body: dict[str, Any], field: str) -> datetime | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"{field}: expected an ISO 8601 time")
    try:
        parsed = parse_iso(value)
    except ValueError:
        raise ApiError(400, "invalid_field", f"{field}: expected an ISO 8601 time") from None
    # A time without an offset is taken as UTC (parse_iso), as the classic tables store it.
    return parsed
