"""What the peer baselines share: child processes stopped by pid, free loopback ports, a JSON-line
control channel to a child, per-message timing records, and the figures computed from them
(latency from the intended send time, failover from a kill time).

The number helpers (percentiles, latency summary, spread, CPU shares) and the machine facts
come from ``figures.py`` and ``machine.py``, so that raftseq and its peers are summarised by the
same code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Coroutine, Sequence
from functools import partial

from benchmarks.figures import BenchError, cpu_text, expect, largest_gap_s, latency_line, latency_summary
from benchmarks.machine import REPO_DIR, cpu_times, cpu_used, load_average
from benchmarks.options import resolve_sizes, terminate, write_report
from raftseq.cluster.local import die_with_parent

#: After SIGTERM, how long a child may take to exit before SIGKILL.
STOP_GRACE_S = 5.0
#: Acks this long before a kill and after the first post-kill ack bound the gap search
#: (``failover.GAP_WINDOW_S``).
GAP_WINDOW_S = 1.0
LATENCY_WARMUP_S = 1.0
#: How often a failover workload looks for the first ack after a kill.
FAILOVER_POLL_S = 0.05
#: A peer's cluster start: how long its servers may take to have a leader, and how many times
#: it is tried on fresh ports (another process may take a free port before the server binds it).
START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3
#: Loads with retries (failover): while messages fail, one is sent again as a probe this often.
RETRY_DELAY_S = 0.05
#: Failover workloads: the longest wait for an ack of a message sent after a kill, and for a
#: restarted node to rejoin; the pause before the first kill and after each; how long the load
#: may take to drain once stopped.
FAILOVER_TIMEOUT_S = 60.0
REJOIN_TIMEOUT_S = 60.0
SETTLE_S = 1.0
DRAIN_TIMEOUT_S = 30.0


class SetupError(Exception):
    """A peer could not be installed or started (not a measurement failure)."""


#: How long an install waits for another apt-get or dpkg to release the dpkg lock.
APT_LOCK_TIMEOUT_S = 120
#: How long one apt-get or pip command of a peer's setup may take.
INSTALL_TIMEOUT_S = 600


# --- setup ----------------------------------------------------------------------------------


def find_binary(name: str) -> str | None:
    """`name` on PATH or in /usr/sbin, /usr/bin (Debian puts servers in either)."""
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def ensure_debian_binary(binary: str, *, package: str, service: str) -> str:
    """The path of `binary`, installed with Debian's `package` when missing: apt-get quiet and
    non-interactive, waiting up to ``APT_LOCK_TIMEOUT_S`` for the dpkg lock; on a machine with
    systemd the packaged `service` is disabled and stopped again (the benchmark starts its own
    servers on loopback)."""
    path = find_binary(binary)
    if path:
        return path
    if os.geteuid() != 0:
        raise SetupError(f"{binary} is not installed and this is not root: run `apt-get install {package}`")
    if not shutil.which("apt-get"):
        raise SetupError(f"{binary} is not installed and there is no apt-get to install it with")
    print(f"setup     installing {package} (Debian package) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = f"-oDPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"
    for command in (
        ["apt-get", lock, "update", "-qq"],
        ["apt-get", lock, "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"installing {package} failed: {' '.join(command)}: {exc}") from None
        if done.returncode != 0:
            raise SetupError(
                f"installing {package} failed: {' '.join(command)} exited {done.returncode}\n{(done.stdout + done.stderr)[-2000:]}"
            )
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", service], capture_output=True, timeout=60)
    path = find_binary(binary)
    if not path:
        raise SetupError(f"apt-get installed {package} but no {binary} binary was found")
    return path


def ensure_pip_package(distribution: str, check: Callable[[], object]) -> object:
    """`check()` (an import, a path lookup), after installing `distribution` with pip into this
    Python when it fails with ImportError or SetupError."""
    try:
        return check()
    except (ImportError, SetupError):
        pass
    print(f"setup     installing {distribution} (pip) ...", flush=True)
    command = [sys.executable, "-m", "pip", "install", "-q", distribution]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"installing {distribution} failed: {exc}") from None
    if done.returncode != 0:
        raise SetupError(f"installing {distribution} failed: pip exited {done.returncode}\n{(done.stdout + done.stderr)[-2000:]}")
    importlib.invalidate_caches()
    try:
        return check()
    except (ImportError, SetupError) as exc:
        raise SetupError(f"{distribution} was installed but is not usable: {exc}") from None


# --- child processes ----------------------------------------------------------------------


class Children:
    """The processes one benchmark started, by name. Every signal goes to a pid this object
    started; ``close`` stops all of them (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        #: Where the latest process of each name writes its output.
        self.log_paths: dict[str, str] = {}
        self._logs: list = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self, name: str, command: list[str], *, log_path: str | None = None, pipes: bool = False, cwd: str | None = None
    ) -> subprocess.Popen:
        old = self.processes.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.pid})")
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in close()
        if log_path:
            self._logs.append(log)
            self.log_paths[name] = log_path
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else log,
            stderr=log,
            cwd=cwd or REPO_DIR,
            preexec_fn=partial(die_with_parent, signal.SIGKILL),  # when the benchmark dies without cleaning up
        )
        self.processes[name] = process
        return process

    def log_tails(self, names: Sequence[str], count: int) -> str:
        """The last `count` lines of the log of each named process (none before it was started
        with a log, or while the log is unreadable)."""
        parts = []
        for name in names:
            tail: list[str] = []
            if name in self.log_paths:
                try:
                    with open(self.log_paths[name], errors="replace") as f:
                        tail = f.read().splitlines()[-count:]
                except OSError:
                    pass
            parts.append(f"--- {name} log ---\n" + "\n".join(tail))
        return "\n".join(parts)

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


