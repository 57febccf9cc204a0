"""Figures into verdicts, a table and a JSON file.

``python -m bench.report RESULTS.json [--write-docs] [--block NAME]`` prints a
saved run's table and, with ``--write-docs``, puts it into docs/performance.md
(block ``results`` by default), headed by the command that measured it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sqlite3
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# The goals (2 cores).
LATENESS_P99_MS = 100.0
CEILING_RATE_SHARE = 0.70
CEILING_CPU_FACTOR = 2.5
CRON_FACTOR = 30.0
RSS_MIB = 150.0
STARTUP_S = 3.0
# A simulator busier than this share of one core is taken as the bottleneck.
SIMULATOR_SATURATED = 0.85


DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def write_block(name: str, text: str, doc: Path = DOC, *, heading: str = "") -> None:
    """Put ``text`` between ``<!-- bench-NAME:begin -->`` and ``<!-- bench-NAME:end -->``.

    A block not in ``doc`` yet is added at its end, under ``heading`` if one is
    given. The figures in the docs are written by the run that measured them.
    """
    begin, end = f"<!-- bench-{name}:begin -->", f"<!-- bench-{name}:end -->"
    content = doc.read_text(encoding="utf-8")
    block = f"{begin}\n{text}{end}"
    if begin in content and end in content:
        start, stop = content.index(begin), content.index(end) + len(end)
        content = content[:start] + block + content[stop:]
    else:
        content = content.rstrip("\n") + f"\n\n{heading}{block}\n"
    doc.write_text(content, encoding="utf-8")


def measured_block(command: str, results: dict[str, Any], *, written_by: str = "") -> str:
    """A run's table for the docs, headed by the command that measured it and when."""
    when = results["started"][:16].replace("T", " ")
    written = f", written by `{written_by}`" if written_by else ""
    return f"Measured by `{command}`, {when} UTC{written}.\n\n```\n{table(results)}\n```\n"


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 (nearest rank), min, max and how many are negative (early)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]

    return {
        "n": len(ordered),
        "p50": rank(0.50),
        "p99": rank(0.99),
        "min": ordered[0],
        "max": ordered[-1],
        "early": sum(1 for v in ordered if v < 0),
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "aiohttp": metadata.version("aiohttp"),
        "aiosqlite": metadata.version("aiosqlite"),
        "cryptography": metadata.version("cryptography"),
        "uvloop": _version("uvloop"),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with its figure, its bound and whether it is met."""
    verdicts: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float, met: bool, note: str = "") -> None:
        verdicts.append({"goal": name, "value": value, "bound": bound, "met": met, "note": note})

    phase = results.get("lateness_phase")
    if phase:
        departure = phase["lateness"]["departure_ms"]
        if departure.get("n"):
            add(
                "lateness p99 (ms)",
                departure["p99"],
                LATENESS_P99_MS,
                departure["p99"] < LATENESS_P99_MS,
            )
            add("refreshes early", departure["early"], 0, departure["early"] == 0)
        add(
            "peak RSS (MiB)",
            phase["memory"]["peak_rss_mib"],
            RSS_MIB,
            phase["memory"]["peak_rss_mib"] <= RSS_MIB,
        )
        scheduled = phase["startup"]["to_scheduled_s"]
        if scheduled is not None:
            add("start-up to scheduled (s)", scheduled, STARTUP_S, scheduled <= STARTUP_S)
    ceilings = runs_by_place(results, "ceilings")
    paced_ceilings = runs_by_place(results, "ceilings_at_rate")
    for daemon in _sorted_storms(results):
        latency, concurrency, loop = daemon["latency_ms"], daemon["concurrency"], _loop(daemon)
        bare = ceilings.get((latency, concurrency))
        if latency != 0 or bare is None:
            continue
        share = daemon["rate_per_s"] / bare["rate_per_s"]
        factor = daemon["cpu_per_1000_s"] / bare["cpu_per_1000_s"]
        note = _saturation(daemon, bare)
        add(
            f"c{concurrency} 0 ms {loop}: rate / ceiling",
            share,
            CEILING_RATE_SHARE,
            share >= CEILING_RATE_SHARE,
            note,
        )
        notes = []
        least = floors_at(results, latency, concurrency)
        if least:
            notes.append(f"the floor: {least[0]['cpu_per_1000_s'] / bare['cpu_per_1000_s']:.2f}")
        paced = paced_for(paced_ceilings, daemon)
        if paced:
            cpu = daemon["cpu_per_1000_s"] / paced["cpu_per_1000_s"]
            notes.append(f"daemon / bare client at the daemon's rate: {cpu:.2f}")
        add(
            f"c{concurrency} 0 ms {loop}: CPU per 1000 / ceiling",
            factor,
            CEILING_CPU_FACTOR,
            factor <= CEILING_CPU_FACTOR,
            "; ".join(notes),
        )
    crons = _crons(results)
    for daemon in _sorted_storms(results):
        cron_run = crons.get((daemon["latency_ms"], 1))
        latency, concurrency = daemon["latency_ms"], daemon["concurrency"]
        if latency == 0 or concurrency != 64 or not cron_run or not cron_run["rate_per_s"]:
            continue
        factor = daemon["rate_per_s"] / cron_run["rate_per_s"]
        add(f"c64 {latency:g} ms: rate / cron", factor, CRON_FACTOR, factor >= CRON_FACTOR)
    return verdicts


def _saturation(*runs: dict[str, Any]) -> str:
    busy = [r["who"] for r in runs if r["simulator_cpu_share"] >= SIMULATOR_SATURATED]
    return f"simulator saturated during: {', '.join(busy)}" if busy else ""


def table(results: dict[str, Any]) -> str:
    """The results as plain text, one block per measurement."""
    out: list[str] = []
    m = results["machine"]
    out.append(
        f"machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
        f"SQLite {m['sqlite']}, aiohttp {m['aiohttp']}"
    )
    out.append(f"load average at start: {_load(results['load_average_start'])}")
    build = results.get("build")
    if build:
        out.append(
            f"database: {build['accounts']} accounts, grants {build['grants_s']:.1f} s, "
            f"stored {build['store_s']:.1f} s"
        )
    phase = results.get("lateness_phase")
    if phase:
        s, mem, late = phase["startup"], phase["memory"], phase["lateness"]
        out.append("")
        load = _load(phase["load_average_before"])
        out.append(f"start-up with {phase['accounts']} accounts (load {load})")
        out.append(
            f"  imports {s['to_imported_s']:.2f} s, all scheduled {_num(s['to_scheduled_s'])} s, "
            f"ready {s['to_ready_s']:.2f} s, CPU to ready {s['cpu_to_ready_s']:.2f} s"
        )
        out.append(
            f"  RSS at ready {s['rss_at_ready_mib']:.1f} MiB, peak {mem['peak_rss_mib']:.1f} MiB "
            f"(after the lateness run; now {mem['rss_end_mib']:.1f} MiB)"
        )
        out.append(
            f"lateness: {late['due']} due over the run, {late['due_before_ready']} due before "
            f"ready, simulator {late['simulator_cpu_share']:.0%} of a core"
        )
        for label, key in (
            ("departure", "departure_ms"),
            ("at simulator", "arrival_at_simulator_ms"),
        ):
            d = late[key]
            if d.get("n"):
                out.append(
                    f"  {label:13} n={d['n']} p50 {d['p50']:.2f} ms  p99 {d['p99']:.2f} ms  "
                    f"max {d['max']:.2f} ms  min {d['min']:.2f} ms  early {d['early']}"
                )
    rows = _storm_rows(results)
    if rows:
        out.append("")
        out.append(
            "catch-up storm: overdue accounts drained (rate: refreshes/s; "
            "cpu: CPU s per 1000 refreshes; sim: simulator's share of one core)"
        )
        out.append(
            f"  {'latency':>7} {'conc':>4}  {'who':17} {'n':>6} {'rate/s':>9} {'cpu/1000':>9} "
            f"{'sim':>5}  load before"
        )
        out.extend(rows)
    out.extend(goal_lines(results.get("goals", [])))
    return "\n".join(out)


def _storm_rows(results: dict[str, Any]) -> list[str]:
    """Daemon beside ceiling per latency and concurrency, with their ratio; then cron."""
    ceilings = runs_by_place(results, "ceilings")
    paced_ceilings = runs_by_place(results, "ceilings_at_rate")
    crons = _crons(results)
    storms = _sorted_storms(results)
    rows: list[str] = []

    def row(run: dict[str, Any], who: str, n: int, concurrency: int) -> str:
        return (
            f"  {run['latency_ms']:>5.0f}ms {concurrency:>4}  {who:17} {n:>6} "
            f"{run['rate_per_s']:>9.1f} {run['cpu_per_1000_s']:>9.3f} "
            f"{run['simulator_cpu_share']:>5.0%}  {_load(run['load_average_before'])}"
        )

    def ratio(label: str, rate: float, cpu: float | None = None) -> str:
        cpu_text = f" {cpu:>8.1f}x" if cpu is not None else ""
        return f"  {'':>7} {'':>4}  {label:17} {'':>6} {rate:>8.1f}x{cpu_text}"

    latencies = sorted({s["latency_ms"] for s in storms} | {latency for latency, _ in crons})
    for latency in latencies:
        here = [s for s in storms if s["latency_ms"] == latency]
        for concurrency in sorted({s["concurrency"] for s in here}):
            bare = ceilings.get((latency, concurrency))
            paced = paced_ceilings.get((latency, concurrency))
            for daemon in (s for s in here if s["concurrency"] == concurrency):
                who = f"daemon {_loop(daemon)}"
                rows.append(row(daemon, who, daemon["refreshes_measured"], concurrency))
                same_rate = paced_for(paced_ceilings, daemon)
                for label, other in (("/ bare client", bare), ("/ bare, same rate", same_rate)):
                    if other:
                        rate = daemon["rate_per_s"] / other["rate_per_s"]
                        cpu = daemon["cpu_per_1000_s"] / other["cpu_per_1000_s"]
                        rows.append(
                            f"  {'':>7} {'':>4}  {label:17} {'':>6} {rate:>8.0%} {cpu:>8.1f}x"
                        )
                floors = floors_at(results, latency, concurrency)
                if floors:
                    cpu = daemon["cpu_per_1000_s"] / floors[0]["cpu_per_1000_s"]
                    rows.append(f"  {'':>7} {'':>4}  {'/ floor':17} {'':>6} {'':>9} {cpu:>8.1f}x")
            if bare:
                rows.append(row(bare, "bare client", bare["ok"], concurrency))
            if paced:
                rows.append(row(paced, "bare, daemon rate", paced["ok"], concurrency))
                rows.append(
                    f"  {'':>7} {'':>4}  {'':17} {'':>6} the simulator waited "
                    f"{paced['simulator_latency_ms']:.2f} ms; held to "
                    f"daemon {paced.get('paced_to_loop', 'asyncio')}'s rate"
                )
            for least in floors_at(results, latency, concurrency):
                rows.append(row(least, floor_name(least), least["ok"], concurrency))
                if bare:
                    cpu = least["cpu_per_1000_s"] / bare["cpu_per_1000_s"]
                    rows.append(
                        f"  {'':>7} {'':>4}  {'/ bare client':17} {'':>6} {'':>9} {cpu:>8.1f}x"
                    )
        for (cron_latency, workers), cron_run in sorted(crons.items()):
            if cron_latency != latency:
                continue
            rows.append(row(cron_run, f"cron {workers} thread(s)", cron_run["refreshed"], workers))
            for daemon in here:
                if cron_run["rate_per_s"] and (workers == 1 or workers == daemon["concurrency"]):
                    factor = daemon["rate_per_s"] / cron_run["rate_per_s"]
                    label = f"c{daemon['concurrency']} {_loop(daemon)} / it"
                    rows.append(ratio(label, factor))
    return rows


def runs_by_place(results: dict[str, Any], kind: str) -> dict[tuple[float, int], dict[str, Any]]:
    """The runs of ``kind`` (``ceilings``...) by their storm's latency and concurrency."""
    return {(c["latency_ms"], c["concurrency"]): c for c in results.get(kind, [])}


def paced_for(
    paced_ceilings: dict[tuple[float, int], dict[str, Any]], daemon: dict[str, Any]
) -> dict[str, Any] | None:
    """The bare client's run held to ``daemon``'s rate, if there is one (one loop's storm)."""
    paced = paced_ceilings.get((daemon["latency_ms"], daemon["concurrency"]))
    if paced is None or paced.get("paced_to_loop", "asyncio") != _loop(daemon):
        return None
    return paced


def floors_at(results: dict[str, Any], latency: float, concurrency: int) -> list[dict[str, Any]]:
    """The floor's runs at one latency and concurrency: whole first, then with parts left out."""
    here = [
        f
        for f in results.get("floors", [])
        if f["latency_ms"] == latency and f["concurrency"] == concurrency
    ]
    return sorted(here, key=lambda f: len(f.get("without", [])))


def cpu_over(run: dict[str, Any] | None, bare: dict[str, Any] | None) -> float | None:
    """``run``'s CPU per refresh over ``bare``'s; None when either is missing (or
    ``bare`` measured no CPU)."""
    if run is None or bare is None or not bare["cpu_per_1000_s"]:
        return None
    return float(run["cpu_per_1000_s"]) / float(bare["cpu_per_1000_s"])


def floor_name(run: dict[str, Any]) -> str:
    """``floor``, ``floor -read``, ``floor -read -log``: the floor less the parts it left out."""
    return " -".join(["floor", *run.get("without", [])])


def _sorted_storms(results: dict[str, Any]) -> list[dict[str, Any]]:
    storms: list[dict[str, Any]] = results.get("storms", [])
    return sorted(storms, key=lambda s: (s["latency_ms"], s["concurrency"], _loop(s)))


def _crons(results: dict[str, Any]) -> dict[tuple[float, int], dict[str, Any]]:
    """Cron runs by latency and thread count (runs from before threads count as one)."""
    return {(c["latency_ms"], c.get("workers", 1)): c for c in results.get("crons", [])}


def _loop(run: dict[str, Any]) -> str:
    loop: str = run.get("loop", "asyncio")
    return loop


def goal_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """The verdicts under a table: each goal, met or MISSED, with its figure and bound."""
    if not verdicts:
        return []
    out = ["", "goals"]
    for v in verdicts:
        mark = "met   " if v["met"] else "MISSED"
        note = f"  ({v['note']})" if v.get("note") else ""
        out.append(f"  {mark} {v['goal']}: {_num(v['value'])} (bound {v['bound']}){note}")
    return out


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json [--write-docs] [--block NAME]``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="A saved run's table."
    )
    parser.add_argument("results", type=Path, help="a JSON file python -m bench wrote")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    parser.add_argument("--block", default="results", help="the block to write (bench-NAME)")
    parser.add_argument("--docs", type=Path, default=DOC, help=argparse.SUPPRESS)  # tests: a copy
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    command = results.get("command")
    if args.write_docs and not command:
        # An older run did not record how it was started: its figures cannot be
        # headed by the command that measured them.
        parser.error(f"{args.results} does not say which command measured it")
    print(table(results))
    if args.write_docs:
        written_by = f"python -m bench.report {args.results.name} --write-docs"
        if args.block != "results":
            written_by += f" --block {args.block}"
        write_block(args.block, measured_block(command, results, written_by=written_by), args.docs)
        print(f"written: {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
