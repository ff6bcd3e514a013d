"""A node's log: repeated lines rate-limited, and the file rotated by the node that writes it.

Failed hellos once wrote a ~284-byte line each, without limit (2.4 MiB/s from one client).
``RepeatLimiter`` passes the first ``LOG_REPEAT_LINES_MAX`` lines of one kind (logger, level
and message template) per ``LOG_REPEAT_INTERVAL_S``, marks the last one it passes, drops the
rest, and notes how many it dropped on the first line of that kind after the interval.
``RotatingNodeLog`` is the node log file, rotated at ``NODE_LOG_BYTES_MAX`` with
``NODE_LOG_FILES_KEPT`` older files; the process's stdout and stderr follow it, so that a
traceback written without logging lands in the current file too.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable

from raftseq.cluster.data_dir import open_private
from raftseq.cluster.config import (
    LOG_REPEAT_INTERVAL_S,
    LOG_REPEAT_KINDS_MAX,
    LOG_REPEAT_LINES_MAX,
    NODE_LOG_BYTES_MAX,
    NODE_LOG_FILES_KEPT,
)


class _Kind:
    __slots__ = ("window_start", "passed", "dropped")

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.passed = 0
        self.dropped = 0


class RepeatLimiter(logging.Filter):
    """At most `lines_max` lines of one kind per `interval_s` (CRITICAL lines always pass)."""

    def __init__(
        self,
        *,
        lines_max: int = LOG_REPEAT_LINES_MAX,
        interval_s: float = LOG_REPEAT_INTERVAL_S,
        kinds_max: int = LOG_REPEAT_KINDS_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.lines_max = lines_max
        self.interval_s = interval_s
        self.kinds_max = kinds_max
        self.clock = clock
        self.kinds: dict[tuple, _Kind] = {}
        #: Lines dropped since start.
        self.dropped_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        key = (record.name, record.levelno, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        now = self.clock()
        kind = self.kinds.get(key)
        if kind is None or now - kind.window_start >= self.interval_s:
            dropped = kind.dropped if kind is not None else 0
            if kind is None and len(self.kinds) >= self.kinds_max:
                del self.kinds[next(iter(self.kinds))]  # the kind seen first goes
            kind = self.kinds[key] = _Kind(now)
            if dropped:
                _note(record, f"[{dropped} similar lines dropped in the {self.interval_s:g} s before]")
        kind.passed += 1
        if kind.passed <= self.lines_max:
            if kind.passed == self.lines_max:
                _note(record, f"[similar lines dropped for the next {self.interval_s:g} s]")
            return True
        kind.dropped += 1
        self.dropped_total += 1
        return False


def _note(record: logging.LogRecord, note: str) -> None:
    """Append `note` to the record's message (formatted here; a record whose arguments do
    not fit its template is left for the handler to report)."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        return
    record.msg = f"{message} {note}"
    record.args = None


class RotatingNodeLog(logging.handlers.RotatingFileHandler):
    """The node log file, rotated by size. With `own_standard_streams` (a node process),
    file descriptors 1 and 2 follow the current file."""

    def __init__(
        self,
        path: str,
        *,
        bytes_max: int = NODE_LOG_BYTES_MAX,
        files_kept: int = NODE_LOG_FILES_KEPT,
        own_standard_streams: bool = False,
    ) -> None:
        super().__init__(path, maxBytes=bytes_max, backupCount=files_kept, encoding="utf-8")
        self.own_standard_streams = own_standard_streams
        self._follow()

    def _open(self) -> io.TextIOWrapper:
        """The file created 0600 (it holds payload details), whatever the umask."""
        return os.fdopen(open_private(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a", encoding=self.encoding)

    def doRollover(self) -> None:  # noqa: N802 - logging's name
        super().doRollover()
        self._follow()

    def _follow(self) -> None:
        stream = self.stream
        if stream is None or not self.own_standard_streams:
            return
        for standard in (sys.stdout, sys.stderr):
            standard.flush()
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
