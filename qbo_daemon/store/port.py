"""The storage port: what the engine asks of a database, in the engine's own terms.

The engine decides; the store keeps. Every timing and status rule (``lead``,
``reconnect_token_at``, which status a failure leaves) is the engine's
(:mod:`qbo_daemon.engine.policy`): an :class:`AccountStore` computes nothing
about time or status. It owns what only a database can: identity (``id``,
``created_at``), the ``version`` every write checks and bumps, encryption at
rest, and durability (a write that returned is on disk).

Writes are typed values (:class:`AccountWrite`, :class:`Attempt`), never SQL
text. A token write is a compare-and-swap: it names the ``version`` its
decision was read at, and fails alone with
:class:`~qbo_daemon.core.errors.StaleWriteError` when the row moved on. A new
connection or an import replaces the credentials on purpose and is the only
write that is not a compare-and-swap.

``store/repository.py`` implements it on SQLite. A second implementation
(several daemons on PostgreSQL) keeps this shape: it adds a claim with a
fencing token before the call to Intuit, and its ``commit`` checks that claim
beside ``read_version`` (``docs/architecture.md``, "The storage port").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from qbo_daemon.core.models import Account, AccountStatus
from qbo_daemon.store.crypto import Cipher


@dataclass(frozen=True, slots=True)
class AccountWrite:
    """One compare-and-swap write of an account: the row as the engine decided it.

    Stored only if the row is still at ``read_version``; the store then sets
    ``version`` to ``read_version + 1`` (``account.version`` is not read).
    With ``tokens`` false the secret columns (realm id, access and refresh
    token) keep what is stored, and nothing is encrypted: a failure note.
    """

    account: Account
    read_version: int
    tokens: bool
    attempt: Attempt | None = None
    # Several daemons: the claim the decision was made under. The write still lands
    # when the claim was lost but the row is exactly as read (its answer is then the
    # newest token there is); it ends the claim if it is still this one.
    claim: Claim | None = None
    # Keep the row's mark of an Intuit call that never answered into the database
    # (``Claim.abandoned_since``): set on the failure note of a refusal that call may explain.
    keep_abandoned: bool = False


@dataclass(frozen=True, slots=True)
class Attempt:
    """One refresh attempt, for the append-only attempts table."""

    account_id: str
    started_at: datetime
    outcome: str
    duration_ms: float
    intuit_tid: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Imported:
    """What an import did with one account."""

    account_id: str
    existed: bool  # the account was there when the write's transaction read it
    account: Account | None  # as stored; None when it existed and was not to be replaced


@dataclass(frozen=True, slots=True)
class ScheduleEntry:
    """What the scheduler needs of an account at start-up: times, no secrets."""

    account_id: str
    status: AccountStatus
    reconnect_token_at: datetime
    token_expires_at: datetime
    refresh_token_expires_at: datetime | None
    refresh_token_hard_expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class StateRecord:
    """A pending or used OAuth state: the account it was issued for and how it ended."""

    account_id: str
    outcome: str | None


@dataclass(frozen=True, slots=True)
class ClaimedState:
    """A state the callback has just claimed: whom it was for, and what it carried."""

    account_id: str
    allow_realm_change: bool = False
    code_verifier: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RealmPolicy:
    """Which company a connection from the callback may bring (``store.realms``).

    Checked in the transaction that stores the connection, so two callbacks
    cannot both pass it for one company.
    """

    allow_shared: bool = False  # [callback] allow_shared_realm
    allow_change: bool = False  # {"allow_realm_change": true} on the authorize-url request


@dataclass(frozen=True, slots=True)
class Claim:
    """One node's right to call Intuit for one account, until its lease runs out.

    ``generation`` is the fencing token: every claim of the row takes the next
    one, so a write can tell its own claim from a later node's.
    """

    account_id: str
    owner: str
    generation: int
    lease: float  # seconds the database granted, counted from before the claim was sent
    # A call to Intuit an earlier claim started and never answered into the database
    # (its node died or was paused): it may have rotated the refresh token.
    abandoned_since: datetime | None = None
    abandoned_for: float | None = None  # seconds since then, by the database's clock


@dataclass(frozen=True, slots=True)
class Claimed:
    """The claim was granted: the row as it is now, secrets decrypted."""

    account: Account
    claim: Claim


@dataclass(frozen=True, slots=True)
class Busy:
    """Another node holds the account's claim for ``remaining`` more seconds."""

    account: Account
    owner: str
    remaining: float


@dataclass(frozen=True, slots=True)
class NotDue:
    """A timer's claim found the row refreshed already: not due before ``account``'s time."""

    account: Account


