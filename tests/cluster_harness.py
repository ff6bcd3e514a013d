"""Real raftseq nodes on loopback, one helper per verb: the local cluster (``LocalCluster``:
start, find the leader, kill and restart nodes, wait until every node holds the same stream),
and what tests add to it: read the journals, record what subscribers see, speak raw frames to a
node.

Every wait has a deadline and every loop a bound; ``running_cluster`` always stops the nodes it
started, whatever the test did. The base port comes from a seeded generator; the seed and the
ports are printed (``RAFTSEQ_TEST_SEED=N`` replays them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from raftseq.clients import Message, SequencerClient, subscribe
from raftseq.cluster.local import LEADER_TIMEOUT_S, LocalCluster, free_base_port
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import Journal, VerifyReport, list_segment_files, verify_journal


def run_seed() -> int:
    """The seed of this run's port choices: ``RAFTSEQ_TEST_SEED`` or fresh (and printed)."""
    text = os.environ.get("RAFTSEQ_TEST_SEED", "")
    return int(text) if text else random.SystemRandom().randrange(1, 2**31)


class ClusterHarness(LocalCluster):
    """The local cluster (``LocalCluster``: start, kill, restart, status, waits, logs) with
    what a test adds: the seed of its ports, printed faults, the sockets on its ports when no
    leader comes, and the journals read back after ``stop``."""

    def __init__(self, data_dir: str, base_port: int, *, seed: int, overrides: dict | None = None) -> None:
        super().__init__(data_dir, base_port, insecure=False, restart=False, overrides=overrides)
        self.seed = seed

    def start(self, *, leader_timeout_s: float | None = None) -> dict | None:
        """Start every node; with `leader_timeout_s`, also wait for a leader and for every
        node's metrics page (a node serves it after its client port: a test that read the
        metrics right after the election sometimes found a port not yet open)."""
        leader = super().start(leader_timeout_s=leader_timeout_s)
        if leader_timeout_s is not None:
            for node_id in self.node_ids:
                self.wait_serving_metrics(node_id, timeout_s=leader_timeout_s)
        return leader

    def describe(self) -> str:
        return f"seed {self.seed}, base port {self.base_port}\n{super().describe()}"

    def diagnostics(self) -> str:
        return f"{self.sockets()}\n{super().diagnostics()}"

    # --- faults ---------------------------------------------------------------------------

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` (SIGKILL by default) to one node, reaping it. Returns its pid."""
        pid = super().kill(node_id, sig)
        print(f"killed {node_id} (pid {pid}) with {signal.Signals(sig).name}", flush=True)
        return pid

    def restart(self, node_id: str) -> int:
        pid = super().restart(node_id)
        print(f"restarted {node_id} (pid {pid})", flush=True)
        return pid

    # --- diagnostics ----------------------------------------------------------------------

    def sockets(self) -> str:
        """``ss`` lines of the TCP sockets on this cluster's ports (for a failure message)."""
        ports = set()
        for node in self.nodes:
            c = node.config
            ports |= {a.rsplit(":", 1)[1] for a in (c.client_address, c.raft_address, c.metrics_address) if a}
        try:
            out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"(ss failed: {exc})"
        lines = [line for line in out.splitlines() if any(f":{p} " in line for p in ports)]
        return "--- sockets on the cluster's ports ---\n" + "\n".join(lines)

    # --- journals (read after stop) -------------------------------------------------------

    def read_journal(self, node_id: str) -> JournalContents:
        directory = self.journal_dir(node_id)
        journal = Journal.open(directory, readonly=True)
        try:
            assert not journal.recovery.bytes_cut, f"{node_id}: torn journal tail {journal.recovery}"
            records = list(journal.records())
            first, last = journal.first_seq, journal.last_seq
            holes = list(journal.holes)
        finally:
            journal.close()
        segments = b""
        for _, path in list_segment_files(directory):
            with open(path, "rb") as f:
                segments += f.read()
        return JournalContents(node_id, records, segments, verify_journal(directory), first, last, holes)


@dataclass
class JournalContents:
    node_id: str
    records: list[protocol.Delivered]
    #: Every segment file, in order, concatenated: the stream byte for byte.
    segment_bytes: bytes
    report: VerifyReport
    first_seq: int
    last_seq: int
    holes: list[tuple[int, int]]


# --- the fixture ------------------------------------------------------------------------


@contextlib.contextmanager
def module_cluster(data_dir: str, *, overrides: dict | None = None) -> Iterator[ClusterHarness]:
    """A started three-node cluster in `data_dir` (a module's fixture shares one), described
    when up; every node is stopped at the end, and the logs' tails printed."""
    seed = run_seed()
    harness = ClusterHarness(data_dir, free_base_port(random.Random(seed)), seed=seed, overrides=overrides)
    try:
        harness.start(leader_timeout_s=LEADER_TIMEOUT_S)
        print(harness.describe(), flush=True)
        yield harness
    finally:
        harness.stop()
        print(harness.log_tails(), flush=True)


@pytest.fixture
def running_cluster(tmp_path, request) -> ClusterHarness:
    """A running three-node cluster with a leader. Overrides of the node config come from
    indirect parametrization: ``@pytest.mark.parametrize("running_cluster", [{...}], indirect=True)``.
    Every node is stopped at teardown, also when the test (or the start) failed."""
    overrides = getattr(request, "param", None)
    seed = run_seed()
    base_port = free_base_port(random.Random(seed))
    harness = ClusterHarness(str(tmp_path / "c"), base_port, seed=seed, overrides=overrides)
    print(f"cluster: seed {seed}, base port {base_port}, overrides {overrides}, data {harness.data_dir}", flush=True)
    try:
        started = time.monotonic()
        leader = harness.start(leader_timeout_s=LEADER_TIMEOUT_S)
        print(f"leader {leader['id']} after {time.monotonic() - started:.2f} s", flush=True)
        print(harness.describe(), flush=True)
        yield harness
    finally:
        harness.stop()
        print(harness.log_tails(), flush=True)


# --- clients ----------------------------------------------------------------------------


async def pipeline(
    client: SequencerClient,
    payloads: Sequence[bytes],
    *,
    timeout_s: float,
    on_ack: Callable[[asyncio.Future], None] | None = None,
) -> list[int]:
    """Submit every payload with ``submit_nowait`` (waiting for room in the client's window)
    and return their sequence numbers, in order. Raises ``TimeoutError`` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    futures = []
    for payload in payloads:
        await asyncio.wait_for(client.wait_for_room(), max(0.0, deadline - time.monotonic()))
        future = client.submit_nowait(payload)
        if on_ack is not None:
            future.add_done_callback(on_ack)
        futures.append(future)
    return list(await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic())))


class StreamRecorder:
    """A subscriber (``clients.subscribe``) that keeps every message it receives."""

    def __init__(self, endpoints: Sequence[str], *, token: str, from_seq: int = 1, prefer: str = "", session: str = "recorder") -> None:
        self.endpoints = list(endpoints)
        self.token = token
        self.from_seq = from_seq
        self.prefer = prefer
        self.session = session
        self.messages: list[Message] = []
        self.error: BaseException | None = None
        self._progress = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> StreamRecorder:
        self._task = asyncio.create_task(self._run(), name=f"recorder-{self.session}")
        return self

    async def _run(self) -> None:
        try:
            async for message in subscribe(
                self.endpoints, from_seq=self.from_seq, token=self.token, session=self.session, prefer=self.prefer
            ):
                self.messages.append(message)
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported by wait_until
            self.error = exc
            self._progress.set()

    @property
    def last_seq(self) -> int:
        return self.messages[-1].seq if self.messages else self.from_seq - 1

    async def wait_until(self, seq: int, *, timeout_s: float) -> None:
        """Return once a message numbered `seq` (or later) arrived."""
        deadline = time.monotonic() + timeout_s
        while self.last_seq < seq and self.error is None:
            self._progress.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"subscriber {self.session} reached {self.last_seq}, not {seq}, in {timeout_s} s")
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                pass
        if self.error is not None:
            raise AssertionError(f"subscriber {self.session} failed: {self.error!r}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


# --- raw frames -------------------------------------------------------------------------


class RawConnection:
    """A plain socket to a node's client port, speaking frames by hand."""

    def __init__(self, address: str, *, timeout_s: float = 5.0) -> None:
        host, port = address.rsplit(":", 1)
        self.address = address
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.reader = protocol.FrameReader("node")
        self.buffered: list = []
        self.closed_by_node = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, frame: object) -> None:
        self.send(protocol.encode_frame(frame))

    def hello(self, session: str, token: str, *, version: int = protocol.PROTOCOL_VERSION) -> object:
        """Send a hello; return the first answer (``Welcome`` or ``Rejected``)."""
        self.send_frame(protocol.Hello(session, token, version))
        frame = self.next_frame()
        assert frame is not None, f"{self.address} closed the connection without answering the hello"
        return frame

    def _receive(self, deadline: float) -> bool:
        """Read once; False when the node closed the connection or the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.closed_by_node:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed_by_node = True
            return False
        for frame in self.reader.feed(data):
            assert not isinstance(frame, protocol.FrameError), f"bad frame from {self.address}: {frame}"
            self.buffered.append(frame)
        return True

    def next_frame(self, *, timeout_s: float = 5.0, skip_heartbeats: bool = True) -> object | None:
        """The next frame (heartbeats skipped), or None if the node closed the connection.
        Raises ``AssertionError`` when nothing came within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            while self.buffered:
                frame = self.buffered.pop(0)
                if not (skip_heartbeats and isinstance(frame, protocol.Heartbeat)):
                    return frame
            if not self._receive(deadline):
                if self.closed_by_node:
                    return None
                raise AssertionError(f"no frame from {self.address} within {timeout_s} s")

    def answers(self, count: int, *, timeout_s: float) -> tuple[int, list]:
        """Read answers until `count` submits are answered: how many were acknowledged
        (``Ack``, ``AckRange``), and every other answer (``Busy``, ``Rejected``...), in order."""
        acked, others = 0, []
        while acked + len(others) < count:
            frame = self.next_frame(timeout_s=timeout_s)
            assert frame is not None, f"closed after {acked} acks and {len(others)} other answers: {others[:3]}"
            if isinstance(frame, protocol.AckRange):
                acked += frame.count
            elif isinstance(frame, protocol.Ack):
                acked += 1
            else:
                others.append(frame)
        return acked, others

    def frames_until_closed(self, *, timeout_s: float = 5.0) -> list:
        """Every frame until the node closes the connection (heartbeats skipped)."""
        deadline = time.monotonic() + timeout_s
        while not self.closed_by_node:
            if not self._receive(deadline) and not self.closed_by_node:
                raise AssertionError(f"{self.address} kept the connection open for {timeout_s} s; got {self.buffered}")
        frames = [f for f in self.buffered if not isinstance(f, protocol.Heartbeat)]
        self.buffered = []
        return frames
