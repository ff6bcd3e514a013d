"""etcd as a power-safe baseline: a three-member etcd 3.4 cluster on 127.0.0.1 (Debian's
``etcd-server``), driven through etcd's v3 JSON gateway over HTTP/1.1 keep-alive connections by
a small asyncio client of this module's own. etcd fdatasyncs its write-ahead log before a
member acknowledges an entry, so every ack here has survived a power cut of a majority: the
cost raftseq's ``durability = "power"`` is measured against.

Setup (``ensure_setup``): ``etcd-server`` is installed with apt-get when ``etcd`` is missing
(quiet, waiting for the dpkg lock; the packaged service is disabled again on a machine with
systemd). Each cluster gets a temporary directory (one data directory per member) and free
loopback ports (client, peer), and is always stopped by pid, also on a failure, Ctrl-C or
SIGTERM. Settings are etcd's defaults (heartbeat 100 ms, election timeout 1 s, snapshot every
100,000 entries) except ``--max-txn-ops``, raised to ``--batch`` so that one transaction can
carry a batch as large as raftseq's.

The sequence number of a message is etcd's revision: every put into a key of its own makes a
new revision, a transaction of many puts makes one revision for all of them. The benchmark is
the only writer, so the revisions of its acks must be unique and gapless.

Workloads (one run each; ``python -m benchmarks`` repeats and takes medians):

* ``throughput`` -- acknowledged puts/s from one client process: ``1 client`` (one ``/v3/kv/put``
  per message, ``--etcd-connections`` requests in flight, one per connection: HTTP/1.1 has no
  multiplexing) and ``1 client, batched`` (``/v3/kv/txn`` of ``--batch`` puts, ``--window``
  messages in flight). The load goes to
  the leader's client port (no forwarding: etcd's best case). Each variant also reports the
  leader's WAL fsyncs per second and messages per fsync (``etcd_disk_wal_fsync_duration_seconds_count``
  on ``/metrics``, before and after).
* ``latency`` -- a steady offered rate, send times scheduled in advance and latency counted from
  the intended send time to the ack (coordinated-omission safe, as for raftseq and NATS); a
  message waiting for a free connection waits on the clock.
* ``failover`` -- SIGKILL of the leader under steady load, connections spread over the three
  members: the time from the kill to the first ack of a message first sent after the kill, and
  the longest gap between acks. A request that fails or has no answer within ``ACK_TIMEOUT_S``
  is sent again on another connection after ``RETRY_DELAY_S`` (etcd has no dedup: a put may then
  be applied twice, which the report counts from the revisions).

    python -m benchmarks.peers.etcd_kv [throughput] [latency] [failover] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import msgspec

from benchmarks.figures import BenchError, cpu_text, expect, seq_ranges
from benchmarks.load import run_precise
from benchmarks.machine import cpu_times, load_average
from benchmarks.options import Scoped, positive_int
from benchmarks.peers.common import DRAIN_TIMEOUT_S, LATENCY_WARMUP_S, REJOIN_TIMEOUT_S, RETRY_DELAY_S, START_ATTEMPTS, START_TIMEOUT_S
from benchmarks.peers.common import (
    ChildCluster,
    Children,
    SendLog,
    add_load_options,
    cpu_shares,
    ensure_debian_binary,
    free_ports,
    kill_leaders,
    kills_summary,
    rate_figures,
    resolve_load_options,
    run_peer,
    start_failed,
)

NAME = "etcd"
MEMBERS = ("n1", "n2", "n3")
WORKLOADS = ("throughput", "latency", "failover")
#: Requests in flight of one client process, one per HTTP/1.1 connection (``--etcd-connections``).
CONNECTIONS_DEFAULT = 64
#: Messages in flight of the batched variant, in transactions of ``--batch`` (``--window``, as
#: raftseq's client window: 20 transactions of 500). More (64 transactions of 500 1-KiB puts)
#: made etcd answer "request timed out" on this 2-core machine.
WINDOW_DEFAULT = 10_000
#: Puts per transaction of the batched variant unless ``--batch`` says otherwise (raftseq's
#: ``submit_batch_nowait`` size in ``raftseq bench``).
BATCH_DEFAULT = 500
#: A status, metrics or health request of the benchmark's own, and one load request in the
#: failover workload: no answer by then counts as a failure (the request is sent again).
HTTP_TIMEOUT_S = 1.0
ACK_TIMEOUT_S = 1.0
#: Messages of a steady load sent and not yet answered (waiting for a connection included), at
#: most: past it the sender waits, and its lag counts as latency from the intended send time.
PENDING_MAX = 20_000
#: How long a sender held back by ``PENDING_MAX`` waits before looking again.
PENDING_WAIT_S = 0.001
#: The largest HTTP response header block and body this client reads (a txn answer of 500 puts
#: is ~30 KiB).
RESPONSE_HEADER_BYTES_MAX = 16 * 1024
RESPONSE_BODY_BYTES_MAX = 4 * 1024 * 1024
#: etcd's WAL fsyncs and backend (bbolt) commits, counted by every member.
WAL_FSYNCS = "etcd_disk_wal_fsync_duration_seconds_count"
BACKEND_COMMITS = "etcd_disk_backend_commit_duration_seconds_count"


# --- setup --------------------------------------------------------------------------------


def ensure_etcd() -> str:
    """The path of ``etcd``, installed from Debian's ``etcd-server`` when missing."""
    return ensure_debian_binary("etcd", package="etcd-server", service="etcd")


