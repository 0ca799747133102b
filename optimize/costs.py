"""What each step of a run cost, measured as it ran: wall seconds and peak resident memory of this
process (Linux's VmHWM, reset at each step's start), and of a worker process a step waited for (the
model builder). Steps nest (a stage holds its candidates' builds and gate evaluations): an outer
step's peak includes its inner ones'. The rows go to measurements.json and report.md, never to the
manifest: they differ from run to run, and a warm run skips what the cache holds.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from optimize.runtime.manifest import JsonObject

_rows: list[JsonObject] = []
_open: list[float] = []  # each open step's highest peak so far (MB), outermost first


def begin() -> None:
    """A new run: forget the last one's steps."""
    _rows.clear()
    _open.clear()


def rows() -> list[JsonObject]:
    """The steps so far, in the order they ended (inner before outer)."""
    return list(_rows)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    if _open:
        _open[-1] = max(_open[-1], _peak_mb())
    _open.append(0.0)
    _reset_peak()
    start = time.perf_counter()
    try:
        yield
    finally:
        peak = max(_open.pop(), _peak_mb())
        if _open:
            _open[-1] = max(_open[-1], peak)
        _rows.append({"step": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak, 1)})


def worker(name: str, seconds: float, peak_rss_mb: float) -> None:
    """A worker process's cost (from its rusage once it ended), inside the current step."""
    _rows.append({"step": name, "seconds": round(seconds, 2), "worker_peak_rss_mb": round(peak_rss_mb, 1)})


def wait(pid: int) -> tuple[int, float]:
    """Wait for a child process to end: (its wait status, its peak RSS in MB). The kernel's rusage
    keeps the parent's high-water mark across fork and exec, so the child's own (VmHWM, per address
    space) is read while it runs, and rusage stands only where it is above what the parent had."""
    parent = _status_mb("VmRSS")
    seen = [0.0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.1):
            seen[0] = max(seen[0], _status_mb("VmHWM", pid))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        _, status, usage = os.wait4(pid, 0)
    finally:
        done.set()
        watcher.join()
    rusage_mb = usage.ru_maxrss / 1024
    return status, max(seen[0], rusage_mb if rusage_mb > parent * 1.05 else 0.0)


def _status_mb(field: str, pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS (elsewhere peaks accumulate)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
