"""Helpers shared by the benchmarks: machine info, timing, a plain-text table, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: a busy machine makes every figure here smaller."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_snapshot() -> tuple[float, float, float]:
    """(seconds all CPUs were busy per /proc/stat, this process's CPU seconds, wall seconds)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def other_load(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
    """Cores kept busy by other processes between two cpu_snapshot()s (0 on an idle machine)."""
    busy, own, wall = (e - s for s, e in zip(start, end))
    return max(0.0, (busy - own) / wall) if wall > 0 else float("nan")


def machine_info(**versions: str) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **versions,
    }


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call; fn must block until its result is ready."""
    return timed_result(fn)[1]


def timed_result(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn's result, wall seconds of the call)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def summarize(seconds: Sequence[float]) -> dict:
    """Best and median of repeated timings. The best is the least disturbed by other processes."""
    return {"best_s": min(seconds), "median_s": statistics.median(seconds), "runs_s": list(seconds)}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Left-aligned text columns, right-aligned numbers."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:] if r[i]) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric))

    print(fmt(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(fmt(row))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path