class ChildCluster:
    """A peer's cluster of child processes (``children``), one per id of ``node_ids``."""

    node_ids: tuple[str, ...]
    #: Lines of each log in ``log_tails`` when the caller does not say.
    log_tail_lines = 8
    children: Children

    @property
    def pids(self) -> dict[str, int | None]:
        return {n: self.children.pid(n) for n in self.node_ids}

    def kill(self, node_id: str) -> None:
        self.children.kill(node_id)

    def log_tails(self, count: int | None = None) -> str:
        return self.children.log_tails(self.node_ids, count or self.log_tail_lines)


def start_failed(name: str, error: BenchError, cluster, *, last_attempt: bool) -> None:
    """After `name`'s `cluster` did not start: stops its processes (``cluster.children`` starts
    afresh for the next attempt), then returns when ports taken meanwhile explain it (their
    logs, ``cluster.log_tails()``, say so) and another attempt is left, so that the caller
    starts again on other ports; raises the failure otherwise."""
    tails = cluster.log_tails()
    cluster.children.close()
    cluster.children = Children()
    if "address already in use" in tails.lower() and not last_attempt:
        print(f"    {name}: ports were taken meanwhile; starting again on other ports", flush=True)
        return
    raise BenchError(f"{name} cluster did not start: {error}\n{tails}") from None


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


