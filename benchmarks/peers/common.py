"""What the peer baselines share: child processes stopped by pid, free loopback ports, a JSON-line
control channel to a child, per-message timing records, and the figures computed from them
(latency from the intended send time, failover from a kill time).

The number helpers (percentiles, latency summary, spread, load average, CPU time from /proc)
come from ``bench_cluster.py`` so that raftseq and its peers are summarised by the same code.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Sequence

from benchmarks.bench_cluster import (  # noqa: F401 - re-exported for the peers
    BenchError,
    expect,
    largest_gap_s,
    latency_summary,
    load_average,
    machine_facts,
    percentile,
    process_cpu_s,
    seq_ranges,
    spread,
)

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: After SIGTERM, how long a child may take to exit before SIGKILL.
STOP_GRACE_S = 5.0
#: Acks this long before a kill and after the first post-kill ack bound the gap search
#: (``bench_cluster.GAP_WINDOW_S``).
GAP_WINDOW_S = 1.0
LATENCY_WARMUP_S = 1.0


class SetupError(Exception):
    """A peer could not be installed or started (not a measurement failure)."""


# --- child processes ----------------------------------------------------------------------


def _die_with_parent() -> None:
    """Child side of Popen: SIGKILL this child when the benchmark dies without cleaning up."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Children:
    """The processes one benchmark started, by name. Every signal goes to a pid this object
    started; ``close`` stops all of them (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, name: str, command: list[str], *, log_path: str | None = None, pipes: bool = False, cwd: str | None = None) -> subprocess.Popen:
        old = self.processes.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.pid})")
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in close()
        if log_path:
            self._logs.append(log)
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else log,
            stderr=log,
            cwd=cwd or REPO_DIR,
            preexec_fn=_die_with_parent,
        )
        self.processes[name] = process
        return process

    def pid(self, name: str) -> int | None:
        process = self.processes.get(name)
        return process.pid if process is not None and process.poll() is None else None

    def kill(self, name: str) -> None:
        """SIGKILL one child by its pid and reap it."""
        process = self.processes[name]
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_GRACE_S)

    def close(self) -> None:
        running = [p for p in self.processes.values() if p.poll() is None]
        for process in running:
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_GRACE_S)
        for process in self.processes.values():
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        for log in self._logs:
            log.close()
        self._logs = []


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago (the caller retries
    on other ports when one is taken before its server binds)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def read_line(process: subprocess.Popen, deadline: float) -> str:
    """One line of a child's stdout, or "" at the deadline or when it closed stdout."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return ""
    ready, _, _ = select.select([process.stdout], [], [], remaining)
    if not ready:
        return ""
    return process.stdout.readline().decode(errors="replace")


def ask(process: subprocess.Popen, request: dict, *, timeout_s: float) -> dict:
    """Send one JSON line to a child's stdin and read its one-line JSON answer."""
    try:
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.flush()
    except (BrokenPipeError, OSError) as exc:
        raise BenchError(f"child {process.pid} is gone ({exc}); request {request.get('op')}") from None
    line = read_line(process, time.monotonic() + timeout_s)
    if not line:
        raise BenchError(f"child {process.pid}: no answer to {request.get('op')} within {timeout_s:.0f} s")
    answer = json.loads(line)
    if "error" in answer:
        raise BenchError(f"child {process.pid}: {request.get('op')}: {answer['error']}")
    return answer


def child_main_loop(handlers: dict, *, stdin=None, stdout=None) -> None:
    """The child side of ``ask``: one JSON request per line, one JSON answer per line, until
    ``exit`` or end of input. A handler's exception becomes ``{"error": ...}``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    for line in stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        if op == "exit":
            stdout.write(json.dumps({"ok": True}) + "\n")
            stdout.flush()
            return
        try:
            answer = handlers[op](request)
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


# --- records and figures ------------------------------------------------------------------


def pack(values: array) -> str:
    return base64.b64encode(values.tobytes()).decode()


def unpack(text: str, typecode: str = "d") -> array:
    values = array(typecode)
    values.frombytes(base64.b64decode(text))
    return values


def latency_figures(intended: Sequence[float], sent: Sequence[float], acked_at: Sequence[float], *, first_index: int) -> dict:
    """Latency from the intended send time to the ack (coordinated-omission safe), sender lag
    (intended to actual send) and send to ack, of the acknowledged messages from `first_index`,
    as ``bench_cluster.latency_summary`` dicts in milliseconds."""
    total, lag, service = [], [], []
    for i in range(first_index, len(acked_at)):
        a = acked_at[i]
        if a:
            total.append((a - intended[i]) * 1000)
            lag.append((sent[i] - intended[i]) * 1000)
            service.append((a - sent[i]) * 1000)
    return {
        "latency": latency_summary(sorted(total)),
        "sender_lag": latency_summary(sorted(lag)),
        "service": latency_summary(sorted(service)),
    }


def first_ack_after(killed_at: float, first_sent: Sequence[float], acked_at: Sequence[float]) -> float:
    """The first ack time of a message first sent at or after `killed_at` (0.0 while none);
    cheap enough to poll: it looks only at messages sent after the kill."""
    start = bisect_left(first_sent, killed_at)
    return min((a for a in acked_at[start:] if a), default=0.0)


def failover_figures(killed_at: float, first_sent: Sequence[float], acked_at: Sequence[float]) -> dict | None:
    """For a kill at `killed_at` (``time.monotonic``, which is system-wide on Linux, so times
    from other processes compare): the time to the first ack of a message first sent after the
    kill, and the longest gap between consecutive acks from ``GAP_WINDOW_S`` before the kill to
    ``GAP_WINDOW_S`` after that first ack. None when no such ack exists. `first_sent` must be
    in send order (non-decreasing)."""
    first_ack = first_ack_after(killed_at, first_sent, acked_at)
    if not first_ack:
        return None
    window = [a for a in acked_at if a and killed_at - GAP_WINDOW_S <= a <= first_ack + GAP_WINDOW_S]
    before = max((a for a in acked_at if a and a < killed_at), default=0.0)
    if before:
        window.append(before)
    return {"failover_s": first_ack - killed_at, "ack_gap_s": largest_gap_s(window), "first_ack_at": first_ack}


def median_of_summaries(summaries: list[dict]) -> dict:
    """Per key, the median over runs of ``latency_summary`` dicts (each percentile on its own)."""
    out = {k: statistics.median(s[k] for s in summaries) for k in summaries[0] if k != "count"}
    out["count"] = sum(s["count"] for s in summaries)
    out["runs"] = len(summaries)
    return out


def cpu_shares(pids: dict[str, int | None], before: dict[str, float], seconds: float) -> dict[str, float]:
    """CPU share (1.0 = one core) of each process since `before` (from ``cpu_times``)."""
    now = cpu_times(pids)
    return {k: round((now.get(k, 0.0) - v) / seconds, 2) for k, v in before.items() if seconds > 0}


def cpu_times(pids: dict[str, int | None]) -> dict[str, float]:
    times = {name: process_cpu_s(pid) for name, pid in pids.items()}
    times["bench"] = time.process_time()
    return times


def cpu_text(cpu: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * v:.0f}%" for k, v in cpu.items())


def latency_line(label: str, s: dict) -> str:
    return (
        f"  {label:<18} p50 {s['p50_ms']:7.2f}  p90 {s['p90_ms']:7.2f}  p99 {s['p99_ms']:7.2f}  "
        f"max {s['max_ms']:8.2f} ms   ({s['count']:,} acks)"
    )
