"""Fault injection for the Intuit simulator: the kinds, the queues, and how each answers.

A fault answers in place of the endpoint and changes no state. Declined
authorizations (``access_denied``) are queued here too.

Besides the canned kinds (:data:`FAULT_KINDS`), a ``raw`` fault answers with
exactly the status, headers and body it was given (:class:`RawAnswer`): how
tests play a careless or hostile Intuit (``Retry-After: 1e12``, ``"expires_in":
"²"``, any status) without a new kind for each.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from qbo_daemon.simulator.grants import INVALID_REFRESH_TOKEN

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "ENDPOINTS",
    "FAULT_KINDS",
    "HANG_SECONDS",
    "RAW_KIND",
    "Fault",
    "FaultPlan",
    "RawAnswer",
    "fault_response",
]

ENDPOINTS: Final = ("authorize", "token", "revoke", "companyinfo")
FAULT_KINDS: Final = frozenset(
    {
        "500",
        "502_html",
        "html",
        "503",
        "429",
        "hang",
        "malformed",
        "no_token",
        "invalid_grant",
        "invalid_client",
        "reset",
    }
)
# Answers with exactly the status, headers and body given (a RawAnswer).
RAW_KIND: Final = "raw"
DEFAULT_RETRY_AFTER: Final = 2.0
HANG_SECONDS: Final = 3600.0
_HANG_POLL: Final = 0.05

_NGINX_PAGE: Final = (
    "<html>\r\n<head><title>{status}</title></head>\r\n<body>\r\n"
    "<center><h1>{status}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_MALFORMED_BODY: Final = '{"access_token":"sim-at-garbled","refresh_token":"sim-rt-gar'


# A header name is an HTTP token; these would break the framing of the answer.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FRAMING_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "connection"})
_MAX_RAW_BODY: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """An exact answer: any final status (200-999), any headers, any body.

    Build it with :meth:`make`, which refuses what HTTP cannot carry: a 1xx
    status (not a final answer), a header name that is not a token, a value
    with CR, LF or NUL or that is not text, and the headers that frame the
    answer (``Content-Length``, ``Transfer-Encoding``, ``Connection``).
    Without a ``Content-Type`` aiohttp sends ``application/octet-stream``;
    without an ``intuit_tid`` the simulator stamps its own, as on every answer.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def make(
        cls,
        status: object,
        headers: Iterable[tuple[object, object]] | None = None,
        body: bytes | str = b"",
    ) -> RawAnswer:
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 999:
            raise ValueError(f"status must be an integer from 200 to 999, not {status!r}")
        checked: list[tuple[str, str]] = []
        for name, value in headers or ():
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if name.lower() in _FRAMING_HEADERS:
                raise ValueError(f"header {name!r} frames the answer; the simulator sets it")
            if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} must be text without CR, LF or NUL")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"header {name!r} is not encodable text") from None
            checked.append((name, value))
        if isinstance(body, str):
            try:
                body = body.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("body is not encodable text; use body_base64") from None
        if len(body) > _MAX_RAW_BODY:
            raise ValueError(f"body is longer than {_MAX_RAW_BODY} bytes")
        return cls(status, tuple(checked), body)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RawAnswer:
        """From the control API: ``status``, ``headers`` (an object or a list of
        ``[name, value]`` pairs, so a name may repeat), ``body`` (text) or
        ``body_base64`` (bytes)."""
        headers = data.get("headers") or {}
        if isinstance(headers, dict):
            pairs = list(headers.items())
        elif isinstance(headers, list) and all(
            isinstance(p, list) and len(p) == 2 for p in headers
        ):
            pairs = [(p[0], p[1]) for p in headers]
        else:
            raise ValueError("headers must be an object or a list of [name, value] pairs")
        if "body" in data and "body_base64" in data:
            raise ValueError("give either body or body_base64, not both")
        body: bytes | str = b""
        if "body_base64" in data:
            encoded = data["body_base64"]
            if not isinstance(encoded, str):
                raise ValueError("body_base64 must be a string")
            try:
                body = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise ValueError("body_base64 is not base64") from None
        elif "body" in data:
            if not isinstance(data["body"], str):
                raise ValueError("body must be a string (or give body_base64)")
            body = data["body"]
        return cls.make(data.get("status"), pairs, body)


@dataclass(slots=True)
class Fault:
    kind: str
    remaining: int
    retry_after: float | None
    raw: RawAnswer | None = None


