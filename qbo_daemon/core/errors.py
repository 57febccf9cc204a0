"""The exception tree. Broad ``except`` clauses live only at boundaries."""

from __future__ import annotations


class QboDaemonError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(QboDaemonError):
    """The configuration is wrong; the message names the key and the file."""

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None) -> None:
        where = ""
        if key and path:
            where = f"{path}: [{key}] "
        elif key:
            where = f"[{key}] "
        elif path:
            where = f"{path}: "
        super().__init__(f"{where}{message}")
        self.key = key
        self.path = path


class CryptoError(QboDaemonError):
    """A stored secret cannot be decrypted."""


class MissingKeyError(CryptoError):
    """A value was encrypted under a key id that is not configured."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"a stored secret is encrypted with key id {key_id!r}, which is not among the "
            "configured encryption keys; add that key back to [storage] encryption_keys"
        )
        self.key_id = key_id


class DecryptionError(CryptoError):
    """A ciphertext failed authentication (tampered, moved to another row, or garbled)."""


class StorageError(QboDaemonError):
    """The database cannot do what was asked."""


class DatabaseLockedError(StorageError):
    """Another daemon already holds this database."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"another qbo-daemon is already running on {path}; only one daemon may use a database"
        )
        self.path = path


class StaleWriteError(StorageError):
    """A compare-and-swap token write lost: the row changed since it was read."""

    def __init__(self, account_id: str, expected_version: int) -> None:
        super().__init__(
            f"account {account_id!r} changed since version {expected_version} was read; "
            "write refused"
        )
        self.account_id = account_id
        self.expected_version = expected_version


class AccountNotFoundError(QboDaemonError):
    def __init__(self, account_id: str) -> None:
        super().__init__(f"no account {account_id!r}")
        self.account_id = account_id


class OAuthStateError(QboDaemonError):
    """An OAuth ``state`` on the callback is missing, unknown, expired or already used."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RealmConflictError(QboDaemonError):
    """A new connection's company clashes with what is stored; nothing was written.

    ``reason`` is ``shared`` (another account id, ``holder``, holds this company)
    or ``changed`` (the account held another company, and changing it was not
    asked for). The message is for the operator's log; the browser gets its own words.
    """

    def __init__(self, reason: str, message: str, *, holder: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.holder = holder


class IntuitError(QboDaemonError):
    """A call to Intuit failed. ``intuit_tid`` identifies the request for Intuit support."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        intuit_tid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.intuit_tid = intuit_tid


class PermanentIntuitError(IntuitError):
    """Retrying with the same input will not help."""


class InvalidGrantError(PermanentIntuitError):
    """The refresh token or code is dead: the user must reconnect."""


class InvalidClientError(PermanentIntuitError):
    """Our client credentials are wrong: a configuration fault affecting every account."""


class TransientIntuitError(IntuitError):
    """Worth retrying: connection error, timeout, 5xx, 429, malformed answer."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        intuit_tid: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, intuit_tid=intuit_tid)
        self.retry_after = retry_after
