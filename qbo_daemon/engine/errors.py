"""What the engine's services refuse, in terms the token API and the CLI answer with."""

from __future__ import annotations

from qbo_daemon.core.errors import QboDaemonError


class UnavailableError(QboDaemonError):
    """An account cannot give what was asked now; ``code`` is the API's error code.

    ``unavailable`` and ``invalid_client``: try again later (Intuit, the daemon).
    ``needs_reconnect`` and ``disconnected``: the user must connect again.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail

    @property
    def retry_later(self) -> bool:
        return self.code in ("unavailable", "invalid_client")


class KeyMismatchError(QboDaemonError):
    """A key rotation expected another primary key than the daemon encrypts with."""

    def __init__(self, primary: str, expected: str) -> None:
        super().__init__(
            f"the daemon encrypts with key id {primary}, not {expected}: it has not read the "
            "new [storage] encryption_keys yet; reload it (systemctl reload qbo-daemon, or "
            "SIGHUP) or restart it, then rotate again"
        )
        self.primary = primary
        self.expected = expected
