"""A listening socket no client can use to take the daemon down.

aiohttp's own server (``loop.create_server`` under ``web.TCPSite``) accepts
every connection and waits as long as a client likes for its request head:
300 half-sent requests ran a daemon out of file descriptors, and with them
the token API and the calls to Intuit. asyncio then logged every failed
``accept()`` (about 137,000 lines in 50 s). A :class:`Listener` puts our own
accept loop in front of the same aiohttp application:

- **a connection cap** (``max_connections``). When full, a new connection
  takes the place of the oldest *idle* one (a half-sent request, or a
  keep-alive connection between requests); when every connection is busy
  with a request, accepting pauses and the kernel's backlog holds the rest.
- **a read deadline** (``read_timeout``). A connection must deliver a whole
  request head within it, counted from when it connected or its previous
  request ended; a request body must have arrived within it of the head.
  Otherwise the connection is closed.
- **accept failures** for want of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM)
  pause accepting and are logged at most once every :data:`ACCEPT_LOG_INTERVAL`
  seconds, with a count. Any other failure means the listening socket is
  broken: :attr:`Listener.task` ends with the error, and the daemon's
  supervisor stops the daemon so its service manager starts a fresh one.
- **no version**: every answer says ``Server: qbo-daemon``, aiohttp's own
  answer to an unparseable request included, whose page the caller supplies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from aiohttp.web_request import BaseRequest

log = structlog.get_logger("qbo_daemon.http.listener")

SERVER_NAME = "qbo-daemon"
# At most one line per listener this often about failing accept() calls or a full listener.
ACCEPT_LOG_INTERVAL = 10.0
# How long accepting pauses after an accept() failed for want of resources (doubling).
_PAUSE_MIN, _PAUSE_MAX = 0.1, 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2), Linux: errors of the connection being accepted, not of the listener;
# "treat them like EAGAIN by retrying".
_CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPERM,  # a firewall rule refused it
        errno.EINTR,
    }
)
_PLAIN_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'",
}

ErrorPage = Callable[[int], web.Response]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_connections: int  # open at once on this listener
    read_timeout: float  # seconds for a request head, and for its body after the head


def plain_error_page(status: int) -> web.Response:
    """``404 Not Found`` as text: the default page for an answer aiohttp makes itself."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return web.Response(status=status, text=f"{status} {phrase}\n", headers=_PLAIN_HEADERS)


