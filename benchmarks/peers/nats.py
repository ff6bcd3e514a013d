"""NATS JetStream as a baseline: a three-node cluster on 127.0.0.1 with one file-backed stream
of 3 replicas, driven by nats-py with the same kind of Python client loop as raftseq's.

Setup (``ensure_setup``): Debian's ``nats-server`` is installed with apt-get when it is missing
(quiet, idempotent; a packaged service is not left running), and ``nats-py`` with pip into this
Python when it cannot be imported. Each cluster gets a temporary directory (one config file and
one ``store_dir`` per node) and free loopback ports (client, cluster route, HTTP monitoring), and
is always stopped, by pid, also on a failure, Ctrl-C or SIGTERM.

The stream ``BENCH`` (subjects ``bench.>``, file storage, 3 replicas, server defaults
otherwise: no fsync per message, 2-minute duplicate window). Every publish carries a
``Nats-Msg-Id`` header, JetStream's publish dedup, which is what raftseq's exactly-once
sessions are compared with.

Workloads (one run each; ``python -m benchmarks`` repeats and takes medians):

* ``throughput`` -- acknowledged publishes/s: ``js.publish_async`` per message (its window of
  ``publish_async_max_pending`` acks outstanding, ``--nats-window``, nats-py's default 4,000), from 1 client and from
  ``--processes`` client processes started together. The acks' stream sequence numbers must
  form the gapless range 1..N.
* ``latency`` -- a steady offered rate, send times scheduled in advance and latency counted from
  the intended send time to the ack (coordinated-omission safe, as in ``bench_cluster.py``).
* ``failover`` -- SIGKILL of the stream leader (or the meta leader, ``--nats-kill meta``) under
  steady load: the time from the kill to the first ack of a message first sent after the kill,
  and the longest gap between acks. The client resubmits a message (same ``Nats-Msg-Id``) whose
  publish failed or got no ack within ``ACK_TIMEOUT_S``: while publishes fail it probes with the
  oldest failed message every ``RETRY_DELAY_S``, and once an ack arrives it resends all of them
  (a retry per message and timer would flood the servers while the stream has no leader).
* ``replay`` -- messages/s delivered to an ordered push consumer reading the stream from the
  start (``js.subscribe(..., ordered_consumer=True)``).

    python -m benchmarks.peers.nats [throughput] [latency] [failover] [replay] [--quick]
"""

from __future__ import annotations

import sys
import os

# Run as a file, this directory would come first on sys.path and ``import nats`` would find this
# module instead of nats-py.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _HERE:
    sys.path.pop(0)
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from array import array  # noqa: E402
from collections import deque  # noqa: E402

from benchmarks.peers.common import (  # noqa: E402
    LATENCY_WARMUP_S,
    BenchError,
    Children,
    SetupError,
    cpu_shares,
    cpu_text,
    cpu_times,
    expect,
    GAP_WINDOW_S,
    failover_figures,
    first_ack_after,
    free_ports,
    latency_figures,
    latency_line,
    load_average,
    read_line,
    seq_ranges,
)

NAME = "nats"
NODE_IDS = ("n1", "n2", "n3")
STREAM = "BENCH"
SUBJECT = "bench.m"
START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3
#: Failover loop: a publish without an ack after this long is sent again (same Nats-Msg-Id).
ACK_TIMEOUT_S = 1.0
RETRY_DELAY_S = 0.05
FAILOVER_TIMEOUT_S = 60.0
REJOIN_TIMEOUT_S = 60.0
SETTLE_S = 1.0
DRAIN_TIMEOUT_S = 30.0
#: nats-py reconnects to another server after this wait (its default of 2 s would be charged to
#: NATS's failover figure).
RECONNECT_TIME_WAIT_S = 0.1
#: nats-py's default ``publish_async_max_pending``.
NATS_WINDOW_DEFAULT = 4000
APT_LOCK_TIMEOUT_S = 120


# --- setup --------------------------------------------------------------------------------


def find_nats_server() -> str | None:
    return shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)), None)


def ensure_nats_server(*, quiet: bool = True) -> str:
    """The path of ``nats-server``, installed from Debian's package when missing."""
    path = find_nats_server()
    if path:
        return path
    if os.geteuid() != 0:
        raise SetupError("nats-server is not installed and this is not root: run `apt-get install nats-server`")
    if not shutil.which("apt-get"):
        raise SetupError("nats-server is not installed and there is no apt-get to install it with")
    print("setup     installing nats-server (Debian package) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = f"-oDPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"
    for command in (
        ["apt-get", lock, "update", "-qq"],
        ["apt-get", lock, "install", "-y", "-qq", "--no-install-recommends", "nats-server"],
    ):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"installing nats-server failed: {' '.join(command)}: {exc}") from None
        if done.returncode != 0:
            raise SetupError(f"installing nats-server failed: {' '.join(command)} exited {done.returncode}\n{(done.stdout + done.stderr)[-2000:]}")
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", "nats-server"], capture_output=True, timeout=60)
    path = find_nats_server()
    if not path:
        raise SetupError("apt-get installed nats-server but no nats-server binary was found")
    return path


