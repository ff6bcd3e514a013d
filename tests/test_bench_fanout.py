"""The fan-out benchmark at its smallest: pinned and unpinned, a stalled subscriber, and NATS
JetStream beside it. Only that it runs, pins what it says and checks delivery is tested here,
never its figures: those depend on the machine (and on whoever else loads it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_runs import REPO_DIR, run_benchmark

SMALLEST = ["--subscribers", "4", "--relays", "2", "--rate", "200", "--seconds", "1"]
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    return run_benchmark("benchmarks.bench_fanout", [*SMALLEST, *args], tmp_path, timeout_s=TIMEOUT_S)


def cores(text: str) -> set[int]:
    """``Cpus_allowed_list`` ("0-1", "0,2") as a set."""
    found = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def assert_pinned(affinity: dict[str, str], groups: dict[str, set[int]]) -> None:
    """Every process of each group was on exactly its cores (as /proc said after pinning)."""
    seen = {group: 0 for group in groups}
    for key, allowed in affinity.items():
        group = key.split()[0]
        if group in groups:
            assert cores(allowed) == groups[group], (key, allowed)
            seen[group] += 1
    assert all(seen.values()), f"no process pinned in some group: {seen}"


def test_pinned_and_unpinned_runs_deliver_everything_and_a_stalled_subscriber_is_measured(tmp_path: Path) -> None:
    report, output = run_bench(tmp_path, "--pin", "both", "--pin-cores", "0:1", "--stalled-subscriber-s", "1", "--stall-margin-s", "1")
    unpinned, pinned = report["runs"]
    everything = os.sched_getaffinity(0)
    # Unpinned: nodes, bench, relays and subscribers may run anywhere (also after a pinned run).
    assert_pinned(unpinned["affinity"], {"nodes": everything, "fanout": everything})
    # Pinned: nodes (3) and the publishing benchmark on core 0, relays (2) and subscribers on 1.
    assert_pinned(pinned["affinity"], {"nodes": {0}, "fanout": {1}})
    assert sum(1 for k in pinned["affinity"] if k.startswith("nodes")) == 4
    assert sum(1 for k in pinned["affinity"] if k.startswith("fanout")) == 3
    for run in (unpinned, pinned):
        assert run["subscribers_complete"] == 4 and run["subscribers_with_gaps"] == 0, run
        # 200/s for 2 s (warm-up included); a sender woken late at the end sends a few less.
        assert 300 <= run["messages_each"] <= 400, run
        assert run["delivered_per_s"] > 0 and run["with_subscribers"]["delivery_latency"]["count"] > 0, run
        assert all(run[r]["cpu_us_per_submit"][run["leader"]] > 0 for r in ("without_subscribers", "with_subscribers")), run
    stall = report["stall"]
    assert stall["stalled_complete"] and stall["subscribers_complete"] == 4, stall
    assert stall["bound"]["rss_bytes"] == 64 * 1024 + 2 * 256 * 1024, stall["bound"]
    assert len(stall["relay_rss_growth_bytes"]) == 2, stall
    # Subscribers 1..3 on relays r2, r1, r2: the others' delivery is timed on both relays.
    assert all(stall["others_delivery_latency"][f"{p} r{r}"]["count"] > 0 for p in ("before", "during", "after") for r in (1, 2)), stall
    assert "relay RSS, highest during the stall minus highest before" in output, output
    table = output[output.index("fan-out: 4 subscribers") :]
    assert table.count("raftseq, 2 relays") == 2 and "NATS" not in table, table


def test_nats_jetstream_beside_in_one_table(tmp_path: Path) -> None:
    report, output = run_bench(tmp_path, "--pin", "on", "--vs", "nats", "--nats-processes", "2")
    [nats] = report["nats"]
    assert nats["subscribers_complete"] == 4 and nats["fewest_received"] == 400, nats
    assert nats["consumers"] == "raw push consumers" and not nats["client_errors"], nats
    assert nats["without_subscribers"]["latency"]["count"] > 0 and nats["with_subscribers"]["latency"]["count"] > 0, nats
    assert all(nats[r]["cpu_us_per_submit"][nats["leader"]] > 0 for r in ("without_subscribers", "with_subscribers")), nats
    assert_pinned(nats["affinity"], {"nodes": {0}, "fanout": {1}})
    # Three servers and the publishing benchmark; two consumer processes.
    assert sum(1 for k in nats["affinity"] if k.startswith("nodes")) == 4
    assert sum(1 for k in nats["affinity"] if k.startswith("fanout")) == 2
    table = output[output.index("fan-out: 4 subscribers") :]
    assert "raftseq, 2 relays" in table and "NATS JetStream R3" in table, table


class Written:
    """A writer that keeps what it is given."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_raw_nats_consumers_count_by_reply_subject_find_gaps_and_answer_flow_control() -> None:
    import asyncio

    from benchmarks.peers.nats_jetstream import RawConsumers

    def msg(k: int, seq: int) -> bytes:
        payload = b"NATS/1.0\r\nNats-Msg-Id: r-1\r\n\r\n" + b"x" * 10
        return f"HMSG fanout.0.1.{k} {k + 2} $JS.ACK.BENCH.c{k}.1.{seq}.{seq}.0.0 30 {len(payload)}\r\n".encode() + payload + b"\r\n"

    flow = b"HMSG fanout.0.1.1 3 $JS.FC.BENCH.abc.1 28 28\r\nNATS/1.0 100 FlowControl Request\r\n\r\n\r\n"
    heartbeat = b"HMSG fanout.0.1.0 2 29 29\r\nNATS/1.0 100 Idle Heartbeat\r\n\r\n\r\n"
    stream = msg(0, 10) + msg(1, 10) + b"PING\r\n" + msg(0, 11) + flow + heartbeat + msg(1, 12) + b"+OK\r\n" + msg(0, 12)

    async def scenario() -> RawConsumers:
        consumers = RawConsumers(2, 10)
        consumers._reader, consumers._writer = asyncio.StreamReader(), Written()
        reading = asyncio.create_task(consumers._read())
        for i in range(0, len(stream), 7):  # frames cut anywhere
            consumers._reader.feed_data(stream[i : i + 7])
            await asyncio.sleep(0)
        consumers._reader.feed_eof()
        try:
            await reading
        except ConnectionError:
            pass
        return consumers

    consumers = asyncio.run(scenario())
    assert consumers.counts == [3, 2]
    assert consumers.last_seqs == [12, 12]
    assert consumers.gaps == [0, 1]  # consumer 1 went from 10 to 12
    assert consumers._writer.data == b"PONG\r\nPUB $JS.FC.BENCH.abc.1 0\r\n\r\n"


@pytest.mark.parametrize("cores", ["0:0", "0:x", "01"])
def test_bad_pin_cores_are_a_usage_error(cores: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_fanout", "--pin", "on", "--pin-cores", cores],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "--pin-cores" in done.stderr, done.stderr


def test_pinning_to_cores_this_machine_lacks_is_a_usage_error() -> None:
    missing = max(os.sched_getaffinity(0)) + 1
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_fanout", "--pin", "on", "--pin-cores", f"0:{missing}"],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and f"cores [{missing}] are not available" in done.stderr, done.stderr
