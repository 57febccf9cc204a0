"""Fault injection for the Intuit simulator: the kinds, the queues, and how each answers.

A fault answers in place of the endpoint and changes no state. Declined
authorizations (``access_denied``) are queued here too.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from qbo_daemon.simulator.grants import INVALID_REFRESH_TOKEN

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "ENDPOINTS",
    "FAULT_KINDS",
    "HANG_SECONDS",
    "Fault",
    "FaultPlan",
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
DEFAULT_RETRY_AFTER: Final = 2.0
HANG_SECONDS: Final = 3600.0
_HANG_POLL: Final = 0.05

_NGINX_PAGE: Final = (
    "<html>\r\n<head><title>{status}</title></head>\r\n<body>\r\n"
    "<center><h1>{status}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_MALFORMED_BODY: Final = '{"access_token":"sim-at-garbled","refresh_token":"sim-rt-gar'


@dataclass(slots=True)
class Fault:
    kind: str
    remaining: int
    retry_after: float | None


class FaultPlan:
    """What the next calls of each endpoint will suffer, in order."""

    def __init__(self) -> None:
        self.denials = 0
        self._queues: dict[str, deque[Fault]] = {e: deque() for e in ENDPOINTS}

    def inject(self, kind: str, count: int, endpoint: str, retry_after: float | None) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
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
        self._queues[endpoint].append(Fault(kind, count, retry_after))

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
            endpoint: [
                {"kind": f.kind, "count": f.remaining, "retry_after": f.retry_after} for f in queue
            ]
            for endpoint, queue in self._queues.items()
        }

    def clear(self) -> None:
        """Forget every pending fault and denial."""
        for queue in self._queues.values():
            queue.clear()
        self.denials = 0


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
    headers = {"intuit_tid": tid}
    kind = fault.kind
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
