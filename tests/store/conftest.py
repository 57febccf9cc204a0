"""Fixtures for the storage tests: keys, and each backend with a storage open on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from tests.pg import fresh_database
from tests.store.backends import AnyStorage, Backend, PostgresBackend, SqliteBackend


@pytest.fixture
def key_a() -> EncryptionKey:
    return EncryptionKey.from_text(generate_key())


@pytest.fixture
def key_b() -> EncryptionKey:
    return EncryptionKey.from_text(generate_key())


@pytest.fixture
def cipher(key_a: EncryptionKey) -> Cipher:
    return Cipher([key_a])


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each backend in turn: an SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        (tmp_path / "data").mkdir()  # a database in a missing directory is refused
        yield SqliteBackend(tmp_path / "data" / "qbo.sqlite3")
        return
    async with fresh_database() as url:
        yield PostgresBackend(url)


@pytest.fixture
async def storage(backend: Backend, cipher: Cipher) -> AsyncIterator[AnyStorage]:
    """A storage open on ``backend``, closed after the test."""
    opened = await backend.open(cipher)
    try:
        yield opened
    finally:
        await opened.close()
