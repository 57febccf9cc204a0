"""The storage's behaviour, on both backends: an SQLite file and a PostgreSQL database.

Every test runs once per backend (the ``backend`` fixture, tests/store/conftest.py)
with real AES-GCM keys, and reads what an operator would read: the rows, with
the database's own client (tests/store/backends.py), and the error messages.
What only one backend has (SQLite's file, lock and group commit; PostgreSQL's
schema, notifications and connections) is tested beside it, in
test_repository.py and test_postgres.py.

Writes go through the helpers below, shaped as the engine's tests call the
storage port, so moving this suite onto the port changes the helpers only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest

from qbo_daemon.core.errors import (
    AccountNotFoundError,
    DecryptionError,
    MissingKeyError,
    OAuthStateError,
    RealmConflictError,
    StaleWriteError,
    StorageError,
)
from qbo_daemon.core.models import Account, AccountStatus, ImportItem, TokenSet
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.port import (
    AccountWrite,
    Attempt,
    ClaimedState,
    RealmPolicy,
    ScheduleEntry,
    StateRecord,
)
from qbo_daemon.store.schema import sha256_hex
from qbo_daemon.store.states import MAX_PENDING, answer_hash
from tests.store import writes
from tests.store.backends import AnyStorage, Backend
from tests.store.test_repository import ACCESS, HOUR, NOW, REALM, REFRESH, tokens
from tests.store.writes import LEAD, POLICY, forget_tokens, record_failure, save_connection

TTL = timedelta(minutes=10)
OTHER_REALM = "REALM-9130357766806786"

# -- writes, as the engine makes them: the policy decides, the port stores ------


async def connect(storage: AnyStorage, account_id: str = "acct-1", **kw: Any) -> Account:
    return await save_connection(storage, account_id, REALM, tokens(**kw), now=NOW)


async def save_refresh(
    storage: AnyStorage,
    account: Account,
    token_set: TokenSet,
    *,
    now: datetime = NOW,
    attempt: Attempt | None = None,
) -> Account:
    return await writes.save_refresh(storage, account, token_set, now=now, attempt=attempt)


async def import_accounts(
    storage: AnyStorage, items: Sequence[ImportItem], *, now: datetime
) -> list[Account]:
    stored: list[Account] = []
    for result in await writes.import_accounts(storage, items, now=now):
        assert result.account is not None
        stored.append(result.account)
    return stored


async def attempts_of(backend: Backend, account_id: str | None = None) -> list[tuple[Any, ...]]:
    """(outcome, error, intuit_tid) of the stored attempts, newest first, read from the rows."""
    where = f"WHERE account_id = '{account_id}'" if account_id else ""
    return await backend.query(
        f"SELECT outcome, error, intuit_tid FROM refresh_attempts {where} ORDER BY id DESC"  # noqa: S608
    )


# -- opening -------------------------------------------------------------------


async def test_reopen_is_idempotent(backend: Backend, cipher: Cipher) -> None:
    first = await backend.open(cipher)
    await connect(first)
    version = await backend.schema_version()
    await first.close()
    second = await backend.open(cipher)
    try:
        assert (await second.load("acct-1")).refresh_token == REFRESH
        assert await backend.schema_version() == version > 0
    finally:
        await second.close()


# -- accounts ------------------------------------------------------------------


async def test_save_connection_round_trip_and_utc_text(
    storage: AnyStorage, backend: Backend
) -> None:
    local_now = NOW.astimezone(timezone(timedelta(hours=2)))  # same instant, not UTC
    saved = await save_connection(storage, "acct-1", REALM, tokens(at=local_now), now=local_now)
    loaded = await storage.load("acct-1")
    assert loaded == saved
    assert loaded.id > 0
    assert (loaded.realm_id, loaded.access_token, loaded.refresh_token) == (
        REALM,
        ACCESS,
        REFRESH,
    )
    assert loaded.status is AccountStatus.ACTIVE
    assert loaded.version == 1
    assert loaded.token_expires_at == NOW + HOUR
    assert loaded.token_expires_at is not None
    assert loaded.token_expires_at.tzinfo is UTC
    assert loaded.reconnect_token_at == NOW + HOUR - LEAD

    stored = await backend.row(
        "acct-1",
        "status, version, key_id, token_expires_at, reconnect_token_at, "
        "refresh_token_expires_at, last_refreshed_at, created_at, updated_at",
    )
    assert stored == (
        "active",
        1,
        storage.primary_key_id,
        "2025-03-01T13:00:00.000000Z",
        "2025-03-01T12:50:00.000000Z",
        "2025-06-09T12:00:00.000000Z",
        "2025-03-01T12:00:00.000000Z",
        "2025-03-01T12:00:00.000000Z",
        "2025-03-01T12:00:00.000000Z",
    )
    secrets = await backend.row("acct-1", "realm_id, access_token, refresh_token")
    for value in secrets:
        assert value.startswith(f"v1.{storage.primary_key_id}.")

    listed = await storage.list_accounts()
    assert [(a.account_id, a.realm_id, a.access_token, a.refresh_token) for a in listed] == [
        ("acct-1", REALM, None, None)
    ]
    with pytest.raises(AccountNotFoundError, match="nope"):
        await storage.load("nope")
    assert await storage.find("nope") is None


async def test_short_lived_token_is_due_at_half_life(storage: AnyStorage) -> None:
    saved = await connect(storage, lifetime=timedelta(minutes=4))
    assert saved.reconnect_token_at == NOW + timedelta(minutes=2)


async def test_reconnect_replaces_tokens_and_reactivates(
    storage: AnyStorage, backend: Backend
) -> None:
    first = await connect(storage)
    failed = await record_failure(
        storage, first, status=AccountStatus.NEEDS_RECONNECT, error="invalid_grant", now=NOW
    )
    assert await backend.row("acct-1", "status, version") == ("needs_reconnect", 2)
    assert await storage.schedule_entries() == []

    later = NOW + timedelta(days=3)
    again = await save_connection(
        storage, "acct-1", "REALM-2", tokens("ACCESS-2", "REFRESH-2", at=later), now=later
    )
    assert again.version == failed.version + 1 == 3
    loaded = await storage.load("acct-1")
    assert loaded == again
    assert (loaded.realm_id, loaded.access_token, loaded.refresh_token) == (
        "REALM-2",
        "ACCESS-2",
        "REFRESH-2",
    )
    assert loaded.status is AccountStatus.ACTIVE
    assert (loaded.failure_count, loaded.last_error) == (0, None)
    assert loaded.created_at == NOW
    assert await backend.row(
        "acct-1", "status, version, failure_count, last_error, created_at"
    ) == ("active", 3, 0, None, "2025-03-01T12:00:00.000000Z")
    assert await backend.count("accounts") == 1
    assert [e.account_id for e in await storage.schedule_entries()] == ["acct-1"]


async def test_ciphertext_moved_to_another_row_or_column_does_not_decrypt(
    storage: AnyStorage, backend: Backend
) -> None:
    await connect(storage, account_id="victim")
    await save_connection(storage, "attacker", "REALM-X", tokens("ACCESS-X", "REFRESH-X"), now=NOW)
    await backend.execute(
        "UPDATE accounts SET refresh_token = "
        "(SELECT refresh_token FROM accounts WHERE account_id = 'victim') "
        "WHERE account_id = 'attacker'"
    )
    with pytest.raises(DecryptionError, match="copied from another row") as caught:
        await storage.load("attacker")
    assert "'attacker'" in str(caught.value)
    assert REFRESH not in str(caught.value)
    assert (await storage.load("victim")).refresh_token == REFRESH

    # Same row, another column: refused as well.
    await backend.execute(
        "UPDATE accounts SET access_token = refresh_token WHERE account_id = 'victim'"
    )
    with pytest.raises(DecryptionError, match="access_token"):
        await storage.load("victim")


async def test_missing_key_is_named_at_start(
    backend: Backend, key_a: EncryptionKey, key_b: EncryptionKey
) -> None:
    first = await backend.open(Cipher([key_a]))
    await connect(first)
    await first.close()

    other = await backend.open(Cipher([key_b]))
    try:
        with pytest.raises(MissingKeyError) as caught:
            await other.verify_keys()
        assert caught.value.key_id == key_a.key_id
        assert key_a.key_id in str(caught.value)
        assert "encryption_keys" in str(caught.value)
        with pytest.raises(MissingKeyError):
            await other.load("acct-1")
        # A reload's keys are checked by their ids alone, before they are used.
        await other.verify_keys(Cipher([key_b, key_a]))
        with pytest.raises(MissingKeyError):
            await other.verify_keys(Cipher([key_b]))
    finally:
        await other.close()


# -- compare-and-swap ----------------------------------------------------------


async def test_stale_save_refresh_changes_nothing(storage: AnyStorage, backend: Backend) -> None:
    v1 = await connect(storage)
    v2 = await save_refresh(storage, v1, tokens("ACCESS-2", "REFRESH-2"), now=NOW)
    assert v2.version == 2
    before = await backend.query("SELECT * FROM accounts")

    attempt = Attempt("acct-1", NOW, "success", 120.0, intuit_tid="tid-stale")
    with pytest.raises(StaleWriteError) as caught:
        await save_refresh(storage, v1, tokens("ACCESS-3", "REFRESH-3"), now=NOW, attempt=attempt)
    assert (caught.value.account_id, caught.value.expected_version) == ("acct-1", 1)
    assert "'acct-1' changed since version 1" in str(caught.value)
    assert await backend.query("SELECT * FROM accounts") == before
    assert await backend.count("refresh_attempts") == 0
    assert (await storage.load("acct-1")).refresh_token == "REFRESH-2"


async def test_two_concurrent_refreshes_of_one_version_one_wins(
    storage: AnyStorage, backend: Backend
) -> None:
    v1 = await connect(storage)
    results = await asyncio.gather(
        save_refresh(storage, v1, tokens("ACCESS-A", "REFRESH-A"), now=NOW),
        save_refresh(storage, v1, tokens("ACCESS-B", "REFRESH-B"), now=NOW),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Account)]
    losers = [r for r in results if isinstance(r, StaleWriteError)]
    assert (len(winners), len(losers)) == (1, 1), results
    stored = await storage.load("acct-1")
    assert stored.refresh_token == winners[0].refresh_token
    assert stored.version == 2
    assert await backend.row("acct-1", "version") == (2,)


async def test_many_concurrent_writes_land_and_the_stale_one_fails_alone(
    storage: AnyStorage, backend: Backend
) -> None:
    accounts = [await connect(storage, account_id=f"acct-{n:02d}") for n in range(40)]
    stale = accounts[7]
    await save_refresh(storage, stale, tokens("ACCESS-1st", "REFRESH-1st"), now=NOW)

    later = NOW + timedelta(minutes=50)
    results = await asyncio.gather(
        *(
            save_refresh(
                storage,
                account,
                tokens(f"ACCESS-{account.account_id}", f"REFRESH-{account.account_id}", at=later),
                now=later,
                attempt=Attempt(account.account_id, later, "success", 200.0, "tid"),
            )
            for account in accounts
        ),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1
    assert isinstance(failed[0], StaleWriteError)
    assert failed[0].account_id == stale.account_id

    stored = dict(await backend.query("SELECT account_id, version FROM accounts"))
    assert stored.pop(stale.account_id) == 2
    assert set(stored.values()) == {2}
    assert len(stored) == 39
    for account in accounts:
        loaded = await storage.load(account.account_id)
        if account is stale:
            assert loaded.refresh_token == "REFRESH-1st"
        else:
            assert loaded.refresh_token == f"REFRESH-{account.account_id}"
            assert loaded.reconnect_token_at == later + HOUR - LEAD
    assert await backend.count("refresh_attempts") == 39


async def test_close_commits_what_is_queued(backend: Backend, cipher: Cipher) -> None:
    storage = await backend.open(cipher)
    accounts = [await connect(storage, account_id=f"acct-{n}") for n in range(5)]
    pending = [
        asyncio.create_task(
            save_refresh(storage, a, tokens("ACCESS-2", f"R2-{a.account_id}"), now=NOW)
        )
        for a in accounts
    ]
    await asyncio.sleep(0)  # let them queue
    await storage.close()
    assert all(task.done() and task.exception() is None for task in pending)
    assert await backend.query("SELECT DISTINCT version FROM accounts") == [(2,)]
    with pytest.raises(StorageError, match="closed"):
        await save_refresh(storage, accounts[0], tokens(), now=NOW)


async def test_a_cancelled_writer_still_commits_whole(
    storage: AnyStorage, backend: Backend
) -> None:
    account = await connect(storage)
    attempt = Attempt("acct-1", NOW, "success", 90.0, intuit_tid="tid-cancelled")
    task = asyncio.create_task(
        save_refresh(storage, account, tokens("ACCESS-2", "REFRESH-2"), attempt=attempt)
    )
    await asyncio.sleep(0)  # under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The write was not abandoned half-way: the rotated token and its attempt both landed.
    for _ in range(100):
        if await backend.row("acct-1", "version") == (2,):
            break
        await asyncio.sleep(0.02)
    assert (await storage.load("acct-1")).refresh_token == "REFRESH-2"
    assert await attempts_of(backend) == [("success", None, "tid-cancelled")]


# -- failures and disconnects --------------------------------------------------


async def test_record_failure_counts_and_sets_status(storage: AnyStorage, backend: Backend) -> None:
    account = await connect(storage)
    first = await record_failure(
        storage,
        account,
        status=AccountStatus.ACTIVE,
        error="connection reset",
        now=NOW,
        attempt=Attempt("acct-1", NOW, "transient", 30000.0, error="connection reset"),
    )
    assert await backend.row("acct-1", "status, failure_count, last_error, version") == (
        "active",
        1,
        "connection reset",
        2,
    )
    later = NOW + HOUR
    second = await record_failure(
        storage, first, status=AccountStatus.EXPIRED, error="HTTP 503", now=later
    )
    assert second.failure_count == 2
    assert await backend.row(
        "acct-1", "status, failure_count, last_error, version, updated_at, last_failure_at"
    ) == ("expired", 2, "HTTP 503", 3, "2025-03-01T13:00:00.000000Z", "2025-03-01T13:00:00.000000Z")
    assert await storage.load("acct-1") == second
    assert await attempts_of(backend, "acct-1") == [("transient", "connection reset", None)]
    # Expired accounts are still scheduled; needs_reconnect ones are not.
    assert [e.status for e in await storage.schedule_entries()] == [AccountStatus.EXPIRED]
    with pytest.raises(StaleWriteError):
        await record_failure(storage, first, status=AccountStatus.EXPIRED, error="x", now=later)
    third = await record_failure(
        storage, second, status=AccountStatus.NEEDS_RECONNECT, error="invalid_grant", now=later
    )
    assert third.failure_count == 3
    assert await storage.schedule_entries() == []
    assert await storage.status_counts() == {"needs_reconnect": 1}

    # A successful refresh clears the failure bookkeeping.
    await save_refresh(storage, third, tokens(at=later), now=later)
    assert await backend.row("acct-1", "status, failure_count, last_error") == (
        "active",
        0,
        None,
    )
    # When it last failed stays: the status page sorts by it.
    assert await backend.row("acct-1", "last_failure_at") == ("2025-03-01T13:00:00.000000Z",)


async def test_forget_tokens_leaves_a_tombstone(storage: AnyStorage, backend: Backend) -> None:
    account = await connect(storage)
    gone = await forget_tokens(storage, account, now=NOW + HOUR)
    assert gone.status is AccountStatus.DISCONNECTED
    assert await backend.row(
        "acct-1", "status, access_token, refresh_token, reconnect_token_at, version"
    ) == ("disconnected", None, None, None, 2)
    loaded = await storage.load("acct-1")
    assert (loaded.access_token, loaded.refresh_token) == (None, None)
    assert loaded.status is AccountStatus.DISCONNECTED
    assert loaded.realm_id == REALM
    assert await storage.schedule_entries() == []
    with pytest.raises(StaleWriteError):
        await forget_tokens(storage, account, now=NOW + HOUR)
    with pytest.raises(StaleWriteError):  # a refresh that was in flight cannot resurrect it
        await save_refresh(storage, account, tokens(), now=NOW + HOUR)
    assert await backend.row("acct-1", "refresh_token, version") == (None, 2)


# -- import --------------------------------------------------------------------


async def test_import_is_all_or_nothing(storage: AnyStorage, backend: Backend) -> None:
    existing = await connect(storage, account_id="kept")
    before = await backend.query("SELECT * FROM accounts")
    items = [
        ImportItem("new-1", REALM, "REFRESH-new-1"),
        ImportItem("kept", "REALM-overwritten", "REFRESH-overwritten"),
        ImportItem(cast(str, None), REALM, "REFRESH-bad"),  # NOT NULL account_id
        ImportItem("new-2", REALM, "REFRESH-new-2"),
    ]
    with pytest.raises(StorageError, match=backend.not_null_error):
        await import_accounts(storage, items, now=NOW)
    assert await backend.query("SELECT * FROM accounts") == before
    assert await storage.load("kept") == existing

    # A failure the database raises late (here a trigger) rolls back the earlier items too.
    await backend.refuse_inserts_of("poison", "poisoned row")
    items[2] = ImportItem("poison", REALM, "REFRESH-poison")
    with pytest.raises(StorageError, match="poisoned row"):
        await import_accounts(storage, items, now=NOW)
    assert await backend.query("SELECT * FROM accounts") == before

    # The storage is still usable: nothing was left half-open.
    del items[2]
    stored = await import_accounts(storage, items, now=NOW)
    assert [a.account_id for a in stored] == ["new-1", "kept", "new-2"]
    assert await backend.query("SELECT account_id FROM accounts ORDER BY account_id") == [
        ("kept",),
        ("new-1",),
        ("new-2",),
    ]
    assert [a.version for a in stored] == [1, existing.version + 1, 1]
    assert (await storage.load("kept")).refresh_token == "REFRESH-overwritten"


async def test_import_without_a_valid_access_token_is_due_at_once(
    storage: AnyStorage, backend: Backend
) -> None:
    items = [
        ImportItem("no-access", REALM, "REFRESH-1"),
        ImportItem("no-expiry", REALM, "REFRESH-2", access_token="ACCESS-2"),
        ImportItem(
            "expired", REALM, "REFRESH-3", access_token="ACCESS-3", token_expires_at=NOW - HOUR
        ),
        ImportItem(
            "valid",
            REALM,
            "REFRESH-4",
            access_token="ACCESS-4",
            token_expires_at=NOW + timedelta(minutes=50),
            refresh_token_expires_at=NOW + timedelta(days=30),
        ),
    ]
    stored = await import_accounts(storage, items, now=NOW)
    assert all(a.version == 1 and a.status is AccountStatus.ACTIVE for a in stored)
    due = {e.account_id: e.reconnect_token_at for e in await storage.schedule_entries()}
    assert due == {
        "no-access": NOW,
        "no-expiry": NOW,
        "expired": NOW,
        "valid": NOW + timedelta(minutes=40),
    }
    assert await backend.row("no-access", "reconnect_token_at, refresh_token_expires_at") == (
        "2025-03-01T12:00:00.000000Z",
        "2025-06-09T12:00:00.000000Z",  # 100 days when unknown
    )
    assert await backend.row("valid", "refresh_token_expires_at") == (
        "2025-03-31T12:00:00.000000Z",
    )
    valid = await storage.load("valid")
    assert (valid.access_token, valid.refresh_token, valid.realm_id) == (
        "ACCESS-4",
        "REFRESH-4",
        REALM,
    )
    assert (await storage.load("no-access")).refresh_token == "REFRESH-1"


async def test_bulk_insert_stores_new_accounts_and_refuses_an_existing_one(
    storage: AnyStorage, backend: Backend
) -> None:
    items = [ImportItem(f"bulk-{n}", REALM, f"REFRESH-{n}") for n in range(50)]
    assert await storage.insert_accounts([POLICY.imported(i, now=NOW) for i in items]) == 50
    assert (await storage.load("bulk-7")).refresh_token == "REFRESH-7"
    assert len(await storage.schedule_entries()) == 50
    with pytest.raises(StorageError):
        await storage.insert_accounts(
            [
                POLICY.imported(ImportItem("bulk-new", REALM, "R"), now=NOW),
                POLICY.imported(ImportItem("bulk-3", REALM, "R"), now=NOW),
            ]
        )
    assert await backend.count("accounts") == 50


# -- OAuth states --------------------------------------------------------------


async def test_oauth_state_is_single_use(storage: AnyStorage, backend: Backend) -> None:
    ttl = timedelta(minutes=10)
    first, other = answer_hash("code-1", None), answer_hash("code-2", None)
    await storage.create_state("state-1", "acct-1", now=NOW, ttl=ttl)
    assert await storage.get_state("state-1") == StateRecord("acct-1", None)
    claim = await storage.consume_state("state-1", first, now=NOW + timedelta(minutes=1))
    assert claim == ClaimedState("acct-1", allow_realm_change=False, code_verifier=None)
    with pytest.raises(OAuthStateError, match="already been used") as used:
        await storage.consume_state("state-1", other, now=NOW + timedelta(minutes=2))
    assert used.value.reason == "used"
    with pytest.raises(OAuthStateError, match="already been used") as replayed:
        await storage.consume_state("state-1", first, now=NOW + timedelta(minutes=2))
    assert replayed.value.reason == "replayed"
    await storage.finish_state("state-1", "connected")
    assert await storage.get_state("state-1") == StateRecord("acct-1", "connected")

    with pytest.raises(OAuthStateError) as unknown:
        await storage.consume_state("never-issued", first, now=NOW)
    assert unknown.value.reason == "unknown"
    assert await storage.get_state("never-issued") is None

    await storage.create_state("state-2", "acct-2", now=NOW, ttl=ttl)
    with pytest.raises(OAuthStateError, match="expired") as expired:
        await storage.consume_state("state-2", first, now=NOW + ttl)
    assert expired.value.reason == "expired"
    # A refused state is not marked used: it stays expired, not "used".
    assert await backend.query(
        f"SELECT used_at FROM oauth_states WHERE state_hash = '{sha256_hex('state-2')}'"  # noqa: S608
    ) == [(None,)]
    with pytest.raises(OAuthStateError) as again:
        await storage.consume_state("state-2", first, now=NOW + ttl)
    assert again.value.reason == "expired"

    with pytest.raises(StorageError):  # a state value is never issued twice
        await storage.create_state("state-1", "acct-3", now=NOW, ttl=ttl)
    assert await storage.get_state("state-1") == StateRecord("acct-1", "connected")


async def test_old_oauth_states_are_purged(storage: AnyStorage, backend: Backend) -> None:
    ttl = timedelta(minutes=10)
    await storage.create_state("old", "acct-1", now=NOW, ttl=ttl)
    await storage.create_state("new", "acct-2", now=NOW + timedelta(days=2), ttl=ttl)
    assert await backend.query("SELECT state_hash FROM oauth_states") == [(sha256_hex("new"),)]


async def test_a_state_carries_its_realm_change_permission(storage: AnyStorage) -> None:
    await storage.create_state("change", "acme", now=NOW, ttl=TTL, allow_realm_change=True)
    claim = await storage.consume_state("change", answer_hash(None, "access_denied"), now=NOW)
    assert claim == ClaimedState("acme", allow_realm_change=True, code_verifier=None)


async def test_a_verifier_is_encrypted_and_bound_to_its_state(
    storage: AnyStorage, backend: Backend
) -> None:
    verifier = "v" * 64
    await storage.create_state("state-one", "acme", now=NOW, ttl=TTL, code_verifier=verifier)
    await storage.create_state("state-two", "acme", now=NOW, ttl=TTL, code_verifier="w" * 64)
    stored = await backend.query("SELECT state_hash, code_verifier FROM oauth_states")
    assert verifier not in str(stored)
    assert "state-one" not in str(stored)

    # Moved to another state's row, it does not decrypt, and that state stays unused.
    one, two = sha256_hex("state-one"), sha256_hex("state-two")
    moved = f"(SELECT code_verifier FROM oauth_states WHERE state_hash = '{one}')"  # noqa: S608
    await backend.execute(
        f"UPDATE oauth_states SET code_verifier = {moved} WHERE state_hash = '{two}'"  # noqa: S608
    )
    with pytest.raises(DecryptionError):
        await storage.consume_state("state-two", answer_hash("c", None), now=NOW)
    assert await backend.query(
        f"SELECT used_at FROM oauth_states WHERE state_hash = '{two}'"  # noqa: S608
    ) == [(None,)]

    claim = await storage.consume_state("state-one", answer_hash("c", None), now=NOW)
    assert claim.code_verifier == verifier
    assert verifier not in repr(claim)


async def test_pending_states_are_capped_per_account(storage: AnyStorage, backend: Backend) -> None:
    await storage.create_state("expired-one", "acme", now=NOW - TTL * 2, ttl=TTL)
    await storage.create_state("used-one", "acme", now=NOW, ttl=TTL)
    await storage.consume_state("used-one", answer_hash("c", None), now=NOW)
    await storage.create_state("beta-one", "beta", now=NOW, ttl=TTL)

    dropped = [
        await storage.create_state(f"acme-{n:02d}", "acme", now=NOW, ttl=TTL)
        for n in range(MAX_PENDING + 3)
    ]

    assert dropped == [0] * MAX_PENDING + [1, 1, 1]
    pending = await backend.query(
        "SELECT state_hash FROM oauth_states WHERE account_id = 'acme' AND used_at IS NULL "
        "AND expires_at > '2025-03-01T12:00:00.000000Z'"
    )
    assert {r[0] for r in pending} == {
        sha256_hex(f"acme-{n:02d}") for n in range(3, MAX_PENDING + 3)
    }
    # Neither the used nor the expired state, nor another account's, was counted or dropped.
    kept = {r[0] for r in await backend.query("SELECT state_hash FROM oauth_states")}
    assert {sha256_hex(s) for s in ("expired-one", "used-one", "beta-one")} <= kept


# -- the company an account is connected to -------------------------------------


async def save_checked(
    storage: AnyStorage, account_id: str, realm_id: str, **policy: bool
) -> tuple[Account, str | None]:
    connected = POLICY.connected(account_id, realm_id, tokens(), now=NOW)
    return await storage.upsert_checked_connection(connected, RealmPolicy(**policy))


async def test_the_realm_rules_decide_inside_the_write(
    storage: AnyStorage, backend: Backend
) -> None:
    await save_checked(storage, "acme", REALM)
    before = await backend.query("SELECT * FROM accounts")

    with pytest.raises(RealmConflictError) as shared:
        await save_checked(storage, "beta", REALM)
    assert (shared.value.reason, shared.value.holder) == ("shared", "acme")
    with pytest.raises(RealmConflictError) as changed:
        await save_checked(storage, "acme", OTHER_REALM)
    assert changed.value.reason == "changed"
    assert await backend.query("SELECT * FROM accounts") == before

    _, previous = await save_checked(storage, "acme", REALM)  # the same company: no question
    assert previous is None
    _, previous = await save_checked(storage, "acme", OTHER_REALM, allow_change=True)
    assert previous == REALM
    _, previous = await save_checked(storage, "beta", REALM)  # acme let go of it
    assert previous is None
    _, previous = await save_checked(storage, "gamma", REALM, allow_shared=True)
    assert previous is None
    assert await backend.count("accounts") == 3

    # A disconnected account does not hold its company.
    await forget_tokens(storage, await storage.load("acme"), now=NOW)
    _, previous = await save_checked(storage, "delta", OTHER_REALM)
    assert previous is None


async def test_a_connection_may_be_stored_unverified_then_verified(
    storage: AnyStorage, backend: Backend
) -> None:
    unverified = POLICY.connected("acme", REALM, tokens(), now=NOW, realm_verified=False)
    account, _ = await storage.upsert_checked_connection(unverified, RealmPolicy())
    assert account.realm_verified is False
    assert await backend.row("acme", "realm_verified, version") == (0, 1)
    assert (await storage.load("acme")).realm_verified is False
    mark = AccountWrite(POLICY.realm_verified(account, now=NOW + HOUR), account.version, False)
    verified = await storage.commit(mark)
    assert await backend.row("acme", "realm_verified, version, updated_at") == (
        1,
        2,
        "2025-03-01T13:00:00.000000Z",
    )
    assert await storage.load("acme") == verified
    with pytest.raises(StaleWriteError):
        await storage.commit(mark)


async def test_a_realm_is_found_whatever_key_wrote_it(
    storage: AnyStorage, backend: Backend, key_a: EncryptionKey
) -> None:
    await save_checked(storage, "acme", REALM)
    new_key = EncryptionKey.from_text(generate_key())

    # Mid-rotation: the new key encrypts, the old digest is still found.
    storage.use_cipher(Cipher([new_key, key_a]))
    with pytest.raises(RealmConflictError):
        await save_checked(storage, "beta", REALM)

    # Re-encrypted, the digest moves to the new key with the realm...
    assert await storage.reencrypt() == (1, 0)
    [(digest,)] = await backend.query("SELECT realm_digest FROM accounts")
    assert digest.startswith(f"{new_key.key_id}.")
    # ...so the old key can go.
    storage.use_cipher(Cipher([new_key]))
    with pytest.raises(RealmConflictError):
        await save_checked(storage, "beta", REALM)

    # A refresh rewrites the realm under the primary key, and its digest with it.
    storage.use_cipher(Cipher([key_a, new_key]))
    account = await storage.load("acme")
    await save_refresh(storage, account, tokens("A2", "R2"))
    [(digest,)] = await backend.query("SELECT realm_digest FROM accounts")
    assert digest.startswith(f"{key_a.key_id}.")
    storage.use_cipher(Cipher([key_a]))
    with pytest.raises(RealmConflictError):
        await save_checked(storage, "beta", REALM)


# -- refresh attempts ----------------------------------------------------------


async def write_attempts(storage: AnyStorage, count: int, start: int = 0) -> None:
    for first in range(start, start + count, 100):
        await asyncio.gather(
            *(
                storage.record_attempt(
                    Attempt("acct-1", NOW + timedelta(seconds=n), "invalid_client", 1.5)
                )
                for n in range(first, min(first + 100, start + count))
            )
        )


async def test_refresh_attempts_stay_bounded(backend: Backend, cipher: Cipher) -> None:
    keep = 50
    limit = keep + 1000
    storage = await backend.open(cipher, attempts_keep=keep)
    try:
        for chunk in range(25):
            await write_attempts(storage, 100, chunk * 100)
            count = await backend.count("refresh_attempts")
            assert count <= limit, (chunk, count)
        # The trim keeps the newest: daemons on one PostgreSQL insert in no set order, so
        # "newest" is by started_at.
        newest = await backend.query(
            "SELECT started_at FROM refresh_attempts ORDER BY started_at DESC LIMIT 1"
        )
        assert newest == [("2025-03-01T12:41:39.000000Z",)]  # NOW + 2499 s
    finally:
        await storage.close()

    # The bound holds across restarts too: each run writing fewer than a trim's worth.
    for run in range(3):
        storage = await backend.open(cipher, attempts_keep=keep)
        try:
            await write_attempts(storage, 900, 10_000 * (run + 1))
        finally:
            await storage.close()
        count = await backend.count("refresh_attempts")
        assert count <= limit, (run, count)


# -- key rotation --------------------------------------------------------------


async def test_reencrypt_moves_every_row_to_the_new_key(
    backend: Backend, key_a: EncryptionKey, key_b: EncryptionKey
) -> None:
    old = await backend.open(Cipher([key_a]))
    for n in range(23):
        await connect(old, account_id=f"acct-{n:02d}", access=f"A-{n}", refresh=f"R-{n}")
    await forget_tokens(old, await old.load("acct-05"), now=NOW)  # a tombstone
    await old.close()
    assert await backend.key_ids_stored() == {key_a.key_id}

    rotating = await backend.open(Cipher([key_b, key_a]))
    try:
        await rotating.verify_keys()
        results = [await rotating.reencrypt(batch=10) for _ in range(3)]
        assert results == [(10, 13), (10, 3), (3, 0)]
        assert await rotating.reencrypt() == (0, 0)
    finally:
        await rotating.close()
    assert await backend.key_ids_stored() == {key_b.key_id}

    new_only = await backend.open(Cipher([key_b]))
    try:
        await new_only.verify_keys()
        for n in range(23):
            account = await new_only.load(f"acct-{n:02d}")
            assert account.realm_id == REALM
            if n == 5:
                assert account.refresh_token is None
            else:
                assert (account.access_token, account.refresh_token) == (f"A-{n}", f"R-{n}")
    finally:
        await new_only.close()


async def test_refresh_during_reencrypt_is_not_lost(
    backend: Backend, key_a: EncryptionKey, key_b: EncryptionKey
) -> None:
    old = await backend.open(Cipher([key_a]))
    for n in range(20):
        await connect(old, account_id=f"acct-{n:02d}")
    await old.close()

    storage = await backend.open(Cipher([key_b, key_a]))
    try:
        # Both read before either writes, then race to the database.
        racing = await storage.load("acct-10")
        waiting = await storage.load("acct-15")
        saved, (done, remaining) = await asyncio.gather(
            save_refresh(storage, racing, tokens("ACCESS-new", "REFRESH-new"), now=NOW),
            storage.reencrypt(),
        )
        assert saved.refresh_token == "REFRESH-new"
        assert (done, remaining) == (19, 0)

        # A refresh read before the re-encryption finds the row moved on only in
        # bookkeeping (same refresh token): it re-reads and writes again, as the
        # refresher does, and its tokens land.
        with pytest.raises(StaleWriteError):
            await save_refresh(storage, waiting, tokens("ACCESS-15", "REFRESH-15"), now=NOW)
        current = await storage.load("acct-15")
        assert current.refresh_token == waiting.refresh_token
        await save_refresh(storage, current, tokens("ACCESS-15", "REFRESH-15"), now=NOW)
    finally:
        await storage.close()
    assert await backend.key_ids_stored() == {key_b.key_id}

    new_only = await backend.open(Cipher([key_b]))
    try:
        await new_only.verify_keys()
        assert (await new_only.load("acct-10")).refresh_token == "REFRESH-new"
        assert (await new_only.load("acct-15")).refresh_token == "REFRESH-15"
        assert (await new_only.load("acct-03")).refresh_token == REFRESH
    finally:
        await new_only.close()


# -- a database that refuses writes --------------------------------------------


async def test_failing_write_is_a_storage_error_and_writes_nothing(
    storage: AnyStorage, backend: Backend
) -> None:
    account = await connect(storage)
    before = await backend.query("SELECT * FROM accounts")
    await backend.set_read_only(storage, True)
    refused = backend.read_only_error

    attempt = Attempt("acct-1", NOW, "success", 90.0, intuit_tid="tid-1")
    with pytest.raises(StorageError, match=refused):
        await save_refresh(storage, account, tokens("ACCESS-2", "REFRESH-2"), attempt=attempt)
    with pytest.raises(StorageError, match=refused):
        await import_accounts(
            storage,
            [ImportItem("imp-1", REALM, "R-1"), ImportItem("imp-2", REALM, "R-2")],
            now=NOW,
        )
    with pytest.raises(StorageError, match=refused):
        await save_connection(storage, "acct-2", REALM, tokens(), now=NOW)
    with pytest.raises(StorageError, match=refused):
        await storage.create_state("state-1", "acct-1", now=NOW, ttl=HOUR)
    with pytest.raises(StorageError, match=refused):
        await record_failure(storage, account, status=AccountStatus.EXPIRED, error="x", now=NOW)

    assert await backend.query("SELECT * FROM accounts") == before
    assert await backend.count("refresh_attempts") == 0
    assert await backend.count("oauth_states") == 0
    assert (await storage.load("acct-1")) == account

    # Once the database takes writes again, the caller's retry of the same write succeeds:
    # no transaction was left open and the version was not consumed.
    await backend.set_read_only(storage, False)
    saved = await save_refresh(
        storage, account, tokens("ACCESS-2", "REFRESH-2"), now=NOW, attempt=attempt
    )
    assert saved.version == 2
    assert await backend.row("acct-1", "version") == (2,)
    assert (await storage.load("acct-1")).refresh_token == "REFRESH-2"
    assert await attempts_of(backend) == [("success", None, "tid-1")]


async def test_the_schedulers_window_reads_the_accounts_due_in_it(storage: AnyStorage) -> None:
    """``schedule_entries(until, after=…)``: due after ``after`` and by ``until``, from any
    stretch of the table, nothing disconnected."""
    for n in range(12):  # due every 5 minutes from NOW + 5 m (an hour's token, lead 10 m)
        at = NOW - timedelta(minutes=45) + timedelta(minutes=5 * n)
        await save_connection(storage, f"acct-{n:02d}", REALM, tokens(at=at), now=at)
    gone = await save_connection(storage, "gone", REALM, tokens(), now=NOW)
    await forget_tokens(storage, gone, now=NOW)

    def ids(entries: Sequence[ScheduleEntry]) -> list[str]:
        return sorted(e.account_id for e in entries)

    first = await storage.schedule_entries(NOW + timedelta(minutes=10))
    assert ids(first) == ["acct-00", "acct-01"]  # due at +5 m and +10 m (inclusive)
    following = await storage.schedule_entries(
        NOW + timedelta(minutes=25), after=NOW + timedelta(minutes=10)
    )
    assert ids(following) == ["acct-02", "acct-03", "acct-04"]  # +15, +20, +25 m
    assert [e.reconnect_token_at for e in sorted(following, key=lambda e: e.account_id)] == [
        NOW + timedelta(minutes=m) for m in (15, 20, 25)
    ]
    everything = await storage.schedule_entries(NOW + timedelta(days=1))
    assert ids(everything) == [f"acct-{n:02d}" for n in range(12)]
