"""Two benchmark runs side by side: ``python -m bench.compare BEFORE.json AFTER.json``.

Reads the JSON files ``python -m bench`` wrote (one per code version, run on the
same machine in one sitting) and prints a Markdown table of the figures that
matter for a change to the refresh path: lateness, memory, start-up, the
catch-up storms beside the bare client (at 0 ms also beside the bare client
held to the daemon's rate), the floor (``bench.floor``), and the cron batches. With
``--write-docs`` it also puts that table into docs/performance.md between
``<!-- bench-compare:begin -->`` and ``<!-- bench-compare:end -->`` (with
``--block NAME``, between ``<!-- bench-compare:NAME:begin -->`` and its ``end``,
so that a second pair of runs can stand beside the first), so the document
shows what the runs measured and nothing typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.report import DOC, cpu_over, floor_name, paced_for, runs_by_place, write_block

Row = tuple[str, str, str]


def rows(before: dict[str, Any], after: dict[str, Any]) -> list[Row]:
    """(figure, before, after) for every figure both runs have."""
    out: list[Row] = []

    def add(label: str, b: float | None, a: float | None, fmt: str) -> None:
        if b is None and a is None:
            return
        out.append(
            (label, "-" if b is None else format(b, fmt), "-" if a is None else format(a, fmt))
        )

    def lateness(run: dict[str, Any]) -> float | None:
        phase = run.get("lateness_phase") or {}
        departure = phase.get("lateness", {}).get("departure_ms", {})
        return _number(departure.get("p99"))

    def memory(run: dict[str, Any]) -> float | None:
        return _number((run.get("lateness_phase") or {}).get("memory", {}).get("peak_rss_mib"))

    def scheduled(run: dict[str, Any]) -> float | None:
        return _number((run.get("lateness_phase") or {}).get("startup", {}).get("to_scheduled_s"))

    add("lateness p99 (ms)", lateness(before), lateness(after), ".2f")
    add("peak RSS (MiB)", memory(before), memory(after), ".1f")
    add("start-up to all scheduled (s)", scheduled(before), scheduled(after), ".2f")
    for key in sorted(_storm_keys(before) | _storm_keys(after)):
        latency, concurrency, loop = key
        b, a = _storm(before, key), _storm(after, key)
        name = f"storm {latency:g} ms, c{concurrency}, {loop}"
        add(f"{name}: refreshes/s", _get(b, "rate_per_s"), _get(a, "rate_per_s"), ".0f")
        add(f"{name}: CPU s per 1000", _get(b, "cpu_per_1000_s"), _get(a, "cpu_per_1000_s"), ".3f")
        add(
            f"{name}: CPU / bare client's",
            _ratio(before, b, latency, concurrency),
            _ratio(after, a, latency, concurrency),
            ".2f",
        )
        add(
            f"{name}: CPU / bare client's at the same rate",
            _same_rate_ratio(before, b),
            _same_rate_ratio(after, a),
            ".2f",
        )
    for floor_key in sorted(_floor_keys(before) | _floor_keys(after)):
        latency, concurrency, name = floor_key
        b, a = _floor(before, floor_key), _floor(after, floor_key)
        add(
            f"{name}, {latency:g} ms, c{concurrency}: CPU / bare client's",
            _ratio(before, b, latency, concurrency),
            _ratio(after, a, latency, concurrency),
            ".2f",
        )
    for run_key in sorted(_cron_keys(before) | _cron_keys(after)):
        latency, workers = run_key
        add(
            f"cron {latency:g} ms, {workers} thread(s): refreshes/s",
            _get(_cron(before, run_key), "rate_per_s"),
            _get(_cron(after, run_key), "rate_per_s"),
            ".1f",
        )
    return out


def markdown(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str]) -> str:
    m = after.get("machine", {})
    # A run records its command since the bench learnt to; older ones say nothing.
    commands = [run.get("command") for run in (before, after)]
    if commands[0] and commands[0] == commands[1]:
        run_by = f"both run by `{commands[0]}`"
    elif commands[1]:
        run_by = f"both run by `python -m bench` (the second: `{commands[1]}`)"
    else:
        run_by = "both run by `python -m bench`"
    lines = [
        f"Written by `python -m bench.compare --write-docs`: {names[0]} against {names[1]}, "
        f"{run_by} on {m.get('cores')} cores ({m.get('cpu')}), "
        f"Python {m.get('python')}, load average at the start "
        f"{_load(before)} and {_load(after)}.",
        "",
        "| figure | before | after |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {label} | {b} | {a} |" for label, b, a in rows(before, after)]
    return "\n".join(lines) + "\n"


def write_docs(text: str, doc: Path = DOC, block_name: str | None = None) -> None:
    """The table between ``bench-compare`` markers (``bench-compare:NAME`` with a name)."""
    name = "compare" if block_name is None else f"compare:{block_name}"
    heading = "## Before and after\n\n" if block_name is None else ""
    write_block(name, text, doc, heading=heading)


def _storm_keys(run: dict[str, Any]) -> set[tuple[float, int, str]]:
    return {(s["latency_ms"], s["concurrency"], s.get("loop", "asyncio")) for s in run["storms"]}


def _storm(run: dict[str, Any], key: tuple[float, int, str]) -> dict[str, Any] | None:
    for s in run["storms"]:
        if (s["latency_ms"], s["concurrency"], s.get("loop", "asyncio")) == key:
            found: dict[str, Any] = s
            return found
    return None


def _same_rate_ratio(run: dict[str, Any], storm: dict[str, Any] | None) -> float | None:
    """``storm``'s CPU per refresh over the bare client's held to its rate, if run."""
    paced = paced_for(runs_by_place(run, "ceilings_at_rate"), storm) if storm else None
    return cpu_over(storm, paced)


def _ratio(
    run: dict[str, Any], storm: dict[str, Any] | None, latency: float, concurrency: int
) -> float | None:
    """``storm``'s CPU per refresh over the bare client's at the same place."""
    return cpu_over(storm, runs_by_place(run, "ceilings").get((latency, concurrency)))


def _floor_keys(run: dict[str, Any]) -> set[tuple[float, int, str]]:
    return {(f["latency_ms"], f["concurrency"], floor_name(f)) for f in run.get("floors", [])}


def _floor(run: dict[str, Any], key: tuple[float, int, str]) -> dict[str, Any] | None:
    for f in run.get("floors", []):
        if (f["latency_ms"], f["concurrency"], floor_name(f)) == key:
            found: dict[str, Any] = f
            return found
    return None


def _cron_keys(run: dict[str, Any]) -> set[tuple[float, int]]:
    return {(c["latency_ms"], c.get("workers", 1)) for c in run.get("crons", [])}


def _cron(run: dict[str, Any], key: tuple[float, int]) -> dict[str, Any] | None:
    for c in run.get("crons", []):
        if (c["latency_ms"], c.get("workers", 1)) == key:
            found: dict[str, Any] = c
            return found
    return None


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _get(run: dict[str, Any] | None, field: str) -> float | None:
    return None if run is None else float(run[field])


def _load(run: dict[str, Any]) -> str:
    return " ".join(f"{v:.2f}" for v in run.get("load_average_start", []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--names", nargs=2, default=("before", "after"), metavar=("BEFORE", "AFTER"))
    p.add_argument("--write-docs", action="store_true", help="put the table in performance.md")
    p.add_argument(
        "--block", default=None, metavar="NAME", help="write between this block's markers"
    )
    args = p.parse_args(argv)
    before = json.loads(args.before.read_text(encoding="utf-8"))
    after = json.loads(args.after.read_text(encoding="utf-8"))
    text = markdown(before, after, tuple(args.names))
    print(text)
    if args.write_docs:
        write_docs(text, block_name=args.block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
