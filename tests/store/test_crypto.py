from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qbo_daemon.core.errors import CryptoError, DecryptionError, MissingKeyError
from qbo_daemon.store.crypto import NONCE_SIZE, Cipher, EncryptionKey, generate_key

KEY_A = EncryptionKey(bytes(range(32)))
KEY_B = EncryptionKey(bytes(range(100, 132)))
PLACE = {"table": "accounts", "column": "refresh_token", "row_key": "acct-1"}


def _blob(ciphertext: str) -> bytes:
    data = ciphertext.split(".")[2]
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _with_blob(ciphertext: str, blob: bytes) -> str:
    version, key_id, _ = ciphertext.split(".")
    return f"{version}.{key_id}.{base64.urlsafe_b64encode(blob).decode().rstrip('=')}"


def test_round_trip() -> None:
    cipher = Cipher([KEY_A])
    token = cipher.encrypt("AB11.refresh-token-value", **PLACE)
    assert token.startswith(f"v1.{KEY_A.key_id}.")
    assert "refresh-token-value" not in token
    assert cipher.decrypt(token, **PLACE) == "AB11.refresh-token-value"


@given(st.text())
def test_round_trip_any_text(plaintext: str) -> None:
    cipher = Cipher([KEY_A])
    assert cipher.decrypt(cipher.encrypt(plaintext, **PLACE), **PLACE) == plaintext


def test_generated_key_round_trips_and_id_is_derived() -> None:
    text = generate_key()
    key = EncryptionKey.from_text(text)
    secret = base64.urlsafe_b64decode(text)
    assert len(secret) == 32
    assert key.secret == secret
    expected = hashlib.sha256(b"qbo-daemon key id\0" + secret).hexdigest()[:12]
    assert key.key_id == expected
    assert EncryptionKey.from_text(text.rstrip("=") + "\n") == key
    assert generate_key() != text


def test_swapped_row_fails() -> None:
    cipher = Cipher([KEY_A])
    token = cipher.encrypt("PLAINTEXT-XYZ", **PLACE)
    with pytest.raises(DecryptionError) as info:
        cipher.decrypt(token, table="accounts", column="refresh_token", row_key="acct-2")
    message = str(info.value)
    assert "failed authentication" in message
    assert "accounts.refresh_token" in message
    assert "acct-2" in message
    assert "PLAINTEXT-XYZ" not in message
    assert token.split(".")[2][:16] not in message


def test_swapped_column_fails() -> None:
    cipher = Cipher([KEY_A])
    token = cipher.encrypt("secret", **PLACE)
    with pytest.raises(DecryptionError, match=r"accounts\.access_token"):
        cipher.decrypt(token, table="accounts", column="access_token", row_key="acct-1")


def test_swapped_table_fails() -> None:
    cipher = Cipher([KEY_A])
    token = cipher.encrypt("secret", **PLACE)
    with pytest.raises(DecryptionError):
        cipher.decrypt(token, table="oauth_states", column="refresh_token", row_key="acct-1")


@pytest.mark.parametrize("index", [0, NONCE_SIZE - 1, NONCE_SIZE, -17, -1])
def test_flipped_byte_fails(index: int) -> None:
    cipher = Cipher([KEY_A])
    token = cipher.encrypt("the refresh token", **PLACE)
    blob = bytearray(_blob(token))
    blob[index] ^= 0x01
    with pytest.raises(DecryptionError, match="failed authentication"):
        cipher.decrypt(_with_blob(token, bytes(blob)), **PLACE)


def test_truncated_and_garbled_values_fail() -> None:
    cipher = Cipher([KEY_A])
    token = cipher.encrypt("x", **PLACE)
    with pytest.raises(DecryptionError, match="too short"):
        cipher.decrypt(_with_blob(token, _blob(token)[:20]), **PLACE)
    with pytest.raises(DecryptionError, match="not base64"):
        cipher.decrypt(f"v1.{KEY_A.key_id}.***", **PLACE)
    for bad in ["", "plaintext-token", "v2." + token[3:], token + ".x", "v1.XYZ.abcd"]:
        with pytest.raises(DecryptionError, match="not a qbo-daemon ciphertext"):
            cipher.decrypt(bad, **PLACE)


