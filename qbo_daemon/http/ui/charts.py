"""The geometry of the status page's small SVG charts. Pure: data in, shapes out.

Templates draw the shapes as ``<rect>`` and ``<text>`` with classes; colours come
from the stylesheet (no inline style, so the Content-Security-Policy holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from qbo_daemon.engine.status_page import Attempt, MinuteCount, MinuteOutcomes
from qbo_daemon.http.ui.views import duration

WIDTH = 560.0  # about the width of a half-page card: one unit is one pixel there
WIDE = 1120.0  # a full-width card
HEIGHT = 150.0
_AXIS = 18.0  # room for tick labels under the plot
_TOP = 4.0


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    kind: str  # a CSS class: ok, failed, due
    title: str  # the tooltip


@dataclass(frozen=True, slots=True)
class Tick:
    x: float
    label: str
    anchor: str = "middle"


@dataclass(frozen=True, slots=True)
class Chart:
    bars: list[Bar]
    ticks: list[Tick]
    baseline: float  # y of the zero line
    scale_label: str  # what the tallest bar means
    width: float = WIDTH
    height: float = HEIGHT
    totals: dict[str, int] = field(default_factory=dict)


def outcomes_chart(minutes: Sequence[MinuteOutcomes], *, end: datetime, window: timedelta) -> Chart:
    """Successes up, failures down, one column per minute of ``window`` ending at ``end``."""
    start = _floor_minute(end - window) + timedelta(minutes=1)
    slots = int(window.total_seconds() // 60)
    slot = WIDTH / slots
    peak = max([m.succeeded for m in minutes] + [m.failed for m in minutes] + [1])
    half = (HEIGHT - _AXIS - _TOP) / 2
    baseline = _TOP + half
    bars = []
    for m in minutes:
        index = int((m.minute - start).total_seconds() // 60)
        if not 0 <= index < slots:
            continue
        x, w = _column(index, slot)
        label = m.minute.strftime("%H:%M")
        if m.succeeded:
            h = max(half * m.succeeded / peak, 1.0)
            bars.append(Bar(x, baseline - h, w, h, "ok", f"{label} UTC: {m.succeeded} succeeded"))
        if m.failed:
            h = max(half * m.failed / peak, 1.0)
            bars.append(Bar(x, baseline, w, h, "failed", f"{label} UTC: {m.failed} failed"))
    every = _tick_every(window)
    ticks = []
    t = _ceil_to(start, every)
    while t <= end:
        offset = (t - start).total_seconds() / 60
        if offset * slot < WIDTH - 60:  # leave room for "now" at the right end
            ticks.append(Tick(offset * slot, t.strftime("%H:%M")))
        t += every
    ticks.append(Tick(WIDTH, "now", "end"))
    return Chart(
        bars=bars,
        ticks=_inside(ticks),
        baseline=baseline,
        scale_label=f"peak {peak} a minute" if minutes else "no attempts yet",
        totals={
            "succeeded": sum(m.succeeded for m in minutes),
            "failed": sum(m.failed for m in minutes),
        },
    )


def due_chart(minutes: Sequence[MinuteCount], *, now: datetime, within: timedelta) -> Chart:
    """Refreshes due per minute from ``now`` on: a timeline of the next ``within``."""
    start = _floor_minute(now)
    slots = int(within.total_seconds() // 60) + 1
    slot = WIDTH / slots
    peak = max([m.count for m in minutes] + [1])
    room = HEIGHT - _AXIS - _TOP
    baseline = HEIGHT - _AXIS
    bars = []
    for m in minutes:
        index = int((m.minute - start).total_seconds() // 60)
        if not 0 <= index < slots:
            continue
        x, w = _column(index, slot)
        h = max(room * m.count / peak, 2.0)
        when = m.minute.strftime("%H:%M")
        bars.append(Bar(x, baseline - h, w, h, "due", f"{when} UTC: {m.count} due"))
    step = max(int(within.total_seconds() // 60) // 4, 1)
    ticks = [Tick(i * slot, "now" if i == 0 else f"+{i} min") for i in range(0, slots, step)]
    return Chart(
        bars=bars,
        ticks=_inside(ticks),
        baseline=baseline,
        scale_label=f"peak {peak} a minute" if minutes else "none due",
        totals={"due": sum(m.count for m in minutes)},
    )


def durations_chart(attempts: Sequence[Attempt]) -> Chart:
    """One bar per attempt, oldest on the left, as tall as it took."""
    ordered = sorted(attempts, key=lambda a: a.started_at)
    slots = max(len(ordered), 40)
    slot = WIDE / slots
    peak = max([a.duration_ms for a in ordered] + [1.0])
    room = 120.0 - _AXIS - _TOP
    baseline = 120.0 - _AXIS
    bars = []
    for index, attempt in enumerate(ordered):
        x, w = _column(index, slot)
        h = max(room * attempt.duration_ms / peak, 2.0)
        kind = "ok" if attempt.outcome == "success" else "failed"
        title = (
            f"{attempt.started_at.strftime('%H:%M:%S')} UTC: {attempt.outcome}, "
            f"{duration(attempt.duration_ms)}"
        )
        bars.append(Bar(x, baseline - h, w, h, kind, title))
    ticks = []
    if ordered:
        ticks.append(Tick(0, ordered[0].started_at.strftime("%H:%M:%S"), "start"))
        last_x = (len(ordered) - 1) * slot + slot / 2
        if last_x > 120:  # room for both labels
            ticks.append(Tick(last_x, ordered[-1].started_at.strftime("%H:%M:%S"), "middle"))
    return Chart(
        bars=bars,
        ticks=_inside(ticks, WIDE),
        baseline=baseline,
        scale_label=f"longest {duration(peak)}",
        width=WIDE,
        height=120.0,
    )


def _column(index: int, slot: float) -> tuple[float, float]:
    gap = 1.0 if slot > 4 else 0.0
    return round(index * slot + gap / 2, 2), round(max(slot - gap, 0.5), 2)


def _inside(ticks: list[Tick], width: float = WIDTH) -> list[Tick]:
    """Anchor labels at the edges inward, so none is cut off."""
    placed = []
    for tick in ticks:
        if tick.x < 24:
            placed.append(Tick(max(tick.x, 0.0), tick.label, "start"))
        elif tick.x > width - 24:
            placed.append(Tick(min(tick.x, width), tick.label, "end"))
        else:
            placed.append(Tick(round(tick.x, 2), tick.label, tick.anchor))
    return placed


def _floor_minute(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0)


def _tick_every(window: timedelta) -> timedelta:
    hours = window.total_seconds() / 3600
    if hours <= 0.25:
        return timedelta(minutes=5)
    if hours <= 1:
        return timedelta(minutes=15)
    if hours <= 3:
        return timedelta(minutes=30)
    if hours <= 6:
        return timedelta(hours=1)
    return timedelta(hours=2)


def _ceil_to(when: datetime, step: timedelta) -> datetime:
    midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
    steps = -(-(when - midnight) // step)
    return midnight + steps * step
