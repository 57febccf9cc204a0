"""The Intuit simulator's HTTP control API under ``/_sim/``.

The in-process controls of :class:`~qbo_daemon.simulator.app.IntuitSimulator`
over HTTP, for a simulator in another process (``qbo-daemon simulator``, the
benchmark, the fault tests). Bad input answers 400 and an unknown token 404,
as JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any, Final, Protocol

from aiohttp import web

from qbo_daemon.simulator.faults import RAW_KIND, RawAnswer
from qbo_daemon.simulator.log import RequestLogEntry
from qbo_daemon.simulator.settings import SimulatorSettings

__all__ = ["MAX_BULK_GRANTS", "ControlTarget", "add_control_routes"]

# Most connections one POST /_sim/grants {"count": N} mints (a few MB of JSON).
MAX_BULK_GRANTS: Final = 10_000

_Handler = Callable[[web.Request], Awaitable[web.Response]]


class ControlTarget(Protocol):
    """What the control API drives: the simulator's in-process controls."""

    @property
    def settings(self) -> SimulatorSettings: ...

    @property
    def request_log(self) -> list[RequestLogEntry]: ...

    @property
    def pending_denials(self) -> int: ...

    def inject(
        self,
        kind: str,
        count: int = 1,
        *,
        endpoint: str = "token",
        retry_after: float | None = None,
        raw: RawAnswer | None = None,
    ) -> None: ...

    def deny_next_authorization(self) -> None: ...

    def choose_realm(self, realm_id: str) -> None: ...

    def grant(self, realm_id: str | None = None) -> dict[str, Any]: ...

    def invalidate(self, refresh_token: str) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...


def add_control_routes(app: web.Application, target: ControlTarget) -> None:
    """Route ``/_sim/faults``, ``deny``, ``choose-realm``, ``grants``, ``invalidate``,
    ``log``, ``stats``, ``reset`` and ``settings`` to ``target``."""
    api = _ControlAPI(target)
    control: list[tuple[str, str, _Handler]] = [
        ("POST", "/_sim/faults", api.faults),
        ("POST", "/_sim/deny", api.deny),
        ("POST", "/_sim/choose-realm", api.choose_realm),
        ("POST", "/_sim/grants", api.grants),
        ("POST", "/_sim/invalidate", api.invalidate),
        ("GET", "/_sim/log", api.log),
        ("GET", "/_sim/stats", api.stats),
        ("POST", "/_sim/reset", api.reset),
        ("GET", "/_sim/settings", api.settings),
        ("POST", "/_sim/settings", api.settings),
    ]
    for method, path, handler in control:
        app.router.add_route(method, path, _control(handler))


class _ControlAPI:
    def __init__(self, target: ControlTarget) -> None:
        self._target = target

    async def faults(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        kind = _require_str(data, "kind")
        allowed = {"kind", "count", "endpoint", "retry_after"}
        raw = None
        if kind == RAW_KIND:
            # {"kind": "raw", "status": 200, "headers": {...}, "body": "..."}: exactly that.
            allowed = {"kind", "count", "endpoint", "status", "headers", "body", "body_base64"}
            _only(data, allowed)
            raw = RawAnswer.from_json(data)
        _only(data, allowed)
        self._target.inject(
            kind,
            data.get("count", 1),
            endpoint=data.get("endpoint", "token"),
            retry_after=data.get("retry_after"),
            raw=raw,
        )
        return web.json_response({"pending_faults": self._target.stats()["pending_faults"]})

    async def deny(self, request: web.Request) -> web.Response:
        self._target.deny_next_authorization()
        return web.json_response({"pending_denials": self._target.pending_denials})

    async def choose_realm(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        _only(data, {"realm_id"})
        realm_id = _require_str(data, "realm_id")
        self._target.choose_realm(realm_id)
        return web.json_response({"chosen_realm_id": realm_id})

    async def grants(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        _only(data, {"realm_id", "count"})
        if "count" in data:
            # Bulk minting for the benchmark: {"count": N} answers {"grants": [...]}.
            count = data["count"]
            if "realm_id" in data:
                raise ValueError("give either realm_id or count, not both")
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError("count must be an integer")
            if not 1 <= count <= MAX_BULK_GRANTS:
                raise ValueError(f"count must be between 1 and {MAX_BULK_GRANTS}")
            return web.json_response({"grants": [self._target.grant() for _ in range(count)]})
        realm_id = data.get("realm_id")
        if realm_id is not None and (not isinstance(realm_id, str) or not realm_id):
            raise ValueError("realm_id must be a non-empty string")
        return web.json_response(self._target.grant(realm_id))

    async def invalidate(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        _only(data, {"refresh_token"})
        self._target.invalidate(_require_str(data, "refresh_token"))
        return web.json_response({"invalidated": True})

    async def log(self, request: web.Request) -> web.Response:
        entries = self._target.request_log
        if "limit" in request.query:
            try:
                limit = int(request.query["limit"])
            except ValueError:
                raise ValueError("limit must be an integer") from None
            entries = entries[-limit:] if limit > 0 else []
        return web.json_response({"entries": [e.to_json() for e in entries]})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._target.stats())

    async def reset(self, request: web.Request) -> web.Response:
        self._target.reset()
        return web.json_response({"reset": True})

    async def settings(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self._target.settings.update(**await _json_object(request))
        return web.json_response(asdict(self._target.settings))


def _control(handler: _Handler) -> _Handler:
    """Turn bad input into 400 and unknown tokens into 404, as JSON."""

    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except ValueError as exc:
            return web.json_response({"error": "invalid_request", "detail": str(exc)}, status=400)
        except KeyError as exc:
            detail = exc.args[0] if exc.args else "not found"
            return web.json_response({"error": "not_found", "detail": detail}, status=404)

    return wrapped


async def _json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def _only(data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _require_str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name!r} must be a non-empty string")
    return value
