"""Timestamps of each submit along a leader's data path, for the benchmarks' tables of where a
submit's time goes (``python -m benchmarks.bench_cluster --workload latency --stages``,
``python -m benchmarks.bench_priority --stages``).

Off unless the environment of the node names a directory in ``STAGE_PROBE_DIR_ENV`` (only the
benchmarks set it): then ``recording`` is True, and the batcher records, per sequenced submit,
when the gateway read it, when its batch was proposed and when that committed, and the gateway
when it wrote the acks; ``STAGE_PROBE_SESSIONS_ENV`` restricts it to sessions starting with a
prefix. Times are ``time.monotonic_ns()`` (one clock for every process of the machine). Rows
are appended to ``stages-PID.txt`` in that directory, at most ``STAGE_PROBE_ROWS_MAX`` per
process (later submits go unrecorded):

    L seq read_ns proposed_ns committed_ns     (one sequenced submit)
    W first_seq count written_ns               (acks of seqs first_seq .. + count - 1 written)
"""

from __future__ import annotations

import atexit
import os
import time

from raftseq.cluster.config import (
    STAGE_PROBE_DIR_ENV,
    STAGE_PROBE_ROWS_MAX,
    STAGE_PROBE_SESSIONS_ENV,
    STAGE_PROBE_WRITE_INTERVAL_S,
)

directory = os.environ.get(STAGE_PROBE_DIR_ENV, "")
#: Whether submits are recorded (a directory was named).
recording = bool(directory)
#: Only sessions starting with this are recorded.
sessions = os.environ.get(STAGE_PROBE_SESSIONS_ENV, "")

_rows: list[str] = []
_rows_left = STAGE_PROBE_ROWS_MAX
_written_at = 0.0


def sequenced(seq: int, read_ns: int, proposed_ns: int, committed_ns: int) -> None:
    _row(f"L {seq} {read_ns} {proposed_ns} {committed_ns}")


def acks_written(first_seq: int, count: int, written_ns: int) -> None:
    _row(f"W {first_seq} {count} {written_ns}")


def _row(row: str) -> None:
    global _rows_left
    if _rows_left <= 0:
        return
    _rows_left -= 1
    _rows.append(row)
    if time.monotonic() - _written_at >= STAGE_PROBE_WRITE_INTERVAL_S:
        write()


def write() -> None:
    """Append the rows held to this process's file."""
    global _written_at
    _written_at = time.monotonic()
    if not _rows:
        return
    with open(os.path.join(directory, f"stages-{os.getpid()}.txt"), "a", encoding="ascii") as out:
        out.write("\n".join(_rows) + "\n")
    _rows.clear()


if recording:
    atexit.register(write)
