"""``accounts show`` says when Intuit has not confirmed an account's company yet."""

from __future__ import annotations

from datetime import UTC, datetime

from qbo_daemon.cli.render import account_details

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def realm_line(**account: object) -> str:
    text = account_details({"account_id": "acme", "status": "active", **account}, NOW)
    [line] = [line for line in text.splitlines() if line.lstrip().startswith("realm id")]
    return line


def test_an_unconfirmed_realm_is_flagged() -> None:
    assert realm_line(realm_id="4620816365", realm_verified=False).endswith(
        "4620816365  (not yet confirmed by Intuit; checked again after each refresh)"
    )
    assert realm_line(realm_id="4620816365", realm_verified=True).endswith(" 4620816365")
    assert realm_line(realm_id="4620816365").endswith(" 4620816365")  # an older daemon's JSON
