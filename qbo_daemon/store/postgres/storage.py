""":class:`PostgresStorage`: accounts, OAuth states and refresh attempts in one PostgreSQL database.

It implements the storage port (:class:`~qbo_daemon.store.port.AccountStore`)
as the SQLite ``Storage`` (``store/repository.py``) does, with the same names
and value types, so either serves the same callers and one test suite runs
against both (``tests/store/test_shared.py``). It decides nothing: every row
it stores is the one the engine's policy decided.

Several daemons may share the database: every write is a single statement or
one transaction, a token write is a compare-and-swap on ``version``, and a
connect, import, refresh or disconnect notifies ``qbo_account`` with the
``account_id`` when it commits (:meth:`PostgresStorage.listen`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from qbo_daemon.core.models import Account
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import (
    AccountWrite,
    Attempt,
    ClaimedState,
    Imported,
    RealmPolicy,
    ScheduleEntry,
    StateRecord,
)
from qbo_daemon.store.postgres.accounts import CHANNEL, AccountTable
from qbo_daemon.store.postgres.database import PgDatabase, PgSettings
from qbo_daemon.store.postgres.states import OAuthStates
from qbo_daemon.store.postgres.status_queries import PgStatusQueries

__all__ = ["PgSettings", "PostgresStorage"]


class PostgresStorage:
    """Accounts, OAuth states and refresh attempts in one PostgreSQL database."""

    def __init__(self, database: PgDatabase, cipher: Cipher, *, attempts_keep: int) -> None:
        self.where = database.where  # the URL with its password masked
        self._db = database
        self._accounts = AccountTable(database, cipher, attempts_keep=attempts_keep)
        self._states = OAuthStates(database)
        # The status page's reads (no token column), with whichever keys are current.
        self.status_page = PgStatusQueries(database, lambda: self._accounts.cipher)

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

    @property
    def primary_key_id(self) -> str:
        return self._accounts.cipher.primary_key_id

    def use_cipher(self, cipher: Cipher) -> None:
        """A reload's keys: used for every read and write from now on."""
        self._accounts.cipher = cipher

    # -- reading ---------------------------------------------------------------------

    async def load(self, account_id: str) -> Account:
        """The account with its secrets decrypted; :class:`AccountNotFoundError` if none."""
        return await self._accounts.load(account_id)

    async def find(self, account_id: str) -> Account | None:
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

    async def existing_account_ids(self, account_ids: Sequence[str]) -> set[str]:
        """Which of ``account_ids`` are stored (a snapshot: for reports, not for writes)."""
        return await self._accounts.existing_ids(account_ids)

    async def verify_keys(self, cipher: Cipher | None = None) -> None:
        """Fail fast when a stored secret cannot be decrypted with the configured keys."""
        await self._accounts.verify_keys(cipher)

    async def ping(self) -> None:
        await self._db.fetchrow("SELECT 1")

    # -- writing -----------------------------------------------------------------------

    async def commit(self, write: AccountWrite) -> Account:
        """Store ``write`` (and its attempt) if the row is still at ``write.read_version``.

        Durable when it returns; :class:`StaleWriteError` (nothing written) when the
        row changed or is gone.
        """
        return await self._accounts.commit(
            write.account, write.read_version, tokens=write.tokens, attempt=write.attempt
        )

    async def record_attempt(self, attempt: Attempt) -> None:
        """Record an attempt that changes no account (for example ``invalid_client``)."""
        await self._accounts.record_attempt(attempt)

    async def upsert_connection(self, account: Account) -> Account:
        """Store a new connection, or replace the credentials of an existing account."""
        (stored,) = await self._accounts.upsert([account])
        return stored

    async def upsert_connections(self, accounts: Sequence[Account]) -> list[Account]:
        """Store every account in one transaction: all or nothing."""
        return await self._accounts.upsert(accounts)

    async def import_connections(
        self, accounts: Sequence[Account], *, replace_existing: bool = True
    ) -> list[Imported]:
        """Imported connections in one transaction (all or nothing), in order."""
        return await self._accounts.import_(accounts, replace_existing=replace_existing)

    async def upsert_checked_connection(
        self, account: Account, policy: RealmPolicy
    ) -> tuple[Account, str | None]:
        """A connection from the callback: stored only if ``policy`` allows its company.

        Raises :class:`RealmConflictError` (nothing written) when another account
        holds the realm or the account held another one; returns the account and
        its previous realm when the connection changed it.
        """
        return await self._accounts.upsert_checked(account, policy)

    async def insert_accounts(self, accounts: Sequence[Account]) -> int:
        """New accounts in one ``COPY``: all or nothing; an existing one fails them all."""
        return await self._accounts.insert_new(accounts)

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
