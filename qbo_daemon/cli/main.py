"""The ``qbo-daemon`` command: the only ``asyncio.run``; errors become exit codes.

A user's mistake (bad configuration, daemon already running, wrong key) is
one clear line on stderr and exit status 2 or 1, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from qbo_daemon import __version__
from qbo_daemon.cli.common import (
    CONFIG_HELP,
    EXIT_BROKEN_PIPE,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    read_config,
)
from qbo_daemon.cli.preflight import preflight
from qbo_daemon.config.load import Config, load_config
from qbo_daemon.config.render import render_config
from qbo_daemon.core.errors import ConfigError, QboDaemonError
from qbo_daemon.runtime.daemon import Daemon
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.runtime.loop import loop_factory
from qbo_daemon.runtime.supervisor import TaskDiedError
from qbo_daemon.store.crypto import generate_key

log = structlog.get_logger("qbo_daemon.cli.main")
Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "func", None)
    if command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        code = command(args)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        return quiet_broken_pipe()
    except ConfigError as exc:
        return fail(str(exc), EXIT_USAGE)
    except QboDaemonError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130


def quiet_broken_pipe() -> int:
    """Standard output's reader left (``qbo-daemon accounts list --json | head``).

    Not an error worth a line: point stdout at /dev/null so the interpreter's
    last flush does not complain either, and exit as a program killed by
    SIGPIPE would (141), which ``set -o pipefail`` still notices.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbo-daemon",
        description="Keeps the QuickBooks Online OAuth 2.0 tokens of many companies fresh.",
    )
    parser.add_argument("--version", action="version", version=f"qbo-daemon {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
        return p

    with_config(command("run", cmd_run, "run the daemon in the foreground"))
    with_config(command("check-config", cmd_check_config, "validate and print the configuration"))
    demo = command(
        "demo", cmd_demo, "run the whole loop against an embedded Intuit simulator (no credentials)"
    )
    demo.add_argument("--accounts", type=int, default=3, help="demo accounts to connect")
    demo.add_argument("--expires-in", type=int, default=60, help="access token lifetime, seconds")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--data-dir", type=Path, default=None, help="keep the database here")
    simulator = command("simulator", cmd_simulator, "run the Intuit simulator alone")
    simulator.add_argument("--host", default="127.0.0.1")
    simulator.add_argument("--port", type=int, default=8700)
    simulator.add_argument("--expires-in", type=int, default=3600)
    simulator.add_argument(
        "--rotate-after", type=float, default=86_400.0, help="seconds; 0 rotates on every refresh"
    )
    simulator.add_argument("--latency", type=float, default=0.0, help="seconds per token call")
    simulator.add_argument("--client-id", default="sim-client-id")
    simulator.add_argument("--client-secret", default="sim-client-secret")

    keys = sub.add_parser("keys", help="encryption keys", description="encryption keys")
    keys.set_defaults(func=lambda _: _usage(keys))
    keys_sub = keys.add_subparsers(metavar="ACTION")
    generate = keys_sub.add_parser("generate", help="print a new encryption key")
    generate.set_defaults(func=cmd_keys_generate)

    from qbo_daemon.cli.export import register as register_export
    from qbo_daemon.cli.manage import register
    from qbo_daemon.cli.migrate import register as register_migrate

    register(sub, keys_sub)
    register_export(sub)
    register_migrate(sub)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def cmd_check_config(args: argparse.Namespace) -> int:
    """The effective configuration, then every problem ``run`` would find (the same checks)."""
    config = read_config(args)
    print(render_config(config), end="")
    findings = preflight(config)
    for finding in findings:
        print(f"qbo-daemon: {finding.severity}: {finding}", file=sys.stderr)
    errors = sum(1 for f in findings if f.is_error)
    source = config.source or "defaults"
    if errors:
        print(f"# {errors} error(s) in {source}: `run` would refuse to start", file=sys.stderr)
        return EXIT_USAGE
    warned = f", {len(findings)} warning(s)" if findings else ""
    print(f"# configuration OK ({source}{warned})", file=sys.stderr)
    return EXIT_OK


def cmd_keys_generate(args: argparse.Namespace) -> int:
    print(generate_key())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    config = read_config(args)
    findings = preflight(config)  # what check-config reports, refused before anything starts
    errors = [f for f in findings if f.is_error]
    for finding in errors:
        fail(str(finding), EXIT_USAGE)
    if errors:
        return EXIT_USAGE
    configure_logging(config.log.format, config.log.level)
    for finding in findings:
        log.warning("config.setting_flagged", setting=finding.setting, detail=finding.message)
    path = config.source  # the file found, so a reload reads the same one
    name, factory = loop_factory()
    log.info("loop.selected", loop=name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(config, lambda: load_config(path, os.environ)))


async def serve(config: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run a daemon until SIGTERM or SIGINT; SIGHUP re-reads the configuration.

    A second SIGTERM or SIGINT while the daemon stops exits at once, abandoning
    the drain (status 128 + the signal's number). Exit status: 0 after a
    requested stop; 2 for a configuration error (a listen address in use
    among them), which restarting cannot fix; 1 for anything else, a
    supervised task that died included, so that systemd restarts the daemon.
    """
    daemon = Daemon(config, environ=os.environ)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("daemon.signal_received", signal=sig.name)
            stop.set()
            return
        services = daemon.services
        log.warning(
            "daemon.exit_forced",
            signal=sig.name,
            refreshes_abandoned=services.scheduler.in_flight if services else None,
            detail="a second signal: the shutdown is cut short; a refresh in flight may "
            "lose a refresh token Intuit has already rotated",
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload, reload)
    try:
        await daemon.run(stop)
    except TaskDiedError as exc:
        return fail(str(exc))  # the task's end is already logged, at critical level
    except ConfigError as exc:
        log.error("daemon.failed", error=str(exc))
        return fail(str(exc), EXIT_USAGE)
    except QboDaemonError as exc:
        log.error("daemon.failed", error=str(exc))
        return fail(str(exc))
    except OSError as exc:
        log.error("daemon.failed", error=str(exc))
        return fail(str(exc))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from qbo_daemon.cli.demo import run_demo

    configure_logging("auto", "info")
    return asyncio.run(
        run_demo(
            accounts=args.accounts,
            expires_in=args.expires_in,
            duration=args.duration,
            data_dir=args.data_dir,
        )
    )


def cmd_simulator(args: argparse.Namespace) -> int:
    from qbo_daemon.simulator.app import SimulatorSettings, serve_simulator

    configure_logging("auto", "info")
    settings = SimulatorSettings(
        client_id=args.client_id,
        client_secret=args.client_secret,
        expires_in=args.expires_in,
        rotate_after=args.rotate_after,
        latency=args.latency,
    )

    async def go() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_simulator(args.host, args.port, settings, stop)
        return EXIT_OK

    return asyncio.run(go())