def start_worker(module: str, flag: str, spec: dict, *, stdin: bool, stderr: bool) -> subprocess.Popen:
    """A benchmark's worker process, ``python -m module flag SPEC`` from the checkout with its
    spec as JSON; its stdout is a pipe (``read_line``, ``worker_outcome``), and so are its stdin
    when `stdin` and its stderr when `stderr` (inherited otherwise)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, flag, json.dumps(spec)],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr else None,
        cwd=REPO_DIR,
    )


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


def worker_outcome(work: Callable[[], Coroutine[object, object, dict]]) -> int:
    """The end of a worker process: the outcome of `work()` (run on a fresh event loop) as one
    JSON line on stdout, or the error that ended it; the benchmark reads it (exit status 0)."""
    try:
        outcome = asyncio.run(work())
    except BaseException as exc:  # noqa: BLE001 - reported to the benchmark as the outcome
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(outcome), flush=True)
    return 0


class SendLog:
    """A peer client load's record, per message by index: the intended send time, the first
    send time, the ack time and the sequence number (0 until acknowledged), as
    ``time.monotonic()``; how many are acknowledged and how many sends were resubmits."""

    def __init__(self) -> None:
        self.intended = array("d")
        self.first_sent = array("d")
        self.acked_at = array("d")
        self.seqs = array("q")
        self.acked = 0
        self.resubmits = 0

    def new(self, intended: float) -> int:
        """A message meant to go out at `intended`, sent now: its index."""
        index = len(self.first_sent)
        self.intended.append(intended)
        self.acked_at.append(0.0)
        self.seqs.append(0)
        self.first_sent.append(time.monotonic())
        return index

    def ack(self, index: int, seq: int, at: float) -> None:
        self.seqs[index] = seq
        self.acked_at[index] = at
        self.acked += 1


def pack(values: array) -> str:
    return base64.b64encode(values.tobytes()).decode()


def unpack(text: str, typecode: str = "d") -> array:
    values = array(typecode)
    values.frombytes(base64.b64decode(text))
    return values


def latency_figures(intended: Sequence[float], sent: Sequence[float], acked_at: Sequence[float], *, first_index: int) -> dict:
    """Latency from the intended send time to the ack (coordinated-omission safe), sender lag
    (intended to actual send) and send to ack, of the acknowledged messages from `first_index`,
    as ``figures.latency_summary`` dicts in milliseconds."""
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


def rate_figures(name: str, load: SendLog, *, rate: int, latency_seconds: float, cpu: dict, load_now, note: str = "") -> dict:
    """One offered rate of a peer's latency workload, measured by one client's `load`: the
    latency figures of the messages after the warm-up, the achieved rate, and a progress line
    (`note` appended) printed."""
    first = int(LATENCY_WARMUP_S * rate)
    figures = latency_figures(load.intended, load.first_sent, load.acked_at, first_index=first)
    print(
        f"    {name} {rate:,} msg/s (load avg {load_now[0] if load_now else '-'}): "
        + latency_line("", figures["latency"]).strip()
        + (f"; {note}" if note else "")
        + f"; cpu {cpu_text(cpu)}",
        flush=True,
    )
    return {
        "offered_per_s": rate,
        "achieved_per_s": max(0, len(load.first_sent) - first) / latency_seconds,
        "submitted": len(load.first_sent),
        **figures,
        "cpu_share": cpu,
        "load_average": load_now,
    }


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


async def await_failover(killed_at: float, load: SendLog, *, timeout_s: float) -> dict | None:
    """After a kill at `killed_at`: waits (looking every ``FAILOVER_POLL_S``, at most
    `timeout_s`) for the first ack of a message of `load` first sent after the kill, then
    ``GAP_WINDOW_S`` more; the ``failover_figures``, or None when no such ack came."""
    first_ack_at = 0.0
    deadline = killed_at + timeout_s
    while not first_ack_at and time.monotonic() < deadline:
        await asyncio.sleep(FAILOVER_POLL_S)
        first_ack_at = first_ack_after(killed_at, load.first_sent, load.acked_at)
    if not first_ack_at:
        return None
    await asyncio.sleep(max(0.0, first_ack_at + GAP_WINDOW_S - time.monotonic()))
    return failover_figures(killed_at, load.first_sent, load.acked_at)


async def stop_load(load, sender: asyncio.Task, *, timeout_s: float) -> None:
    """Stop a failover workload's steady `load` and wait up to `timeout_s` for its `sender`
    task to drain its outstanding messages."""
    load.stop()
    try:
        await asyncio.wait_for(sender, timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        pass


async def kill_leaders(
    name: str,
    load,
    *,
    kills: int,
    rate_per_s: int,
    kill: Callable[[], Coroutine[object, object, tuple[str, float, dict]]],
    rejoin: Callable[[str, dict], Coroutine[object, object, tuple[str, str]]],
    log_tails: Callable[[], str],
) -> list[dict]:
    """The failover workload of an asyncio peer: `load` sends `rate_per_s` in the background
    while, `kills` times, ``kill()`` picks a leader and kills it (returning the victim, the
    time of the kill and the kill's record so far), the first ack of a message sent after it
    is awaited, and ``rejoin(victim, record)`` restarts the victim and waits until it has caught
    up (returning how to name the kill and the rejoin in the progress line). Returns the
    records, each with ``failover_s`` and ``ack_gap_s``; the load is always stopped."""
    budget_s = kills * (FAILOVER_TIMEOUT_S + REJOIN_TIMEOUT_S + 2 * SETTLE_S + 10)
    sender = asyncio.get_running_loop().create_task(load.run(rate_per_s, duration_s=budget_s))
    records: list[dict] = []
    try:
        await asyncio.sleep(SETTLE_S)
        for k in range(kills):
            expect(not sender.done(), f"{name}: the load stopped early: {sender.exception() if sender.done() else ''}")
            victim, killed_at, record = await kill()
            figures = await await_failover(killed_at, load, timeout_s=FAILOVER_TIMEOUT_S)
            if not figures:
                raise BenchError(
                    f"{name} kill {k + 1} ({victim}): no message sent after the kill acknowledged within {FAILOVER_TIMEOUT_S:.0f} s\n{log_tails()}"
                )
            record.update(failover_s=figures["failover_s"], ack_gap_s=figures["ack_gap_s"])
            killed, rejoined = await rejoin(victim, record)
            records.append(record)
            print(
                f"    {name} kill {k + 1:>2} {killed}: failover {figures['failover_s']:.3f} s, ack gap {figures['ack_gap_s']:.3f} s; {rejoined}",
                flush=True,
            )
            await asyncio.sleep(SETTLE_S)
    finally:
        await stop_load(load, sender, timeout_s=DRAIN_TIMEOUT_S + 5)
    return records


def kills_summary(kills: list[dict]) -> dict:
    """Median and max over the kills of the failover time and of the longest ack gap."""
    failovers = [k["failover_s"] for k in kills]
    gaps = [k["ack_gap_s"] for k in kills]
    return {
        "failover_s": {"median": statistics.median(failovers), "max": max(failovers)},
        "ack_gap_s": {"median": statistics.median(gaps), "max": max(gaps)},
    }


def median_of_summaries(summaries: list[dict]) -> dict:
    """Per key, the median over runs of ``latency_summary`` dicts (each percentile on its own)."""
    out = {k: statistics.median(s[k] for s in summaries) for k in summaries[0] if k != "count"}
    out["count"] = sum(s["count"] for s in summaries)
    out["runs"] = len(summaries)
    return out


def cpu_shares(pids: dict[str, int | None], before: dict[str, float], seconds: float) -> dict[str, float]:
    """CPU share (1.0 = one core) of each process since `before` (from ``machine.cpu_times``)."""
    return cpu_used(before, cpu_times(pids), seconds)


# --- a peer's own command (``python -m benchmarks.peers.NAME``) -------------------------------


def add_load_options(parser: argparse.ArgumentParser, *, payload_help: str, timeout_help: str) -> None:
    """The options both peers' commands take, as ``raftseq bench`` passes them."""
    add = parser.add_argument
    add("--messages", type=int, default=None, help="messages per throughput run (default 200,000; --quick 5,000)")
    add("--payload-bytes", type=int, default=100, help=payload_help)
    add("--rates", type=lambda t: [int(x) for x in t.split(",")], default=None, help="offered rates, msg/s (default 1000,2000,10000,50000)")
    add("--latency-seconds", type=float, default=None, help="measured seconds per rate after 1 s warm-up (default 10; --quick 1)")
    add("--kills", type=int, default=None, help="leader kills (default 10; --quick 2)")
    add("--failover-rate", type=int, default=2000, help="offered rate during the kills (default 2000)")
    add("--run-timeout-s", type=float, default=120.0, help=timeout_help)


def resolve_load_options(opts: argparse.Namespace) -> None:
    """Defaults of ``add_load_options`` left open (smaller with ``--quick``)."""
    sizes = {
        "messages": (5_000, 200_000),
        "rates": ([1000, 2000], [1000, 2000, 10000, 50000]),
        "latency_seconds": (1.0, 10.0),
        "kills": (2, 10),
    }
    resolve_sizes(opts, sizes)


def run_peer(system: str, opts: argparse.Namespace, report: dict, measure: Callable[[str], None]) -> int:
    """A peer command's run: `measure` fills `report` working in a temporary directory that is
    removed at the end (SIGTERM unwinds through it); the load average before and after; the
    report as JSON to ``--json``."""
    signal.signal(signal.SIGTERM, terminate)
    report["load_average_start"] = load_average()
    root = tempfile.mkdtemp(prefix=f"raftseq-bench-{system}-")
    try:
        measure(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["load_average_end"] = load_average()
    print(f"load avg {report['load_average_start']} -> {report['load_average_end']}")
    write_report(opts.json, report)
    return 0
