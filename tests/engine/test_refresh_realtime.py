"""A live daemon on the real clocks refreshes short-lived tokens again and again."""

from __future__ import annotations

import itertools
from datetime import timedelta

from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.crypto import Cipher, EncryptionKey
from qbo_daemon.store.repository import Storage
from tests.conftest import StartDaemon
from tests.harness import attempts, wait_for

EXPIRES_IN = 2  # seconds an access token lives
LEAD = 1.0  # seconds before expiry a refresh is due
REFRESHES = 4


async def test_consecutive_real_refreshes_rotate_and_persist(
    simulator: IntuitSimulator, daemon_factory: StartDaemon
) -> None:
    simulator.settings.update(expires_in=EXPIRES_IN, rotate_after=0)
    running = await daemon_factory(lead=f"{LEAD:g}s")
    assert await running.connect("acme") == 200

    def refreshes() -> int:
        return sum(1 for e in simulator.request_log if e.grant_type == "refresh_token")

    await wait_for(lambda: refreshes() >= REFRESHES, timeout=30)
    await running.shutdown()  # drains a refresh in flight

    calls = [e for e in simulator.request_log if e.endpoint == "token"]
    assert calls[0].grant_type == "authorization_code"
    newest = calls[0].issued_refresh_token
    for previous, call in itertools.pairwise(calls):
        assert (call.grant_type, call.status) == ("refresh_token", 200)
        # Rotation on every answer: only the newest refresh token is ever presented.
        assert call.presented_refresh_token == newest
        newest = call.issued_refresh_token
        # Due at expires_in - lead after the previous one was sent: not early, not late.
        gap = call.at - previous.at
        assert timedelta(seconds=EXPIRES_IN - LEAD - 0.1) <= gap <= timedelta(seconds=5), gap

    storage = await Storage.open(
        running.database, Cipher([EncryptionKey.from_text(running.encryption_key)])
    )
    try:
        stored = await storage.load("acme")
    finally:
        await storage.close()
    refreshed = len(calls) - 1
    assert refreshed >= REFRESHES
    assert stored.refresh_token == newest
    assert stored.version == 1 + refreshed  # every refresh was written
    assert [a.outcome for a in attempts(running.database, "acme")] == ["success"] * refreshed
    # The newest access token too: it expires expires_in after the last call was sent.
    assert stored.access_token
    assert stored.token_expires_at is not None
    sent = stored.token_expires_at - timedelta(seconds=EXPIRES_IN)
    assert calls[-1].at - timedelta(seconds=1) <= sent <= calls[-1].at
