"""The OpenAPI 3.1 document of the token API, served at ``GET /v1/openapi.json``.

Written by hand, next to :mod:`qbo_daemon.http.api`; ``tests/test_api.py`` keeps it
true: the app's routes are exactly the document's paths and methods, and
every answer the tests see validates against the schema documented for its
status code.
"""

from __future__ import annotations

import copy
from typing import Any

from qbo_daemon import __version__

JSON = "application/json"
# Times are ISO 8601 UTC with microseconds and a Z (models.iso).
_TIME_PATTERN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"
_ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _time(description: str, *, nullable: bool = True) -> dict[str, Any]:
    return {
        "type": ["string", "null"] if nullable else "string",
        "format": "date-time",
        "pattern": _TIME_PATTERN,
        "description": description,
    }


# Every field of an account, as every daemon shows it (``node`` only when several share).
_ACCOUNT_FIELDS = (
    "account_id",
    "status",
    "realm_id",
    "realm_verified",
    "token_expires_at",
    "reconnect_token_at",
    "refresh_token_expires_at",
    "refresh_token_hard_expires_at",
    "last_refreshed_at",
    "failure_count",
    "last_error",
    "version",
    "created_at",
    "updated_at",
    "next_refresh_at",
    "hard_expiry_soon",
)


def _object(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


_ACCOUNT_PARAM = {
    "name": "account_id",
    "in": "path",
    "required": True,
    "description": "The host app's tenant id.",
    "schema": {"type": "string", "pattern": _ACCOUNT_ID_PATTERN},
}
_UNAUTHORIZED = _error("Missing or wrong API key (`unauthorized`).")
_STORAGE = _error("The database cannot be used right now (`storage_unavailable`).")
_INTERNAL = _error("Internal error (`internal`) or an undecryptable row (`encryption_key`).")
_BAD_ID = _error("`invalid_account_id`, or a bad body: `invalid_json`, `invalid_field`.")
_NOT_FOUND = _error("No such account (`not_found`).")
_TOO_LARGE = _error("The body is larger than allowed (`too_large`).")


def _protected(
    summary: str, responses: dict[str, Any], *, account: bool = True, body: Any = None
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary}
    if account:
        operation["parameters"] = [_ACCOUNT_PARAM]
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = {
        **responses,
        "401": _UNAUTHORIZED,
        "500": _INTERNAL,
        "503": responses.get("503", _STORAGE),
    }
    return operation


def _public(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "security": [], "responses": responses}


_SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": {"type": "string", "description": "A stable code, e.g. `needs_reconnect`."},
            "detail": {"type": "string", "description": "What happened and what to do."},
            "field": {"type": "string", "description": "The body field that is wrong."},
        },
        required=["error", "detail"],
    ),
    "Account": _object(
        {
            "account_id": {"type": "string", "pattern": _ACCOUNT_ID_PATTERN},
            "status": {
                "type": "string",
                "enum": ["active", "expired", "needs_reconnect", "disconnected"],
            },
            "realm_id": {"type": ["string", "null"], "description": "The QuickBooks company."},
            "realm_verified": {
                "type": "boolean",
                "description": "Whether Intuit confirmed that the tokens belong to `realm_id`; "
                "false while a transient failure kept the check from finishing (it is "
                "repeated after each refresh).",
            },
            "token_expires_at": _time("When the access token dies."),
            "reconnect_token_at": _time("When the next refresh is due."),
            "refresh_token_expires_at": _time("When the refresh token dies."),
            "refresh_token_hard_expires_at": _time("Intuit's 5-year limit, when known."),
            "last_refreshed_at": _time("The last successful refresh (or connection)."),
            "failure_count": {"type": "integer", "minimum": 0},
            "last_error": {"type": ["string", "null"]},
            "version": {"type": "integer", "minimum": 1},
            "created_at": _time("", nullable=False),
            "updated_at": _time("", nullable=False),
            "next_refresh_at": _time(
                "When the account is refreshed next: this daemon's timer, or its due time "
                "when that is beyond the timers' 10-minute window; null when none is set."
            ),
            "hard_expiry_soon": {"type": "boolean"},
            "node": {
                "type": "string",
                "description": "Several daemons on PostgreSQL only: the node that refreshes "
                "this account first (another takes over within about a second if it is gone).",
            },
        },
        required=[*_ACCOUNT_FIELDS],
    ),
    "AccountList": _object({"accounts": {"type": "array", "items": _ref("Account")}}),
    "Token": _object(
        {
            "access_token": {"type": "string", "minLength": 1},
            "realm_id": {"type": "string"},
            "expires_at": _time("When the access token dies.", nullable=False),
        }
    ),
    "AuthorizeUrl": _object({"url": {"type": "string", "format": "uri"}}),
    "AuthorizeRequest": _object(
        {
            "allow_realm_change": {
                "type": "boolean",
                "description": "Let this connection move the account to another QuickBooks "
                "company (emits `account.realm_changed`); without it such a connect is refused.",
            }
        },
        required=[],
    ),
    "ImportTokens": _object(
        {
            "refresh_token": {"type": "string", "minLength": 1},
            "realm_id": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
            "access_token": {"type": ["string", "null"]},
            "token_expires_at": {
                "type": ["string", "null"],
                "description": "ISO 8601; without an offset it is UTC. Without it (or with "
                "it in the past) the access token counts as dead and is refreshed at once.",
            },
            "refresh_token_expires_at": {
                "type": ["string", "null"],
                "description": "ISO 8601; 100 days from now when absent.",
            },
        },
        required=["refresh_token", "realm_id"],
    ),
    "ImportBatch": _object(
        {
            "accounts": {
                "type": "array",
                "maxItems": 100_000,
                "items": {
                    "description": "An ImportTokens object plus `account_id`.",
                    "type": "object",
                },
            },
            "replace": {
                "type": "boolean",
                "default": False,
                "description": "Overwrite accounts that exist; otherwise they are skipped.",
            },
            "dry_run": {"type": "boolean", "default": False},
        },
        required=["accounts"],
    ),
    "ImportReport": _object(
        {
            "imported": {
                "type": "array",
                "items": _object(
                    {
                        "index": {"type": "integer", "minimum": 0},
                        "account_id": {"type": "string"},
                        "replaced": {"type": "boolean"},
                        "refreshing_now": {"type": "boolean"},
                        "next_refresh_at": _time("When the account's first refresh is due."),
                    },
                    required=["index", "account_id", "replaced"],
                ),
            },
            "skipped": {
                "type": "array",
                "items": _object(
                    {
                        "index": {"type": "integer", "minimum": 0},
                        "account_id": {"type": ["string", "null"]},
                        "field": {"type": ["string", "null"]},
                        "reason": {"type": "string"},
                    }
                ),
            },
            "dry_run": {"type": "boolean"},
        }
    ),
    "RotateRequest": _object(
        {
            "batch": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 500},
            "expected_key_id": {
                "type": "string",
                "description": "Refuse (409 `key_mismatch`) unless the daemon encrypts with "
                "this key id: proves it has reloaded the new key list.",
            },
        },
        required=[],
    ),
    "RotateResult": _object(
        {
            "reencrypted": {"type": "integer", "minimum": 0},
            "remaining": {"type": "integer", "minimum": 0},
            "primary_key_id": {"type": "string"},
        }
    ),
    "Health": _object({"status": {"const": "ok"}}),
    "Ready": _object(
        {
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        }
    ),
}
# Disconnected extends Account: allOf plus additionalProperties would refuse `revoke`.
_SCHEMAS["Disconnected"] = copy.deepcopy(_SCHEMAS["Account"])
_SCHEMAS["Disconnected"]["properties"]["revoke"] = {
    "type": "string",
    "enum": ["revoked", "failed", "not_needed"],
    "description": "What Intuit said to the revoke (best effort; the tokens are forgotten anyway).",
}
_SCHEMAS["Disconnected"]["required"].append("revoke")