ClaimResult = Claimed | Busy | NotDue


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A daemon sharing the database, as its heartbeat row says."""

    node_id: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    age: float  # seconds since its last heartbeat, by the database's clock


class AccountStore(Protocol):
    """Accounts, OAuth states and refresh attempts, durable and encrypted at rest."""

    @property
    def primary_key_id(self) -> str:
        """The id of the key new values are encrypted under."""
        ...

    # -- reading -----------------------------------------------------------------

    async def load(self, account_id: str) -> Account:
        """The account with its secrets decrypted; :class:`AccountNotFoundError` if none."""
        ...

    async def find(self, account_id: str) -> Account | None:
        """The account with its secrets decrypted, or None."""
        ...

    async def list_accounts(self) -> list[Account]:
        """Every account by ``account_id``; the tokens are not decrypted (they are None)."""
        ...

    async def schedule_entries(
        self, until: datetime | None = None, *, after: datetime | None = None
    ) -> list[ScheduleEntry]:
        """Every active or expired account that holds a refresh token and a token expiry.

        With ``until`` only those whose ``reconnect_token_at`` is by then (and
        later than ``after``, if given), read from an index: the scheduler's window.
        """
        ...

    async def status_counts(self) -> dict[str, int]: ...

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """The newest attempts first, of one account or of all."""
        ...

    # -- writing -----------------------------------------------------------------

    async def commit(self, write: AccountWrite) -> Account:
        """Store ``write`` (and its attempt) if the row is still at ``write.read_version``.

        Durable when it returns the stored account. Raises :class:`StaleWriteError`
        (nothing written) when the row changed or is gone, :class:`StorageError`
        when the database refuses.
        """
        ...

    async def record_attempt(self, attempt: Attempt) -> None:
        """Note an attempt that changes no account (``invalid_client``)."""
        ...

    async def upsert_connection(self, account: Account) -> Account:
        """Make ``account``'s credentials the stored ones, creating the row if new.

        Not a compare-and-swap: a connection or reconnect wins over whatever the
        row held. The row keeps its ``id`` and ``created_at``; ``version`` moves on.
        """
        ...

    async def import_connections(
        self, accounts: Sequence[Account], *, replace_existing: bool = True
    ) -> list[Imported]:
        """Imported connections, in one transaction (all or nothing), in order.

        Whether each account exists is read inside that transaction; an existing
        one is replaced like :meth:`upsert_connection`, or with
        ``replace_existing=False`` left as it is (reported, not stored). Keep a
        call to about a thousand accounts: token writes wait behind it.
        """
        ...

    async def existing_account_ids(self, account_ids: Sequence[str]) -> set[str]:
        """Which of ``account_ids`` are stored (a snapshot: for reports, not for writes)."""
        ...

    async def upsert_checked_connection(
        self, account: Account, policy: RealmPolicy
    ) -> tuple[Account, str | None]:
        """:meth:`upsert_connection` of a connection from the callback, if ``policy`` allows it.

        The realm rules are checked in the transaction that stores it. Raises
        :class:`RealmConflictError` (nothing written) when another account holds
        the realm or the account held another one; returns the stored account and
        its previous realm when the connection changed it (else None).
        """
        ...

    async def reencrypt(self, *, batch: int) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows under the primary key: (done now, still to do)."""
        ...

    # -- keys --------------------------------------------------------------------

    async def verify_keys(self, cipher: Cipher | None = None) -> None:
        """Raise :class:`MissingKeyError` if a stored value's key is not configured."""
        ...

    def use_cipher(self, cipher: Cipher) -> None:
        """Encrypt and decrypt with ``cipher`` from now on (a reload's keys)."""
        ...

    # -- OAuth states ------------------------------------------------------------

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
        """Store a state (only its hash; the verifier encrypted).

        Returns how many older pending states of the account it dropped.
        """
        ...

    async def consume_state(self, state: str, answer: str, *, now: datetime) -> ClaimedState:
        """Mark ``state`` used by ``answer`` (``store.states.answer_hash``); return its claim.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired``,
        ``replayed`` (used before by the same answer) or ``used``; a failed
        check changes nothing.
        """
        ...

    async def finish_state(self, state: str, outcome: str) -> None: ...

    async def get_state(self, state: str) -> StateRecord | None: ...

    # -- the database itself -----------------------------------------------------

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class ClaimStore(Protocol):
    """What several daemons on one database add to :class:`AccountStore`: claims,
    heartbeats and change notifications (PostgreSQL only; one SQLite daemon needs none).

    Leases and heartbeats are timed by the database's clock, so nodes whose
    clocks disagree still agree on who holds what.
    """

    node_id: str

    async def claim(
        self, account_id: str, *, lease: float, due_by: datetime | None = None
    ) -> ClaimResult | None:
        """Claim ``account_id`` for one attempt, or say who holds it; None if it is gone.

        With ``due_by`` (a timer's attempt) a row whose ``reconnect_token_at`` is
        later is not claimed: it was refreshed meanwhile (:class:`NotDue`).
        """
        ...

    async def release(self, claim: Claim) -> None:
        """End ``claim`` without a write (no call was made), if it is still held."""
        ...

    async def join(self, live_within: float) -> None:
        """Refuse (:class:`ConfigError`) a node id another process beat with lately."""
        ...

    async def heartbeat(self) -> list[NodeInfo]:
        """Say this node is alive; return every node's row."""
        ...

    async def leave(self) -> None:
        """Remove this node's heartbeat row (a clean shutdown)."""
        ...

    async def listen(self, callback: Callable[[AccountChange | None], None]) -> None:
        """Call ``callback`` after each committed change of an account, any node's.

        ``callback(None)``: changes may have been missed (the connection that
        listens was cut and is back); read again what depends on them.
        """
        ...

    async def listen_nodes(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(node_id)`` when a node comes up or leaves (any node, this one too).

        A hint to read the nodes now rather than at the next heartbeat; the
        heartbeat rows stay the truth (a node that dies announces nothing).
        """
        ...


@dataclass(frozen=True, slots=True)
class AccountChange:
    """A committed change of an account, as every node hears of it (no secrets)."""

    account_id: str
    version: int
    status: AccountStatus
    reconnect_token_at: datetime | None
    failure_count: int
    last_failure_at: datetime | None
    origin: str | None  # the node that wrote it, when known
