"""PKCE (RFC 7636) with S256: a verifier per authorization, and its challenge. No I/O.

The verifier stays with us (encrypted in the OAuth state's row) and goes only to
the token endpoint with the code; the authorization URL carries its challenge.
A code intercepted on its way back to the callback is then useless to anyone
without the verifier (RFC 9700, 2.1.1).
"""

from __future__ import annotations

import base64
import hashlib
import secrets

METHOD = "S256"


def new_verifier() -> str:
    """64 characters of base64url (RFC 7636 wants 43 to 128 unreserved characters)."""
    return secrets.token_urlsafe(48)


def challenge(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(verifier)))`` without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
