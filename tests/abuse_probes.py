"""What every abuse probe measures (``tests/test_abuse_*.py``).

An abuse probe attacks a real local cluster on loopback (bounded in count and time, every
socket and process its own), then asserts the outcome a user relies on: the node is alive,
its resident memory stayed within a stated bound, a legitimate client's latency stayed within
a stated bound, and nothing acknowledged was lost. These helpers measure the last three.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence

from raftseq.clients import SequencerClient


def rss_bytes(pid: int, *, field: str = "VmRSS") -> int:
    """Resident memory of process `pid` now (``VmRSS`` in ``/proc/PID/status``); with
    ``field="VmHWM"`` its peak so far."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} line for pid {pid}")


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of `samples` (nearest rank)."""
    assert samples, "no samples"
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def submit_latencies(endpoints: Sequence[str], token: str, *, count: int, session: str, timeout_s: float) -> list[float]:
    """Submit `count` messages one at a time as a legitimate client; each ack's latency in
    seconds. Raises if the whole run takes longer than `timeout_s`."""
    latencies: list[float] = []

    async def run() -> None:
        async with SequencerClient(list(endpoints), token=token, session=session) as client:
            for i in range(count):
                started = time.perf_counter()
                await client.submit(b"legit-%d" % i)
                latencies.append(time.perf_counter() - started)

    await asyncio.wait_for(run(), timeout_s)
    return latencies


def describe_latencies(latencies: Sequence[float]) -> str:
    """``p50 0.8 ms, p99 2.1 ms, max 3.0 ms (n=200)`` for a test's output."""
    return (
        f"p50 {statistics.median(latencies) * 1e3:.1f} ms, p99 {percentile(latencies, 0.99) * 1e3:.1f} ms, "
        f"max {max(latencies) * 1e3:.1f} ms (n={len(latencies)})"
    )
