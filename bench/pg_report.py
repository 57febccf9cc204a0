"""The PostgreSQL figures (bench/cluster.py) into verdicts, a table and docs/performance.md.

``--write-docs`` (on ``python -m bench --storage …``, or ``python -m bench.pg_report
RESULTS.json --write-docs`` for a saved run) puts each phase's table in its
marked block (``<!-- bench-pg-lateness:begin -->``, ``<!-- bench-pg-storms:begin -->``)
inside ``<!-- bench-pg:begin -->`` … ``<!-- bench-pg:end -->`` of docs/performance.md,
so every figure there is written by the run that measured it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import LATENESS_P99_MS, goal_lines

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
BEGIN, END = "<!-- bench-pg:begin -->", "<!-- bench-pg:end -->"
# Issue 13's goals (2 cores).
RSS_MIB = 200.0
READY_S = 5.0
SCALE_OF_THREE = 2.5  # three nodes drain a storm at least this many times one node's rate


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with its figure, its bound and whether it is met."""
    verdicts: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float, met: bool) -> None:
        verdicts.append({"goal": name, "value": value, "bound": bound, "met": met, "note": ""})

    million = results.get("million")
    if million:
        accounts = million["accounts"]
        for run in million["runs"]:
            nodes = run["nodes"]
            label = f"{nodes} node{'s' if nodes > 1 else ''}"
            if nodes == 1:
                (node,) = run["startup"]
                (memory,) = run["memory_end"]
                add(
                    f"{accounts} accounts, 1 node: peak RSS (MiB)",
                    memory["peak_rss_mib"],
                    RSS_MIB,
                    memory["peak_rss_mib"] <= RSS_MIB,
                )
                add(
                    f"{accounts} accounts, 1 node: ready (s)",
                    node["to_ready_s"],
                    READY_S,
                    node["to_ready_s"] <= READY_S,
                )
            departure = run["departure_ms"]
            if departure.get("n"):
                add(
                    f"lateness p99, {label} (ms)",
                    departure["p99"],
                    LATENESS_P99_MS,
                    departure["p99"] < LATENESS_P99_MS,
                )
                add(f"refreshes early, {label}", departure["early"], 0, departure["early"] == 0)
            add(
                f"idle accounts called, {label}", run["idle_attempts"], 0, run["idle_attempts"] == 0
            )
            add(
                f"calls per refresh token, {label}",
                run["calls_per_token_max"],
                1,
                run["calls_per_token_max"] == 1,
            )
    storms = results.get("pg_storms", [])
    single = {(s["latency_ms"], s["concurrency"]): s for s in storms if s["nodes"] == 1}
    for s in storms:
        one = single.get((s["latency_ms"], s["concurrency"]))
        add(
            f"storm {s['latency_ms']:g} ms, c{s['concurrency']}, {s['nodes']} node(s): "
            "calls per refresh token",
            s["calls_per_token_max"],
            1,
            s["calls_per_token_max"] == 1,
        )
        if s["nodes"] == 1 or one is None:
            continue
        factor = s["rate_per_s"] / one["rate_per_s"]
        bound = SCALE_OF_THREE * s["nodes"] / 3
        add(
            f"storm {s['latency_ms']:g} ms, c{s['concurrency']}: {s['nodes']} nodes / 1 node",
            factor,
            round(bound, 2),
            factor >= bound,
        )
        cores = _cores_needed(one, bound)
        if cores is not None:
            verdicts[-1]["note"] = (
                f"machine {s['machine_busy_share']:.0%} busy; {bound:g}× one node's rate at "
                f"one node's CPU per refresh (node, PostgreSQL, simulator) needs "
                f"{cores:.1f} cores, this machine has {results['machine']['cores']}"
            )
    return verdicts


def _cores_needed(one: dict[str, Any], factor: float) -> float | None:
    """Cores that ``factor`` times the single node's rate would keep busy, at its costs.

    Runs saved before PostgreSQL's CPU was measured give None.
    """
    if "postgres_cpu_share" not in one:
        return None
    rate = one["rate_per_s"]
    per_refresh = (
        one["cpu_per_1000_s"] / 1000
        + (one["postgres_cpu_share"] + one["simulator_cpu_share"]) / rate
    )
    return float(factor * rate * per_refresh)