def test_key_id_is_bound_into_associated_data() -> None:
    cipher = Cipher([KEY_A, KEY_B])
    token = cipher.encrypt("secret", **PLACE)
    relabelled = token.replace(KEY_A.key_id, KEY_B.key_id)
    with pytest.raises(DecryptionError):
        cipher.decrypt(relabelled, **PLACE)


def test_unknown_key_id_names_it() -> None:
    token = Cipher([KEY_B]).encrypt("secret", **PLACE)
    with pytest.raises(MissingKeyError) as info:
        Cipher([KEY_A]).decrypt(token, **PLACE)
    assert info.value.key_id == KEY_B.key_id
    assert KEY_B.key_id in str(info.value)
    assert isinstance(info.value, CryptoError)


def test_rotation_first_key_encrypts_all_decrypt() -> None:
    old = Cipher([KEY_A])
    stored = old.encrypt("old value", **PLACE)

    rotated = Cipher([KEY_B, KEY_A])
    assert rotated.primary_key_id == KEY_B.key_id
    assert rotated.key_ids == (KEY_B.key_id, KEY_A.key_id)
    assert rotated.decrypt(stored, **PLACE) == "old value"
    assert Cipher.key_id_of(stored) == KEY_A.key_id

    fresh = rotated.encrypt("old value", **PLACE)
    assert Cipher.key_id_of(fresh) == KEY_B.key_id
    assert rotated.decrypt(fresh, **PLACE) == "old value"
    with pytest.raises(MissingKeyError):
        old.decrypt(fresh, **PLACE)


def test_duplicate_keys_collapse_and_empty_is_refused() -> None:
    cipher = Cipher([KEY_A, KEY_B, EncryptionKey(KEY_A.secret)])
    assert cipher.key_ids == (KEY_A.key_id, KEY_B.key_id)
    with pytest.raises(ValueError, match="at least one"):
        Cipher([])


def test_nonces_differ_for_same_plaintext() -> None:
    cipher = Cipher([KEY_A])
    tokens = {cipher.encrypt("same", **PLACE) for _ in range(50)}
    assert len(tokens) == 50
    nonces = {_blob(token)[:NONCE_SIZE] for token in tokens}
    assert len(nonces) == 50
    assert all(len(nonce) == 12 for nonce in nonces)


def test_key_id_of_rejects_foreign_text() -> None:
    with pytest.raises(DecryptionError):
        Cipher.key_id_of("gAAAAABfernet-token")


def test_repr_hides_key_bytes() -> None:
    text = generate_key()
    key = EncryptionKey.from_text(text)
    cipher = Cipher([key])
    for shown in (repr(key), str(key), repr(cipher), repr([key])):
        assert text not in shown
        assert text.rstrip("=") not in shown
        assert repr(key.secret) not in shown
        assert key.secret.hex() not in shown
    assert key.key_id in repr(key)


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all: s3cr3t-value!",
        "c2hvcnQta2V5LXNlY3JldA",  # valid base64, 16 bytes
        base64.urlsafe_b64encode(bytes(33)).decode(),
        base64.b64encode(b"\xfb" * 32).decode(),  # standard alphabet, not url-safe
        "",
    ],
)
def test_from_text_errors_do_not_echo_input(text: str) -> None:
    with pytest.raises(ValueError, match="encryption key") as info:
        EncryptionKey.from_text(text)
    message = str(info.value)
    if text:
        assert text not in message
        assert text.strip("=")[:8] not in message
    assert "keys generate" in message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        EncryptionKey(bytes(16))
