"""The refresh policy's own rules, on plain values (no daemon needed)."""

from __future__ import annotations

from datetime import timedelta

from tests.store.test_repository import NOW, REALM, tokens
from tests.store.writes import POLICY

HARD = NOW + timedelta(days=5 * 365)


def test_a_hard_expiry_that_did_not_move_is_kept_and_one_that_moved_is_taken() -> None:
    # Intuit counts the 5-year limit down in whole seconds: the same instant comes back
    # a fraction of a second off on each refresh, and rewriting it rewrites its index.
    account = POLICY.connected("acme", REALM, tokens(hard=HARD), now=NOW)
    assert account.refresh_token_hard_expires_at == HARD
    later = NOW + timedelta(minutes=50)
    jittered = POLICY.refreshed(
        account, tokens(at=later, hard=HARD + timedelta(milliseconds=700)), now=later
    )
    assert jittered.refresh_token_hard_expires_at == HARD
    moved = POLICY.refreshed(account, tokens(at=later, hard=HARD + timedelta(days=1)), now=later)
    assert moved.refresh_token_hard_expires_at == HARD + timedelta(days=1)
    unsaid = POLICY.refreshed(account, tokens(at=later), now=later)
    assert unsaid.refresh_token_hard_expires_at == HARD  # an answer without it keeps it