def ensure_setup() -> dict:
    """Install what is missing; returns the version in use."""
    server = ensure_etcd()
    try:
        version = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "unknown"
    return {"etcd": version, "etcd_path": server, "client": "v3 JSON gateway, HTTP/1.1 keep-alive (benchmarks/peers/etcd_kv.py)"}


# --- the client: etcd's JSON gateway over HTTP/1.1 -------------------------------------------


class _Header(msgspec.Struct):
    revision: str = "0"


class _Answer(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)


_decode_answer = msgspec.json.Decoder(_Answer).decode


class HttpError(Exception):
    """A request got no usable answer: the connection failed, or the status was not 200."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Connection:
    """One HTTP/1.1 keep-alive connection to one member's client port; one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, body: bytes) -> bytes:
        """POST `body` (JSON) to `path`; the answer's body. Raises HttpError (the connection is
        then closed and opened again by the next request)."""
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
            self._writer.write(
                b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (path.encode(), len(body), body)
            )
            head = await self._reader.readuntil(b"\r\n\r\n")
            if len(head) > RESPONSE_HEADER_BYTES_MAX:
                raise HttpError(f"response header of {len(head)} bytes")
            status_line, _, rest = head.partition(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            headers = {}
            for line in rest.split(b"\r\n"):
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await self._read_body(headers)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            self.close()  # cancelled half-way: the connection's state is unknown
            raise
        if status != 200:
            raise HttpError(f"HTTP {status}: {body[:200]!r}")
        return body

    async def _read_body(self, headers: dict[bytes, bytes]) -> bytes:
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            total = 0
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                total += size
                if total > RESPONSE_BODY_BYTES_MAX:
                    raise ValueError(f"response body over {RESPONSE_BODY_BYTES_MAX} bytes")
                chunk = await self._reader.readexactly(size + 2)
                if not size:
                    return b"".join(parts)
                parts.append(chunk[:-2])
        length = int(headers.get(b"content-length", b"0"))
        if length > RESPONSE_BODY_BYTES_MAX:
            raise ValueError(f"response body of {length} bytes")
        return await self._reader.readexactly(length)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def put_body(key: str, value_b64: str) -> bytes:
    return b'{"key":"%s","value":"%s"}' % (b64(key.encode()).encode(), value_b64.encode())


def txn_body(keys: list[str], value_b64: str) -> bytes:
    puts = ",".join('{"requestPut":{"key":"%s","value":"%s"}}' % (b64(k.encode()), value_b64) for k in keys)
    return ('{"success":[%s]}' % puts).encode()


def revision(answer: bytes) -> int:
    """The revision of a put's or a transaction's answer (etcd writes uint64 as a JSON string)."""
    return int(_decode_answer(answer).header.revision)


def _http(port: int, path: str, body: bytes | None = None) -> bytes:
    """One request of the benchmark's own (status, metrics, health), blocking."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as r:
        return r.read()


# --- the cluster --------------------------------------------------------------------------


class EtcdCluster(Scoped, ChildCluster):
    """Three ``etcd`` members below `root`, one data directory each; ``close`` stops them by
    pid. The blocking methods (status, metrics) ask members with short timeouts."""

    node_ids = MEMBERS

    def __init__(self, root: str, name: str, *, server: str, max_txn_ops: int) -> None:
        self.directory = os.path.join(root, name)
        self.server = server
        self.max_txn_ops = max_txn_ops
        self.children = Children()
        self.ports: dict[str, dict[str, int]] = {}
        self.member_names: dict[str, str] = {}
        self.startup_s = 0.0
        self._attempt_dir = ""

    def open(self) -> None:
        self._start()

    def close(self) -> None:
        self.children.close()

    def client_port(self, member: str) -> int:
        return self.ports[member]["client"]

    def _start(self) -> None:
        last = ""
        for attempt in range(1, START_ATTEMPTS + 1):
            ports = free_ports(2 * len(MEMBERS))
            self.ports = {n: {"client": ports[2 * i], "peer": ports[2 * i + 1]} for i, n in enumerate(MEMBERS)}
            self._attempt_dir = os.path.join(self.directory, f"try{attempt}")
            os.makedirs(self._attempt_dir, exist_ok=True)
            started = time.monotonic()
            for member in MEMBERS:
                self.start_member(member, state="new")
            try:
                self.wait_for_leader(deadline=started + START_TIMEOUT_S)
            except BenchError as exc:
                last = str(exc)
                start_failed(NAME, exc, self, last_attempt=attempt == START_ATTEMPTS)
                continue
            self.startup_s = time.monotonic() - started
            members = json.loads(_http(self.client_port(MEMBERS[0]), "/v3/cluster/member/list", b"{}"))["members"]
            self.member_names = {m["ID"]: m["name"] for m in members}
            return
        raise BenchError(f"{NAME} cluster did not start in {START_ATTEMPTS} attempts: {last}")

    def start_member(self, member: str, *, state: str = "existing") -> None:
        """Start `member` (again: its data directory makes it rejoin as itself)."""
        peers = ",".join(f"{n}=http://127.0.0.1:{self.ports[n]['peer']}" for n in MEMBERS)
        client = f"http://127.0.0.1:{self.client_port(member)}"
        peer = f"http://127.0.0.1:{self.ports[member]['peer']}"
        self.children.start(
            member,
            [
                self.server,
                "--name",
                member,
                "--data-dir",
                os.path.join(self._attempt_dir, member),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                peers,
                "--initial-cluster-token",
                os.path.basename(self.directory),
                "--initial-cluster-state",
                state,
                "--max-txn-ops",
                str(self.max_txn_ops),
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ],
            log_path=os.path.join(self._attempt_dir, f"{member}.log"),
        )

    def status(self, member: str) -> dict:
        """``/v3/maintenance/status`` of `member`: leader (by name), raftIndex, revision."""
        answer = json.loads(_http(self.client_port(member), "/v3/maintenance/status", b"{}"))
        return {
            "leader": self.member_names.get(answer.get("leader", ""), answer.get("leader", "")),
            "raft_index": int(answer.get("raftIndex", 0)),
            "revision": int(answer.get("header", {}).get("revision", 0)),
        }

    def wait_for_leader(self, *, deadline: float, members: tuple[str, ...] = MEMBERS) -> str:
        """Until every one of `members` answers its status naming one leader (by member id
        before the names are known, by name after)."""
        last = ""
        while time.monotonic() < deadline:
            try:
                leaders = {self.status(m)["leader"] for m in members}
                if len(leaders) == 1 and "" not in leaders and "0" not in leaders:
                    return leaders.pop()
                last = f"leaders named: {sorted(leaders)}"
            except (OSError, ValueError, KeyError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise BenchError(f"{NAME}: no agreed leader within the deadline: {last}")

    def wait_caught_up(self, member: str, *, deadline: float) -> str:
        """Until `member` answers, names a leader and has applied the leader's raft index as
        it was when `member` first answered; the leader's name."""
        last = ""
        target = 0
        while time.monotonic() < deadline:
            try:
                mine = self.status(member)
                leader = mine["leader"]
                if leader in MEMBERS:
                    if not target:
                        target = self.status(leader)["raft_index"]
                    if mine["raft_index"] >= target:
                        return leader
                last = f"{member} at raft index {mine['raft_index']}, leader {leader} at {target}"
            except (OSError, ValueError, KeyError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise BenchError(f"{NAME}: {member} did not catch up in time: {last}")

    def counters(self) -> dict[str, dict[str, float]]:
        """Per member that answers: its WAL fsyncs and backend commits so far (``/metrics``)."""
        out = {}
        for member in MEMBERS:
            if self.children.pid(member) is None:
                continue
            try:
                text = _http(self.client_port(member), "/metrics").decode()
            except (OSError, ValueError):
                continue
            found = {}
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in (WAL_FSYNCS, BACKEND_COMMITS):
                    found[name] = float(value)
            out[member] = found
        return out


def fsync_figures(before: dict, after: dict, *, leader: str, messages: int, requests: int, seconds: float) -> dict:
    """The leader's WAL fsyncs per second, messages and requests (raft entries) per fsync, and
    every member's counts, between two ``EtcdCluster.counters``."""
    per_member = {
        m: {k: after[m].get(k, 0) - before.get(m, {}).get(k, 0) for k in (WAL_FSYNCS, BACKEND_COMMITS)} for m in after if m in before
    }
    fsyncs = per_member.get(leader, {}).get(WAL_FSYNCS, 0)
    return {
        "leader": leader,
        "wal_fsyncs": fsyncs,
        "fsyncs_per_s": fsyncs / seconds if seconds > 0 else 0.0,
        "messages_per_fsync": messages / fsyncs if fsyncs else None,
        "requests_per_fsync": requests / fsyncs if fsyncs else None,
        "members": per_member,
    }


def fsync_text(f: dict) -> str:
    if not f.get("messages_per_fsync"):
        return "fsyncs not counted"
    return f"leader {f['fsyncs_per_s']:,.0f} WAL fsyncs/s, {f['messages_per_fsync']:,.1f} messages per fsync"


# --- 1. throughput ------------------------------------------------------------------------


async def put_many(port: int, *, run: str, messages: int, batch: int, connections: int, value: bytes, timeout_s: float) -> dict:
    """`messages` puts to keys of their own (``run/i``), as transactions of `batch` puts when
    `batch` > 1, from `connections` connections each with one request in flight: start, end and
    the revisions (one per request)."""
    value_b64 = b64(value)
    requests = [(i, min(batch, messages - i)) for i in range(0, messages, batch)]
    revisions = [0] * len(requests)
    next_request = 0
    deadline = time.monotonic() + timeout_s

    async def worker() -> None:
        nonlocal next_request
        connection = Connection(port)
        try:
            while next_request < len(requests) and time.monotonic() < deadline:
                k = next_request
                next_request += 1
                first, count = requests[k]
                if batch > 1:
                    body, path = txn_body([f"{run}/{i}" for i in range(first, first + count)], value_b64), "/v3/kv/txn"
                else:
                    body, path = put_body(f"{run}/{first}", value_b64), "/v3/kv/put"
                revisions[k] = revision(await connection.request(path, body))
        finally:
            connection.close()

    started = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(min(connections, len(requests))))), timeout_s)
    except TimeoutError:
        done = sum(1 for r in revisions if r)
        raise BenchError(f"{NAME} {run}: stuck: {done:,} of {len(requests):,} requests answered after {timeout_s:.0f} s") from None
    except HttpError as exc:
        raise BenchError(f"{NAME} {run}: a request failed: {exc}") from None
    finished = time.monotonic()
    expect(all(revisions), f"{NAME} {run}: stuck: {sum(1 for r in revisions if r):,} of {len(requests):,} answered in {timeout_s:.0f} s")
    return {"started": started, "finished": finished, "revisions": revisions}


