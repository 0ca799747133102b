"""What each step of a run cost, measured as it ran: wall seconds and peak resident memory of this
process, and of a worker process a step waited for (the model builder). Steps nest (a stage holds
its candidates' builds and gate evaluations): an outer step's peak includes its inner ones'. The
rows go to measurements.json and report.md, never to the manifest: they differ from run to run. A
step reused from the cache replays the rows it recorded when it ran (`since`, `replay`).
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
_open: list[list[float]] = []  # each open step's highest RSS seen so far (MB), outermost first
_sampler: threading.Thread | None = None
SAMPLE_S = 0.05


def begin() -> None:
    """A new run: forget the last one's steps."""
    _rows.clear()
    _open.clear()


def rows() -> list[JsonObject]:
    """The steps so far, in the order they ended (inner before outer)."""
    return list(_rows)


def mark() -> int:
    """Where the rows stand now: `since(mark())` after a step is what it cost."""
    return len(_rows)


def since(start: int) -> list[JsonObject]:
    return [dict(row) for row in _rows[start:]]


def replay(kept: list[JsonObject]) -> None:
    """A step reused from the cache: what it cost when it ran, so a warm run reports what a cold
    one did (and writes the same measurement files)."""
    _rows.extend(dict(row) for row in kept)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Time a step and find its peak: VmHWM where the step set the process's new high (exact),
    else the highest VmRSS sampled every SAMPLE_S while it ran. (The high-water mark is never
    reset: /usr/bin/time and the kernel's accounting read it too.)"""
    global _sampler
    high = status_mb("VmHWM")
    mine = [status_mb("VmRSS")]
    _open.append(mine)
    if _sampler is None or not _sampler.is_alive():
        _sampler = threading.Thread(target=_sample, daemon=True)
        _sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        del _open[
            next(i for i, row in enumerate(_open) if row is mine)
        ]  # by identity: equal peaks are not the same step
        now_high = status_mb("VmHWM")
        peak = max(mine[0], status_mb("VmRSS"), now_high if now_high > high else 0.0)
        for outer in _open:
            outer[0] = max(outer[0], peak)
        _rows.append({"step": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak, 1)})


def _sample() -> None:
    while _open:
        rss = status_mb("VmRSS")
        for row in list(_open):
            row[0] = max(row[0], rss)
        time.sleep(SAMPLE_S)


def worker(name: str, seconds: float, peak_rss_mb: float) -> None:
    """A worker process's cost (its peak from `wait`), inside the current step."""
    _rows.append({"step": name, "seconds": round(seconds, 2), "worker_peak_rss_mb": round(peak_rss_mb, 1)})


def wait(pid: int) -> tuple[int, float]:
    """Wait for a child process to end: (its wait status, its peak RSS in MB). The kernel's rusage
    starts a spawned child at the parent's high-water mark (it exec'd from the parent's address
    space), so the child's own VmHWM is read while it runs, and rusage stands only above the
    parent's mark."""
    parent = status_mb("VmHWM")
    seen = [0.0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.1):
            seen[0] = max(seen[0], status_mb("VmHWM", pid))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        _, status, usage = os.wait4(pid, 0)
    finally:
        done.set()
        watcher.join()
    rusage_mb = usage.ru_maxrss / 1024
    return status, max(seen[0], rusage_mb if rusage_mb > parent else 0.0)


def status_mb(field: str, pid: int | str = "self") -> float:
    """A /proc status field of a process (VmRSS, VmHWM), in MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
