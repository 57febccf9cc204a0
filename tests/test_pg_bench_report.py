"""The PostgreSQL benchmark's verdicts (``bench.pg_report``) and its CPU readings.

A storm's ratio of three nodes to one says nothing on a machine that was
already busy: the verdict names the cores the goal needs at one node's costs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.pg_report import goals, table
from bench.procs import cpu_seconds, machine_cpu, named_cpu


def _storm(nodes: int, rate: float, **extra: float) -> dict[str, Any]:
    return {
        "nodes": nodes,
        "latency_ms": 100.0,
        "concurrency": 64,
        "refreshes_measured": 30000,
        "rate_per_s": rate,
        "cpu_per_1000_s": 1.0,
        "simulator_cpu_share": 0.1,
        "calls_per_token_max": 1,
        "load_average_before": [1.0, 1.0, 1.0],
        **extra,
    }


def test_a_missed_ratio_names_the_cores_it_needs() -> None:
    results = {
        "machine": {"cores": 2},
        "pg_storms": [
            _storm(1, 500.0, postgres_cpu_share=0.4, machine_busy_share=0.8),
            _storm(3, 550.0, postgres_cpu_share=0.9, machine_busy_share=0.99),
        ],
    }
    (ratio,) = [v for v in goals(results) if "nodes / 1 node" in v["goal"]]
    assert not ratio["met"]
    # 2.5 × 500/s × (1 ms of node + (0.4 + 0.1) cores / 500/s) = 2.5 × (0.5 + 0.5) cores.
    assert ratio["note"] == (
        "machine 99% busy; 2.5× one node's rate at one node's CPU per refresh "
        "(node, PostgreSQL, simulator) needs 2.5 cores, this machine has 2"
    )
    assert "needs 2.5 cores, this machine has 2" in table({**results, "goals": goals(results)})


def test_a_run_saved_before_postgres_was_measured_still_reports() -> None:
    results = {"machine": {"cores": 2}, "pg_storms": [_storm(1, 500.0), _storm(3, 1300.0)]}
    (ratio,) = [v for v in goals(results) if "nodes / 1 node" in v["goal"]]
    assert ratio["met"]
    assert ratio["note"] == ""
    rows = table(results).splitlines()
    assert any(" 500.0 " in row and "    -     -" in row for row in rows)


def test_cpu_readings_see_this_process_and_the_machine() -> None:
    busy, total = machine_cpu()
    assert 0 < busy < total
    name = Path(f"/proc/{os.getpid()}/comm").read_text(encoding="ascii").strip()
    assert sum(range(3_000_000)) > 0  # some CPU of this process's own
    own = cpu_seconds(os.getpid())
    assert own > 0
    assert named_cpu(name) >= own  # this process among the others of its name
    assert named_cpu("no-such-process") == 0
