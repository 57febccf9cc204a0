"""What every command shares: exit codes, the one-line error, reading the configuration."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qbo_daemon.config.load import Config, load_config
from qbo_daemon.config.locate import DEFAULT_CONFIG_PATH, ENV_CONFIG, locate_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away

CONFIG_HELP = f"the TOML configuration file (default: ${ENV_CONFIG}, else {DEFAULT_CONFIG_PATH})"


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"qbo-daemon: error: {message}", file=sys.stderr)
    return code


def read_config(args: argparse.Namespace) -> Config:
    """``--config``, else ``$QBO_DAEMON_CONFIG``, else ``/etc/qbo-daemon/config.toml``."""
    given: Path | None = getattr(args, "config", None)
    return load_config(locate_config(given, os.environ), os.environ)
