"""A small blocking client of the token API, for the management commands.

The standard library only: the CLI makes one call at a time and exits.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from qbo_daemon import __version__
from qbo_daemon.config.load import Config
from qbo_daemon.core.errors import ConfigError, QboDaemonError
from qbo_daemon.http.api import CLI_USER_AGENT
from qbo_daemon.store.lock import advertised_api

# Longer than a token request that waits for a refresh ([refresh] token_wait, 30 s).
DEFAULT_TIMEOUT = 60.0
# The daemon logs refreshes this command asks for with trigger "cli".
USER_AGENT = f"{CLI_USER_AGENT}{__version__}"


class DaemonNotRunningError(QboDaemonError):
    """Nothing answers at the API's address."""

    def __init__(self, url: str) -> None:
        super().__init__(f"qbo-daemon is not running at {url}")
        self.url = url


class ApiAnswerError(QboDaemonError):
    """The daemon answered with an error body: ``{"error", "detail"}``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{detail} ({status} {code})")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ApiClient:
    url: str
    key: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_config(cls, config: Config, *, timeout: float = DEFAULT_TIMEOUT) -> ApiClient:
        """The daemon at ``[api] listen``, with the first of ``[api] keys``.

        A running daemon that still listens where it started (``[api] listen`` was
        changed and only reloaded) is found through its lock file, with a note.
        """
        if not config.api.keys:
            raise ConfigError("no API key configured: set keys or key_file", key="api")
        url = config.api.url
        live = advertised_api(config.storage.path)
        if live is not None and live != url:
            print(
                f"qbo-daemon: note: the daemon answers at {live}, not at {url} "
                "([api] listen): a new address applies when it is restarted",
                file=sys.stderr,
            )
            url = live
        return cls(url, config.api.keys[0].reveal(), timeout)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; the parsed JSON answer, or :class:`ApiAnswerError`."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the URL is the configured http API
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.key}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310
                return _parse(answer.read(), answer.status)
        except urllib.error.HTTPError as exc:
            with exc:
                payload = _parse(exc.read(), exc.code)
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                raise ApiAnswerError(
                    exc.code, payload["error"], str(payload.get("detail", ""))
                ) from None
            raise ApiAnswerError(exc.code, "http_error", f"HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError | FileNotFoundError):
                raise DaemonNotRunningError(self.url) from None
            if isinstance(exc.reason, TimeoutError):
                raise QboDaemonError(
                    f"qbo-daemon at {self.url} did not answer within {self.timeout:g}s"
                ) from None
            raise QboDaemonError(f"cannot reach qbo-daemon at {self.url}: {exc.reason}") from None
        except TimeoutError:
            raise QboDaemonError(
                f"qbo-daemon at {self.url} did not answer within {self.timeout:g}s"
            ) from None
        except ConnectionError as exc:
            raise QboDaemonError(
                f"the connection to qbo-daemon at {self.url} broke: {exc}"
            ) from None


def _parse(raw: bytes, status: int) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise QboDaemonError(
            f"the daemon answered HTTP {status} with a body that is not JSON"
        ) from None
