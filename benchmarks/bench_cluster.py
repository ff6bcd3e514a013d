"""Figures of a running three-node raftseq cluster on loopback: throughput, latency, failover
and needless elections, measured through ``SequencerClient`` as an application sees them.

Run from the repository root::

    python benchmarks/bench_cluster.py [--workload throughput|latency|failover|elections|all]
                                       [--quick] [--runs R] [--json FILE]

Each workload starts its own local cluster (``LocalCluster``, three nodes as child processes,
free ports on 127.0.0.1, a temporary data directory) and always stops it, also on a failure,
Ctrl-C or SIGTERM; the temporary directory is removed at the end. Only the node processes this
benchmark started are ever signalled (``LocalCluster.kill`` by node id, ``LocalCluster.stop``).
Every wait has a deadline and every loop a bound.

Workloads (``benchmarks/README_cluster.md`` says what each figure covers):

1. ``throughput`` — acknowledged 100-byte messages per second from one client process, per
   message (``submit_nowait``) and in batches of 500 (``submit_batch_nowait``), and from four
   client processes in batches; median (min, max) of ``--runs`` runs.
2. ``latency`` — a steady offered rate through one client (``submit_nowait``), send times
   scheduled in advance and latency measured from the *intended* send time to the ack
   (coordinated-omission safe).
3. ``failover`` — SIGKILL of the current leader under steady load, ``--kills`` times: kill to
   the first ack of a submit made after the kill, and the longest gap between acks around it.
4. ``elections`` — steady load for ``--elections-seconds``; leader changes seen in status polls
   and in the node logs ("leader is now ...") after the first election: needless elections.

Correctness is checked on the way: every acknowledged sequence number is unique, and since the
benchmark is the only writer of its cluster, the numbers of a cluster form one gapless range
1..N. This is a measurement, not a test: it exits 0 whether or not a goal is met, and 1 when a
workload failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import select
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)  # measure the checkout this file lives in, whatever is installed

from raftseq.clients import SequencerClient  # noqa: E402
from raftseq.cluster.local import LocalCluster, free_base_port, local_configs  # noqa: E402
from raftseq.cluster.status import gather_status  # noqa: E402

WORKLOAD_NAMES = ("throughput", "latency", "failover", "elections", "metrics")

# Goals from the issue.
GOAL_THROUGHPUT_PER_S = 150_000
GOAL_LATENCY_P99_MS = 5.0
GOAL_LATENCY_RATE_PER_S = 2000
GOAL_FAILOVER_MEDIAN_S = 0.5
GOAL_FAILOVER_MAX_S = 1.0
GOAL_NEEDLESS_ELECTIONS = 0

THROUGHPUT_MESSAGES_DEFAULT = 200_000
THROUGHPUT_MESSAGES_QUICK = 20_000
BATCH_SIZE_DEFAULT = 500
CLIENT_PROCESSES_DEFAULT = 4
LATENCY_RATES_DEFAULT = "2000,10000"
LATENCY_SECONDS_DEFAULT = 10.0
LATENCY_SECONDS_QUICK = 2.0
LATENCY_WARMUP_S = 1.0
FAILOVER_RATE_DEFAULT = 2000
KILLS_DEFAULT = 10
KILLS_QUICK = 2
ELECTIONS_RATE_DEFAULT = 5000
ELECTIONS_SECONDS_DEFAULT = 60.0
ELECTIONS_SECONDS_QUICK = 5.0

#: The longest one throughput run may take before it counts as stuck.
RUN_TIMEOUT_S_DEFAULT = 120.0
#: After a steady load stops: how long its outstanding submits may take to be acknowledged.
DRAIN_TIMEOUT_S = 30.0
#: From starting the nodes to a leader every node names.
LEADER_TIMEOUT_S = 20.0
#: Per status request to one node.
STATUS_TIMEOUT_S = 1.0
STATUS_POLL_S = 0.05
ELECTIONS_POLL_S = 0.5
#: After a leader kill: the longest wait for the first ack of a submit made after it.
FAILOVER_TIMEOUT_S = 30.0
#: After restarting the killed node: try this long under load for all three to report the same
#: last_seq, then hold the load until they do (at most CONVERGE_TIMEOUT_S in all).
CONVERGE_UNDER_LOAD_S = 5.0
CONVERGE_TIMEOUT_S = 60.0
#: Steady load between convergence and the next kill.
SETTLE_S = 1.0
#: Acks this long before the kill and after the first post-kill ack bound the gap search.
GAP_WINDOW_S = 1.0
#: Attempts at starting a cluster (a port picked as free may be taken before the nodes bind).
START_ATTEMPTS = 3
LOG_TAIL_LINES = 15
#: The client's window of submits in flight (``SequencerClient`` default).
IN_FLIGHT_MAX_DEFAULT = 10_000

LEADER_LINE = re.compile(r"leader is now (\S+) \(term (\d+)\)")
#: ``SequencerReplica.role`` names a node that knows no leader "candidate".
NO_LEADER_ROLE_LINE = re.compile(r"role \w+ -> candidate")


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
    expect(len(ranges) == 1, f"{what}: sequence numbers are not one gapless run: {_describe_ranges(ranges)}")
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


def _describe_ranges(ranges: list[list[int]]) -> str:
    shown = ", ".join(f"{a}..{b}" for a, b in ranges[:6])
    return shown + (f" and {len(ranges) - 6} more ranges" if len(ranges) > 6 else "")


# --- machine facts ------------------------------------------------------------------------


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def process_cpu_s(pid: int | None) -> float:
    """User plus system CPU seconds of a process, from /proc (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def other_raftseq_nodes(own_pids: set[int]) -> int:
    """raftseq node processes on this machine that this benchmark did not start."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in own_pids:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if b"raftseq.cluster.cli" in cmdline and b"node" in cmdline:
            count += 1
    return count


def code_under_test() -> dict:
    """The git commit, whether the packages a node runs have uncommitted changes, and a digest
    of their source (equal digests, equal code)."""
    digest = hashlib.sha256()
    for package in ("sequencer", "cluster", "clients"):
        directory = os.path.join(REPO_DIR, package)
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                digest.update(f"{package}/{name}".encode() + b"\0")
                with open(os.path.join(directory, name), "rb") as f:
                    digest.update(f.read())
    commit, dirty = "", None
    try:
        git = ["git", "-C", REPO_DIR]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            status = subprocess.run(
                [*git, "status", "--porcelain", "--", "sequencer", "cluster", "clients"], capture_output=True, text=True, timeout=10
            ).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"repo_dir": REPO_DIR, "git_commit": commit, "dirty": dirty, "source_sha256": digest.hexdigest()[:16]}


def machine_facts() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count() or 0,
        "cpu_model": cpu_model(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
    }


def print_load(when: str) -> list[float]:
    load = load_average()
    print(f"load avg  {when} {' '.join(f'{x:.2f}' for x in load)} (1, 5, 15 min)", flush=True)
    return load


# --- the cluster --------------------------------------------------------------------------


class BenchCluster:
    """A started three-node ``LocalCluster`` below `root`, with a leader. ``close`` stops every
    node it started; use it as a context manager."""

    def __init__(self, root: str, name: str, *, insecure: bool, overrides: dict | None) -> None:
        self.directory = os.path.join(root, name)
        self.insecure = insecure
        self.overrides = overrides
        self.cluster: LocalCluster | None = None
        self.base_port = 0
        self.startup_s = 0.0

    def __enter__(self) -> BenchCluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        last_error = ""
        for attempt in range(1, START_ATTEMPTS + 1):
            directory = f"{self.directory}-{attempt}"
            self.base_port = free_base_port(random.Random())
            self.cluster = LocalCluster(directory, self.base_port, insecure=self.insecure, restart=False, overrides=self.overrides)
            started = time.monotonic()
            self.cluster.start()
            try:
                self.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)
            except BenchError as exc:
                last_error = str(exc)
                exited = [n.config.id for n in self.cluster.nodes if n.process is not None and n.process.poll() is not None]
                tails = self.log_tails()
                self.cluster.stop()
                if exited and "Address already in use" in tails and attempt < START_ATTEMPTS:
                    print(f"          ports from {self.base_port} were taken meanwhile; starting again on other ports", flush=True)
                    continue
                raise BenchError(f"cluster did not start: {last_error}\n{tails}") from None
            self.startup_s = time.monotonic() - started
            return
        raise BenchError(f"cluster did not start in {START_ATTEMPTS} attempts: {last_error}")

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    # --- who is where -----------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return self.cluster.endpoints

    @property
    def token(self) -> str:
        return self.cluster.token

    @property
    def pids(self) -> dict[str, int | None]:
        return {n.config.id: (n.process.pid if n.process is not None else None) for n in self.cluster.nodes}

    def node_id_of(self, client_address: str) -> str:
        for node in self.cluster.nodes:
            if node.config.client_address == client_address:
                return node.config.id
        return ""

    def status(self) -> dict:
        return gather_status(self.endpoints, token=self.token, timeout_s=STATUS_TIMEOUT_S)

    def wait_for_leader(self, *, timeout_s: float, exclude: Sequence[str] = ()) -> dict:
        """The status entry of the leader every reachable node names (not one of `exclude`)."""
        deadline = time.monotonic() + timeout_s
        report: dict = {}
        while time.monotonic() < deadline:
            report = self.status()
            up = [n for n in report["nodes"] if n.get("role") != "unreachable"]
            leaders = [n for n in up if n["role"] == "leader" and n["id"] not in exclude]
            if len(leaders) == 1 and all(n["leader"] == leaders[0]["address"] for n in up):
                return leaders[0]
            time.sleep(STATUS_POLL_S)
        raise BenchError(f"no leader that every node names within {timeout_s:.0f} s; last status {report['nodes'] if report else '-'}")

    def converged_seq(self) -> int | None:
        """The last_seq every node reports, or None while they differ or one is unreachable."""
        report = self.status()
        seqs = {n.get("last_seq") for n in report["nodes"]}
        if len(seqs) == 1 and None not in seqs and all(n.get("role") != "unreachable" for n in report["nodes"]):
            return seqs.pop()
        return None

    def wait_converged(self, at: int | None = None, timeout_s: float = CONVERGE_TIMEOUT_S) -> int | str:
        """The last_seq every node reports once they agree (on `at`, if given; followers apply
        a moment after the leader acknowledges), or a sentence saying they did not within
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            seq = self.converged_seq()
            if seq is not None and (at is None or seq == at):
                return seq
            if time.monotonic() >= deadline:
                return f"NOT REACHED within {timeout_s:.0f} s"
            time.sleep(STATUS_POLL_S)

    # --- logs -------------------------------------------------------------------------------

    def log_sizes(self) -> dict[str, int]:
        sizes = {}
        for node in self.cluster.nodes:
            try:
                sizes[node.config.id] = os.path.getsize(node.log_path)
            except OSError:
                sizes[node.config.id] = 0
        return sizes

    def log_lines(self, since: dict[str, int] | None = None) -> dict[str, list[str]]:
        """Each node's log lines, from byte offset ``since[node]`` on."""
        lines = {}
        for node in self.cluster.nodes:
            node_id = node.config.id
            try:
                with open(node.log_path, "rb") as f:
                    f.seek((since or {}).get(node_id, 0))
                    lines[node_id] = f.read().decode("utf-8", "replace").splitlines()
            except OSError:
                lines[node_id] = []
        return lines

    def log_tails(self, count: int = LOG_TAIL_LINES) -> str:
        parts = []
        for node_id, lines in self.log_lines().items():
            tail = lines[-count:]
            parts.append(f"--- {node_id} log (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)


def leader_events(lines_by_node: dict[str, list[str]]) -> dict:
    """What the node logs say about leadership: the terms in which some node learned of a
    leader, "leader is now unknown" lines, and "role ... -> candidate" lines (a node that knows
    no leader, whether or not it stood for election)."""
    terms: set[int] = set()
    unknown = 0
    no_leader_roles = 0
    per_node: dict[str, int] = {}
    for node_id, lines in lines_by_node.items():
        per_node[node_id] = 0
        for line in lines:
            if NO_LEADER_ROLE_LINE.search(line):
                no_leader_roles += 1
            match = LEADER_LINE.search(line)
            if match is None:
                continue
            if match.group(1) == "unknown":
                unknown += 1
                continue
            per_node[node_id] += 1
            terms.add(int(match.group(2)))
    return {"leader_terms": sorted(terms), "leader_lines_per_node": per_node, "unknown_lines": unknown, "no_leader_role_lines": no_leader_roles}


# --- a steady offered rate ------------------------------------------------------------------


def run_precise(coroutine):
    """Run a load generator on an asyncio loop whose timers keep time to the microsecond.

    The default loop waits in ``epoll``, whose timeout is whole milliseconds, rounded up: a
    sender sleeping until its next intended send time woke up to 1 ms late (0.32 ms median lag
    at 2,000 msg/s, measured here), and that lag counts as latency from the intended time.
    ``select`` takes microseconds; a load generator has only a few sockets to watch."""
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
        return runner.run(coroutine)


class SteadyLoad:
    """One client submitting `payload` at `rate_per_s`, send times scheduled in advance
    (``t0 + i / rate``). A sender that falls behind sends at once what is due, so a stall shows
    as latency from the intended time (no coordinated omission). ``hold`` stops sending;
    ``resume`` starts a fresh schedule from now."""

    def __init__(self, client: SequencerClient, *, rate_per_s: float, payload: bytes) -> None:
        self.client = client
        self.rate_per_s = rate_per_s
        self.payload = payload
        #: Per submit, by index: intended send time, actual submit time, ack time (0 until
        #: acknowledged), sequence number (0 until acknowledged). Times are time.monotonic().
        self.intended = array("d")
        self.sent = array("d")
        self.acked_at = array("d")
        self.seqs = array("q")
        self.acked = 0
        self.errors: list[str] = []
        self._running = asyncio.Event()
        self._running.set()
        self._stop = False
        self._t0 = 0.0
        self._i0 = 0
        self._all_acked = asyncio.Event()
        # First ack of a submit with index >= watch_index (failover).
        self.watch_index = -1
        self.watch_acked_at = 0.0
        self._watch_event = asyncio.Event()

    @property
    def submitted(self) -> int:
        return len(self.sent)

    def hold(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._t0 = time.monotonic()
        self._i0 = len(self.sent)
        self._running.set()

    def stop(self) -> None:
        self._stop = True
        self._running.set()

    def watch_from(self, index: int) -> asyncio.Event:
        self.watch_index = index
        self.watch_acked_at = 0.0
        self._watch_event = asyncio.Event()
        return self._watch_event

    async def run(self, *, duration_s: float) -> None:
        """Submit until `duration_s` of schedule passed (time on hold not counted) or ``stop``."""
        client = self.client
        submit = client.submit_nowait
        window = client.in_flight_max
        interval_s = 1.0 / self.rate_per_s
        self._t0 = time.monotonic()
        self._i0 = 0
        scheduled_s = 0.0
        monotonic = time.monotonic
        while not self._stop:
            if not self._running.is_set():
                scheduled_s += (len(self.sent) - self._i0) * interval_s
                await self._running.wait()
                continue
            now = monotonic()
            if scheduled_s + (now - self._t0) >= duration_s:
                break
            due = self._i0 + int((now - self._t0) * self.rate_per_s) + 1
            while len(self.sent) < due and self._running.is_set() and not self._stop:
                if client.in_flight >= window:
                    await asyncio.wait_for(client.wait_for_room(), DRAIN_TIMEOUT_S)
                    continue
                index = len(self.sent)
                self.intended.append(self._t0 + (index - self._i0) * interval_s)
                future = submit(self.payload)
                self.sent.append(monotonic())
                self.acked_at.append(0.0)
                self.seqs.append(0)
                future.add_done_callback(lambda f, i=index: self._done(i, f))
            if not self._running.is_set():
                continue
            next_s = self._t0 + (len(self.sent) - self._i0) * interval_s
            await asyncio.sleep(max(0.0, next_s - monotonic()))

    def _done(self, index: int, future: asyncio.Future) -> None:
        now = time.monotonic()
        if future.cancelled():
            self.errors.append(f"submit {index} cancelled")
            return
        error = future.exception()
        if error is not None:
            self.errors.append(f"submit {index}: {error!r}")
            return
        self.seqs[index] = future.result()
        self.acked_at[index] = now
        self.acked += 1
        if index >= self.watch_index >= 0 and not self.watch_acked_at:
            self.watch_acked_at = now
            self._watch_event.set()
        if self.acked + len(self.errors) >= len(self.sent):
            self._all_acked.set()

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until every submit so far has an outcome; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.acked + len(self.errors) < len(self.sent):
            self._all_acked.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._all_acked.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
        return True

    def latencies_ms(self, *, first_index: int = 0) -> list[float]:
        """Sorted latencies, intended send to ack, of acknowledged submits from `first_index`
        on, in milliseconds."""
        intended, acked_at = self.intended, self.acked_at
        return sorted((acked_at[i] - intended[i]) * 1000 for i in range(first_index, len(self.sent)) if acked_at[i])

    def split_ms(self, *, first_index: int = 0) -> tuple[list[float], list[float]]:
        """Sorted sender lag (intended to actual send) and send-to-ack times, in milliseconds."""
        lag, service = [], []
        for i in range(first_index, len(self.sent)):
            acked_at = self.acked_at[i]
            if acked_at:
                lag.append((self.sent[i] - self.intended[i]) * 1000)
                service.append((acked_at - self.sent[i]) * 1000)
        return sorted(lag), sorted(service)

    def acked_seqs(self) -> list[int]:
        return [s for s in self.seqs if s]


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


async def connected_client(bc: BenchCluster, session: str, *, in_flight_max: int) -> SequencerClient:
    client = SequencerClient(bc.endpoints, session=session, token=bc.token, in_flight_max=in_flight_max)
    await asyncio.wait_for(client.connect(), LEADER_TIMEOUT_S)
    return client


# --- 1. throughput ------------------------------------------------------------------------


@dataclass
class ThroughputRun:
    messages: int
    seconds: float
    seqs_first: int
    seqs_last: int
    cpu_s: dict[str, float]
    reconnects: int = 0
    resubmits: int = 0

    @property
    def per_s(self) -> float:
        return self.messages / self.seconds


def cpu_snapshot(bc: BenchCluster, worker_pids: Sequence[int] = ()) -> dict[str, float]:
    snapshot = {node_id: process_cpu_s(pid) for node_id, pid in bc.pids.items()}
    snapshot["bench"] = time.process_time()
    for k, pid in enumerate(worker_pids):
        snapshot[f"client{k + 1}"] = process_cpu_s(pid)
    return snapshot


def cpu_used(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """CPU share (1.0 = one core busy) of each process over the run."""
    return {key: round((after.get(key, 0.0) - value) / seconds, 2) for key, value in before.items() if key in after}


async def pipelined_run(bc: BenchCluster, session: str, payload: bytes, *, messages: int, batch: int, in_flight_max: int, timeout_s: float) -> tuple[float, list[int], SequencerClient]:
    """Submit `messages` copies of `payload` as fast as the window allows: per message
    (``batch`` 1, ``submit_nowait``) or ``batch`` at a time (``submit_batch_nowait``). Returns
    the seconds from the first submit to the last ack, and the sequence numbers."""
    client = await connected_client(bc, session, in_flight_max=in_flight_max)
    try:
        futures = []
        deadline = time.monotonic() + timeout_s
        started = time.perf_counter()
        if batch == 1:
            submit = client.submit_nowait
            for _ in range(messages):
                if client.in_flight >= in_flight_max:
                    await asyncio.wait_for(client.wait_for_room(), max(0.0, deadline - time.monotonic()))
                futures.append(submit(payload))
        else:
            payloads = [payload] * batch
            sent = 0
            while sent < messages:
                count = min(batch, messages - sent)
                chunk = payloads if count == batch else payloads[:count]
                if client.in_flight + count > in_flight_max:
                    await asyncio.wait_for(client.wait_for_room(count), max(0.0, deadline - time.monotonic()))
                futures.append(client.submit_batch_nowait(chunk))
                sent += count
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            done = sum(1 for f in futures if f.done())
            raise BenchError(
                f"{session}: stuck: {done} of {len(futures)} submit futures done after {timeout_s:.0f} s "
                f"(in flight {client.in_flight}, reconnects {client.reconnects})"
            ) from None
        seconds = time.perf_counter() - started
    except BaseException:
        await client.close()
        raise
    seqs = results if batch == 1 else [s for group in results for s in group]
    return seconds, seqs, client


async def one_client_run(bc: BenchCluster, session: str, payload: bytes, *, messages: int, batch: int, in_flight_max: int, timeout_s: float) -> ThroughputRun:
    before = cpu_snapshot(bc)
    seconds, seqs, client = await pipelined_run(
        bc, session, payload, messages=messages, batch=batch, in_flight_max=in_flight_max, timeout_s=timeout_s
    )
    after = cpu_snapshot(bc)
    try:
        first, last = check_seqs(seqs, session, expected=messages)
        return ThroughputRun(messages, seconds, first, last, cpu_used(before, after, seconds), client.reconnects, client.resubmits)
    finally:
        await client.close()


def worker_main(spec_json: str) -> int:
    """A client process of the multi-process throughput run: connect, say ``ready``, wait for a
    ``go`` line on stdin, submit in batches, print one JSON line with the outcome."""
    spec = json.loads(spec_json)

    async def work() -> dict:
        client = SequencerClient(spec["endpoints"], session=spec["session"], token=spec["token"], in_flight_max=spec["in_flight_max"])
        await asyncio.wait_for(client.connect(), LEADER_TIMEOUT_S)
        try:
            print("ready", flush=True)
            loop = asyncio.get_running_loop()
            line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), spec["timeout_s"])
            if line.strip() != "go":
                return {"error": "no go from the benchmark"}
            payload = b"x" * spec["payload_bytes"]
            started = time.monotonic()
            payloads = [payload] * spec["batch"]
            futures = []
            sent = 0
            deadline = started + spec["timeout_s"]
            while sent < spec["messages"]:
                count = min(spec["batch"], spec["messages"] - sent)
                if client.in_flight + count > client.in_flight_max:
                    await asyncio.wait_for(client.wait_for_room(count), max(0.0, deadline - time.monotonic()))
                futures.append(client.submit_batch_nowait(payloads[:count]))
                sent += count
            results = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
            finished = time.monotonic()
            seqs = [s for group in results for s in group]
            ranges, duplicates = seq_ranges(seqs)
            return {
                "started": started,
                "finished": finished,
                "count": len(seqs),
                "duplicates": duplicates,
                "zeros": sum(1 for s in seqs if s < 1),
                "ranges": ranges,
                "reconnects": client.reconnects,
                "resubmits": client.resubmits,
            }
        finally:
            await client.close()

    try:
        outcome = asyncio.run(work())
    except BaseException as exc:  # noqa: BLE001 - reported to the benchmark as the outcome
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(outcome), flush=True)
    return 0


def _read_line(process: subprocess.Popen, deadline: float) -> str:
    """One line of a worker's stdout, or "" at the deadline or when it closed stdout."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return ""
    ready, _, _ = select.select([process.stdout], [], [], remaining)
    if not ready:
        return ""
    return process.stdout.readline().decode(errors="replace")


def multi_client_run(bc: BenchCluster, label: str, *, processes: int, messages: int, batch: int, payload_bytes: int, in_flight_max: int, timeout_s: float) -> ThroughputRun:
    """`processes` client processes, `messages` between them, each in batches of `batch`."""
    per_worker = [messages // processes + (1 if k < messages % processes else 0) for k in range(processes)]
    workers: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s + LEADER_TIMEOUT_S
    try:
        for k in range(processes):
            spec = {
                "endpoints": bc.endpoints,
                "token": bc.token,
                "session": f"{label}-{k + 1}",
                "messages": per_worker[k],
                "batch": batch,
                "payload_bytes": payload_bytes,
                "in_flight_max": in_flight_max,
                "timeout_s": timeout_s,
            }
            workers.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=REPO_DIR,
                )
            )
        for k, worker in enumerate(workers):
            line = _read_line(worker, deadline)
            if line.strip() != "ready":
                raise BenchError(f"client process {k + 1} did not connect: {line.strip() or 'no answer'}")
        before = cpu_snapshot(bc, [w.pid for w in workers])
        for worker in workers:
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
        outcomes = []
        for k, worker in enumerate(workers):
            line = _read_line(worker, deadline)
            if not line:
                raise BenchError(f"client process {k + 1}: no outcome within {timeout_s:.0f} s (stuck)")
            outcomes.append(json.loads(line))
        after = cpu_snapshot(bc, [w.pid for w in workers])
    finally:
        for worker in workers:
            if worker.poll() is None:
                try:
                    worker.stdin.close()
                except OSError:
                    pass
                try:
                    worker.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
    for k, outcome in enumerate(outcomes):
        expect("error" not in outcome, f"client process {k + 1}: {outcome.get('error')}")
        expect(outcome["count"] == per_worker[k], f"client process {k + 1}: {outcome['count']} numbers for {per_worker[k]} submits")
        expect(not outcome["zeros"], f"client process {k + 1}: {outcome['zeros']} acks without a sequence number")
        expect(not outcome["duplicates"], f"client process {k + 1}: {outcome['duplicates']} duplicate sequence numbers")
    merged = merge_ranges([r for o in outcomes for r in o["ranges"]], label)
    expect(len(merged) == 1, f"{label}: sequence numbers of the {processes} clients are not one gapless run: {_describe_ranges(merged)}")
    seconds = max(o["finished"] for o in outcomes) - min(o["started"] for o in outcomes)
    return ThroughputRun(
        messages,
        seconds,
        merged[0][0],
        merged[0][1],
        cpu_used(before, after, seconds),
        sum(o["reconnects"] for o in outcomes),
        sum(o["resubmits"] for o in outcomes),
    )


def workload_throughput(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    variants = [
        ("per_message", f"1 client, submit_nowait per message (window {args.in_flight_max:,})", 1, 1),
        ("batched", f"1 client, submit_batch_nowait, batches of {args.batch}", args.batch, 1),
        ("processes", f"{args.processes} client processes, submit_batch_nowait, batches of {args.batch}", args.batch, args.processes),
    ]
    with BenchCluster(root, "throughput", insecure=args.insecure, overrides=args.overrides) as bc:
        print(f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; {args.messages:,} messages per run", flush=True)
        all_ranges: list[list[int]] = []

        async def warm_up() -> None:
            messages = min(args.messages, 20_000)
            run = await one_client_run(bc, "tp-warmup", payload, messages=messages, batch=args.batch, in_flight_max=args.in_flight_max, timeout_s=args.run_timeout_s)
            all_ranges.append([run.seqs_first, run.seqs_last])

        asyncio.run(warm_up())
        runs: dict[str, list[ThroughputRun]] = {key: [] for key, *_ in variants}
        # Interleaved (a, b, c, a, b, c, ...) so a change in the machine's load hits every variant.
        for r in range(args.runs):
            for key, _, batch, processes in variants:
                session = f"tp-{key}-{r + 1}"
                if processes == 1:
                    run = asyncio.run(
                        one_client_run(bc, session, payload, messages=args.messages, batch=batch, in_flight_max=args.in_flight_max, timeout_s=args.run_timeout_s)
                    )
                else:
                    run = multi_client_run(
                        bc, session, processes=processes, messages=args.messages, batch=batch,
                        payload_bytes=args.payload_bytes, in_flight_max=args.in_flight_max, timeout_s=args.run_timeout_s,
                    )
                runs[key].append(run)
                all_ranges.append([run.seqs_first, run.seqs_last])
                print(
                    f"    run {r + 1} {key:<12} {run.per_s:>10,.0f} msg/s  ({run.messages:,} in {run.seconds:.2f} s, "
                    f"seqs {run.seqs_first:,}..{run.seqs_last:,} unique and gapless; cpu {_cpu_text(run.cpu_s)}"
                    + (f"; reconnects {run.reconnects}, resubmits {run.resubmits}" if run.reconnects or run.resubmits else "")
                    + ")",
                    flush=True,
                )
        merged = merge_ranges(all_ranges, "throughput workload")
        expect(len(merged) == 1 and merged[0][0] == 1, f"throughput workload: numbers are not one run from 1: {_describe_ranges(merged)}")
        final = bc.wait_converged()
    result: dict = {"messages_per_run": args.messages, "payload_bytes": args.payload_bytes, "variants": {}}
    print()
    for key, title, batch, processes in variants:
        rates = [run.per_s for run in runs[key]]
        s = spread(rates)
        status = goal_text(s["median"] >= GOAL_THROUGHPUT_PER_S, s["median"] / GOAL_THROUGHPUT_PER_S - 1)
        print(f"  {key:<12} {s['median']:>10,.0f} msg/s   min {s['min']:>9,.0f}  max {s['max']:>9,.0f}   goal >= {GOAL_THROUGHPUT_PER_S:,}: {status}")
        print(f"  {'':<12} {title}")
        result["variants"][key] = {
            "title": title,
            "batch": batch,
            "processes": processes,
            "messages_per_s": s,
            "goal_messages_per_s": GOAL_THROUGHPUT_PER_S,
            "goal_met": s["median"] >= GOAL_THROUGHPUT_PER_S,
            "cpu_share_runs": [run.cpu_s for run in runs[key]],
            "reconnects": sum(run.reconnects for run in runs[key]),
            "resubmits": sum(run.resubmits for run in runs[key]),
        }
    print(f"  check: {merged[0][1]:,} sequence numbers 1..{merged[0][1]:,}, unique and gapless; nodes converged at {final}")
    result["total_sequenced"] = merged[0][1]
    return result


def _cpu_text(cpu: dict[str, float]) -> str:
    return " ".join(f"{key} {100 * share:.0f}%" for key, share in cpu.items())


def goal_text(met: bool, margin: float) -> str:
    if met:
        return "met"
    return f"MISSED by {-100 * margin:.0f}%" if margin < 0 else "MISSED"


# --- 2. latency ---------------------------------------------------------------------------


def workload_latency(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    result: dict = {"seconds": args.latency_seconds, "warmup_s": LATENCY_WARMUP_S, "rates": {}}
    with BenchCluster(root, "latency", insecure=args.insecure, overrides=args.overrides) as bc:
        print(f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; {args.latency_seconds:.0f} s per rate after {LATENCY_WARMUP_S:.0f} s warm-up", flush=True)
        total_acked = 0

        async def one_rate(rate: int) -> dict:
            client = await connected_client(bc, f"latency-{rate}", in_flight_max=args.in_flight_max)
            try:
                load = SteadyLoad(client, rate_per_s=rate, payload=payload)
                leader = (await _status(bc))["leader"]
                before, started = cpu_snapshot(bc), time.monotonic()
                await load.run(duration_s=LATENCY_WARMUP_S + args.latency_seconds)
                cpu = cpu_used(before, cpu_snapshot(bc), time.monotonic() - started)
                drained = await load.drain()
                first_index = int(LATENCY_WARMUP_S * rate)
                total = load.latencies_ms(first_index=first_index)
                lag, service = load.split_ms(first_index=first_index)
                measured = load.submitted - first_index
                expect(drained, f"{rate} msg/s: {load.submitted - load.acked} of {load.submitted} submits unacknowledged {DRAIN_TIMEOUT_S:.0f} s after the load stopped")
                expect(not load.errors, f"{rate} msg/s: {len(load.errors)} submits failed, first: {load.errors[:1]}")
                seqs = load.acked_seqs()
                check_seqs(seqs, f"latency {rate} msg/s", expected=load.submitted)
                return {
                    "offered_per_s": rate,
                    "achieved_per_s": measured / args.latency_seconds,
                    "submitted": load.submitted,
                    "latency": latency_summary(total),
                    "sender_lag": latency_summary(lag),
                    "service": latency_summary(service),
                    "reconnects": client.reconnects,
                    "leader": bc.node_id_of(leader),
                    "cpu_share": cpu,
                    "seqs": seqs,
                }
            finally:
                await client.close()

        for rate in args.rates:
            load_now = load_average()
            outcome = run_precise(one_rate(rate))
            total_acked += len(outcome.pop("seqs"))
            s = outcome["latency"]
            goal = ""
            if rate == GOAL_LATENCY_RATE_PER_S:
                met = s["p99_ms"] <= GOAL_LATENCY_P99_MS
                goal = f"   goal p99 <= {GOAL_LATENCY_P99_MS:.0f} ms: {'met' if met else 'MISSED'}"
                outcome["goal_p99_ms"] = GOAL_LATENCY_P99_MS
                outcome["goal_met"] = met
            print(f"  {rate:,} msg/s offered ({outcome['submitted']:,} submits, load avg {load_now[0] if load_now else '-'}){goal}")
            print(latency_line("intended -> ack", s))
            print(latency_line("sender lag", outcome["sender_lag"]))
            print(latency_line("send -> ack", outcome["service"]))
            print(f"  {'':<18} cpu {_cpu_text(outcome['cpu_share'])} (leader {outcome['leader'] or '?'})", flush=True)
            if outcome["reconnects"]:
                print(f"  {'':<18} client reconnected {outcome['reconnects']} times")
            result["rates"][str(rate)] = outcome
        final = bc.wait_converged()
        expect(final is None or final == total_acked, f"latency workload: nodes hold {final} messages, {total_acked} were acknowledged")
    return result


# --- 3. failover --------------------------------------------------------------------------


def largest_gap_s(times: Sequence[float]) -> float:
    ordered = sorted(times)
    return max((b - a for a, b in zip(ordered, ordered[1:])), default=0.0)


async def _status(bc: BenchCluster) -> dict:
    return await asyncio.to_thread(bc.status)


async def _wait_for_leader(bc: BenchCluster, *, timeout_s: float, exclude: Sequence[str] = ()) -> dict:
    return await asyncio.to_thread(bc.wait_for_leader, timeout_s=timeout_s, exclude=exclude)


async def _converge(bc: BenchCluster, load: SteadyLoad) -> tuple[float, int, bool]:
    """Wait until all three nodes report the same last_seq: under load for a while, then with
    the load held. Returns (seconds, last_seq, whether the load was held)."""
    started = time.monotonic()
    deadline = started + CONVERGE_TIMEOUT_S
    held = False
    try:
        while time.monotonic() < deadline:
            seq = await asyncio.to_thread(bc.converged_seq)
            if seq is not None:
                return time.monotonic() - started, seq, held
            if not held and time.monotonic() - started >= CONVERGE_UNDER_LOAD_S:
                load.hold()
                held = True
            await asyncio.sleep(STATUS_POLL_S)
    finally:
        if held:
            load.resume()
    report = await _status(bc)
    raise BenchError(f"nodes did not report the same last_seq within {CONVERGE_TIMEOUT_S:.0f} s: {report['nodes']}")


def workload_failover(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    kills: list[dict] = []
    with BenchCluster(root, "failover", insecure=args.insecure, overrides=args.overrides) as bc:
        print(
            f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; {args.kills} leader kills under "
            f"{args.failover_rate:,} msg/s",
            flush=True,
        )

        async def run() -> dict:
            client = await connected_client(bc, "failover", in_flight_max=args.in_flight_max)
            load = SteadyLoad(client, rate_per_s=args.failover_rate, payload=payload)
            # Long enough for every kill, each bounded below; stopped when the kills are done.
            budget_s = args.kills * (FAILOVER_TIMEOUT_S + CONVERGE_TIMEOUT_S + LEADER_TIMEOUT_S + SETTLE_S + 5)
            sender = asyncio.create_task(load.run(duration_s=budget_s), name="failover-load")
            try:
                await asyncio.sleep(SETTLE_S)
                for k in range(args.kills):
                    expect(not sender.done(), f"the load stopped early: {sender.exception() if sender.done() else ''}")
                    leader = await _wait_for_leader(bc, timeout_s=LEADER_TIMEOUT_S)
                    leader_id, term = leader["id"], leader["term"]
                    failovers_before = client.failovers
                    event = load.watch_from(load.submitted)
                    killed_at = time.monotonic()
                    bc.cluster.kill(leader_id)
                    try:
                        await asyncio.wait_for(event.wait(), FAILOVER_TIMEOUT_S)
                    except TimeoutError:
                        raise BenchError(
                            f"kill {k + 1} ({leader_id}): no submit made after the kill was acknowledged within "
                            f"{FAILOVER_TIMEOUT_S:.0f} s (client reconnects {client.reconnects}, in flight {client.in_flight})\n{bc.log_tails()}"
                        ) from None
                    failover_s = load.watch_acked_at - killed_at
                    await asyncio.sleep(GAP_WINDOW_S)
                    window = [
                        t for t in load.acked_at
                        if killed_at - GAP_WINDOW_S <= t <= load.watch_acked_at + GAP_WINDOW_S
                    ]
                    before = [t for t in load.acked_at if 0 < t < killed_at]
                    if before:
                        window.append(max(before))
                    gap_s = largest_gap_s(window)
                    new_leader = await _wait_for_leader(bc, timeout_s=LEADER_TIMEOUT_S, exclude=[leader_id])
                    client_failover_s = client.last_failover_s if client.failovers > failovers_before else None
                    restarted_at = time.monotonic()
                    bc.cluster.restart_node(leader_id)
                    converge_s, last_seq, held = await _converge(bc, load)
                    after = await _wait_for_leader(bc, timeout_s=LEADER_TIMEOUT_S)
                    record = {
                        "killed": leader_id,
                        "term": term,
                        "new_leader": new_leader["id"],
                        "new_term": new_leader["term"],
                        "failover_s": failover_s,
                        "ack_gap_s": gap_s,
                        "client_last_failover_s": client_failover_s,
                        "client_failovers": client.failovers - failovers_before,
                        "rejoin_converge_s": converge_s,
                        "converged_seq": last_seq,
                        "load_held_to_converge": held,
                        "leader_after_rejoin": after["id"],
                        "term_after_rejoin": after["term"],
                    }
                    kills.append(record)
                    note = []
                    if held:
                        note.append("load held to converge")
                    if after["term"] != new_leader["term"]:
                        note.append(f"rejoin changed the term {new_leader['term']} -> {after['term']} (leader {after['id']})")
                    client_text = f"{client_failover_s:.3f} s" if client_failover_s is not None else "no reconnect"
                    print(
                        f"    kill {k + 1:>2} {leader_id} (term {term}) -> {new_leader['id']} (term {new_leader['term']}): "
                        f"failover {failover_s:.3f} s, ack gap {gap_s:.3f} s, client.last_failover_s {client_text}; "
                        f"rejoined and converged at seq {last_seq:,} in {converge_s:.2f} s (after restart at +{restarted_at - killed_at:.2f} s)"
                        + (f"; {'; '.join(note)}" if note else ""),
                        flush=True,
                    )
                    await asyncio.sleep(SETTLE_S)
            finally:
                load.stop()
                try:
                    await asyncio.wait_for(sender, 5)
                except (TimeoutError, asyncio.CancelledError):
                    pass
            drained = await load.drain()
            expect(drained, f"failover: {load.submitted - load.acked} of {load.submitted} submits unacknowledged {DRAIN_TIMEOUT_S:.0f} s after the load stopped")
            expect(not load.errors, f"failover: {len(load.errors)} submits failed, first: {load.errors[:1]}")
            seqs = load.acked_seqs()
            first, last = check_seqs(seqs, "failover", expected=load.submitted)
            total = load.latencies_ms()
            outcome = {
                "submitted": load.submitted,
                "seqs": [first, last],
                "client_failovers": client.failovers,
                "client_reconnects": client.reconnects,
                "client_resubmits": client.resubmits,
                "latency_all": latency_summary(total),
            }
            await client.close()
            return outcome

        outcome = run_precise(run())
        final = bc.wait_converged()
        expect(final is None or final == outcome["seqs"][1], f"failover: nodes hold {final} messages, {outcome['seqs'][1]} were acknowledged")
    failovers = [k["failover_s"] for k in kills]
    gaps = [k["ack_gap_s"] for k in kills]
    client_s = [k["client_last_failover_s"] for k in kills if k["client_last_failover_s"] is not None]
    median_s, max_s = statistics.median(failovers), max(failovers)
    met_median, met_max = median_s <= GOAL_FAILOVER_MEDIAN_S, max_s <= GOAL_FAILOVER_MAX_S
    print()
    print(
        f"  kill -> first ack of a new submit   median {median_s:.3f} s  max {max_s:.3f} s   "
        f"goal median <= {GOAL_FAILOVER_MEDIAN_S} s: {'met' if met_median else 'MISSED'}, "
        f"max <= {GOAL_FAILOVER_MAX_S:.0f} s: {'met' if met_max else 'MISSED'}"
    )
    print(f"  longest gap between acks           median {statistics.median(gaps):.3f} s  max {max(gaps):.3f} s")
    if client_s:
        print(f"  client.last_failover_s             median {statistics.median(client_s):.3f} s  max {max(client_s):.3f} s   ({len(client_s)} of {len(kills)} kills)")
    rejoin_elections = sum(1 for k in kills if k["term_after_rejoin"] != k["new_term"])
    print(
        f"  check: {outcome['submitted']:,} submits, sequence numbers {outcome['seqs'][0]:,}..{outcome['seqs'][1]:,} unique and gapless; "
        f"client failovers {outcome['client_failovers']}, resubmits {outcome['client_resubmits']:,}; "
        f"elections caused by a rejoining node {rejoin_elections}"
    )
    return {
        "rate_per_s": args.failover_rate,
        "kills": kills,
        "failover_s": {"median": median_s, "max": max_s},
        "ack_gap_s": {"median": statistics.median(gaps), "max": max(gaps)},
        "client_last_failover_s": {"median": statistics.median(client_s), "max": max(client_s)} if client_s else None,
        "goal_median_s": GOAL_FAILOVER_MEDIAN_S,
        "goal_max_s": GOAL_FAILOVER_MAX_S,
        "goal_met": met_median and met_max,
        "rejoin_elections": rejoin_elections,
        **outcome,
    }


# --- 4. elections -------------------------------------------------------------------------


def workload_elections(args: argparse.Namespace, root: str) -> dict:
    payload = b"x" * args.payload_bytes
    with BenchCluster(root, "elections", insecure=args.insecure, overrides=args.overrides) as bc:
        first = bc.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)
        startup_events = leader_events(bc.log_lines())
        offsets = bc.log_sizes()
        print(
            f"  cluster up in {bc.startup_s:.2f} s, base port {bc.base_port}; first leader {first['id']} (term {first['term']}); "
            f"{args.elections_rate:,} msg/s for {args.elections_seconds:.0f} s",
            flush=True,
        )

        async def run() -> dict:
            client = await connected_client(bc, "elections", in_flight_max=args.in_flight_max)
            load = SteadyLoad(client, rate_per_s=args.elections_rate, payload=payload)
            before, cpu_started = cpu_snapshot(bc), time.monotonic()
            sender = asyncio.create_task(load.run(duration_s=args.elections_seconds), name="elections-load")
            seen: list[dict] = []
            leader, term = first["address"], first["term"]
            polls = unreachable = 0
            next_report = time.monotonic() + 60
            try:
                while not sender.done():
                    report = await _status(bc)
                    polls += 1
                    up = [n for n in report["nodes"] if n.get("role") != "unreachable"]
                    unreachable += len(report["nodes"]) - len(up)
                    top_term = max((n["term"] for n in up), default=term)
                    if (report["leader"] and report["leader"] != leader) or top_term > term:
                        event = {"at_s": round(time.monotonic() - started, 2), "leader": report["leader"], "term": top_term}
                        seen.append(event)
                        print(f"    leader change at +{event['at_s']:.1f} s: {bc.node_id_of(report['leader']) or 'none'} term {top_term}", flush=True)
                        leader = report["leader"] or leader
                        term = max(term, top_term)
                    if time.monotonic() >= next_report:
                        next_report += 60
                        print(f"    +{time.monotonic() - started:.0f} s: {load.acked:,} acked, {len(seen)} leader changes, load avg {load_average()[:1]}", flush=True)
                    try:
                        await asyncio.wait_for(asyncio.shield(sender), ELECTIONS_POLL_S)
                    except TimeoutError:
                        pass
                sender.result()
                cpu = cpu_used(before, cpu_snapshot(bc), time.monotonic() - cpu_started)
            finally:
                load.stop()
                if not sender.done():
                    sender.cancel()
            drained = await load.drain()
            expect(drained, f"elections: {load.submitted - load.acked} of {load.submitted} submits unacknowledged {DRAIN_TIMEOUT_S:.0f} s after the load stopped")
            expect(not load.errors, f"elections: {len(load.errors)} submits failed, first: {load.errors[:1]}")
            seqs = load.acked_seqs()
            first_seq, last_seq = check_seqs(seqs, "elections", expected=load.submitted)
            total = load.latencies_ms()
            outcome = {
                "status_changes": seen,
                "status_polls": polls,
                "status_unreachable": unreachable,
                "submitted": load.submitted,
                "achieved_per_s": load.submitted / args.elections_seconds,
                "seqs": [first_seq, last_seq],
                "latency": latency_summary(total),
                "client_failovers": client.failovers,
                "client_reconnects": client.reconnects,
                "cpu_share": cpu,
            }
            await client.close()
            return outcome

        started = time.monotonic()
        outcome = run_precise(run())
        events = leader_events(bc.log_lines(offsets))
        final = bc.wait_converged()
    log_elections = len([t for t in events["leader_terms"] if t > first["term"]])
    status_elections = len(outcome["status_changes"])
    needless = max(log_elections, status_elections)
    met = needless <= GOAL_NEEDLESS_ELECTIONS
    print()
    print(f"  needless elections {needless}   goal {GOAL_NEEDLESS_ELECTIONS}: {'met' if met else 'MISSED'}")
    print(f"    seen in {outcome['status_polls']} status polls: {status_elections} leader changes")
    print(
        f"    in the node logs after the first election: leaders named in terms {events['leader_terms'] or '-'} "
        f"({log_elections} new terms), {events['unknown_lines']} 'leader is now unknown' lines, "
        f"{events['no_leader_role_lines']} 'role -> candidate' (no leader known) lines"
    )
    print(
        f"    before the load (start-up): leaders named in terms {startup_events['leader_terms']}"
    )
    s = outcome["latency"]
    print(latency_line(f"{args.elections_rate} msg/s", s))
    print(f"  {'':<18} cpu {_cpu_text(outcome['cpu_share'])} (first leader {first['id']})")
    print(
        f"  check: {outcome['submitted']:,} submits, sequence numbers {outcome['seqs'][0]:,}..{outcome['seqs'][1]:,} unique and gapless; "
        f"client failovers {outcome['client_failovers']}, reconnects {outcome['client_reconnects']}; nodes converged at {final}"
    )
    return {
        "rate_per_s": args.elections_rate,
        "seconds": args.elections_seconds,
        "first_leader": first["id"],
        "first_term": first["term"],
        "needless_elections": needless,
        "status_leader_changes": status_elections,
        "log_new_terms": log_elections,
        "log_events": events,
        "startup_log_events": startup_events,
        "goal": GOAL_NEEDLESS_ELECTIONS,
        "goal_met": met,
        **outcome,
    }


# --- 5. what metrics cost ------------------------------------------------------------------

#: Goal of the metrics workload: throughput with metrics on within this fraction of it off.
GOAL_METRICS_COST = 0.05


class Scraper:
    """Fetches every node's /metrics every `interval_s` on a thread, as Prometheus would."""

    def __init__(self, urls: Sequence[str], interval_s: float) -> None:
        self.urls = list(urls)
        self.interval_s = interval_s
        self.scrapes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        response.read()
                    self.scrapes += 1
                except OSError:
                    self.errors += 1


def workload_metrics(args: argparse.Namespace, root: str) -> dict:
    """Batched throughput with metrics on (HTTP server, scraped every --scrape-interval) and off
    (no metrics server), alternating, each run on a fresh cluster."""
    payload = b"x" * args.payload_bytes
    modes = {"on": dict(args.overrides or {}), "off": {**(args.overrides or {}), "metrics_address": ""}}
    runs: dict[str, list[float]] = {"on": [], "off": []}
    scrapes = 0
    for r in range(args.runs):
        for mode, overrides in modes.items():
            with BenchCluster(root, f"metrics-{mode}-{r + 1}", insecure=args.insecure, overrides=overrides) as bc:
                urls = [f"http://{n.config.metrics_address}/metrics" for n in bc.cluster.nodes if n.config.metrics_address]
                expect((mode == "on") == bool(urls), f"metrics {mode}: nodes serve metrics at {urls}")

                async def measured() -> ThroughputRun:
                    await one_client_run(bc, "warm-up", payload, messages=min(args.messages, 20_000), batch=args.batch, in_flight_max=args.in_flight_max, timeout_s=args.run_timeout_s)
                    return await one_client_run(bc, "measured", payload, messages=args.messages, batch=args.batch, in_flight_max=args.in_flight_max, timeout_s=args.run_timeout_s)

                if urls:
                    with Scraper(urls, args.scrape_interval) as scraper:
                        run = asyncio.run(measured())
                    expect(scraper.errors == 0, f"metrics on: {scraper.errors} scrapes failed")
                    scrapes += scraper.scrapes
                else:
                    run = asyncio.run(measured())
            runs[mode].append(run.per_s)
            print(f"    run {r + 1} metrics {mode:<3} {run.per_s:>10,.0f} msg/s  (cpu {_cpu_text(run.cpu_s)}, load {load_average()[0]:.2f})", flush=True)
    on, off = spread(runs["on"]), spread(runs["off"])
    cost = 1 - on["median"] / off["median"]
    met = cost <= GOAL_METRICS_COST
    print(f"  metrics on   {on['median']:>10,.0f} msg/s   min {on['min']:>9,.0f}  max {on['max']:>9,.0f}   ({scrapes} scrapes, every {args.scrape_interval} s)")
    print(f"  metrics off  {off['median']:>10,.0f} msg/s   min {off['min']:>9,.0f}  max {off['max']:>9,.0f}")
    print(f"  on/off {on['median'] / off['median']:.3f}: metrics cost {100 * cost:.1f}%   goal <= {100 * GOAL_METRICS_COST:.0f}%: {'met' if met else 'MISSED'}")
    return {"on_messages_per_s": on, "off_messages_per_s": off, "cost": cost, "goal_met": met, "scrape_interval_s": args.scrape_interval, "scrapes": scrapes}


WORKLOADS = {
    "throughput": ("1. throughput: acknowledged messages per second", workload_throughput),
    "latency": ("2. latency at a steady offered rate (from the intended send time)", workload_latency),
    "failover": ("3. failover: SIGKILL of the leader under steady load", workload_failover),
    "elections": ("4. needless elections under steady load", workload_elections),
    "metrics": ("5. what metrics cost: batched throughput with metrics on (scraped) and off", workload_metrics),
}


# --- the command --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _rates(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


def _override(text: str) -> tuple[str, str, object]:
    """``section.key=value`` (value as JSON, else as a string)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.partition(".")
    if not sep or not dot or not section or not key:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section, key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_cluster.py",
        description="Throughput, latency, failover and needless elections of a local three-node raftseq cluster.",
    )
    add = parser.add_argument
    add("--workload", choices=[*WORKLOAD_NAMES, "all"], default="all", help="what to measure (default all)")
    add("--quick", action="store_true", help="short runs for a smoke test (the figures mean little against the goals)")
    add("--runs", type=_positive_int, default=None, help="throughput runs of each variant; the median is the figure (default 3; --quick 1)")
    add("--messages", type=_positive_int, default=None,
        help=f"messages per throughput run (default {THROUGHPUT_MESSAGES_DEFAULT:,}; --quick {THROUGHPUT_MESSAGES_QUICK:,})")
    add("--batch", type=_positive_int, default=BATCH_SIZE_DEFAULT, help=f"payloads per submit_batch_nowait call (default {BATCH_SIZE_DEFAULT})")
    add("--processes", type=_positive_int, default=CLIENT_PROCESSES_DEFAULT,
        help=f"client processes of the multi-process throughput variant (default {CLIENT_PROCESSES_DEFAULT})")
    add("--payload-bytes", type=int, default=100, help="bytes of each payload (default 100)")
    add("--in-flight-max", type=_positive_int, default=IN_FLIGHT_MAX_DEFAULT,
        help=f"each client's window of unacknowledged submits (default {IN_FLIGHT_MAX_DEFAULT:,})")
    add("--run-timeout-s", type=_positive_float, default=RUN_TIMEOUT_S_DEFAULT,
        help=f"a throughput run taking longer is stuck (default {RUN_TIMEOUT_S_DEFAULT:.0f})")
    add("--rates", type=_rates, default=_rates(LATENCY_RATES_DEFAULT), help=f"offered rates of the latency workload, msg/s (default {LATENCY_RATES_DEFAULT})")
    add("--latency-seconds", type=_positive_float, default=None,
        help=f"measured seconds per rate (default {LATENCY_SECONDS_DEFAULT:.0f}; --quick {LATENCY_SECONDS_QUICK:.0f})")
    add("--kills", type=_positive_int, default=None, help=f"leader kills of the failover workload (default {KILLS_DEFAULT}; --quick {KILLS_QUICK})")
    add("--failover-rate", type=_positive_int, default=FAILOVER_RATE_DEFAULT, help=f"offered rate during the kills (default {FAILOVER_RATE_DEFAULT})")
    add("--elections-seconds", type=_positive_float, default=None,
        help=f"seconds of steady load of the elections workload (default {ELECTIONS_SECONDS_DEFAULT:.0f}; --quick "
        f"{ELECTIONS_SECONDS_QUICK:.0f}; the issue's 10 minutes: 600)")
    add("--elections-rate", type=_positive_int, default=ELECTIONS_RATE_DEFAULT, help=f"offered rate of the elections workload (default {ELECTIONS_RATE_DEFAULT})")
    add("--scrape-interval", type=_positive_float, default=1.0, help="seconds between scrapes of every node in the metrics workload (default 1)")
    add("--set", dest="sets", type=_override, action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="a node setting for every node, e.g. raft.election_timeout_min_s=0.3 (repeatable)")
    add("--insecure", action="store_true", help="no Raft password and no client token (unencrypted Raft links)")
    add("--dir", default="", metavar="DIR", help="parent of the temporary directory (default: the system's)")
    add("--json", default="", metavar="FILE", help="also write the report as JSON to FILE")
    add("--worker", default="", help=argparse.SUPPRESS)
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    quick = args.quick
    if args.runs is None:
        args.runs = 1 if quick else 3
    if args.messages is None:
        args.messages = THROUGHPUT_MESSAGES_QUICK if quick else THROUGHPUT_MESSAGES_DEFAULT
    if args.latency_seconds is None:
        args.latency_seconds = LATENCY_SECONDS_QUICK if quick else LATENCY_SECONDS_DEFAULT
    if args.kills is None:
        args.kills = KILLS_QUICK if quick else KILLS_DEFAULT
    if args.elections_seconds is None:
        args.elections_seconds = ELECTIONS_SECONDS_QUICK if quick else ELECTIONS_SECONDS_DEFAULT
    if not args.rates:
        parser.error("--rates: at least one rate")
    if args.batch > args.in_flight_max:
        parser.error("--batch must not exceed --in-flight-max")
    if not 0 <= args.payload_bytes <= 65536:
        parser.error("--payload-bytes must be 0..65536")
    overrides: dict = {}
    for section, key, value in args.sets:
        overrides.setdefault(section, {})[key] = value
    args.overrides = overrides or None
    try:
        local_configs(tempfile.gettempdir(), 20000, insecure=args.insecure, overrides=args.overrides)
    except (ValueError, TypeError, AttributeError) as exc:
        parser.error(f"--set: {exc}")
    args.names = list(WORKLOAD_NAMES) if args.workload == "all" else [args.workload]


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally that stops the nodes


def bench(args: argparse.Namespace, root: str) -> tuple[dict, bool]:
    facts = machine_facts()
    code = code_under_test()
    print("raftseq cluster benchmark")
    commit = code["git_commit"] or "no git checkout"
    changes = {True: ", with uncommitted changes", False: ", clean", None: ""}[code["dirty"]]
    print(f"code      {code['repo_dir']} ({commit}{changes}; sequencer+cluster+clients sha256 {code['source_sha256']})")
    print(f"machine   nproc {facts['nproc']} (of {facts['cpu_count']}), {facts['cpu_model']}")
    print(f"          {facts['python']}, {facts['platform']}")
    others = other_raftseq_nodes(set())
    print(f"          other raftseq node processes running on this machine: {others}")
    load_start = print_load("at start")
    mode = "insecure (no Raft encryption, no token)" if args.insecure else "secure (Raft password: encrypted links; client token)"
    print(f"cluster   3 local nodes per workload, {mode}; node settings: defaults" + (f" + {args.overrides}" if args.overrides else ""))
    print(f"          payload {args.payload_bytes} B, client window {args.in_flight_max:,}" + ("; QUICK: figures mean little against the goals" if args.quick else ""))
    report: dict = {
        "benchmark": "raftseq cluster",
        "code": code,
        "machine": facts,
        "other_raftseq_nodes_at_start": others,
        "load_average_start": load_start,
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("sets", "worker", "json", "names")
        },
        "workloads": {},
        "failures": {},
    }
    failed = False
    for name in args.names:
        title, function = WORKLOADS[name]
        print(f"\n{title}", flush=True)
        load_before = load_average()
        started = time.monotonic()
        try:
            outcome = function(args, root)
        except BenchError as exc:
            failed = True
            print(f"  FAILED: {exc}", flush=True)
            report["failures"][name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one workload's crash must not hide the others
            failed = True
            print(f"  CRASHED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", flush=True)
            report["failures"][name] = f"{type(exc).__name__}: {exc}"
            continue
        outcome["wall_s"] = round(time.monotonic() - started, 1)
        outcome["load_average_before"] = load_before
        outcome["load_average_after"] = load_average()
        report["workloads"][name] = outcome
    print()
    report["load_average_end"] = print_load("at end")
    goals = []
    w = report["workloads"]
    if "throughput" in w:
        best = max(v["messages_per_s"]["median"] for v in w["throughput"]["variants"].values())
        goals.append(f"throughput {best:,.0f} msg/s (best median) >= {GOAL_THROUGHPUT_PER_S:,}: {'met' if best >= GOAL_THROUGHPUT_PER_S else 'MISSED'}")
    if "latency" in w and str(GOAL_LATENCY_RATE_PER_S) in w["latency"]["rates"]:
        p99 = w["latency"]["rates"][str(GOAL_LATENCY_RATE_PER_S)]["latency"]["p99_ms"]
        goals.append(f"p99 {p99:.2f} ms at {GOAL_LATENCY_RATE_PER_S} msg/s <= {GOAL_LATENCY_P99_MS:.0f}: {'met' if p99 <= GOAL_LATENCY_P99_MS else 'MISSED'}")
    if "failover" in w:
        f = w["failover"]["failover_s"]
        goals.append(f"failover median {f['median']:.3f} s / max {f['max']:.3f} s: {'met' if w['failover']['goal_met'] else 'MISSED'}")
    if "metrics" in w:
        goals.append(f"metrics cost {100 * w['metrics']['cost']:.1f}% <= {100 * GOAL_METRICS_COST:.0f}%: {'met' if w['metrics']['goal_met'] else 'MISSED'}")
    if "elections" in w:
        goals.append(f"needless elections {w['elections']['needless_elections']}: {'met' if w['elections']['goal_met'] else 'MISSED'}")
    for name in report["failures"]:
        goals.append(f"{name} FAILED")
    print("goals     " + ("\n          ".join(goals) if goals else "-"))
    return report, failed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    resolve(args, parser)
    signal.signal(signal.SIGTERM, _terminate)
    # Interruptible even when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = tempfile.mkdtemp(prefix="raftseq-bench-cluster-", dir=args.dir or None)
    try:
        report, failed = bench(args, root)
    except KeyboardInterrupt:
        print("\ninterrupted: nodes stopped", file=sys.stderr)
        return 130
    except SystemExit:
        print("\nterminated: nodes stopped", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"report    {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