_PATHS: dict[str, Any] = {
    "/healthz": {"get": _public("Liveness", {"200": _json("Alive.", _ref("Health"))})},
    "/readyz": {
        "get": _public(
            "Readiness: database, scheduler and Intuit credentials",
            {
                "200": _json("Ready.", _ref("Ready")),
                "503": _json("Not ready; `checks` says why.", _ref("Ready")),
            },
        )
    },
    "/metrics": {
        "get": _public(
            "Prometheus metrics",
            {
                "200": {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        )
    },
    "/v1/openapi.json": {
        "get": _public("This document", {"200": _json("OpenAPI 3.1.", {"type": "object"})})
    },
    "/v1/accounts": {
        "get": _protected(
            "Every account with status and times (never a secret)",
            {"200": _json("The accounts, by account_id.", _ref("AccountList"))},
            account=False,
        )
    },
    "/v1/accounts/{account_id}": {
        "get": _protected(
            "One account",
            {"200": _json("The account.", _ref("Account")), "400": _BAD_ID, "404": _NOT_FOUND},
        ),
        "delete": _protected(
            "Disconnect: revoke at Intuit (best effort), forget the tokens, keep a tombstone",
            {
                "200": _json("Disconnected (also when it already was).", _ref("Disconnected")),
                "400": _BAD_ID,
                "404": _NOT_FOUND,
            },
        ),
    },
    "/v1/accounts/{account_id}/authorize-url": {
        "post": _protected(
            "An Intuit authorization URL with a fresh state bound to this account",
            {
                "200": _json("Send the user's browser here.", _ref("AuthorizeUrl")),
                "400": _BAD_ID,
                "413": _TOO_LARGE,
            },
            body={"required": False, "content": {JSON: {"schema": _ref("AuthorizeRequest")}}},
        )
    },
    "/v1/accounts/{account_id}/token": {
        "get": _protected(
            "A valid access token",
            {
                "200": _json(
                    "Served at once while valid (inside the refresh lead a background refresh "
                    "starts); an expired or nearly expired token waits for the refresh.",
                    _ref("Token"),
                ),
                "400": _BAD_ID,
                "404": _NOT_FOUND,
                "409": _error(
                    "`needs_reconnect` or `disconnected`: send the user to the authorize-url."
                ),
                "503": _error(
                    "`unavailable`: Intuit cannot be reached and no valid token is left; retry "
                    "shortly. Also `storage_unavailable`."
                ),
            },
        )
    },
    "/v1/accounts/{account_id}/refresh": {
        "post": _protected(
            "Refresh now (single flight: joins a refresh already under way)",
            {
                "200": _json("Refreshed.", _ref("Account")),
                "400": _BAD_ID,
                "404": _NOT_FOUND,
                "409": _error("`needs_reconnect` or `disconnected`."),
                "503": _error(
                    "`unavailable` (Intuit unreachable; retried by the daemon), "
                    "`invalid_client`, or `storage_unavailable`."
                ),
            },
        )
    },
    "/v1/accounts/{account_id}/tokens": {
        "put": _protected(
            "Import an existing connection (replaces the account's tokens if it exists)",
            {
                "200": _json("Replaced an existing account.", _ref("Account")),
                "201": _json("Created the account.", _ref("Account")),
                "400": _BAD_ID,
                "413": _TOO_LARGE,
            },
            body={
                "required": True,
                "content": {JSON: {"schema": _ref("ImportTokens")}},
            },
        )
    },
    "/v1/import": {
        "post": _protected(
            "Import many connections: every row validated, the good ones stored a "
            "thousand per transaction, the bad ones reported by index",
            {
                "200": _json(
                    "What was imported and what was skipped, and why.", _ref("ImportReport")
                ),
                "400": _error("`invalid_json` or `invalid_field` (the body as a whole)."),
                "413": _TOO_LARGE,
                "503": _error(
                    "`storage_unavailable`; when the database failed part way, `detail` "
                    "names the last row stored: send the rows after it again."
                ),
            },
            account=False,
            body={"required": True, "content": {JSON: {"schema": _ref("ImportBatch")}}},
        )
    },
    "/v1/keys/rotate": {
        "post": _protected(
            "Re-encrypt one batch of rows under the first configured key",
            {
                "200": _json("Call again until `remaining` is 0.", _ref("RotateResult")),
                "400": _error("`invalid_json` or `invalid_field`."),
                "409": _error("`key_mismatch`: the daemon has not loaded the new key list."),
            },
            account=False,
            body={"required": False, "content": {JSON: {"schema": _ref("RotateRequest")}}},
        )
    },
}


# `import --verify`: the first attempt since the import answers, instead of a new one.
_PATHS["/v1/accounts/{account_id}/refresh"]["post"]["parameters"].append(
    {
        "name": "unless_attempted_since",
        "in": "query",
        "required": False,
        "description": "An ISO 8601 time. If a refresh of this account started at or after "
        "it (the one in flight, or one already finished), answer with that attempt's outcome "
        "instead of starting another: each account is refreshed once however many ask.",
        "schema": {"type": "string", "format": "date-time"},
    }
)


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change it)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "qbo-daemon token API",
                "version": __version__,
                "description": "Keeps QuickBooks Online OAuth 2.0 tokens fresh. Every error "
                'answers {"error": "<code>", "detail": "..."}.',
            },
            "servers": [{"url": "/", "description": "where this document is served"}],
            "security": [{"apiKey": []}],
            "paths": _PATHS,
            "components": {
                "schemas": _SCHEMAS,
                "securitySchemes": {
                    "apiKey": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "One of the daemon's [api] keys.",
                    }
                },
            },
        }
    )