class _RateLimitedLine:
    """One log line per ``interval``; the occurrences in between are counted into the next."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: float | None = None
        self._suppressed = 0

    def due(self) -> int | None:
        """None while quiet; else how many occurrences were not logged since the last line."""
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return None
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        return suppressed


class Listener:
    """One aiohttp application on ``host:port`` behind our own accept loop.

    :meth:`start` binds (an ``OSError`` names the address) and starts
    accepting; :attr:`task` runs until :meth:`close` and ends early only if the
    listening socket breaks. ``name`` appears in log lines (``api``, ``callback``).
    """

    def __init__(
        self,
        name: str,
        app: web.Application,
        host: str,
        port: int,
        limits: ListenerLimits,
        *,
        access_log_class: type[AbstractAccessLogger],
        shutdown_timeout: float,
        error_page: ErrorPage = plain_error_page,
    ) -> None:
        if limits.max_connections < 1 or limits.read_timeout <= 0:
            raise ValueError("max_connections and read_timeout must be positive")
        self.name = name
        self.host = host
        self.port = port
        self.limits = limits
        self.error_page = error_page
        self._access_log_class = access_log_class
        # Outermost, so it sees every routed request (404 and 405 included).
        app.middlewares.insert(0, self._track_requests)
        # Innermost, so the application's own error handling answers a body too slow.
        app.middlewares.append(_body_deadline)
        app.on_response_prepare.append(_server_header)
        self._runner = web.AppRunner(
            app, access_log_class=access_log_class, shutdown_timeout=shutdown_timeout
        )
        self._sockets: list[socket.socket] = []
        self._idle: OrderedDict[_Connection, None] = OrderedDict()  # oldest idle first
        self._busy: set[_Connection] = set()
        self._room = asyncio.Event()
        self._accept_errors = _RateLimitedLine(ACCEPT_LOG_INTERVAL)
        self._full = _RateLimitedLine(ACCEPT_LOG_INTERVAL)
        self.task: asyncio.Task[None] | None = None

    @property
    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy)

    @property
    def bound_ports(self) -> list[int]:
        """The ports listened on (``port`` 0 binds a free one)."""
        return [int(sock.getsockname()[1]) for sock in self._sockets]

    async def start(self) -> None:
        """Bind and listen, then accept in :attr:`task`. Raises ``OSError`` if it cannot bind."""
        await self._runner.setup()
        try:
            self._sockets = _bind(self.host, self.port)
        except OSError:
            await self._runner.cleanup()
            raise
        self.task = asyncio.create_task(self._serve(), name=f"listener:{self.name}")

    async def close(self) -> None:
        """Stop accepting, then let open requests finish (aiohttp's ``shutdown_timeout``)."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task})
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        await self._runner.cleanup()

    # -- accepting -------------------------------------------------------------------

    async def _serve(self) -> None:
        loops = [asyncio.create_task(self._accept_loop(sock)) for sock in self._sockets]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # an accept loop only ends by raising
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pause = _PAUSE_MIN
        while True:
            while len(self._busy) >= self.limits.max_connections:
                # Every connection is in a request: leave new ones in the backlog.
                self._room.clear()
                await self._room.wait()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _CONNECTION_ERRNOS:
                    continue
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise  # the listening socket itself is broken
                suppressed = self._accept_errors.due()
                if suppressed is not None:
                    log.error(
                        "listener.accept_failed",
                        listener=self.name,
                        error=exc.strerror or str(exc),
                        suppressed=suppressed,
                        open_connections=self.open_connections,
                        detail="the process is out of file descriptors or memory; "
                        "accepting pauses and retries",
                    )
                await asyncio.sleep(pause)
                pause = min(pause * 2, _PAUSE_MAX)
                continue
            pause = _PAUSE_MIN
            if self.open_connections >= self.limits.max_connections and not self._evict_one():
                conn.close()  # every connection became busy meanwhile
                continue
            try:
                await loop.connect_accepted_socket(self._protocol, conn)
            except OSError:
                conn.close()

    def _evict_one(self) -> bool:
        """Close the connection idle the longest to make room; False if none is idle."""
        if not self._idle:
            return False
        next(iter(self._idle)).shut()
        suppressed = self._full.due()
        if suppressed is not None:
            log.warning(
                "listener.cap_reached",
                listener=self.name,
                max_connections=self.limits.max_connections,
                evicted=suppressed + 1,
                detail="the oldest idle connection was closed to admit a new one",
            )
        return True

    def _protocol(self) -> _Connection:
        server = self._runner.server
        assert server is not None
        return _Connection(
            server,
            self,
            loop=asyncio.get_running_loop(),
            access_log_class=self._access_log_class,
            # Ours closes idle connections; aiohttp's own timer would only repeat it.
            keepalive_timeout=self.limits.read_timeout,
        )

    # -- connection states ----------------------------------------------------------

    def _opened(self, conn: _Connection) -> None:
        self._idle[conn] = None
        conn.arm(self.limits.read_timeout, conn.close_if_idle)

    def _request_started(self, conn: _Connection, request: BaseRequest) -> None:
        if conn.closed:
            return
        self._idle.pop(conn, None)
        self._busy.add(conn)
        if request.content.is_eof():
            conn.disarm()
        else:
            conn.arm(self.limits.read_timeout, lambda: conn.close_if_body_pending(request))

    def _request_finished(self, conn: _Connection) -> None:
        if conn not in self._busy:
            return  # closed meanwhile
        self._busy.discard(conn)
        self._idle[conn] = None
        conn.arm(self.limits.read_timeout, conn.close_if_idle)
        self._room.set()

    def _forget(self, conn: _Connection) -> None:
        conn.disarm()
        self._idle.pop(conn, None)
        if conn in self._busy:
            self._busy.discard(conn)
            self._room.set()

    @web.middleware
    async def _track_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = request.protocol
        if not isinstance(conn, _Connection):
            return await handler(request)
        self._request_started(conn, request)
        try:
            return await handler(request)
        finally:
            self._request_finished(conn)


class _Connection(web.RequestHandler):
    """aiohttp's connection handler, reporting to its :class:`Listener`.

    Its ``handle_error`` answers what aiohttp answers itself (an unparseable
    request) with the listener's page, and logs it at debug level: a scanner
    must not be able to fill the log with tracebacks.
    """

    __slots__ = ("_deadline", "_listener", "body_timed_out", "closed")

    def __init__(self, manager: web.Server, listener: Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._deadline: asyncio.TimerHandle | None = None
        self.closed = False
        self.body_timed_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener._opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._listener._forget(self)
        super().connection_lost(exc)

    def arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self.disarm()
        self._deadline = asyncio.get_running_loop().call_later(seconds, callback)

    def disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def shut(self) -> None:
        """Close now, whatever it was doing; the listener forgets it at once."""
        self.closed = True
        self._listener._forget(self)
        self.force_close()

    def close_if_idle(self) -> None:
        self._deadline = None
        if self in self._listener._idle:
            self.shut()

    def close_if_body_pending(self, request: BaseRequest) -> None:
        self._deadline = None
        if not request.content.is_eof():
            self.body_timed_out = True
            self.shut()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 and not self.closed:
            self.log_exception("Error handling request", exc_info=exc)
        else:
            log.debug(
                "listener.request_rejected",
                listener=self._listener.name,
                status=status,
                error=message or (str(exc) if exc else None),
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun; the connection is closed")
        response = self._listener.error_page(status)
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


@web.middleware
async def _body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A body cut off by the read deadline is a 408 (to a closed connection), not a crash."""
    try:
        return await handler(request)
    except ConnectionResetError:
        conn = request.protocol
        if isinstance(conn, _Connection) and conn.body_timed_out:
            raise web.HTTPRequestTimeout() from None
        raise


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` names (as ``loop.create_server`` binds)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: "::" must not also claim IPv4.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` toward ``wanted`` (never past the hard
    limit, never down); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft
