"""What every command shares: exit codes, the one-line error, reading the configuration."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qbo_daemon.config.load import Config, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"qbo-daemon: error: {message}", file=sys.stderr)
    return code


def read_config(args: argparse.Namespace) -> Config:
    path: Path | None = getattr(args, "config", None)
    return load_config(path, os.environ)