def table(results: dict[str, Any]) -> str:
    """The PostgreSQL results as plain text."""
    out: list[str] = []
    million = results.get("million")
    if million:
        seed = million["seed"]
        out.append(
            f"database: {million['accounts']} accounts ({million['idle']} unknown to the "
            f"simulator, due {million['idle_from_s']:.0f} s to "
            f"{million['idle_from_s'] / 60 + 50:.0f} min after seeding began), "
            f"seeded in {seed['schema_s'] + seed['grants_s'] + seed['idle_s']:.0f} s"
        )
        for run in million["runs"]:
            out.append("")
            out.append(f"{run['nodes']} node(s), load before {_load(run['load_average_before'])}")
            for n, (node, memory) in enumerate(
                zip(run["startup"], run["memory_end"], strict=True), 1
            ):
                out.append(
                    f"  node{n}: ready {node['to_ready_s']:.2f} s (all scheduled "
                    f"{_num(node['to_scheduled_s'])} s, {node['scheduled']} timers), "
                    f"RSS at ready {node['rss_at_ready_mib']:.1f} MiB, peak "
                    f"{memory['peak_rss_mib']:.1f} MiB, CPU to ready {node['cpu_to_ready_s']:.2f} s"
                )
            d = run["departure_ms"]
            line = f"  lateness: {run['due']} due, {run['due_before_ready']} before ready"
            if d.get("n"):
                line += (
                    f"; n={d['n']} p50 {d['p50']:.2f} ms  p99 {d['p99']:.2f} ms  "
                    f"max {d['max']:.2f} ms  early {d['early']}"
                )
            out.append(line)
            out.append(
                f"  calls per refresh token at most {run['calls_per_token_max']} "
                f"({run['tokens_called']} tokens called)"
            )
    storms = results.get("pg_storms", [])
    if storms:
        if out:
            out.append("")
        out.append(
            "catch-up storm on PostgreSQL (rate: refreshes/s from the last node's readiness; "
            "cpu: all nodes' CPU s per 1000; sim, pg: the simulator's and PostgreSQL's "
            "CPU in cores; busy: the whole machine's share of its cores)"
        )
        out.append(
            f"  {'latency':>7} {'conc':>4} {'nodes':>5} {'n':>6} {'rate/s':>8} {'cpu/1000':>8} "
            f"{'sim':>5} {'pg':>5} {'busy':>5}  calls/token  load before"
        )
        for s in sorted(storms, key=lambda s: (s["latency_ms"], s["concurrency"], s["nodes"])):
            out.append(
                f"  {s['latency_ms']:>5.0f}ms {s['concurrency']:>4} {s['nodes']:>5} "
                f"{s['refreshes_measured']:>6} {s['rate_per_s']:>8.1f} "
                f"{s['cpu_per_1000_s']:>8.3f} {s['simulator_cpu_share']:>5.2f} "
                f"{_share(s.get('postgres_cpu_share'), '.2f')} "
                f"{_share(s.get('machine_busy_share'), '.0%')}  "
                f"{s['calls_per_token_max']:>11}  {_load(s['load_average_before'])}"
            )
    out.extend(goal_lines(results.get("goals", [])))
    return "\n".join(out)


def docs_blocks(results: dict[str, Any]) -> dict[str, str]:
    """The marked blocks this run fills: ``lateness`` and ``storms``, each with its command."""
    m = results["machine"]
    header = (
        f"Measured by `{results.get('command') or command_of(results)}`, "
        f"{results['started'][:16].replace('T', ' ')} UTC: "
        f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, "
        f"PostgreSQL {results['postgres']}, load average at the start "
        f"{_load(results['load_average_start'])}."
    )
    blocks = {}
    parts = {
        "lateness": {**results, "pg_storms": []},
        "storms": {**results, "million": None},
    }
    for name, part in parts.items():
        if name == "lateness" and not results.get("million"):
            continue
        if name == "storms" and not results.get("pg_storms"):
            continue
        part["goals"] = goals(part)
        begin, end = _markers(name)
        blocks[name] = f"{begin}\n{header}\n\n```\n{table(part)}\n```\n{end}"
    return blocks


def command_of(results: dict[str, Any]) -> str:
    """The bench command for these results, from their settings (runs that did not save it)."""
    s = results["settings"]
    args = [f"--storage {results['storage']}", f"--nodes {results['nodes']}"]
    args += [f"--accounts {s['accounts']}", f"--overdue {s['overdue']}"]
    if results.get("million"):
        args += [f"--due-soon {s['due_soon']}", f"--lateness-delay {s['lateness_delay']:g}"]
        args += [f"--lateness-window {s['lateness_window']:g}"]
    if results.get("pg_storms"):
        args += ["--latency", *(f"{v:g}" for v in s["latencies"])]
        args += ["--concurrency", *(str(v) for v in s["concurrencies"])]
    only = [k for k, v in (("lateness", "million"), ("storms", "pg_storms")) if results.get(v)]
    return " ".join(["python -m bench", *args, "--only", *only])


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench-pg-{name}:begin -->", f"<!-- bench-pg-{name}:end -->"


def write_docs(blocks: dict[str, str], doc: Path = DOC) -> None:
    """Replace each marked block (the section "Several daemons on PostgreSQL" holds them)."""
    content = doc.read_text(encoding="utf-8")
    for name, block in blocks.items():
        begin, end = _markers(name)
        if begin in content and end in content:
            start, stop = content.index(begin), content.index(end) + len(end)
            content = content[:start] + block + content[stop:]
        elif END in content:
            content = content.replace(END, f"{block}\n\n{END}", 1)
        else:
            raise ValueError(f"{doc} has no {BEGIN} … {END} section to write into")
    doc.write_text(content, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.pg_report RESULTS.json [--write-docs]``: a saved run's table."""
    parser = argparse.ArgumentParser(prog="python -m bench.pg_report", description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    print(table(results))
    if args.write_docs:
        write_docs(docs_blocks(results))
        print(f"written: {DOC}")
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(value: float | None, spec: str) -> str:
    return f"{'-' if value is None else format(value, spec):>5}"


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
