"""The machine's load around a benchmark run, and whether its figures can be quoted.

Timings on a shared CPU are only meaningful when nothing else competes for the cores: a figure
measured while the 1-minute load average exceeded the core count (at the start or the end of the
run) is flagged as not quotable.
"""

from __future__ import annotations

import os


def load_averages() -> tuple[float, float, float]:
    """(1-min, 5-min, 15-min) load averages."""
    return os.getloadavg()


def load_report(start: tuple[float, float, float], end: tuple[float, float, float]) -> str:
    """One line with the load averages and the core count; a WARNING line when the run was busy."""
    cores = os.cpu_count() or 1
    fmt = lambda load: "/".join(f"{x:.2f}" for x in load)
    lines = [f"machine: {cores} cores; load average (1/5/15 min) {fmt(start)} at start, {fmt(end)} at end"]
    busiest = max(start[0], end[0])
    if busiest > cores:
        lines.append(f"WARNING: figures NOT quotable: the 1-min load average ({busiest:.2f}) exceeded the core "
                     f"count ({cores}) at the start or end of the run; rerun on a quiet machine.")
    return "\n".join(lines)
