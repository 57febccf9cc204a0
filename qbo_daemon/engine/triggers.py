"""What started a refresh: named on every ``refresh.*`` log line of the attempt."""

from __future__ import annotations

from typing import Literal

# Its timer, a timer overdue at start-up, an import that left the access token dead,
# the token API (a token read or POST .../refresh), or the CLI (through that API).
Trigger = Literal["scheduled", "catch_up", "import", "api", "cli"]
