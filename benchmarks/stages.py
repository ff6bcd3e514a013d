"""Where a submit's time goes: the leader's stage probe (``cluster.stage_probe``) joined with
the load generator's own send and ack times, by sequence number.

``enable(directory)`` before the cluster starts makes its nodes record (they read the
environment when they start); after a run, ``stage_table(directory, submits)`` gives, for the
submits ``(seq, sent_s, acked_s)`` (``time.monotonic``, the nodes' clock), the time of each stage:

    send -> gateway read     the client's send until the leader's gateway had read it
    read -> proposed         waiting in the batcher for its batch to be proposed
    proposed -> committed    Raft: the batch replicated to a majority and applied
    committed -> ack written until the gateway wrote its ack
    ack written -> acked     until the client's ack callback ran
"""

from __future__ import annotations

import glob
import os
import statistics
import time
from collections.abc import Sequence

from benchmarks.figures import BenchError, latency_summary
from raftseq.cluster.config import STAGE_PROBE_DIR_ENV, STAGE_PROBE_SESSIONS_ENV, STAGE_PROBE_WRITE_INTERVAL_S

STAGES = ("send -> gateway read", "read -> proposed", "proposed -> committed", "committed -> ack written", "ack written -> acked")
#: How long the nodes may take to write the rows of a run's last submits (they append what
#: they hold every ``STAGE_PROBE_WRITE_INTERVAL_S``, and on their gateway's heartbeat timer).
ROWS_TIMEOUT_S = 20 * STAGE_PROBE_WRITE_INTERVAL_S
ROWS_POLL_S = 0.1


def enable(directory: str, sessions: str = "") -> None:
    """Nodes started from now on record into `directory` (submits of sessions starting with
    `sessions` only, when given)."""
    os.makedirs(directory, exist_ok=True)
    os.environ[STAGE_PROBE_DIR_ENV] = directory
    if sessions:
        os.environ[STAGE_PROBE_SESSIONS_ENV] = sessions
    else:
        os.environ.pop(STAGE_PROBE_SESSIONS_ENV, None)


def disable() -> None:
    """Nodes started from now on record nothing."""
    os.environ.pop(STAGE_PROBE_DIR_ENV, None)
    os.environ.pop(STAGE_PROBE_SESSIONS_ENV, None)


def read_rows(directory: str) -> tuple[dict[int, tuple[int, int, int]], dict[int, int]]:
    """seq -> (read, proposed, committed) and seq -> ack written, in ns, from every node's file."""
    sequenced: dict[int, tuple[int, int, int]] = {}
    written: dict[int, int] = {}
    for path in glob.glob(os.path.join(directory, "stages-*.txt")):
        with open(path, encoding="ascii") as rows:
            for line in rows:
                fields = line.split()
                if len(fields) == 5 and fields[0] == "L":
                    sequenced[int(fields[1])] = (int(fields[2]), int(fields[3]), int(fields[4]))
                elif len(fields) == 4 and fields[0] == "W":
                    first, count, at = int(fields[1]), int(fields[2]), int(fields[3])
                    for seq in range(first, first + count):
                        written.setdefault(seq, at)
    return sequenced, written


def wait_for_rows(directory: str, seq: int, timeout_s: float = ROWS_TIMEOUT_S) -> tuple[dict, dict]:
    """The rows (``read_rows``) once they hold both rows of `seq` (the last submit acked)."""
    deadline = time.monotonic() + timeout_s
    while True:
        sequenced, written = read_rows(directory)
        if seq in sequenced and seq in written:
            return sequenced, written
        if time.monotonic() >= deadline:
            raise BenchError(f"stage probe: the rows of seq {seq} not in {directory} within {timeout_s:.0f} s")
        time.sleep(ROWS_POLL_S)


def stage_table(directory: str, submits: Sequence[tuple[int, float, float]]) -> dict:
    """Per stage (``STAGES``) a ``latency_summary`` in ms over `submits` ``(seq, sent_s,
    acked_s)``, and how many of them were joined (a submit a node did not record, or answered
    as a duplicate, is left out)."""
    if not submits:
        return {"joined": 0, "submits": 0, "stages": {}}
    sequenced, written = wait_for_rows(directory, max(seq for seq, _, _ in submits))
    spans: list[list[float]] = [[] for _ in STAGES]
    joined = 0
    for seq, sent_s, acked_s in submits:
        rows = sequenced.get(seq)
        written_ns = written.get(seq)
        if rows is None or written_ns is None:
            continue
        joined += 1
        read_ns, proposed_ns, committed_ns = rows
        marks = (int(sent_s * 1e9), read_ns, proposed_ns, committed_ns, written_ns, int(acked_s * 1e9))
        for i, span in enumerate(spans):
            span.append((marks[i + 1] - marks[i]) / 1e6)
    stages = {
        name: dict(latency_summary(sorted(span)), mean_ms=statistics.fmean(span) if span else 0.0) for name, span in zip(STAGES, spans)
    }
    return {"joined": joined, "submits": len(submits), "stages": stages}


def stage_lines(table: dict) -> list[str]:
    """The table as text: one line per stage, mean and percentiles in ms (the means add up to
    the mean of send -> ack; percentiles do not)."""
    lines = [f"  where the time went ({table['joined']:,} of {table['submits']:,} submits joined with the leader's stage probe):"]
    for name, s in table["stages"].items():
        lines.append(
            f"    {name:<26} mean {s['mean_ms']:7.3f}  p50 {s['p50_ms']:7.3f}  p90 {s['p90_ms']:7.3f}  p99 {s['p99_ms']:7.3f}  p99.9 {s['p999_ms']:7.3f} ms"
        )
    return lines