def ensure_nats_py():
    """The ``nats`` package (nats-py), installed with pip into this Python when missing."""
    try:
        return importlib.import_module("nats")
    except ImportError:
        pass
    print("setup     installing nats-py (pip) ...", flush=True)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "nats-py"], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"installing nats-py failed: {exc}") from None
    if done.returncode != 0:
        raise SetupError(f"installing nats-py failed: pip exited {done.returncode}\n{(done.stdout + done.stderr)[-2000:]}")
    importlib.invalidate_caches()
    try:
        return importlib.import_module("nats")
    except ImportError as exc:
        raise SetupError(f"nats-py was installed but cannot be imported: {exc}") from None


def ensure_setup() -> dict:
    """Install what is missing; returns the versions in use."""
    server = ensure_nats_server()
    ensure_nats_py()
    try:
        version = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        client = dist_version("nats-py")
    except PackageNotFoundError:
        client = "unknown"
    return {"nats_server": version, "nats_server_path": server, "nats_py": client}


# --- the cluster --------------------------------------------------------------------------


CONFIG = """\
server_name: {name}
listen: 127.0.0.1:{client_port}
http: 127.0.0.1:{http_port}
jetstream {{
  store_dir: "{store_dir}"
}}
cluster {{
  name: raftseq-bench
  listen: 127.0.0.1:{route_port}
  routes: [
{routes}
  ]
}}
"""


