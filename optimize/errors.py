"""The failures a user must be able to tell apart from a bug, each with its exit code.

DESIGN.md: 0 done, 2 bad input or usage, 3 a gate failed, 1 anything else (a bug); and 4 the
machine ran out (memory) or a worker process was killed. Code raises `UsageError` for anything the
user can fix (a file, a key, a path), `GateFailed` when quality did not hold, `ResourceError`
when the work died of what it was given to run on and `DependencyError` when a library failed inside;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optimize.records import StageRecord
    from optimize.runtime.manifest import CheckResult


class UsageError(Exception):
    """Bad input: the message names the file, line or key and says how to fix it. Exit code 2."""

    exit_code = 2


class ResourceError(Exception):
    """Out of memory, or a worker process killed (by the kernel's out-of-memory killer, most
    often): the message says what died, how, and what to try. Exit code 4."""

    exit_code = 4


class DependencyError(Exception):
    """A library we run failed inside (an exporter, the model builder): the message names it, its
    version and the last line it said; no traceback. Exit code 1, as any failure that is not the
    user's to fix."""

    exit_code = 1


class GateFailed(Exception):
    """A stage's gate did not hold: the report is written, no artifact is emitted. Exit code 3."""

    exit_code = 3

    def __init__(
        self,
        message: str,
        stages: list[StageRecord] | None = None,
        *,
        metrics: dict[str, float] | None = None,
        checks: list[CheckResult] | None = None,
        details: Mapping[str, object] | None = None,
    ):
        super().__init__(message)
        self.stages = stages or []
        # Raised inside a stage (a search that found nothing): what its closest candidate measured,
        # its gate checks, and everything the stage tried, for the failed stage's record.
        self.metrics, self.checks, self.details = metrics or {}, checks or [], details or {}


# Set by the command line's Ctrl-C handler. A library can swallow the KeyboardInterrupt it raises
# (under load a run was seen to finish and exit 0 after Ctrl-C); the pipeline checks this flag between
# steps and before the artifact is renamed into place, so an interrupted run never emits one.
INTERRUPTED = threading.Event()


def stop_if_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
