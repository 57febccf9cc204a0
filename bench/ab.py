"""Two versions of the daemon in interleaved storms: ``python -m bench.ab BEFORE AFTER``.

One run of a tree differs from the next by about ±10 % on a shared 2-core
machine, more than most changes move CPU per refresh. This runs the catch-up
storms at 0 ms for two git revisions of this repository in turn, ``--pairs``
times (before, after, before, after, ...), and prints each figure's runs and
medians (CPU per 1,000 refreshes, rate, and CPU over the bare client's of the
same run), so a change is read from pairs taken in one sitting and not from two
runs hours apart.

Each revision is exported with ``git archive`` into a work directory and given
this checkout's ``bench/`` (so both are measured the same way, the floor
included); its daemon is that revision's code, run from that directory by this
interpreter. Options after ``--`` go to ``python -m bench`` (default: 20,000
accounts, 10,000 overdue, concurrency 8 and 64, asyncio).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import cpu_over, paced_for, runs_by_place

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCH = ["--accounts", "20000", "--overdue", "10000"]
DEFAULT_BENCH += ["--concurrency", "8", "64", "--loops", "asyncio"]

Key = tuple[float, int, str]  # latency in ms, concurrency, event loop
FIGURES = (
    ("cpu_per_1000_s", ".3f"),
    ("rate_per_s", ".0f"),
    ("cpu / bare client", ".2f"),
    ("cpu / bare, same rate", ".2f"),
)


def export(revision: str, into: Path) -> Path:
    """``revision``'s tree in ``into``, with this checkout's ``bench/``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    shutil.rmtree(into / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "bench", into / "bench", ignore=shutil.ignore_patterns("results"))
    # The tree's own code must be what runs there, not an installed copy of another.
    found = subprocess.run(
        [sys.executable, "-c", "import qbo_daemon; print(qbo_daemon.__file__)"],
        cwd=into,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(into.resolve()):
        raise RuntimeError(f"{revision}: python imports qbo_daemon from {found}, not {into}")
    return into


def storm_figures(results: dict[str, Any]) -> dict[Key, dict[str, float]]:
    """Each 0 ms storm's CPU per 1,000 refreshes and rate, by latency, concurrency and loop,
    and its CPU over the bare client's of the same run (at its own rate, and held to the
    storm's when the bench ran that): ratios within one run share that run's machine."""
    ceilings = runs_by_place(results, "ceilings")
    paced = runs_by_place(results, "ceilings_at_rate")
    figures: dict[Key, dict[str, float]] = {}
    for s in results["storms"]:
        key = (s["latency_ms"], s["concurrency"], s.get("loop", "asyncio"))
        figures[key] = {"cpu_per_1000_s": s["cpu_per_1000_s"], "rate_per_s": s["rate_per_s"]}
        for figure, bare in (
            ("cpu / bare client", ceilings.get(key[:2])),
            ("cpu / bare, same rate", paced_for(paced, s)),
        ):
            ratio = cpu_over(s, bare)
            if ratio is not None:
                figures[key][figure] = ratio
    return figures


def summary(runs: Sequence[list[dict[Key, dict[str, float]]]], names: Sequence[str]) -> str:
    """A Markdown table: each figure's runs for both versions, their medians and the change."""
    before, after = runs
    keys = sorted(set().union(*before, *after))
    lines = [
        f"| storm | figure | {names[0]} | {names[1]} | medians | change |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    for key in keys:
        latency, concurrency, loop = key
        for figure, fmt in FIGURES:
            # A figure a run lacks (no paced bare client for that loop) is left out.
            b = [run[key][figure] for run in before if figure in run.get(key, {})]
            a = [run[key][figure] for run in after if figure in run.get(key, {})]
            if not b or not a:
                continue
            mb, ma = statistics.median(b), statistics.median(a)
            lines.append(
                f"| {latency:g} ms, c{concurrency}, {loop} | {figure} "
                f"| {' '.join(format(v, fmt) for v in b)} "
                f"| {' '.join(format(v, fmt) for v in a)} "
                f"| {mb:{fmt}} → {ma:{fmt}} | {(ma - mb) / mb:+.1%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description=__doc__.splitlines()[0],
        epilog="Options after -- go to python -m bench.",
    )
    parser.add_argument("before", help="a git revision (commit, branch, tag)")
    parser.add_argument("after", help="a git revision; HEAD for the last commit")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the trees and results")
    words = list(sys.argv[1:] if argv is None else argv)
    split = words.index("--") if "--" in words else len(words)
    args = parser.parse_args(words[:split])
    bench_args = words[split + 1 :] or DEFAULT_BENCH
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qbo-bench-ab-"))
    names = (args.before, args.after)
    trees = [export(name, workdir / f"tree-{i}") for i, name in enumerate(names)]
    runs: tuple[list[dict[Key, dict[str, float]]], ...] = ([], [])
    try:
        for pair in range(args.pairs):
            for which, (name, tree) in enumerate(zip(names, trees, strict=True)):
                out = workdir / f"{tree.name}-{pair}.json"
                command = [sys.executable, "-m", "bench", "--only", "storms", "--latency", "0"]
                done = subprocess.run(
                    [*command, *bench_args, "--out", str(out)],
                    cwd=tree,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    print(done.stdout + done.stderr, file=sys.stderr)
                    return 1
                runs[which].append(storm_figures(json.loads(out.read_text(encoding="utf-8"))))
                print(f"[bench.ab] pair {pair + 1} of {args.pairs}: {name} done", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(summary(runs, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