class FaultPlan:
    """What the next calls of each endpoint will suffer, in order."""

    def __init__(self) -> None:
        self.denials = 0
        self._queues: dict[str, deque[Fault]] = {e: deque() for e in ENDPOINTS}

    def inject(
        self,
        kind: str,
        count: int,
        endpoint: str,
        retry_after: float | None,
        raw: RawAnswer | None = None,
    ) -> None:
        if kind == RAW_KIND:
            if raw is None:
                raise ValueError("a raw fault needs its answer (status, headers, body)")
            if retry_after is not None:
                raise ValueError("a raw fault sends its own headers; give Retry-After there")
        elif kind not in FAULT_KINDS:
            known = sorted(FAULT_KINDS | {RAW_KIND})
            raise ValueError(f"unknown fault kind {kind!r}; one of {known}")
        elif raw is not None:
            raise ValueError(f"only a raw fault takes an answer, not {kind!r}")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {list(ENDPOINTS)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, not {count!r}")
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, int | float)
            or not math.isfinite(retry_after)
            or retry_after < 0
        ):
            raise ValueError(f"retry_after must be a number >= 0, not {retry_after!r}")
        self._queues[endpoint].append(Fault(kind, count, retry_after, raw))

    def take(self, endpoint: str) -> Fault | None:
        """The fault for this call of ``endpoint``, if one is pending."""
        queue = self._queues[endpoint]
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault

    def deny_next(self) -> None:
        self.denials += 1

    def take_denial(self) -> bool:
        """Whether this authorization is declined by the user."""
        if not self.denials:
            return False
        self.denials -= 1
        return True

    def pending(self) -> dict[str, list[dict[str, Any]]]:
        return {
            endpoint: [_pending_json(f) for f in queue] for endpoint, queue in self._queues.items()
        }

    def clear(self) -> None:
        """Forget every pending fault and denial."""
        for queue in self._queues.values():
            queue.clear()
        self.denials = 0


def _pending_json(fault: Fault) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": fault.kind,
        "count": fault.remaining,
        "retry_after": fault.retry_after,
    }
    if fault.raw is not None:
        data["status"] = fault.raw.status
    return data


async def fault_response(
    request: web.Request,
    fault: Fault,
    tid: str,
    presented: str | None,
    *,
    expires_in: int,
    closing: Callable[[], bool],
) -> web.StreamResponse:
    """The answer ``fault`` gives (``hang`` and ``reset`` give none).

    ``presented`` is echoed by ``no_token``; a hang ends early once ``closing()``.
    """
    kind = fault.kind
    if fault.raw is not None:
        # Exactly as given; the tid the log names, unless the headers carry their own.
        raw = web.Response(status=fault.raw.status, body=fault.raw.body)
        raw.headers.popall("Content-Type", None)
        for name, value in fault.raw.headers:
            raw.headers.add(name, value)
        if "intuit_tid" not in raw.headers:
            raw.headers["intuit_tid"] = tid
        return raw
    headers = {"intuit_tid": tid}
    if kind == "500":
        body = {"error": "internal_server_error", "error_description": "simulated fault"}
        return web.json_response(body, status=500, headers=headers)
    if kind in ("502_html", "html"):
        return _nginx_page(502, "Bad Gateway", headers)
    if kind in ("503", "429"):
        headers["Retry-After"] = _retry_after_text(fault.retry_after)
        if kind == "503":
            return _nginx_page(503, "Service Temporarily Unavailable", headers)
        body = {"error": "too_many_requests", "error_description": "simulated throttle"}
        return web.json_response(body, status=429, headers=headers)
    if kind == "malformed":
        return web.Response(text=_MALFORMED_BODY, content_type="application/json", headers=headers)
    if kind == "no_token":
        answer: dict[str, Any] = {"token_type": "bearer", "expires_in": expires_in}
        if presented is not None:
            answer["refresh_token"] = presented
        return web.json_response(answer, headers=headers)
    if kind == "invalid_grant":
        return web.json_response(dict(INVALID_REFRESH_TOKEN), status=400, headers=headers)
    if kind == "invalid_client":
        return web.json_response({"error": "invalid_client"}, status=401, headers=headers)
    if kind == "hang":
        await _hang(request, closing)
    return _drop_connection(request)


async def _hang(request: web.Request, closing: Callable[[], bool]) -> None:
    """Wait until the client gives up, the simulator closes, or an hour passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_SECONDS
    while not closing() and loop.time() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(_HANG_POLL)


def _retry_after_text(seconds: float | None) -> str:
    """Whole seconds as HTTP wants; a fraction is kept (``0.5``) so tests can stay fast."""
    value = DEFAULT_RETRY_AFTER if seconds is None else seconds
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _nginx_page(status: int, reason: str, headers: dict[str, str]) -> web.Response:
    text = _NGINX_PAGE.format(status=f"{status} {reason}")
    return web.Response(status=status, text=text, content_type="text/html", headers=headers)


def _drop_connection(request: web.Request) -> web.Response:
    """Close the connection without an answer.

    aiohttp then fails to write the returned response, takes it for a client
    that went away, and logs nothing.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=204)
