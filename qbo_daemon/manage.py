"""Management commands that talk to the running daemon (filled in by the API issue)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, keys_sub: Any) -> None:
    """Add the management commands to the ``qbo-daemon`` parser."""
    _ = (sub, keys_sub, argparse)