class NatsCluster:
    """Three ``nats-server`` processes below `root` with the stream created; ``close`` stops
    them by pid. The async methods use one nats-py connection of the benchmark's own."""

    def __init__(self, root: str, name: str, *, server: str) -> None:
        self.directory = os.path.join(root, name)
        self.server = server
        self.children = Children()
        self.ports: dict[str, dict[str, int]] = {}
        self.startup_s = 0.0
        self.nc = None
        self.js = None

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{self.ports[n]['client']}" for n in NODE_IDS]

    def url(self, node_id: str) -> str:
        return f"nats://127.0.0.1:{self.ports[node_id]['client']}"

    @property
    def pids(self) -> dict[str, int | None]:
        return {n: self.children.pid(n) for n in NODE_IDS}

    async def __aenter__(self) -> NatsCluster:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except Exception:  # noqa: BLE001 - the servers are stopped next anyway
                pass
            self.nc = None
        self.children.close()

    async def _start(self) -> None:
        last = ""
        for attempt in range(1, START_ATTEMPTS + 1):
            ports = free_ports(3 * len(NODE_IDS))
            self.ports = {n: {"client": ports[3 * i], "route": ports[3 * i + 1], "http": ports[3 * i + 2]} for i, n in enumerate(NODE_IDS)}
            started = time.monotonic()
            for node_id in NODE_IDS:
                self._write_config(node_id, attempt)
                self.start_node(node_id)
            try:
                await self._create_stream(deadline=started + START_TIMEOUT_S)
            except BenchError as exc:
                last = str(exc)
                if self.nc is not None:
                    await self.nc.close()
                    self.nc = None
                tails = self.log_tails()
                self.children.close()
                self.children = Children()
                if "address already in use" in tails.lower() and attempt < START_ATTEMPTS:
                    print(f"    {NAME}: ports were taken meanwhile; starting again on other ports", flush=True)
                    continue
                raise BenchError(f"{NAME} cluster did not start: {last}\n{tails}") from None
            self.startup_s = time.monotonic() - started
            return
        raise BenchError(f"{NAME} cluster did not start in {START_ATTEMPTS} attempts: {last}")

    def _write_config(self, node_id: str, attempt: int) -> None:
        directory = os.path.join(self.directory, f"try{attempt}")
        store = os.path.join(directory, node_id)
        os.makedirs(store, exist_ok=True)
        routes = "\n".join(f"    nats-route://127.0.0.1:{self.ports[n]['route']}" for n in NODE_IDS if n != node_id)
        text = CONFIG.format(name=node_id, store_dir=store, routes=routes, client_port=self.ports[node_id]["client"],
                             route_port=self.ports[node_id]["route"], http_port=self.ports[node_id]["http"])
        self._config_dir = directory
        with open(os.path.join(directory, f"{node_id}.conf"), "w") as f:
            f.write(text)

    def start_node(self, node_id: str) -> None:
        self.children.start(node_id, [self.server, "-c", os.path.join(self._config_dir, f"{node_id}.conf")],
                            log_path=os.path.join(self._config_dir, f"{node_id}.log"))

    def kill(self, node_id: str) -> None:
        self.children.kill(node_id)

    def log_tails(self, count: int = 8) -> str:
        parts = []
        for node_id in NODE_IDS:
            try:
                with open(os.path.join(self._config_dir, f"{node_id}.log"), errors="replace") as f:
                    tail = f.read().splitlines()[-count:]
            except (OSError, AttributeError):
                tail = []
            parts.append(f"--- {node_id} log ---\n" + "\n".join(tail))
        return "\n".join(parts)

    async def _create_stream(self, *, deadline: float) -> None:
        from nats.js.api import StorageType

        self.nc = await connect(self.urls, name="bench-admin")
        self.js = self.nc.jetstream(timeout=2.0)
        last = ""
        while time.monotonic() < deadline:
            try:
                await self.js.add_stream(name=STREAM, subjects=["bench.>"], storage=StorageType.FILE, num_replicas=3)
                break
            except Exception as exc:  # noqa: BLE001 - JetStream not ready yet: "temporarily unavailable", timeouts
                last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.2)
        else:
            raise BenchError(f"stream not created within {START_TIMEOUT_S:.0f} s: {last}")
        await self.wait_for_replicas(deadline=deadline)

    async def stream_leader(self, *, timeout_s: float = 2.0) -> tuple[str | None, list]:
        info = await asyncio.wait_for(self.js.stream_info(STREAM), timeout_s)
        return (info.cluster.leader if info.cluster else None), (info.cluster.replicas or [] if info.cluster else [])

    async def wait_for_replicas(self, *, deadline: float, exclude: tuple[str, ...] = ()) -> str:
        """Until the stream has a leader (not in `exclude`) and two current replicas."""
        last = ""
        while time.monotonic() < deadline:
            try:
                leader, replicas = await self.stream_leader()
                if leader and leader not in exclude and len(replicas) == 2 and all(r.current and not r.offline for r in replicas):
                    return leader
                last = f"leader {leader}, replicas {[(r.name, r.current, r.offline) for r in replicas]}"
            except Exception as exc:  # noqa: BLE001 - no leader yet
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
        raise BenchError(f"{NAME}: stream not fully replicated in time: {last}")

    def meta_leader(self, node_id: str) -> str | None:
        """The JetStream meta leader named by `node_id`'s monitoring endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[node_id]['http']}/jsz", timeout=2) as r:
            return json.load(r).get("meta_cluster", {}).get("leader")


async def connect(urls: list[str], *, name: str):
    nats = ensure_nats_py()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:  # nats-py logs every error otherwise
        if len(errors) < 100:
            errors.append(f"{type(exc).__name__}: {exc}")

    nc = await nats.connect(servers=urls, name=name, reconnect_time_wait=RECONNECT_TIME_WAIT_S, max_reconnect_attempts=-1,
                            connect_timeout=2, error_cb=on_error)
    nc._bench_errors = errors
    return nc


def msg_id(run: str, index: int) -> dict:
    return {"Nats-Msg-Id": f"{run}-{index}"}


# --- 1. throughput ------------------------------------------------------------------------


async def publish_many(js, *, run: str, messages: int, payload: bytes, timeout_s: float) -> tuple[float, float, list[int]]:
    """`messages` pipelined ``publish_async`` calls; (start, end, stream sequence numbers)."""
    deadline = time.monotonic() + timeout_s
    futures = []
    started = time.monotonic()
    publish = js.publish_async
    for i in range(messages):
        futures.append(await publish(SUBJECT, payload, headers={"Nats-Msg-Id": f"{run}-{i}"}))
        if time.monotonic() > deadline:
            raise BenchError(f"{NAME} {run}: stuck publishing after {timeout_s:.0f} s ({i:,} of {messages:,} sent)")
    try:
        acks = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        done = sum(1 for f in futures if f.done())
        raise BenchError(f"{NAME} {run}: stuck: {done:,} of {messages:,} acks after {timeout_s:.0f} s") from None
    finished = time.monotonic()
    duplicates = sum(1 for a in acks if a.duplicate)
    expect(not duplicates, f"{NAME} {run}: {duplicates} publishes acknowledged as duplicates")
    return started, finished, [a.seq for a in acks]


def _worker_main(spec_json: str) -> int:
    """A client process of the multi-process throughput run: connect, say ``ready``, wait for a
    ``go`` line, publish, print one JSON line with the outcome."""
    spec = json.loads(spec_json)

    async def work() -> dict:
        nc = await connect(spec["urls"], name=spec["run"])
        try:
            js = nc.jetstream(publish_async_max_pending=spec["window"])
            print("ready", flush=True)
            line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), spec["timeout_s"])
            if line.strip() != "go":
                return {"error": "no go from the benchmark"}
            started, finished, seqs = await publish_many(js, run=spec["run"], messages=spec["messages"], payload=b"x" * spec["payload_bytes"], timeout_s=spec["timeout_s"])
            ranges, duplicates = seq_ranges(seqs)
            return {"started": started, "finished": finished, "count": len(seqs), "ranges": ranges, "duplicates": duplicates}
        finally:
            await nc.close()

    try:
        outcome = asyncio.run(work())
    except BaseException as exc:  # noqa: BLE001 - reported to the benchmark
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(outcome), flush=True)
    return 0


def _check_gapless(seqs: list[int], what: str, *, first: int, count: int) -> None:
    ranges, duplicates = seq_ranges(seqs)
    expect(not duplicates and ranges == [[first, first + count - 1]],
           f"{what}: stream sequence numbers are not {first}..{first + count - 1}: {ranges[:5]}, {duplicates} duplicates")


async def _multi_process_run(nc: NatsCluster, *, run: str, processes: int, messages: int, payload_bytes: int, window: int, timeout_s: float) -> tuple[float, dict]:
    per = [messages // processes + (1 if k < messages % processes else 0) for k in range(processes)]
    workers = []
    deadline = time.monotonic() + timeout_s + START_TIMEOUT_S
    try:
        for k in range(processes):
            spec = {"urls": nc.urls, "run": f"{run}-{k + 1}", "messages": per[k], "payload_bytes": payload_bytes, "window": window, "timeout_s": timeout_s}
            workers.append(nc.children.start(f"{run}-client{k + 1}", [sys.executable, "-m", "benchmarks.peers.nats", "--worker", json.dumps(spec)], pipes=True))
        for k, w in enumerate(workers):
            line = await asyncio.to_thread(read_line, w, deadline)
            expect(line.strip() == "ready", f"{NAME} client process {k + 1} did not connect: {line.strip() or 'no answer'}")
        pids = {**nc.pids, **{f"client{k + 1}": w.pid for k, w in enumerate(workers)}}
        before, t0 = cpu_times(pids), time.monotonic()
        for w in workers:
            w.stdin.write(b"go\n")
            w.stdin.flush()
        outcomes = []
        for k, w in enumerate(workers):
            line = await asyncio.to_thread(read_line, w, deadline)
            expect(bool(line), f"{NAME} client process {k + 1}: no outcome within {timeout_s:.0f} s (stuck)")
            outcomes.append(json.loads(line))
        cpu = cpu_shares(pids, before, time.monotonic() - t0)
    finally:
        for w in workers:
            if w.poll() is None:
                w.stdin.close()
                try:
                    await asyncio.to_thread(w.wait, 5)
                except subprocess.TimeoutExpired:
                    pass  # Children.close() stops it
    for k, o in enumerate(outcomes):
        expect("error" not in o, f"{NAME} client process {k + 1}: {o.get('error')}")
        expect(o["count"] == per[k] and not o["duplicates"], f"{NAME} client process {k + 1}: {o['count']} acks for {per[k]}, {o['duplicates']} duplicates")
    seconds = max(o["finished"] for o in outcomes) - min(o["started"] for o in outcomes)
    return seconds, {"ranges": [r for o in outcomes for r in o["ranges"]], "cpu": cpu}


def throughput(opts: argparse.Namespace, root: str, *, payload_bytes: int) -> dict:
    """Acknowledged publishes/s from 1 client and from ``opts.processes`` client processes (one
    run each, fresh cluster)."""
    server = ensure_nats_server()
    payload = b"x" * payload_bytes

    async def run() -> dict:
        async with NatsCluster(root, f"nats-tp-{payload_bytes}-{time.monotonic_ns()}", server=server) as nc:
            client = await connect(nc.urls, name="tp")
            try:
                js = client.jetstream(publish_async_max_pending=opts.nats_window)
                warm = min(opts.messages, 5_000)
                await publish_many(js, run="warmup", messages=warm, payload=payload, timeout_s=opts.run_timeout_s)
                before, t0 = cpu_times(nc.pids), time.monotonic()
                started, finished, seqs = await publish_many(js, run="one", messages=opts.messages, payload=payload, timeout_s=opts.run_timeout_s)
                cpu_one = cpu_shares(nc.pids, before, time.monotonic() - t0)
                _check_gapless(seqs, f"{NAME} 1 client", first=warm + 1, count=opts.messages)
            finally:
                await client.close()
            seconds, multi = await _multi_process_run(nc, run="multi", processes=opts.processes, messages=opts.messages,
                                                      payload_bytes=payload_bytes, window=opts.nats_window, timeout_s=opts.run_timeout_s)
            first = warm + opts.messages + 1
            merged = sorted(multi["ranges"])
            flat = [s for a, b in merged for s in range(a, b + 1)]
            _check_gapless(flat, f"{NAME} {opts.processes} processes", first=first, count=opts.messages)
            return {"variants": {
                "1 client": {"messages_per_s": opts.messages / (finished - started), "seconds": finished - started, "messages": opts.messages,
                             "cpu_share": cpu_one, "title": f"1 client, js.publish_async per message (window {opts.nats_window:,}), Nats-Msg-Id"},
                f"{opts.processes} processes": {"messages_per_s": opts.messages / seconds, "seconds": seconds, "messages": opts.messages,
                                                "cpu_share": multi["cpu"], "title": f"{opts.processes} client processes, js.publish_async, window {opts.nats_window:,} each"},
            }}

    return asyncio.run(run())


# --- 2. latency and the steady load of failover ------------------------------------------


class NatsLoad:
    """One client publishing at `rate_per_s`, send times scheduled in advance; per message (by
    index) the intended send time, first send time, ack time and stream sequence (0 until
    acknowledged). With `retry`, a publish that failed or got no ack within ``ACK_TIMEOUT_S``
    is sent again with the same ``Nats-Msg-Id``: one probe every ``RETRY_DELAY_S`` while
    publishes fail, all of them once acks flow again."""

    def __init__(self, js, *, run: str, payload: bytes, retry: bool) -> None:
        self.js = js
        self.run_id = run
        self.payload = payload
        self.retry = retry
        self.intended = array("d")
        self.first_sent = array("d")
        self.acked_at = array("d")
        self.seqs = array("q")
        self.acked = 0
        self.resubmits = 0
        self.duplicate_acks = 0
        self.errors: list[str] = []
        self._in_flight: dict[int, tuple[float, asyncio.Future]] = {}
        self._stop = False
        self._failed_queue: deque[int] = deque()
        self._last_ack_at = 0.0
        self._last_failure_at = 0.0

    def stop(self) -> None:
        self._stop = True

    async def _publish(self, index: int) -> None:
        try:
            future = await self.js.publish_async(SUBJECT, self.payload, headers={"Nats-Msg-Id": f"{self.run_id}-{index}"})
        except Exception as exc:  # noqa: BLE001 - disconnected, buffer full: resubmit or record
            self._failed(index, exc)
            return
        if self.retry:
            self._in_flight[index] = (time.monotonic(), future)
        future.add_done_callback(lambda f: self._done(index, f))

    def _failed(self, index: int, exc: BaseException | None) -> None:
        if not self.retry:
            self.errors.append(f"{index}: {type(exc).__name__}: {exc}")
            return
        self._in_flight.pop(index, None)
        self._last_failure_at = time.monotonic()
        self._failed_queue.append(index)

    async def _resubmit_failed(self) -> None:
        """Every RETRY_DELAY_S: all failed messages when an ack arrived since the last failure,
        else the oldest one as a probe."""
        while True:
            await asyncio.sleep(RETRY_DELAY_S)
            if not self._failed_queue:
                continue
            if self._last_ack_at > self._last_failure_at:
                batch = list(self._failed_queue)
                self._failed_queue.clear()
            else:
                batch = [self._failed_queue.popleft()]
            for index in batch:
                if not self.acked_at[index]:
                    self.resubmits += 1
                    await self._publish(index)

    def _done(self, index: int, future: asyncio.Future) -> None:
        if future.cancelled():
            self._failed(index, None)
            return
        exc = future.exception()
        if exc is not None:
            self._failed(index, exc)
            return
        self._in_flight.pop(index, None)
        if self.acked_at[index]:
            return  # an ack for an earlier copy came too
        ack = future.result()
        self._last_ack_at = time.monotonic()
        self.duplicate_acks += bool(ack.duplicate)
        self.seqs[index] = ack.seq
        self.acked_at[index] = time.monotonic()
        self.acked += 1

    async def _watch_timeouts(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            limit = time.monotonic() - ACK_TIMEOUT_S
            for index, (sent, future) in list(self._in_flight.items()):
                if sent < limit and not future.done():
                    future.cancel()  # -> _done -> resubmit

    async def run(self, rate_per_s: float, *, duration_s: float) -> None:
        loop = asyncio.get_running_loop()
        helpers = [loop.create_task(self._watch_timeouts()), loop.create_task(self._resubmit_failed())] if self.retry else []
        try:
            interval = 1.0 / rate_per_s
            t0 = time.monotonic()
            monotonic = time.monotonic
            while not self._stop:
                now = monotonic()
                if now - t0 >= duration_s:
                    break
                due = int((now - t0) * rate_per_s) + 1
                while len(self.first_sent) < due and not self._stop:
                    index = len(self.first_sent)
                    self.intended.append(t0 + index * interval)
                    self.acked_at.append(0.0)
                    self.seqs.append(0)
                    self.first_sent.append(monotonic())
                    await self._publish(index)
                await asyncio.sleep(max(0.0, t0 + len(self.first_sent) * interval - monotonic()))
            await self.drain()
        finally:
            for task in helpers:
                task.cancel()

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.acked + (0 if self.retry else len(self.errors)) < len(self.first_sent):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


def latency(opts: argparse.Namespace, root: str) -> dict:
    """p50/p90/p99/max from the intended send time at each rate of ``opts.rates``; one run."""
    server = ensure_nats_server()
    payload = b"x" * opts.payload_bytes

    async def run() -> dict:
        result: dict = {"rates": {}}
        async with NatsCluster(root, f"nats-lat-{time.monotonic_ns()}", server=server) as nc:
            for rate in opts.rates:
                client = await connect(nc.urls, name=f"latency-{rate}")
                try:
                    js = client.jetstream(publish_async_max_pending=opts.nats_window)
                    load = NatsLoad(js, run=f"lat{rate}", payload=payload, retry=False)
                    load_now = load_average()
                    before, t0 = cpu_times(nc.pids), time.monotonic()
                    await load.run(rate, duration_s=LATENCY_WARMUP_S + opts.latency_seconds)
                    cpu = cpu_shares(nc.pids, before, time.monotonic() - t0)
                finally:
                    await client.close()
                expect(not load.errors, f"{NAME} latency {rate}/s: {len(load.errors)} publishes failed, first {load.errors[:1]}")
                expect(load.acked == len(load.first_sent), f"{NAME} latency {rate}/s: {len(load.first_sent) - load.acked} unacknowledged")
                first = int(LATENCY_WARMUP_S * rate)
                figures = latency_figures(load.intended, load.first_sent, load.acked_at, first_index=first)
                result["rates"][str(rate)] = {
                    "offered_per_s": rate,
                    "achieved_per_s": max(0, len(load.first_sent) - first) / opts.latency_seconds,
                    "submitted": len(load.first_sent),
                    **figures,
                    "cpu_share": cpu,
                    "load_average": load_now,
                }
                print(f"    {NAME} {rate:,} msg/s (load avg {load_now[0] if load_now else '-'}): "
                      + latency_line("", figures["latency"]).strip() + f"; cpu {cpu_text(cpu)}", flush=True)
        return result

    return asyncio.run(run())


# --- 3. failover --------------------------------------------------------------------------


def failover(opts: argparse.Namespace, root: str) -> dict:
    """SIGKILL of the stream leader (or meta leader) under ``opts.failover_rate``,
    ``opts.kills`` times, each followed by a restart and full re-replication."""
    server = ensure_nats_server()
    payload = b"x" * opts.payload_bytes
    which = getattr(opts, "nats_kill", "stream")

    async def run() -> dict:
        kills: list[dict] = []
        async with NatsCluster(root, f"nats-fo-{time.monotonic_ns()}", server=server) as nc:
            client = await connect(nc.urls, name="failover")
            try:
                js = client.jetstream(publish_async_max_pending=opts.nats_window)
                load = NatsLoad(js, run="fo", payload=payload, retry=True)
                budget_s = opts.kills * (FAILOVER_TIMEOUT_S + REJOIN_TIMEOUT_S + 2 * SETTLE_S + 10)
                sender = asyncio.get_running_loop().create_task(load.run(opts.failover_rate, duration_s=budget_s))
                print(f"    {NAME}: {opts.failover_rate:,} msg/s; {opts.kills} kills of the {which} leader", flush=True)
                try:
                    await asyncio.sleep(SETTLE_S)
                    for k in range(opts.kills):
                        expect(not sender.done(), f"{NAME}: the load stopped early: {sender.exception() if sender.done() else ''}")
                        stream_leader = await nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
                        alive = [n for n in NODE_IDS if n != stream_leader]
                        meta = await asyncio.to_thread(nc.meta_leader, alive[0])
                        victim = stream_leader if which == "stream" else meta
                        expect(victim in NODE_IDS, f"{NAME}: no {which} leader to kill (stream {stream_leader}, meta {meta})")
                        connected_to = client.connected_url.port if client.connected_url else None
                        client_on_victim = connected_to == nc.ports[victim]["client"]
                        killed_at = time.monotonic()
                        nc.kill(victim)
                        first_ack_at = 0.0
                        deadline = killed_at + FAILOVER_TIMEOUT_S
                        while not first_ack_at and time.monotonic() < deadline:
                            await asyncio.sleep(0.05)
                            first_ack_at = first_ack_after(killed_at, load.first_sent, load.acked_at)
                        figures = None
                        if first_ack_at:
                            await asyncio.sleep(max(0.0, first_ack_at + GAP_WINDOW_S - time.monotonic()))
                            figures = failover_figures(killed_at, load.first_sent, load.acked_at)
                        if not figures:
                            raise BenchError(f"{NAME} kill {k + 1} ({victim}): no message sent after the kill acknowledged within {FAILOVER_TIMEOUT_S:.0f} s\n{nc.log_tails()}")
                        new_leader, _ = await nc.stream_leader(timeout_s=5)
                        nc.start_node(victim)
                        restarted = time.monotonic()
                        await nc.wait_for_replicas(deadline=restarted + REJOIN_TIMEOUT_S)
                        rejoin_s = time.monotonic() - restarted
                        record = {"killed": victim, "stream_leader": stream_leader, "meta_leader": meta, "client_was_connected_to_it": client_on_victim,
                                  "new_stream_leader": new_leader, "failover_s": figures["failover_s"], "ack_gap_s": figures["ack_gap_s"], "rejoin_s": rejoin_s}
                        kills.append(record)
                        roles = " and ".join(r for r, n in (("stream leader", stream_leader), ("meta leader", meta)) if n == victim)
                        print(f"    {NAME} kill {k + 1:>2} {victim} ({roles}{', the client was connected to it' if client_on_victim else ''}) -> stream leader {new_leader}: "
                              f"failover {figures['failover_s']:.3f} s, ack gap {figures['ack_gap_s']:.3f} s; restarted node current again in {rejoin_s:.2f} s", flush=True)
                        await asyncio.sleep(SETTLE_S)
                finally:
                    load.stop()
                    try:
                        await asyncio.wait_for(sender, DRAIN_TIMEOUT_S + 5)
                    except (TimeoutError, asyncio.CancelledError):
                        pass
                expect(load.acked == len(load.first_sent), f"{NAME} failover: {len(load.first_sent) - load.acked} of {len(load.first_sent)} never acknowledged")
                info = await asyncio.wait_for(nc.js.stream_info(STREAM), 5)
                seqs = [s for s in load.seqs if s]
                ranges, duplicates = seq_ranges(seqs)
                return {"kills": kills, "submitted": len(load.first_sent), "resubmits": load.resubmits, "duplicate_acks": load.duplicate_acks,
                        "stream_messages": info.state.messages, "ack_seq_duplicates": duplicates, "ack_seq_ranges": len(ranges)}
            finally:
                await client.close()

    outcome = asyncio.run(run())
    kills = outcome["kills"]
    failovers = [k["failover_s"] for k in kills]
    gaps = [k["ack_gap_s"] for k in kills]
    expect(outcome["stream_messages"] == outcome["submitted"],
           f"{NAME} failover: the stream holds {outcome['stream_messages']} messages for {outcome['submitted']} distinct publishes")
    return {
        "rate_per_s": opts.failover_rate,
        "killed": which,
        "failover_s": {"median": statistics.median(failovers), "max": max(failovers)},
        "ack_gap_s": {"median": statistics.median(gaps), "max": max(gaps)},
        **outcome,
    }


# --- 4. replay ----------------------------------------------------------------------------


def replay(opts: argparse.Namespace, root: str) -> dict:
    """Messages/s to an ordered push consumer reading the whole stream from the start, on a
    connection to a server that is not the stream leader; ``opts.runs`` reads of one stream."""
    server = ensure_nats_server()
    payload = b"x" * opts.payload_bytes
    count = opts.replay_messages

    async def run() -> dict:
        async with NatsCluster(root, f"nats-replay-{time.monotonic_ns()}", server=server) as nc:
            writer = await connect(nc.urls, name="fill")
            try:
                js = writer.jetstream(publish_async_max_pending=opts.nats_window)
                filled_at = time.monotonic()
                await publish_many(js, run="fill", messages=count, payload=payload, timeout_s=max(opts.run_timeout_s, count / 5_000))
                fill_s = time.monotonic() - filled_at
            finally:
                await writer.close()
            leader = await nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
            follower = next(n for n in NODE_IDS if n != leader)
            print(f"    {NAME}: stream filled with {count:,} messages in {fill_s:.1f} s; reading on {follower} (stream leader {leader})", flush=True)
            rates = []
            for r in range(getattr(opts, "replay_runs", 1)):
                reader = await connect([nc.url(follower)], name=f"replay-{r}")
                try:
                    rjs = reader.jetstream()
                    got = 0
                    last_seq = 0
                    done = asyncio.Event()

                    async def on_message(msg) -> None:
                        nonlocal got, last_seq
                        got += 1
                        last_seq = msg.metadata.sequence.stream if got == count else last_seq
                        if got >= count:
                            done.set()

                    started = time.monotonic()
                    sub = await rjs.subscribe(SUBJECT, ordered_consumer=True, cb=on_message)
                    try:
                        await asyncio.wait_for(done.wait(), max(opts.run_timeout_s, count / 5_000))
                    except TimeoutError:
                        raise BenchError(f"{NAME} replay: {got:,} of {count:,} messages after {opts.run_timeout_s:.0f} s") from None
                    seconds = time.monotonic() - started
                    await sub.unsubscribe()
                finally:
                    await reader.close()
                expect(last_seq == count, f"{NAME} replay: message {count:,} had stream sequence {last_seq}")
                rates.append(count / seconds)
                print(f"    {NAME} replay run {r + 1}: {count / seconds:,.0f} msg/s ({count:,} in {seconds:.2f} s)", flush=True)
        return {"messages": count, "runs": rates, "messages_per_s": statistics.median(rates), "fill_s": fill_s, "reader_on": "follower"}

    return asyncio.run(run())


# --- standalone command -------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--messages", type=int, default=None, help="messages per throughput run (default 200,000; --quick 5,000)")
    add("--nats-window", type=int, default=NATS_WINDOW_DEFAULT,
        help=f"publish_async_max_pending: publishes awaiting their ack, at most (default {NATS_WINDOW_DEFAULT:,}, nats-py's own default)")
    add("--processes", type=int, default=4, help="client processes of the multi-process throughput variant (default 4)")
    add("--payload-bytes", type=int, default=100, help="payload size (default 100)")
    add("--rates", type=lambda t: [int(x) for x in t.split(",")], default=None, help="offered rates, msg/s (default 1000,2000,10000,50000)")
    add("--latency-seconds", type=float, default=None, help="measured seconds per rate after 1 s warm-up (default 10; --quick 1)")
    add("--kills", type=int, default=None, help="leader kills (default 10; --quick 2)")
    add("--failover-rate", type=int, default=2000, help="offered rate during the kills (default 2000)")
    add("--nats-kill", choices=["stream", "meta"], default="stream", help="which leader the failover workload kills (default stream)")
    add("--replay-messages", type=int, default=None, help="messages in the replayed stream (default 200,000; --quick 5,000)")
    add("--run-timeout-s", type=float, default=120.0, help="a run taking longer is stuck (default 120)")


def resolve(opts: argparse.Namespace) -> None:
    quick = getattr(opts, "quick", False)
    if opts.messages is None:
        opts.messages = 5_000 if quick else 200_000
    if opts.rates is None:
        opts.rates = [1000, 2000] if quick else [1000, 2000, 10000, 50000]
    if opts.latency_seconds is None:
        opts.latency_seconds = 1.0 if quick else 10.0
    if opts.kills is None:
        opts.kills = 2 if quick else 10
    if opts.replay_messages is None:
        opts.replay_messages = 5_000 if quick else 200_000


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally that stops the servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.nats", description="NATS JetStream R3 baseline (see the module doc).")
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="throughput, latency, failover and/or replay (default all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", default="", help="also write the figures as JSON to this file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    add_options(parser)
    opts = parser.parse_args(argv)
    if opts.worker:
        return _worker_main(opts.worker)
    known = ("throughput", "latency", "failover", "replay")
    unknown = set(opts.workloads) - set(known)
    if unknown:
        parser.error(f"unknown workload(s) {sorted(unknown)}")
    resolve(opts)
    signal.signal(signal.SIGTERM, _terminate)
    report: dict = {"setup": ensure_setup(), "load_average_start": load_average()}
    print(f"{NAME}: {report['setup']}", flush=True)
    root = tempfile.mkdtemp(prefix="raftseq-bench-nats-")
    try:
        for name in opts.workloads or known:
            print(f"{NAME} {name}", flush=True)
            if name == "throughput":
                report[name] = throughput(opts, root, payload_bytes=opts.payload_bytes)
                for key, v in report[name]["variants"].items():
                    print(f"    {key:<12} {v['messages_per_s']:>10,.0f} msg/s  cpu {cpu_text(v['cpu_share'])}", flush=True)
            elif name == "latency":
                report[name] = latency(opts, root)
            elif name == "failover":
                report[name] = failover(opts, root)
            else:
                report[name] = replay(opts, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["load_average_end"] = load_average()
    print(f"load avg {report['load_average_start']} -> {report['load_average_end']}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
