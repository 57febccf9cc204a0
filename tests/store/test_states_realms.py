"""Schema 3: OAuth states kept as hashes, PKCE verifiers bound to their row, the pending
cap, and finding an account by its (encrypted) realm, across an upgrade and key rotation."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from qbo_daemon.core.errors import DecryptionError, OAuthStateError, RealmConflictError
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.repository import RealmPolicy, Storage
from qbo_daemon.store.schema import SCHEMA_VERSION, sha256_hex
from qbo_daemon.store.states import MAX_PENDING, answer_hash
from tests.store.test_repository import NOW, REALM, build_version_1, query, tokens
from tests.store.writes import POLICY, save_refresh

TTL = timedelta(minutes=10)
OTHER_REALM = "REALM-9130357766806786"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()  # a database in a missing directory is refused
    return tmp_path / "data" / "qbo.sqlite3"


@pytest.fixture
def key() -> EncryptionKey:
    return EncryptionKey.from_text(generate_key())


@pytest.fixture
async def storage(db_path: Path, key: EncryptionKey) -> AsyncIterator[Storage]:
    store = await Storage.open(db_path, Cipher([key]))
    try:
        yield store
    finally:
        await store.close()


async def save(
    storage: Storage, account_id: str, realm_id: str, **policy: bool
) -> tuple[object, str | None]:
    connected = POLICY.connected(account_id, realm_id, tokens(), now=NOW)
    return await storage.upsert_checked_connection(connected, RealmPolicy(**policy))


def database_bytes(path: Path) -> bytes:
    files = [path, path.with_name(path.name + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


# -- the upgrade ------------------------------------------------------------------------------


async def test_an_older_database_keeps_its_states_only_as_hashes_and_its_realms_findable(
    db_path: Path, key: EncryptionKey
) -> None:
    cipher = Cipher([key])
    build_version_1(db_path, cipher)  # legacy-1 holds REALM; 'old-state' is pending
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute(
            "INSERT INTO oauth_states (state, account_id, created_at, expires_at, used_at) "
            "VALUES ('used-old-state', 'legacy-3', ?, ?, ?)",
            ("2025-03-01T11:55:00.000000Z", "2025-03-01T12:05:00.000000Z", "2025-03-01T11:56Z"),
        )
    assert b"old-state" in database_bytes(db_path)

    storage = await Storage.open(db_path, cipher)
    try:
        assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert b"old-state" not in database_bytes(db_path)
        hashes = {r[0] for r in query(db_path, "SELECT state_hash FROM oauth_states")}
        assert hashes == {sha256_hex("old-state"), sha256_hex("used-old-state")}
        # Rows from before count as confirmed, and have the digest that finds their realm.
        assert query(db_path, "SELECT realm_verified FROM accounts") == [(1,)]
        [(digest,)] = query(db_path, "SELECT realm_digest FROM accounts")
        assert digest.startswith(f"{key.key_id}.")
        assert REALM.encode() not in database_bytes(db_path)
        assert (await storage.load("legacy-1")).realm_verified is True

        # The pending state still completes its connect flow; the used one answers nothing.
        claim = await storage.consume_state("old-state", answer_hash("c", None), now=NOW)
        assert claim.account_id == "legacy-2"
        with pytest.raises(OAuthStateError) as used:
            await storage.consume_state("used-old-state", answer_hash("c", None), now=NOW)
        assert used.value.reason == "used"

        # The old account holds its company against a new account id.
        with pytest.raises(RealmConflictError) as shared:
            await save(storage, "newcomer", REALM)
        assert (shared.value.reason, shared.value.holder) == ("shared", "legacy-1")
        assert [r[0] for r in query(db_path, "SELECT account_id FROM accounts")] == ["legacy-1"]
    finally:
        await storage.close()


# -- finding an account by its realm -------------------------------------------------------


async def test_the_realm_rules_decide_inside_the_write(storage: Storage, db_path: Path) -> None:
    await save(storage, "acme", REALM)
    before = query(db_path, "SELECT * FROM accounts")

    with pytest.raises(RealmConflictError) as shared:
        await save(storage, "beta", REALM)
    assert shared.value.reason == "shared"
    with pytest.raises(RealmConflictError) as changed:
        await save(storage, "acme", OTHER_REALM)
    assert changed.value.reason == "changed"
    assert query(db_path, "SELECT * FROM accounts") == before

    _, previous = await save(storage, "acme", REALM)  # the same company: no question
    assert previous is None
    _, previous = await save(storage, "acme", OTHER_REALM, allow_change=True)
    assert previous == REALM
    _, previous = await save(storage, "beta", REALM)  # acme let go of it
    assert previous is None
    _, previous = await save(storage, "gamma", REALM, allow_shared=True)
    assert previous is None
    assert query(db_path, "SELECT COUNT(*) FROM accounts") == [(3,)]


async def test_a_realm_is_found_whatever_key_wrote_it(
    storage: Storage, db_path: Path, key: EncryptionKey
) -> None:
    await save(storage, "acme", REALM)
    new_key = EncryptionKey.from_text(generate_key())

    # Mid-rotation: the new key encrypts, the old digest is still found.
    storage.use_cipher(Cipher([new_key, key]))
    with pytest.raises(RealmConflictError):
        await save(storage, "beta", REALM)

    # Re-encrypted, the digest moves to the new key with the realm...
    assert await storage.reencrypt() == (1, 0)
    [(digest,)] = query(db_path, "SELECT realm_digest FROM accounts")
    assert digest.startswith(f"{new_key.key_id}.")
    # ...so the old key can go.
    storage.use_cipher(Cipher([new_key]))
    with pytest.raises(RealmConflictError):
        await save(storage, "beta", REALM)

    # A refresh rewrites the realm under the primary key, and its digest with it.
    storage.use_cipher(Cipher([key, new_key]))
    account = await storage.load("acme")
    await save_refresh(storage, account, tokens("A2", "R2"), now=NOW)
    [(digest,)] = query(db_path, "SELECT realm_digest FROM accounts")
    assert digest.startswith(f"{key.key_id}.")
    storage.use_cipher(Cipher([key]))
    with pytest.raises(RealmConflictError):
        await save(storage, "beta", REALM)


def test_a_digest_depends_on_the_key_and_the_purpose() -> None:
    one, two = (EncryptionKey.from_text(generate_key()) for _ in range(2))
    a, b = Cipher([one]), Cipher([two])
    assert a.digest(REALM, purpose="p") == a.digest(REALM, purpose="p")
    assert a.digest(REALM, purpose="p") != b.digest(REALM, purpose="p")
    assert a.digest(REALM, purpose="p") != a.digest(REALM, purpose="q")
    assert REALM not in a.digest(REALM, purpose="p")
    assert Cipher([two, one]).digests(REALM, purpose="p") == (
        b.digest(REALM, purpose="p"),
        a.digest(REALM, purpose="p"),
    )


# -- states ----------------------------------------------------------------------------------


async def test_a_verifier_is_encrypted_and_bound_to_its_state(
    storage: Storage, db_path: Path
) -> None:
    verifier = "v" * 64
    await storage.create_state("state-one", "acme", now=NOW, ttl=TTL, code_verifier=verifier)
    await storage.create_state("state-two", "acme", now=NOW, ttl=TTL, code_verifier="w" * 64)
    assert verifier.encode() not in database_bytes(db_path)

    # Moved to another state's row, it does not decrypt, and that state stays unused.
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute(
            "UPDATE oauth_states SET code_verifier = (SELECT code_verifier FROM oauth_states "
            "WHERE state_hash = ?) WHERE state_hash = ?",
            (sha256_hex("state-one"), sha256_hex("state-two")),
        )
    with pytest.raises(DecryptionError):
        await storage.consume_state("state-two", answer_hash("c", None), now=NOW)
    assert query(
        db_path, "SELECT used_at FROM oauth_states WHERE state_hash = ?", (sha256_hex("state-two"),)
    ) == [(None,)]

    claim = await storage.consume_state("state-one", answer_hash("c", None), now=NOW)
    assert claim.code_verifier == verifier
    assert verifier not in repr(claim)


async def test_pending_states_are_capped_per_account(storage: Storage, db_path: Path) -> None:
    await storage.create_state("expired-one", "acme", now=NOW - TTL * 2, ttl=TTL)
    await storage.create_state("used-one", "acme", now=NOW, ttl=TTL)
    await storage.consume_state("used-one", answer_hash("c", None), now=NOW)
    await storage.create_state("beta-one", "beta", now=NOW, ttl=TTL)

    dropped = [
        await storage.create_state(f"acme-{n:02d}", "acme", now=NOW, ttl=TTL)
        for n in range(MAX_PENDING + 3)
    ]

    assert dropped == [0] * MAX_PENDING + [1, 1, 1]
    pending = query(
        db_path,
        "SELECT state_hash FROM oauth_states WHERE account_id = 'acme' AND used_at IS NULL "
        "AND expires_at > ?",
        ("2025-03-01T12:00:00.000000Z",),
    )
    assert {r[0] for r in pending} == {
        sha256_hex(f"acme-{n:02d}") for n in range(3, MAX_PENDING + 3)
    }
    # Neither the used nor the expired state, nor another account's, was counted or dropped.
    kept = {r[0] for r in query(db_path, "SELECT state_hash FROM oauth_states")}
    assert {sha256_hex(s) for s in ("expired-one", "used-one", "beta-one")} <= kept
