"""What the CLI test modules share: one ``qbo-daemon simulator`` subprocess per module."""

from __future__ import annotations

from tests.cli.test_commands import simulator as simulator
