"""The private token API the host app calls (JSON, bearer keys, loopback by default).

Every error answers ``{"error": "<code>", "detail": "..."}`` (plus ``"field"``
when one field of the body is wrong); no answer ever carries a refresh token,
and only ``GET .../token`` carries an access token. ``/healthz``, ``/readyz``,
``/metrics`` and ``/v1/openapi.json`` need no key: the listener is private.
:mod:`qbo_daemon.http.openapi` describes every route; a test keeps the two equal.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from qbo_daemon.core.errors import AccountNotFoundError, CryptoError, StorageError
from qbo_daemon.core.models import ACCOUNT_ID_RULE, iso, parse_iso, valid_account_id
from qbo_daemon.core.threads import yielding
from qbo_daemon.engine.accounts import Imported, ImportInterruptedError
from qbo_daemon.engine.errors import KeyMismatchError, UnavailableError
from qbo_daemon.engine.imports import Checked, FieldError, Rejected, check_batch, parse_item
from qbo_daemon.engine.services import Services
from qbo_daemon.engine.triggers import Trigger
from qbo_daemon.http.jsonbody import CollectorPause, dumps_object, loads_object
from qbo_daemon.http.openapi import openapi_document

SERVICES = web.AppKey("services", Services)
COLLECTOR_PAUSE = web.AppKey("collector_pause", CollectorPause)
MAX_BODY = 64 * 1024
# 32 MiB holds about 100,000 rows; they are stored a thousand per transaction.
MAX_IMPORT_BODY = 32 * 1024 * 1024
MAX_IMPORT_ROWS = 100_000
MAX_ROTATE_BATCH = 10_000
# How the qbo-daemon command introduces itself, so its refreshes log trigger "cli".
CLI_USER_AGENT = "qbo-daemon-cli/"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/openapi.json"})
# The status page (qbo_daemon.http.ui) signs people in with its own session cookie.
UI_PREFIX = "/ui"
_NO_STORE = {"Cache-Control": "no-store"}

log = structlog.get_logger("qbo_daemon.http.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field


def error_response(status: int, code: str, detail: str, field: str | None = None) -> web.Response:
    body = {"error": code, "detail": detail}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, headers=_NO_STORE)


def make_api_app(services: Services) -> web.Application:
    app = web.Application(client_max_size=MAX_IMPORT_BODY, middlewares=[_errors, _auth])
    app[SERVICES] = services
    app[COLLECTOR_PAUSE] = CollectorPause()
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
    r.add_post("/v1/import", _import_batch)
    r.add_post("/v1/keys/rotate", _rotate_keys)
    return app


# -- middlewares ----------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.detail, exc.field)
    except FieldError as exc:
        return error_response(400, "invalid_field", str(exc), exc.field)
    except AccountNotFoundError as exc:
        return error_response(404, "not_found", str(exc))
    except UnavailableError as exc:
        return error_response(503 if exc.retry_later else 409, exc.code, exc.detail)
    except KeyMismatchError as exc:
        return error_response(409, "key_mismatch", str(exc))
    except CryptoError as exc:
        # The message names a key id at most, never a key.
        log.error("api.decryption_failed", error=str(exc), path=request.path, **_about(request))
        return error_response(500, "encryption_key", str(exc))
    except StorageError as exc:
        log.error("api.storage_failed", error=str(exc), path=request.path, **_about(request))
        return error_response(503, "storage_unavailable", "the database cannot be used right now")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = (exc.reason or "error").lower().replace(" ", "_")
        return error_response(exc.status, code, f"{exc.reason}: {request.method} {request.path}")
    except Exception as exc:  # a boundary: answer, and log the cause
        log.exception("api.request_failed", error=str(exc), path=request.path, **_about(request))
        return error_response(500, "internal", "internal error; see the daemon's log")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path in PUBLIC_PATHS or path == UI_PREFIX or path.startswith(UI_PREFIX + "/"):
        return await handler(request)
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Compare digests, so neither the content nor the length of a key leaks through
    # timing, and compare against every key without stopping at the first match.
    # surrogateescape: aiohttp hands undecodable header bytes over as lone surrogates.
    given = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
    ok = False
    for key in request.app[SERVICES].config.api.keys:
        ok |= hmac.compare_digest(given, hashlib.sha256(key.reveal().encode()).digest())
    if not ok or scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer ...)")
    return await handler(request)


# -- handlers -------------------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, checks = await request.app[SERVICES].readiness()
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = await request.app[SERVICES].metrics_text()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _list_accounts(request: web.Request) -> web.Response:
    accounts = await request.app[SERVICES].accounts.list_accounts()
    return web.json_response({"accounts": accounts})


async def _show_account(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response(await services.accounts.show(_account_id(request)))


async def _authorize_url(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = _account_id(request)
    body = await _json_object(request, MAX_BODY, allow_empty=True)
    _only(body, {"allow_realm_change"})
    allow_realm_change = _flag(body, "allow_realm_change")
    url = await services.connect.authorize_url(account_id, allow_realm_change=allow_realm_change)
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
    accounts = request.app[SERVICES].accounts
    account_id = _account_id(request)
    since = _time_param(request, "unless_attempted_since")
    if since is not None:  # import --verify: the first attempt since the import answers
        account = await accounts.refresh_now(
            account_id, trigger="import", unless_attempted_since=since
        )
    else:
        account = await accounts.refresh_now(account_id, trigger=_asker(request))
    return web.json_response(accounts.describe(account))


async def _import_tokens(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = _account_id(request)
    body = await _json_object(request, MAX_BODY)
    item = parse_item(body, now=services.clock.now(), account_id=account_id)
    [imported] = await services.accounts.import_tokens([item])
    assert imported.account is not None  # replaced when it exists
    status = 200 if imported.existed else 201
    return web.json_response(services.accounts.describe(imported.account), status=status)


async def _import_batch(request: web.Request) -> web.Response:
    raw = await _read_body(request, MAX_IMPORT_BODY)
    with request.app[COLLECTOR_PAUSE]():
        return await _import_rows(request.app[SERVICES], raw)


async def _import_rows(services: Services, raw: bytes) -> web.Response:
    # Parsing and checking 100,000 rows takes seconds: off the event loop, which
    # meanwhile serves refreshes, the callback and the watchdog; and in short steps
    # (http.jsonbody), as one long C call would hold the GIL and stop the loop anyway.
    batch = await asyncio.to_thread(_check_import, raw, services.clock.now())
    good = batch.good
    ids = [checked.item.account_id for checked in good]
    if batch.dry_run:
        found = await services.accounts.existing_ids(ids)
        results = [Imported(account_id, account_id in found, None) for account_id in ids]
    else:
        try:
            results = await services.accounts.import_tokens(
                [checked.item for checked in good], replace_existing=batch.replace
            )
        except ImportInterruptedError as exc:
            log.error("api.import_interrupted", stored=len(exc.stored), error=str(exc))
            last = good[len(exc.stored) - 1].position
            raise ApiError(
                503,
                "storage_unavailable",
                f"the database failed part way: the rows up to index {last} are stored and "
                f"scheduled; the rows after index {last} were not stored: send them again",
            ) from None
    text = await asyncio.to_thread(_import_answer, batch, results, services.clock.now())
    return web.Response(text=text, content_type="application/json")


@dataclass(frozen=True, slots=True)
class _ImportBatch:
    good: list[Checked]
    bad: list[Rejected]
    replace: bool
    dry_run: bool


def _import_answer(batch: _ImportBatch, results: list[Imported], now: datetime) -> str:
    """The JSON answer of ``POST /v1/import`` (on a worker thread: it can be 10 MB)."""
    bad = list(batch.bad)
    imported = []
    for checked, result in yielding(zip(batch.good, results, strict=True)):
        if result.existed and not batch.replace:
            reason = "already exists; not replaced"
            bad.append(Rejected(checked.position, result.account_id, "account_id", reason))
            continue
        entry: dict[str, Any] = {
            "index": checked.position,
            "account_id": result.account_id,
            "replaced": result.existed,
        }
        if result.account is not None:
            due = result.account.reconnect_token_at
            entry["refreshing_now"] = due is not None and due <= now
            entry["next_refresh_at"] = iso(due)
        imported.append(entry)
    bad.sort(key=lambda r: r.position)
    skipped = [
        {"index": r.position, "account_id": r.account_id, "field": r.field, "reason": r.reason}
        for r in bad
    ]
    return dumps_object({"imported": imported, "skipped": skipped, "dry_run": batch.dry_run})


def _check_import(raw: bytes, now: datetime) -> _ImportBatch:
    """The body of ``POST /v1/import``, parsed and every row checked (on a worker thread)."""
    body = _parse_object(raw, loads_object)
    _only(body, {"accounts", "replace", "dry_run"})
    rows = body.get("accounts")
    if not isinstance(rows, list):
        raise ApiError(400, "invalid_field", "accounts: expected a list of objects", "accounts")
    if len(rows) > MAX_IMPORT_ROWS:
        raise ApiError(
            400, "invalid_field", f"accounts: at most {MAX_IMPORT_ROWS} per import", "accounts"
        )
    replace = _flag(body, "replace")
    dry_run = _flag(body, "dry_run")
    good, bad = check_batch(enumerate(rows), now=now)
    return _ImportBatch(good, bad, replace, dry_run)


async def _disconnect(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    result = await services.accounts.disconnect(_account_id(request))
    data = services.accounts.describe(result.account)
    data["revoke"] = result.revoke.value
    return web.json_response(data)


async def _rotate_keys(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = await _json_object(request, MAX_BODY, allow_empty=True)
    _only(body, {"batch", "expected_key_id"})
    batch = body.get("batch", 500)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_ROTATE_BATCH:
        raise ApiError(
            400,
            "invalid_field",
            f"batch: expected an integer from 1 to {MAX_ROTATE_BATCH}",
            "batch",
        )
    expected = body.get("expected_key_id")
    if expected is not None and not isinstance(expected, str):
        raise ApiError(
            400, "invalid_field", "expected_key_id: expected a string", "expected_key_id"
        )
    done, remaining, primary = await services.accounts.rotate_keys(batch, expected_key_id=expected)
    log.info("key_rotation.batch_completed", reencrypted=done, remaining=remaining, key_id=primary)
    return web.json_response(
        {"reencrypted": done, "remaining": remaining, "primary_key_id": primary}
    )


# -- helpers --------------------------------------------------------------------


def _account_id(request: web.Request) -> str:
    account_id = request.match_info["account_id"]
    if not valid_account_id(account_id):
        raise ApiError(
            400, "invalid_account_id", f"account_id must be {ACCOUNT_ID_RULE}", "account_id"
        )
    return account_id


def _about(request: web.Request) -> dict[str, str]:
    """``account_id`` for a log line, when the route names a valid one."""
    account_id = request.match_info.get("account_id", "")
    return {"account_id": account_id} if valid_account_id(account_id) else {}


def _asker(request: web.Request) -> Trigger:
    """``cli`` for the ``qbo-daemon`` command (its User-Agent), else ``api``."""
    return "cli" if request.headers.get("User-Agent", "").startswith(CLI_USER_AGENT) else "api"


def _time_param(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        when = parse_iso(text)
    except ValueError:
        when = None
    if when is None:
        raise ApiError(
            400,
            "invalid_field",
            f"{name}: expected an ISO 8601 time such as 2024-05-01T09:30:00Z",
            name,
        )
    return when


async def _json_object(
    request: web.Request, limit: int, *, allow_empty: bool = False
) -> dict[str, Any]:
    raw = await _read_body(request, limit)
    if not raw.strip() and allow_empty:
        return {}
    return _parse_object(raw)


def _parse_object(raw: bytes, loads: Callable[[bytes], Any] = json.loads) -> dict[str, Any]:
    try:
        data = loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: "[[[[..." nested past the interpreter's limit fits in a body.
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return data


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes."""
    too_large = ApiError(413, "too_large", f"the request body is limited to {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "invalid_field", f"{unknown[0]}: unknown field", unknown[0])


def _flag(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_field", f"{field}: expected true or false", field)
    return value
