""":class:`PostgresStorage`: accounts, OAuth states and refresh attempts in one PostgreSQL database.

Its public methods are those of the SQLite ``Storage`` (``store/repository.py``),
with the same names and value types, so either serves the same callers and
one test suite runs against both (``tests/store/test_shared.py``). Beneath
them are the storage port's operations (``accounts.py``): the methods here
only decide the row each write leaves, exactly as ``Storage`` decides it
(those few lines go once the engine decides them, behind the port).

Several daemons may share the database: every write is a single statement or
one transaction, a token write is a compare-and-swap on ``version``, and a
connect, import, refresh or disconnect notifies ``qbo_account`` with the
``account_id`` when it commits (:meth:`PostgresStorage.listen`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from qbo_daemon.core.models import Account, AccountStatus, TokenSet, reconnect_at, utc
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.postgres.accounts import CHANNEL, AccountTable
from qbo_daemon.store.postgres.database import PgDatabase, PgSettings
from qbo_daemon.store.postgres.states import OAuthStates
from qbo_daemon.store.realms import RealmPolicy
from qbo_daemon.store.rows import Attempt, ScheduleEntry
from qbo_daemon.store.states import ClaimedState, StateRecord
from qbo_daemon.store.upsert import ImportItem, imported_tokens

__all__ = ["PgSettings", "PostgresStorage"]


class PostgresStorage:
    """Accounts, OAuth states and refresh attempts in one PostgreSQL database."""

    def __init__(self, database: PgDatabase, cipher: Cipher, *, attempts_keep: int) -> None:
        self.where = database.where  # the URL with its password masked
        self._db = database
        self._accounts = AccountTable(database, cipher, attempts_keep=attempts_keep)
        self._states = OAuthStates(database)

    @classmethod
    async def open(
        cls,
        url: str,
        cipher: Cipher,
        *,
        attempts_keep: int = 100_000,
        settings: PgSettings | None = None,
    ) -> PostgresStorage:
        """Connect to the database at ``url``, creating or migrating its tables."""
        database = await PgDatabase.open(url, settings)
        storage = cls(database, cipher, attempts_keep=attempts_keep)
        try:
            await storage._accounts.fill_realm_digests()
        except BaseException:
            await storage.close()
            raise
        return storage

    async def close(self) -> None:
        """Let the writes in flight commit, then close every connection."""
        await self._db.close()

    @property
    def cipher(self) -> Cipher:
        return self._accounts.cipher

    @cipher.setter
    def cipher(self, cipher: Cipher) -> None:
        """A reload's keys: used for every read and write from now on."""
        self._accounts.cipher = cipher

    async def listen(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(account_id)`` after each committed change of an account, any node's."""
        await self._db.listen(CHANNEL, callback)

    # -- reading ---------------------------------------------------------------------

    async def get_account(self, account_id: str) -> Account:
        """The account with its secrets decrypted; :class:`AccountNotFoundError` if none."""
        return await self._accounts.load(account_id)

    async def find_account(self, account_id: str) -> Account | None:
        return await self._accounts.find(account_id)

    async def list_accounts(self) -> list[Account]:
        """Every account, ordered by ``account_id``; tokens are not decrypted (they are None)."""
        return await self._accounts.list_accounts()

    async def schedule_entries(self) -> list[ScheduleEntry]:
        """Every account the scheduler should time: active or expired, with times."""
        return await self._accounts.schedule_entries()

    async def status_counts(self) -> dict[str, int]:
        return await self._accounts.status_counts()

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """The newest attempts first, of one account or of all."""
        return await self._accounts.attempts(account_id, limit)

    async def verify_keys(self, cipher: Cipher | None = None) -> None:
        """Fail fast when a stored secret cannot be decrypted with the configured keys."""
        await self._accounts.verify_keys(cipher)

    async def ping(self) -> None:
        await self._db.fetchrow("SELECT 1")

    # -- token writes ------------------------------------------------------------------

    async def save_connection(
        self, account_id: str, realm_id: str, tokens: TokenSet, *, lead: timedelta, now: datetime
    ) -> Account:
        """Store a new connection, or replace the tokens of an existing account (reconnect)."""
        (stored,) = await self._accounts.upsert(
            [_connected(account_id, realm_id, tokens, lead=lead, now=now)]
        )
        return stored

    async def save_checked_connection(
        self,
        account_id: str,
        realm_id: str,
        tokens: TokenSet,
        *,
        lead: timedelta,
        now: datetime,
        policy: RealmPolicy,
        realm_verified: bool,
    ) -> tuple[Account, str | None]:
        """A connection from the callback: stored only if ``policy`` allows its company.

        Raises :class:`RealmConflictError` (nothing written) when another account
        holds the realm or the account held another one; returns the account and
        its previous realm when the connection changed it.
        """
        connected = _connected(account_id, realm_id, tokens, lead=lead, now=now)
        return await self._accounts.upsert_checked(
            replace(connected, realm_verified=realm_verified), policy
        )

    async def mark_realm_verified(self, account: Account, *, now: datetime) -> Account:
        """Note that Intuit confirmed the account's realm, if the row is still at its version."""
        return await self._accounts.mark_verified(
            replace(account, updated_at=utc(now)), account.version
        )

    async def import_accounts(
        self, items: Sequence[ImportItem], *, lead: timedelta, now: datetime
    ) -> list[Account]:
        """Store every item in one transaction: all or nothing.

        An access token without a known future expiry is treated as dead, so the
        account is due for a refresh at once.
        """
        return await self._accounts.upsert([_imported(item, lead=lead, now=now) for item in items])

    async def insert_accounts(
        self, items: Sequence[ImportItem], *, lead: timedelta, now: datetime
    ) -> int:
        """Store new accounts in one ``COPY``: all or nothing; an existing one fails them all."""
        return await self._accounts.insert_new(
            [_imported(item, lead=lead, now=now) for item in items]
        )

    async def save_refresh(
        self,
        account: Account,
        tokens: TokenSet,
        *,
        lead: timedelta,
        now: datetime,
        attempt: Attempt | None = None,
    ) -> Account:
        """Persist a refresh's tokens and times if the row is still at ``account.version``.

        Durable when this returns; raises :class:`StaleWriteError` when the row
        changed meanwhile.
        """
        due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
        hard = tokens.refresh_token_hard_expires_at or account.refresh_token_hard_expires_at
        refreshed = replace(
            account,
            status=AccountStatus.ACTIVE,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_expires_at=utc(tokens.token_expires_at),
            reconnect_token_at=utc(due),
            refresh_token_expires_at=utc(tokens.refresh_token_expires_at),
            refresh_token_hard_expires_at=None if hard is None else utc(hard),
            failure_count=0,
            last_error=None,
            last_refreshed_at=utc(now),
            updated_at=utc(now),
        )
        return await self._accounts.commit(refreshed, account.version, tokens=True, attempt=attempt)

    async def record_failure(
        self,
        account: Account,
        *,
        status: AccountStatus,
        error: str,
        now: datetime,
        attempt: Attempt | None = None,
    ) -> Account:
        """Note a failed refresh (and the status it leaves) if the row is still at its version."""
        noted = replace(
            account,
            status=status,
            failure_count=account.failure_count + 1,
            last_error=error,
            updated_at=utc(now),
        )
        return await self._accounts.commit(noted, account.version, tokens=False, attempt=attempt)

    async def record_attempt(self, attempt: Attempt) -> None:
        """Record an attempt that changes no account (for example ``invalid_client``)."""
        await self._accounts.record_attempt(attempt)

    async def forget_tokens(self, account: Account, *, now: datetime) -> Account:
        """Disconnect: drop every token, keep a tombstone row marked ``disconnected``."""
        gone = replace(
            account,
            status=AccountStatus.DISCONNECTED,
            access_token=None,
            refresh_token=None,
            reconnect_token_at=None,
            updated_at=utc(now),
        )
        return await self._accounts.commit(gone, account.version, tokens=True, attempt=None)

    async def reencrypt(self, *, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows not yet under the primary key: (done, still to do)."""
        return await self._accounts.reencrypt(batch=batch)

    # -- OAuth states --------------------------------------------------------------------

    async def create_state(
        self,
        state: str,
        account_id: str,
        *,
        now: datetime,
        ttl: timedelta,
        code_verifier: str | None = None,
        allow_realm_change: bool = False,
    ) -> int:
        """Store a state (as its hash); returns how many older pending ones were dropped."""
        return await self._states.create(
            state,
            account_id,
            now=now,
            ttl=ttl,
            cipher=self.cipher,
            code_verifier=code_verifier,
            allow_realm_change=allow_realm_change,
        )

    async def consume_state(self, state: str, answer: str, *, now: datetime) -> ClaimedState:
        """Mark ``state`` used by ``answer`` (``store.states.answer_hash``); return its claim.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired``,
        ``replayed`` (used before by the same answer) or ``used``; a failed
        check changes nothing.
        """
        return await self._states.consume(state, answer, now=now, cipher=self.cipher)

    async def finish_state(self, state: str, outcome: str) -> None:
        await self._states.finish(state, outcome)

    async def get_state(self, state: str) -> StateRecord | None:
        return await self._states.get(state)


def _connected(
    account_id: str, realm_id: str, tokens: TokenSet, *, lead: timedelta, now: datetime
) -> Account:
    """The row a new connection (or a reconnect, or an import) leaves."""
    due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
    hard = tokens.refresh_token_hard_expires_at
    return Account(
        id=0,
        account_id=account_id,
        status=AccountStatus.ACTIVE,
        realm_id=realm_id,
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        token_expires_at=utc(tokens.token_expires_at),
        reconnect_token_at=utc(due),
        refresh_token_expires_at=utc(tokens.refresh_token_expires_at),
        refresh_token_hard_expires_at=None if hard is None else utc(hard),
        failure_count=0,
        last_error=None,
        last_refreshed_at=utc(now),
        version=1,
        created_at=utc(now),
        updated_at=utc(now),
    )


def _imported(item: ImportItem, *, lead: timedelta, now: datetime) -> Account:
    return _connected(
        item.account_id, item.realm_id, imported_tokens(item, now), lead=lead, now=now
    )