def _check_gapless(revisions: list[int], what: str) -> None:
    ranges, duplicates = seq_ranges(revisions)
    expect(
        not duplicates and len(ranges) == 1,
        f"{what}: revisions are not unique and gapless: {ranges[:5]}, {duplicates} duplicates",
    )


def throughput(opts: argparse.Namespace, root: str, *, payload_bytes: int) -> dict:
    """Acknowledged puts/s of one client, per message and batched (one run each, one fresh
    cluster for both), with the leader's fsyncs."""
    server = ensure_etcd()
    batch = _batch(opts)
    connections = _connections(opts)
    value = b"x" * payload_bytes

    async def run(cluster: EtcdCluster, leader: str) -> dict:
        port = cluster.client_port(leader)
        warm = min(opts.messages, 5_000)
        await put_many(port, run="warmup", messages=warm, batch=1, connections=connections, value=value, timeout_s=opts.run_timeout_s)
        variants = {}
        for key, size in (("1 client", 1), ("1 client, batched", batch)):
            # batched: as many messages in flight as raftseq's client window allows
            lanes = connections if size == 1 else max(1, min(connections, _window(opts) // size))
            counters, before, t0 = cluster.counters(), cpu_times(cluster.pids), time.monotonic()
            out = await put_many(
                port, run=key.replace(" ", "").replace(",", "-"), messages=opts.messages, batch=size, connections=lanes,
                value=value, timeout_s=opts.run_timeout_s,
            )  # fmt: skip
            seconds = out["finished"] - out["started"]
            cpu = cpu_shares(cluster.pids, before, time.monotonic() - t0)
            _check_gapless(out["revisions"], f"{NAME} {key}")
            how = "/v3/kv/put per message" if size == 1 else f"/v3/kv/txn of {size} puts"
            variants[key] = {
                "messages_per_s": opts.messages / seconds,
                "seconds": seconds,
                "messages": opts.messages,
                "requests": len(out["revisions"]),
                "cpu_share": cpu,
                "fsync": fsync_figures(
                    counters, cluster.counters(), leader=leader, messages=opts.messages, requests=len(out["revisions"]), seconds=seconds
                ),
                "title": f"1 client, {how}, {lanes} connections to the leader",
            }
        return {"variants": variants}

    with EtcdCluster(root, f"etcd-tp-{payload_bytes}-{time.monotonic_ns()}", server=server, max_txn_ops=batch) as cluster:
        leader = cluster.wait_for_leader(deadline=time.monotonic() + START_TIMEOUT_S)
        return asyncio.run(run(cluster, leader))


def _batch(opts: argparse.Namespace) -> int:
    return getattr(opts, "batch", None) or BATCH_DEFAULT


def _window(opts: argparse.Namespace) -> int:
    return getattr(opts, "window", None) or WINDOW_DEFAULT


def _connections(opts: argparse.Namespace) -> int:
    return getattr(opts, "etcd_connections", None) or CONNECTIONS_DEFAULT


# --- 2. latency and the steady load of failover ------------------------------------------


class EtcdLoad(SendLog):
    """One client putting at `rate_per_s`, send times scheduled in advance, over at most
    `connections` connections spread over `ports` (a message waits for a free one). With
    `retry`, a request that fails or has no answer within ``ACK_TIMEOUT_S`` is sent again on
    the next connection after ``RETRY_DELAY_S``, until the load's deadline."""

    def __init__(self, ports: list[int], *, connections: int, run: str, value: bytes, retry: bool) -> None:
        super().__init__()
        self.run_id = run
        self.value_b64 = b64(value)
        self.retry = retry
        self.errors: list[str] = []
        self._idle: asyncio.Queue[Connection] = asyncio.Queue()
        for k in range(connections):
            self._idle.put_nowait(Connection(ports[k % len(ports)]))
        self._ports = ports
        self._tasks: set[asyncio.Task] = set()
        self._stop = False
        self._deadline = 0.0

    def stop(self) -> None:
        self._stop = True

    def _send(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._put(index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, index: int) -> None:
        body = put_body(f"{self.run_id}/{index}", self.value_b64)
        while True:
            connection = await self._idle.get()
            try:
                if self.retry:
                    answer = await asyncio.wait_for(connection.request("/v3/kv/put", body), ACK_TIMEOUT_S)
                else:
                    answer = await connection.request("/v3/kv/put", body)
                self.ack(index, revision(answer), time.monotonic())
                return
            except (HttpError, TimeoutError, msgspec.DecodeError, ValueError) as exc:
                connection.close()
                if not self.retry:
                    self.errors.append(f"{index}: {exc}")
                    return
                # the next request on this slot goes to the next member
                connection.port = self._ports[(self._ports.index(connection.port) + 1) % len(self._ports)]
            finally:
                self._idle.put_nowait(connection)
            if time.monotonic() >= self._deadline:
                self.errors.append(f"{index}: not acknowledged before the load's deadline")
                return
            self.resubmits += 1
            await asyncio.sleep(RETRY_DELAY_S)

    async def run(self, rate_per_s: float, *, duration_s: float) -> None:
        """Put at `rate_per_s` for `duration_s`, then wait for the outstanding answers."""
        self._deadline = time.monotonic() + duration_s + DRAIN_TIMEOUT_S
        interval = 1.0 / rate_per_s
        t0 = time.monotonic()
        monotonic = time.monotonic
        while not self._stop:
            now = monotonic()
            if now - t0 >= duration_s:
                break
            due = int((now - t0) * rate_per_s) + 1
            while len(self.first_sent) < due and len(self._tasks) < PENDING_MAX and not self._stop:
                self._send(self.new(t0 + len(self.first_sent) * interval))
            if len(self._tasks) >= PENDING_MAX:
                await asyncio.sleep(PENDING_WAIT_S)
            else:
                await asyncio.sleep(max(0.0, t0 + len(self.first_sent) * interval - monotonic()))
        await self.drain()

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, self._deadline - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()
        while not self._idle.empty():
            self._idle.get_nowait().close()


def latency(opts: argparse.Namespace, root: str) -> dict:
    """p50/p90/p99/p99.9/max from the intended send time at each rate of ``opts.rates``, all
    connections to the leader; one run, one cluster."""
    server = ensure_etcd()
    value = b"x" * opts.payload_bytes
    connections = _connections(opts)

    async def run(cluster: EtcdCluster, leader: str) -> dict:
        result: dict = {"rates": {}}
        for rate in opts.rates:
            load = EtcdLoad([cluster.client_port(leader)], connections=connections, run=f"lat{rate}", value=value, retry=False)
            load_now = load_average()
            counters, before, t0 = cluster.counters(), cpu_times(cluster.pids), time.monotonic()
            await load.run(rate, duration_s=LATENCY_WARMUP_S + opts.latency_seconds)
            seconds = time.monotonic() - t0
            cpu = cpu_shares(cluster.pids, before, seconds)
            fsync = fsync_figures(counters, cluster.counters(), leader=leader, messages=load.acked, requests=load.acked, seconds=seconds)
            expect(not load.errors, f"{NAME} latency {rate}/s: {len(load.errors)} puts failed, first {load.errors[:1]}")
            expect(load.acked == len(load.first_sent), f"{NAME} latency {rate}/s: {len(load.first_sent) - load.acked} unacknowledged")
            result["rates"][str(rate)] = {
                **rate_figures(
                    NAME, load, rate=rate, latency_seconds=opts.latency_seconds, cpu=cpu, load_now=load_now, note=fsync_text(fsync)
                ),
                "fsync": fsync,
            }
        return result

    with EtcdCluster(root, f"etcd-lat-{time.monotonic_ns()}", server=server, max_txn_ops=_batch(opts)) as cluster:
        leader = cluster.wait_for_leader(deadline=time.monotonic() + START_TIMEOUT_S)
        return run_precise(run(cluster, leader))


# --- 3. failover --------------------------------------------------------------------------


def failover(opts: argparse.Namespace, root: str) -> dict:
    """SIGKILL of the leader under ``opts.failover_rate``, ``opts.kills`` times, each followed
    by a restart and the restarted member catching up."""
    server = ensure_etcd()
    value = b"x" * opts.payload_bytes

    async def run(cluster: EtcdCluster) -> dict:
        ports = [cluster.client_port(m) for m in MEMBERS]
        revision_before = cluster.status(MEMBERS[0])["revision"]
        load = EtcdLoad(ports, connections=_connections(opts), run="fo", value=value, retry=True)
        print(f"    {NAME}: {opts.failover_rate:,} msg/s; {opts.kills} kills of the leader", flush=True)

        async def kill() -> tuple[str, float, dict]:
            leader = await asyncio.to_thread(cluster.wait_for_leader, deadline=time.monotonic() + REJOIN_TIMEOUT_S)
            killed_at = time.monotonic()
            cluster.kill(leader)
            return leader, killed_at, {"killed": leader}

        async def rejoin(leader: str, record: dict) -> tuple[str, str]:
            alive = tuple(m for m in MEMBERS if m != leader)
            record["new_leader"] = await asyncio.to_thread(
                cluster.wait_for_leader, deadline=time.monotonic() + REJOIN_TIMEOUT_S, members=alive
            )
            cluster.start_member(leader)
            restarted = time.monotonic()
            await asyncio.to_thread(cluster.wait_caught_up, leader, deadline=restarted + REJOIN_TIMEOUT_S)
            record["rejoin_s"] = time.monotonic() - restarted
            return f"{leader} (leader) -> leader {record['new_leader']}", f"restarted member caught up in {record['rejoin_s']:.2f} s"

        kills = await kill_leaders(
            NAME, load, kills=opts.kills, rate_per_s=opts.failover_rate, kill=kill, rejoin=rejoin, log_tails=cluster.log_tails
        )
        expect(not load.errors, f"{NAME} failover: {len(load.errors)} puts failed for good, first {load.errors[:1]}")
        expect(load.acked == len(load.first_sent), f"{NAME} failover: {len(load.first_sent) - load.acked} never acknowledged")
        revision_after = await asyncio.to_thread(
            lambda: cluster.status(cluster.wait_for_leader(deadline=time.monotonic() + 10))["revision"]
        )
        ranges, duplicates = seq_ranges([s for s in load.seqs if s])
        return {
            "kills": kills,
            "submitted": len(load.first_sent),
            "resubmits": load.resubmits,
            "ack_seq_duplicates": duplicates,
            "ack_seq_ranges": len(ranges),
            # every put makes one revision: revisions beyond the messages are puts applied again
            "applied_again": revision_after - revision_before - len(load.first_sent),
        }

    with EtcdCluster(root, f"etcd-fo-{time.monotonic_ns()}", server=server, max_txn_ops=_batch(opts)) as cluster:
        outcome = run_precise(run(cluster))
    kills = outcome["kills"]
    expect(not outcome["ack_seq_duplicates"], f"{NAME} failover: {outcome['ack_seq_duplicates']} revisions acknowledged twice")
    return {
        "rate_per_s": opts.failover_rate,
        **kills_summary(kills),
        **outcome,
    }


# --- standalone command -------------------------------------------------------------------


def add_etcd_options(parser: argparse.ArgumentParser) -> None:
    """``--etcd-connections``, which ``raftseq bench`` takes too."""
    parser.add_argument(
        "--etcd-connections",
        type=positive_int,
        default=CONNECTIONS_DEFAULT,
        help=f"etcd: HTTP/1.1 connections of one client process, one request in flight on each (default {CONNECTIONS_DEFAULT})",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.etcd_kv", description="etcd 3.4 baseline (see the module doc).")
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"{', '.join(WORKLOADS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", default="", help="also write the figures as JSON to this file")
    parser.add_argument("--batch", type=int, default=BATCH_DEFAULT, help=f"puts per transaction when batched (default {BATCH_DEFAULT})")
    parser.add_argument("--window", type=int, default=WINDOW_DEFAULT, help=f"messages in flight when batched (default {WINDOW_DEFAULT:,})")
    add_load_options(parser, payload_help="payload size (default 100)", timeout_help="a run taking longer is stuck (default 120)")
    add_etcd_options(parser)
    opts = parser.parse_args(argv)
    unknown = set(opts.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s) {sorted(unknown)}")
    resolve_load_options(opts)
    report: dict = {"setup": ensure_setup()}
    print(f"{NAME}: {report['setup']}", flush=True)

    def measure(root: str) -> None:
        for name in [w for w in WORKLOADS if w in (opts.workloads or WORKLOADS)]:
            print(f"{NAME} {name}", flush=True)
            if name == "throughput":
                report[name] = throughput(opts, root, payload_bytes=opts.payload_bytes)
                for key, v in report[name]["variants"].items():
                    print(
                        f"    {key:<18} {v['messages_per_s']:>10,.0f} msg/s  {fsync_text(v['fsync'])}  cpu {cpu_text(v['cpu_share'])}",
                        flush=True,
                    )
            elif name == "latency":
                report[name] = latency(opts, root)
            else:
                report[name] = failover(opts, root)
                print(f"    failover median {report[name]['failover_s']['median']:.3f} s, max {report[name]['failover_s']['max']:.3f} s")

    return run_peer(NAME, opts, report, measure)


if __name__ == "__main__":
    sys.exit(main())
