"""Schema 3: OAuth states kept as hashes, PKCE verifiers bound to their row, the pending
cap, and finding an account by its (encrypted) realm, across an upgrade and key rotation."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from qbo_daemon.core.errors import OAuthStateError, RealmConflictError
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.repository import RealmPolicy, Storage
from qbo_daemon.store.schema import SCHEMA_VERSION, sha256_hex
from qbo_daemon.store.states import answer_hash
from tests.store.test_repository import NOW, REALM, build_version_1, query, tokens
from tests.store.writes import POLICY

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
