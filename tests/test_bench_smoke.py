"""The benchmark end to end at a few hundred accounts, so that it never rots.

``python -m bench`` runs as the lead runs it (simulator, daemons, bare client and
cron batch each in a process of its own, loopback only), with short phases.
Only what must hold at any size is checked: every refresh is on disk, none left
early, every figure is there. The speed goals are for the full run on a quiet
machine (docs/performance.md), not for a test.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from bench import ab, phases, report
from tests import pg
from tests.bench_run import run_bench

ACCOUNTS, OVERDUE, DUE_SOON = 300, 150, 60


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    docs = tmp_path / "performance.md"
    marked = "<!-- bench-storms:begin -->\nold\n<!-- bench-storms:end -->"
    docs.write_text(f"# Performance\n\nbefore\n{marked}\nafter\n")
    done = run_bench(
        "bench",
        f"--accounts={ACCOUNTS}",
        f"--overdue={OVERDUE}",
        f"--due-soon={DUE_SOON}",
        "--lateness-delay=2.5",
        "--lateness-window=1.5",
        "--latency",
        "0",
        "0.02",
        "--concurrency",
        "8",
        "64",
        "--cron-seconds=0.5",
        "--cron-workers",
        "1",
        "4",
        "--loops",
        "asyncio",
        "uvloop",
        f"--out={out}",
        f"--workdir={tmp_path / 'work'}",
        "--write-docs",
        f"--docs={docs}",
    )
    assert "goals" in done.stdout
    results = json.loads(out.read_text())

    assert results["machine"]["cores"] >= 1
    assert results["build"]["accounts"] == ACCOUNTS
    phase = results["lateness_phase"]
    # Timers for the accounts due within the scheduler's window (10 minutes): every one
    # due during the run, and no more than there are.
    assert DUE_SOON <= phase["startup"]["scheduled"] <= ACCOUNTS
    assert phase["startup"]["to_scheduled_s"] > 0
    assert phase["memory"]["peak_rss_mib"] > 0
    lateness = phase["lateness"]
    assert lateness["refreshed"] == DUE_SOON
    departure = lateness["departure_ms"]
    assert departure["n"] == DUE_SOON - lateness["due_before_ready"] > 0
    assert departure["early"] == 0
    assert lateness["arrival_at_simulator_ms"]["early"] == 0

    storms = results["storms"]
    # Both loops at 0 ms, where our own overhead shows; the first one with latency.
    assert sorted((s["latency_ms"], s["concurrency"], s["loop"]) for s in storms) == [
        (0.0, 8, "asyncio"),
        (0.0, 8, "uvloop"),
        (0.0, 64, "asyncio"),
        (0.0, 64, "uvloop"),
        (20.0, 8, "asyncio"),
        (20.0, 64, "asyncio"),
    ]
    for storm in storms:
        assert storm["durable"] == {"rows_refreshed": OVERDUE, "attempts_success": OVERDUE}
        assert storm["rate_per_s"] > 0
        assert storm["cpu_per_1000_s"] > 0
    assert [c["ok"] for c in results["ceilings"]] == [OVERDUE] * 4
    # At 0 ms the bare client runs again, held by the simulator's wait to the rate of
    # the first loop's storm: the run kept is the try nearest that rate, and it is
    # slower than the unpaced client (the point of holding it back).
    paced = results["ceilings_at_rate"]
    assert [(c["latency_ms"], c["concurrency"], c["ok"]) for c in paced] == [
        (0.0, 8, OVERDUE),
        (0.0, 64, OVERDUE),
    ]
    unpaced_runs = [c for c in results["ceilings"] if c["latency_ms"] == 0]
    for run, unpaced in zip(paced, unpaced_runs, strict=True):
        first = next(
            s
            for s in storms
            if (s["latency_ms"], s["concurrency"], s["loop"])
            == (0.0, run["concurrency"], "asyncio")
        )
        assert (run["paced_to_rate"], run["paced_to_loop"]) == (first["rate_per_s"], "asyncio")
        tries = run["tries"]
        assert 1 <= len(tries) <= 3
        complete = [t for t in tries if t["ok"] == OVERDUE]
        nearest = min(complete, key=lambda t: abs(t["rate_per_s"] - run["paced_to_rate"]))
        assert run["rate_per_s"] == nearest["rate_per_s"]
        assert run["simulator_latency_ms"] == nearest["simulator_latency_ms"]
        assert tries[0]["simulator_latency_ms"] > 0
        assert run["rate_per_s"] < unpaced["rate_per_s"]
    # The floor runs where our overhead shows (0 ms), and its refreshes are durable too.
    floors = results["floors"]
    assert [(f["latency_ms"], f["concurrency"], f["without"], f["ok"]) for f in floors] == [
        (0.0, concurrency, without, OVERDUE)
        for concurrency in (8, 64)
        for without in ([], ["read"], ["read", "log"])
    ]
    for least in floors:
        assert least["durable"] == {"rows_refreshed": OVERDUE, "attempts_success": OVERDUE}
        assert least["cpu_per_1000_s"] > 0
    assert "floor" in done.stdout
    # --write-docs puts the run's table, headed by its command, between the markers.
    written = docs.read_text()
    assert written.startswith("# Performance\n\nbefore\n<!-- bench-storms:begin -->\nMeasured by ")
    assert written.endswith("<!-- bench-storms:end -->\nafter\n")
    assert "old" not in written
    assert f"`python -m bench --accounts={ACCOUNTS} --overdue={OVERDUE}" in written
    assert "--write-docs`" in written
    assert "--workdir" not in written
    assert "--docs" not in written
    assert "  floor  " in written
    assert "  floor -read  " in written
    assert "/ floor " in written
    assert "  bare, daemon rate  " in written
    assert "/ bare, same rate " in written
    # Only under the storm whose rate the bare client was held to (asyncio's).
    assert written.count("/ bare, same rate ") == 2
    assert "daemon uvloop" in written
    crons = results["crons"]
    assert [(c["latency_ms"], c["workers"]) for c in crons] == [
        (0.0, 1),
        (0.0, 4),
        (20.0, 1),
        (20.0, 4),
    ]
    assert all(c["refreshed"] > 0 and c["failed"] == 0 for c in crons)

    goals = {g["goal"] for g in results["goals"]}
    assert {"lateness p99 (ms)", "refreshes early", "peak RSS (MiB)"} <= goals
    assert "c64 20 ms: rate / cron" in goals
    assert {"c8 0 ms uvloop: CPU per 1000 / ceiling", "c8 0 ms asyncio: rate / ceiling"} <= goals
    assert "daemon uvloop" in done.stdout
    assert "cron 4 thread(s)" in done.stdout

    # The before/after table reads the same files (here one run against itself).
    compared = run_bench("bench.compare", str(out), str(out), timeout=60)
    assert f"both run by `{results['command']}` on " in compared.stdout
    assert "| storm 0 ms, c8, uvloop: CPU / bare client's |" in compared.stdout
    assert "| cron 20 ms, 4 thread(s): refreshes/s |" in compared.stdout
    assert "| floor, 0 ms, c64: CPU / bare client's |" in compared.stdout
    assert "| storm 0 ms, c64, asyncio: CPU / bare client's at the same rate |" in compared.stdout
    assert (
        "| storm 0 ms, c64, uvloop: CPU / bare client's at the same rate |" not in compared.stdout
    )

    # bench.ab sets each storm beside the bare client of its own run, and beside the
    # paced one where that was held to its rate (the first loop's storms only).
    figures = ab.storm_figures(results)
    assert {"cpu / bare client", "cpu / bare, same rate"} <= set(figures[(0.0, 64, "asyncio")])
    assert "cpu / bare, same rate" not in figures[(0.0, 64, "uvloop")]

    # Results written before the paced run (and the recorded command) existed still
    # read: table, goals, compare.
    older = tmp_path / "older.json"
    older.write_text(
        json.dumps({k: v for k, v in results.items() if k not in ("ceilings_at_rate", "command")})
    )
    assert "/ bare, same rate" not in report.table(json.loads(older.read_text()))
    assert report.goals(json.loads(older.read_text()))
    compared = run_bench("bench.compare", str(older), str(out), timeout=60)
    assert f"(the second: `{results['command']}`)" in compared.stdout
    assert (
        "| storm 0 ms, c64, asyncio: CPU / bare client's at the same rate | - |" in compared.stdout
    )
    assert "| floor -read -log, 0 ms, c8: CPU / bare client's |" in compared.stdout

    # A saved run goes into the docs later, headed by the command that measured it;
    # one that did not record its command is refused and the docs stay as they were.
    assert results["command"].startswith(f"python -m bench --accounts={ACCOUNTS} ")
    assert "--write-docs" not in results["command"]
    saved = tmp_path / "saved.md"
    saved.write_text(
        "# Performance\n<!-- bench-results:begin -->\nold\n<!-- bench-results:end -->\n"
    )
    run_bench("bench.report", str(out), "--write-docs", f"--docs={saved}", timeout=60)
    block = saved.read_text()
    assert block.startswith(
        f"# Performance\n<!-- bench-results:begin -->\nMeasured by `{results['command']}`, "
    )
    assert "written by `python -m bench.report results.json --write-docs`." in block
    assert "old" not in block
    assert "  bare, daemon rate  " in block
    assert "goals" in block
    refused = run_bench(
        "bench.report", str(older), "--write-docs", f"--docs={saved}", timeout=60, returncode=2
    )
    assert "does not say which command measured it" in refused.stderr
    assert saved.read_text() == block


def test_paced_wait_steps_toward_the_rate() -> None:
    # Target 8 ms per request in each of 8 lanes (1,000/s). One run at 5 ms took 6 ms:
    # add the 2 ms missing.
    one = [{"simulator_latency_ms": 5.0, "rate_per_s": 8 / 0.006}]
    assert phases._next_wait(one, 0.008, 8) == pytest.approx(0.007)
    # Two runs: follow the line through them (here 2 ms more wait gave 1.5 ms more per
    # request, so the 0.5 ms missing takes 2/3 ms more wait).
    two = [*one, {"simulator_latency_ms": 7.0, "rate_per_s": 8 / 0.0075}]
    assert phases._next_wait(two, 0.008, 8) == pytest.approx(0.007 + 0.0005 * 2 / 1.5)
    # A line that slopes the wrong way (more wait, faster) is not followed: the
    # difference is added again, and the wait never exceeds the target time.
    wrong = [*one, {"simulator_latency_ms": 7.0, "rate_per_s": 8 / 0.0055}]
    assert phases._next_wait(wrong, 0.008, 8) == pytest.approx(0.008)
    # Already slower than the target: less wait, never below none.
    slow = [{"simulator_latency_ms": 1.0, "rate_per_s": 8 / 0.02}]
    assert phases._next_wait(slow, 0.008, 8) == 0.0


def test_ab_summary_leaves_out_a_figure_a_run_lacks() -> None:
    # The uvloop storm has no paced bare client; its other figures still print.
    key_a, key_u = (0.0, 8, "asyncio"), (0.0, 8, "uvloop")
    run = {
        key_a: {"cpu_per_1000_s": 0.5, "rate_per_s": 1000.0, "cpu / bare, same rate": 3.0},
        key_u: {"cpu_per_1000_s": 0.4, "rate_per_s": 1100.0},
    }
    text = ab.summary(([run], [run]), ("A", "B"))
    assert "| 0 ms, c8, uvloop | cpu_per_1000_s | 0.400 | 0.400 |" in text
    assert "| 0 ms, c8, asyncio | cpu / bare, same rate | 3.00 | 3.00 |" in text
    assert "| 0 ms, c8, uvloop | cpu / bare, same rate |" not in text


def test_ab_smoke(tmp_path: Path) -> None:
    # Two revisions (here the same one twice), interleaved, each from its own tree.
    done = run_bench(
        "bench.ab",
        "HEAD",
        "HEAD",
        "--pairs=1",
        f"--workdir={tmp_path / 'ab'}",
        "--",
        "--accounts=300",
        "--overdue=100",
        "--due-soon=10",
        "--concurrency=8",
        "--loops=asyncio",
        timeout=180,
    )
    assert "| storm | figure | HEAD | HEAD | medians | change |" in done.stdout
    assert "| 0 ms, c8, asyncio | cpu_per_1000_s |" in done.stdout
    assert "| 0 ms, c8, asyncio | rate_per_s |" in done.stdout
    assert "| 0 ms, c8, asyncio | cpu / bare client |" in done.stdout
    assert len(list((tmp_path / "ab").glob("tree-*-0.json"))) == 2


PG_ACCOUNTS, PG_OVERDUE, PG_DUE_SOON, PG_NODES = 600, 120, 20, 2


def test_bench_smoke_postgresql(tmp_path: Path) -> None:
    """``--storage postgresql://… --nodes N``: every phase on its own database, then dropped."""
    asyncio.run(pg.require_server())
    out = tmp_path / "results.json"
    done = run_bench(
        "bench",
        f"--storage={pg.ADMIN_URL}",
        f"--nodes={PG_NODES}",
        f"--accounts={PG_ACCOUNTS}",
        f"--overdue={PG_OVERDUE}",
        f"--due-soon={PG_DUE_SOON}",
        "--lateness-delay=8",
        "--lateness-window=1",
        "--latency",
        "0.01",
        "--concurrency",
        "8",
        f"--out={out}",
        f"--workdir={tmp_path / 'work'}",
        timeout=180,
    )
    assert "goals" in done.stdout
    results = json.loads(out.read_text())

    million = results["million"]
    assert million["accounts"] == PG_ACCOUNTS
    assert [run["nodes"] for run in million["runs"]] == [1, PG_NODES]
    for run in million["runs"]:
        assert len(run["startup"]) == run["nodes"]
        # Each node times the accounts of its window, not the table.
        assert all(0 < node["scheduled"] < PG_ACCOUNTS for node in run["startup"])
        assert run["refreshed"] == run["due"] == PG_DUE_SOON
        assert run["calls_per_token_max"] == 1
        assert run["idle_attempts"] == 0
        assert run["departure_ms"].get("early", 0) == 0

    storms = results["pg_storms"]
    assert [(s["nodes"], s["concurrency"]) for s in storms] == [(1, 8), (PG_NODES, 8)]
    for storm in storms:
        assert storm["durable"] == {
            "accounts": PG_OVERDUE,
            "rows_refreshed": PG_OVERDUE,
            "attempts_success": PG_OVERDUE,
        }
        assert storm["calls_per_token_max"] == 1
        assert storm["rate_per_s"] > 0
    goals = {g["goal"] for g in results["goals"]}
    assert f"storm 10 ms, c8: {PG_NODES} nodes / 1 node" in goals
    assert f"{PG_ACCOUNTS} accounts, 1 node: peak RSS (MiB)" in goals
    used = {million["database"], *(s["database"] for s in storms)}
    assert len(used) == 3
    assert not _existing(used), "the bench left its databases behind"


def _existing(names: set[str]) -> list[str]:
    async def query() -> list[str]:
        conn = await asyncpg.connect(pg.ADMIN_URL, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", list(names)
            )
        finally:
            await conn.close()
        return [r["datname"] for r in rows]

    return asyncio.run(query())


def test_profile_smoke(tmp_path: Path) -> None:
    """``python -m bench.profile`` at a few hundred accounts: the daemon profiled, its time
    split into parts that add up to the whole."""
    done = run_bench("bench.profile", "--accounts=300", "--overdue=150")
    parts = [
        float(line.rsplit(None, 2)[-2])
        for line in done.stdout.split("part of the program", 1)[1].split("\n\n", 1)[0].splitlines()
        if line.endswith("%")
    ]
    assert len(parts) >= 5
    assert abs(sum(parts) - 100) < 1
    assert "engine: scheduler, refresher, state (engine/)" in done.stdout
    assert "Python and C calls per refresh:" in done.stdout
