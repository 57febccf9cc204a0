"""sd_notify without a package: readiness, status, stopping and watchdog pings.

The protocol (``sd_notify(3)``) is one datagram per message to the AF_UNIX
socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names a socket in the
abstract namespace. When the variable is unset (not started by systemd, or a
``Type=`` that does not listen) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping


def _socket_address(value: str | None) -> str | None:
    """The address to send to, or None when notifications are off or unsupported.

    Only AF_UNIX addresses are supported: an absolute path or ``@name``.
    (systemd ≥ 254 may also hand out ``vsock:`` addresses, for VMs; not ours.)
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


class SystemdNotifier:
    """Talks to the service manager that started us, if any.

    ``environ`` is read once, here; nothing else in the package reads
    ``NOTIFY_SOCKET`` or ``WATCHDOG_*``.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._address = _socket_address(environ.get("NOTIFY_SOCKET"))
        self.enabled: bool = self._address is not None
        self._watchdog_usec = _positive_int(environ.get("WATCHDOG_USEC"))
        watchdog_pid = environ.get("WATCHDOG_PID")
        # WATCHDOG_PID set to another process means the pings are not ours to send
        # (the variable was inherited from a parent that systemd watches).
        self._watchdog_ours = watchdog_pid is None or _positive_int(watchdog_pid) == os.getpid()

    def notify(self, message: str) -> bool:
        """Send one datagram; True when it was sent.

        Never raises: a manager that went away must not take the daemon with
        it. The socket is non-blocking, so a full receive queue drops the
        message instead of stalling the event loop.
        """
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.connect(self._address)
                sock.send(message.encode())
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``Type=notify``), with an optional status line."""
        message = "READY=1"
        if status is not None:
            message += "\nSTATUS=" + _one_line(status)
        return self.notify(message)

    def status(self, text: str) -> bool:
        """Set the free-form status ``systemctl status`` shows."""
        return self.notify("STATUS=" + _one_line(text))

    def stopping(self) -> bool:
        """Tell systemd shutdown has begun."""
        return self.notify("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None if not asked."""
        if self._watchdog_usec is None or not self._watchdog_ours:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def watchdog(self, stop: asyncio.Event, alive: Callable[[], bool] | None = None) -> None:
        """Ping ``WATCHDOG=1`` every :meth:`watchdog_interval` until ``stop`` is set.

        With ``alive``, a ping is sent only while ``alive()`` is true: the daemon
        passes its dispatcher's heartbeat, so a refresh loop that is wedged (or an
        event loop that is blocked) stops the pings, and systemd restarts the daemon.
        Returns at once when there is no watchdog to feed.
        """
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while not stop.is_set():
            if alive is None or alive():
                self.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


def _one_line(text: str) -> str:
    # A newline would start a new (possibly meaningful) assignment in the datagram.
    return " ".join(text.splitlines())
