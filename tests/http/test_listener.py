"""The listeners over real sockets: caps, read deadlines, our pages, no version.

The daemon-level tests run the real daemon in this process; the rest put a
small aiohttp application behind a :class:`Listener` and talk to it with raw
sockets, which is how a slow or broken client talks.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_log import AccessLogger

from qbo_daemon.http.listener import Listener, ListenerLimits
from tests.conftest import StartDaemon

CALLBACK_SECURITY = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def raw_exchange(host: str, port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` as is and read until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def head(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    top, _, body = answer.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


# -- the daemon's two listeners -----------------------------------------------------


async def test_no_version_on_either_listener_and_our_pages_on_the_callback(
    daemon_factory: StartDaemon,
) -> None:
    running = await daemon_factory()
    callback = urlsplit(running.callback_url)
    api = urlsplit(running.api_url)
    assert callback.hostname
    assert callback.port
    assert api.hostname
    assert api.port
    http = running.session

    answers: dict[str, tuple[int, dict[str, str], str]] = {}
    for name, method, url in (
        ("api healthz", "GET", running.api_url + "/healthz"),
        ("api 401", "GET", running.api_url + "/nowhere"),
        ("callback 400", "GET", running.callback_url),
        ("callback 404", "GET", f"http://{callback.netloc}/wp-login.php"),
        ("callback 405", "POST", running.callback_url),
    ):
        async with http.request(method, url) as response:
            answers[name] = (response.status, dict(response.headers), await response.text())
    for name, data in (
        ("api unparseable", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"),
        ("callback unparseable", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        ("callback header too long", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"),
    ):
        host, port = (
            (api.hostname, api.port)
            if name.startswith("api")
            else (callback.hostname, callback.port)
        )
        status, headers, raw = head(await raw_exchange(host, port, data))
        answers[name] = (status, headers, raw.decode(errors="replace"))

    for name, (_, headers, text_body) in answers.items():
        assert headers["Server"] == "qbo-daemon", name
        for text in (text_body, *headers.values()):
            assert "aiohttp" not in text, (name, text)
            assert "Python" not in text, (name, text)
    assert [answers[n][0] for n in answers] == [200, 401, 400, 404, 405, 400, 400, 400]

    for name in ("callback 400", "callback 404", "callback 405", "callback unparseable"):
        _, headers, page = answers[name]
        assert headers["Content-Type"] == "text/html; charset=utf-8", name
        assert page.startswith("<!doctype html>"), name
        for header, value in CALLBACK_SECURITY.items():
            assert headers.get(header) == value, (name, header)
    assert answers["callback 405"][1]["Allow"] == "GET,HEAD"
    assert "<h1>Not Found</h1>" in answers["callback 404"][2]


# -- a Listener in front of a small application -------------------------------------


class App:
    """Answers ``GET /`` at once, ``GET /slow`` when released, ``POST /`` after its body."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_slow = 0
        self.all_in = asyncio.Event()

    def build(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.hello)
        app.router.add_get("/slow", self.slow)
        app.router.add_post("/", self.echo)
        return app

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def slow(self, request: web.Request) -> web.Response:
        self.in_slow += 1
        if self.in_slow == 4:
            self.all_in.set()
        await self.release.wait()
        return web.Response(text="done")

    async def echo(self, request: web.Request) -> web.Response:
        return web.Response(text=f"{len(await request.read())} bytes")


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, Listener, int]]:
    app = App()
    listener = Listener(
        "test",
        app.build(),
        "127.0.0.1",
        0,
        ListenerLimits(max_connections=4, read_timeout=0.5),
        access_log_class=AccessLogger,
        shutdown_timeout=1.0,
    )
    await listener.start()
    port = listener.bound_ports[0]
    yield app, listener, port
    app.release.set()
    await listener.close()


async def test_when_every_connection_is_busy_new_ones_wait_their_turn(
    served: tuple[App, Listener, int],
) -> None:
    app, listener, port = served
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

        async def get(path: str) -> str:
            async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                return await response.text()

        busy = [asyncio.create_task(get("/slow")) for _ in range(4)]
        await asyncio.wait_for(app.all_in.wait(), 5)
        # Full of requests in progress: the fifth is not refused, it waits in the backlog.
        waiting = asyncio.create_task(get("/"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert listener.open_connections == 4
        app.release.set()
        async with asyncio.timeout(5):
            assert await waiting == "hello"
            assert await asyncio.gather(*busy) == ["done"] * 4


async def test_a_body_that_does_not_arrive_in_time_closes_the_connection(
    served: tuple[App, Listener, int],
) -> None:
    _, listener, port = served
    started = asyncio.get_running_loop().time()
    answer = await raw_exchange(
        "127.0.0.1", port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"
    )
    assert answer == b""
    assert 0.4 < asyncio.get_running_loop().time() - started < 2.0
    # A whole body in time is answered.
    answer = await raw_exchange(
        "127.0.0.1",
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    assert head(answer)[0] == 200
    assert answer.endswith(b"3 bytes")
    assert listener.open_connections == 0


async def test_an_idle_keep_alive_connection_is_closed_after_the_read_timeout(
    served: tuple[App, Listener, int],
) -> None:
    _, listener, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"hello"), 2)
        assert first.startswith(b"HTTP/1.1 200")
        assert listener.open_connections == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert 0.4 < loop.time() - started < 2.0
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize(("hard", "expected"), [(4096, 1316), (512, 512)])
def test_the_open_file_limit_is_raised_toward_what_the_caps_need(hard: int, expected: int) -> None:
    """In a child process whose soft limit is 256: raised to what is wanted, or to the hard
    limit when that is lower (then the daemon warns, see runtime/daemon.py)."""
    code = (
        "import resource\n"
        "from qbo_daemon.http.listener import raise_open_file_limit\n"
        "print(raise_open_file_limit(1316), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    assert result.stdout.split() == [str(expected), str(expected)]
