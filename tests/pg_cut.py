"""A TCP proxy in front of PostgreSQL that loses the reply to one statement.

The server runs the statement and commits it; the client never hears so,
because the proxy closes its connection first, as a network cut or a server
crash between the commit and the reply would. That is the in-doubt commit:
the write landed and its writer cannot tell.

It reads the client's side of PostgreSQL's wire protocol just enough to know
which prepared statement holds ``marker`` (a ``Parse`` message carries the
statement's text and name) and when it is executed (a ``Bind`` names it). The
first execution is forwarded to the server and nothing more of that connection
is relayed in either direction. Every other connection and statement passes
unchanged. It needs a plaintext connection: ``ssl=disable`` in the URL, or a
server without SSL (the client's SSL request is relayed and answered by it).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from urllib.parse import urlsplit, urlunsplit

# Untyped messages a client may send before its startup message: SSL and GSS requests.
_ENCRYPTION_REQUESTS = {80877103, 80877104}


class ReplyCutter:
    """Forwards 127.0.0.1:``port`` to the server of ``url``; cuts one reply (see module)."""

    def __init__(self, url: str, marker: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._parts = parts
        self._marker = marker.encode()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._armed = True  # one reply is lost, then every statement passes
        self.cut = asyncio.Event()  # set once the reply was lost

    async def start(self) -> str:
        """Listen; the URL that goes through the proxy (same database and user)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        netloc_text = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return urlunsplit(self._parts._replace(netloc=netloc_text))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection(*self._target)
        cutting = asyncio.Event()
        back = asyncio.create_task(self._pump_back(server_in, client_out, cutting))
        forward = asyncio.create_task(self._pump_forward(client_in, server_out, cutting))
        try:
            # Either side closing ends the connection (a client's Terminate: the server's).
            await asyncio.wait({back, forward}, return_when=asyncio.FIRST_COMPLETED)
            if cutting.is_set():
                # Long enough for the server to run and commit what it was sent.
                await asyncio.sleep(0.5)
                self.cut.set()
        finally:
            for task in (back, forward):
                task.cancel()
            for writer in (client_out, server_out):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _pump_back(
        self,
        server_in: asyncio.StreamReader,
        client_out: asyncio.StreamWriter,
        cutting: asyncio.Event,
    ) -> None:
        while data := await server_in.read(65536):
            if cutting.is_set():
                return
            client_out.write(data)
            await client_out.drain()

    async def _pump_forward(
        self,
        client_in: asyncio.StreamReader,
        server_out: asyncio.StreamWriter,
        cutting: asyncio.Event,
    ) -> None:
        typed = False  # after the startup message, every message starts with its type
        marked: set[bytes] = set()  # names of prepared statements holding the marker
        while True:
            if not typed:
                head = await client_in.readexactly(8)
                (length,) = struct.unpack("!I", head[:4])
                body = await client_in.readexactly(length - 8)
                (code,) = struct.unpack("!I", head[4:8])
                typed = code not in _ENCRYPTION_REQUESTS
                server_out.write(head + body)
                await server_out.drain()
                continue
            try:
                head = await client_in.readexactly(5)
            except asyncio.IncompleteReadError:
                return
            (length,) = struct.unpack("!I", head[1:5])
            body = await client_in.readexactly(length - 4)
            kind = head[:1]
            if kind == b"P":  # Parse: statement name, then its text
                name, _, rest = body.partition(b"\0")
                text = rest.partition(b"\0")[0]
                if self._marker in text:
                    marked.add(name)
                else:
                    marked.discard(name)
            server_out.write(head + body)
            await server_out.drain()
            if kind == b"B" and self._armed:
                statement = body.split(b"\0", 2)[1]  # after the portal's name
                if statement in marked:
                    self._armed = False
                    cutting.set()  # the Execute and Sync that follow still go through
            if cutting.is_set() and kind == b"S":
                return
