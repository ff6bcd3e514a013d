"""The numbers of every benchmark report, computed by one piece of code for raftseq and its
peers: percentiles and latency summaries, the median and range of runs, checks that sequence
numbers are unique and gapless, CPU shares as text, goal verdicts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


class BenchError(Exception):
    """A workload did something other than what it was asked: stuck, lost or duplicate numbers."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise BenchError(what)


# --- numbers ------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def seq_ranges(seqs: Sequence[int]) -> tuple[list[list[int]], int]:
    """Sorted ``seqs`` as inclusive ranges, and how many numbers occurred more than once."""
    ordered = sorted(seqs)
    ranges: list[list[int]] = []
    duplicates = 0
    previous = None
    for seq in ordered:
        if seq == previous:
            duplicates += 1
            continue
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
        previous = seq
    return ranges, duplicates


def check_seqs(seqs: Sequence[int], what: str, *, expected: int) -> tuple[int, int]:
    """Every number of `seqs` is a real one (>= 1), unique, and they are one gapless run of
    `expected` numbers (the benchmark is the only writer). Returns the run's (first, last)."""
    expect(len(seqs) == expected, f"{what}: {len(seqs)} sequence numbers for {expected} acknowledged submits")
    expect(all(s >= 1 for s in seqs), f"{what}: an acknowledged submit carries sequence number {min(seqs)}")
    ranges, duplicates = seq_ranges(seqs)
    expect(not duplicates, f"{what}: {duplicates} duplicate sequence numbers among {len(seqs)}")
    expect(len(ranges) == 1, f"{what}: sequence numbers are not one gapless run: {describe_ranges(ranges)}")
    return ranges[0][0], ranges[0][1]


def merge_ranges(parts: list[list[int]], what: str) -> list[list[int]]:
    """Ranges from several clients merged; overlapping ranges mean one number given twice."""
    merged: list[list[int]] = []
    for first, last in sorted(parts):
        if merged and first <= merged[-1][1]:
            raise BenchError(f"{what}: sequence numbers {first}..{min(last, merged[-1][1])} were given to two submits")
        if merged and first == merged[-1][1] + 1:
            merged[-1][1] = last
        else:
            merged.append([first, last])
    return merged


def describe_ranges(ranges: list[list[int]]) -> str:
    shown = ", ".join(f"{a}..{b}" for a, b in ranges[:6])
    return shown + (f" and {len(ranges) - 6} more ranges" if len(ranges) > 6 else "")


def latency_summary(ordered_ms: Sequence[float]) -> dict:
    return {
        "count": len(ordered_ms),
        "p50_ms": percentile(ordered_ms, 0.50),
        "p90_ms": percentile(ordered_ms, 0.90),
        "p99_ms": percentile(ordered_ms, 0.99),
        "p999_ms": percentile(ordered_ms, 0.999),
        "max_ms": ordered_ms[-1] if ordered_ms else 0.0,
    }


def latency_line(label: str, s: dict) -> str:
    return (
        f"  {label:<18} p50 {s['p50_ms']:7.2f}  p90 {s['p90_ms']:7.2f}  p99 {s['p99_ms']:7.2f}  "
        f"p99.9 {s['p999_ms']:7.2f}  max {s['max_ms']:8.2f} ms   ({s['count']:,} acks)"
    )


def largest_gap_s(times: Sequence[float]) -> float:
    ordered = sorted(times)
    return max((b - a for a, b in zip(ordered, ordered[1:])), default=0.0)


def cpu_text(cpu: dict[str, float]) -> str:
    return " ".join(f"{key} {100 * share:.0f}%" for key, share in cpu.items())


def goal_text(met: bool, margin: float) -> str:
    if met:
        return "met"
    return f"MISSED by {-100 * margin:.0f}%" if margin < 0 else "MISSED"
