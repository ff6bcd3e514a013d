"""Integration scenarios with real node processes on loopback.

Each test starts its own three-node cluster (``running_cluster``, stopped at teardown
whatever happens), drives it through clients, subscribers, raw sockets or the ``raftseq``
command, injects faults with SIGKILL, and then checks the guarantees of DESIGN.md section 1 on
what clients saw and on the journals left on disk: one gapless total order, byte-identical on
every node; acknowledged means committed and kept under its number; exactly once per session,
in ``client_seq`` order; gapless, duplicate-free delivery to subscribers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter

import msgspec
import pytest
from cluster_harness import ClusterHarness, JournalContents, RawConnection, StreamRecorder, pipeline, running_cluster  # noqa: F401

from raftseq.clients import BlockingSequencerClient, Rejected, SequencerClient, subscribe
from raftseq.cluster import catchup
from raftseq.cluster.config import GatewayConfig, PeerConfig
from raftseq.cluster.local import free_base_port
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason

MESSAGES_PER_CLIENT = 10_000
CLIENT_COUNT = 3
#: A Raft log compacted after a few entries, and small journal segments (many seals and rolls).
COMPACTION = {
    "raft": {"log_compaction_min_entries": 20, "log_compaction_min_time_s": 0.5},
    "journal": {"segment_bytes_max": 16 * 1024},
}
#: Records a follower misses while down: more than one catch-up store (catchup.FILL_RECORDS_MAX).
MISSED_MIN = 3000
SESSION_LIMIT = 5
SMALL_SESSION_WINDOW = {"gateway": {"in_flight_per_session_max": SESSION_LIMIT}}


# --- helpers --------------------------------------------------------------------------------


def payload_of(client: int, n: int) -> bytes:
    return b"c%d-%d" % (client, n)


def followers_of(h: ClusterHarness, leader: dict) -> list[str]:
    return [node_id for node_id in h.node_ids if node_id != leader["id"]]


class AckCounter:
    """Counts resolved submits; ``reached`` is set once `threshold` of them resolved."""

    def __init__(self, threshold: int) -> None:
        self.count = 0
        self.threshold = threshold
        self.reached = asyncio.Event()

    def __call__(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self.count += 1
        if self.count >= self.threshold:
            self.reached.set()


async def connected_clients(h: ClusterHarness, sessions: list[str], *, in_flight_max: int) -> list[SequencerClient]:
    clients = [SequencerClient(h.endpoints, session=s, token=h.token, in_flight_max=in_flight_max) for s in sessions]
    for client in clients:
        await client.connect()
    return clients


async def close_all(clients: list[SequencerClient]) -> None:
    for client in clients:
        await client.close()


def check_journals_identical(h: ClusterHarness, last_seq: int) -> list[protocol.Delivered]:
    """Every node's journal verifies, has no hole, holds 1..last_seq, and all are byte-identical.
    Returns the records (of any one of them)."""
    journals: dict[str, JournalContents] = {node_id: h.read_journal(node_id) for node_id in h.node_ids}
    reference = next(iter(journals.values()))
    for node_id, journal in journals.items():
        assert journal.report.ok, f"{node_id}: verify_journal: {journal.report}"
        assert journal.holes == [], f"{node_id}: journal still has holes {journal.holes}"
        assert (journal.first_seq, journal.last_seq) == (1, last_seq), f"{node_id}: journal holds {journal.first_seq}..{journal.last_seq}"
        assert len(journal.records) == last_seq, f"{node_id}: {len(journal.records)} records"
        assert journal.segment_bytes == reference.segment_bytes, (
            f"journal of {node_id} differs from {reference.node_id}'s "
            f"({len(journal.segment_bytes)} vs {len(reference.segment_bytes)} bytes)"
        )
    records = reference.records
    assert [r.seq for r in records] == list(range(1, last_seq + 1))
    return records


def check_acknowledged(records: list[protocol.Delivered], acked: dict[bytes, int], *, where: str) -> None:
    """Each acknowledged payload sits exactly at its acknowledged sequence number."""
    wrong = []
    for payload, seq in acked.items():
        if not 1 <= seq <= len(records) or records[seq - 1].payload != payload:
            found = records[seq - 1].payload if 1 <= seq <= len(records) else None
            wrong.append((payload, seq, found))
    assert not wrong, f"{where}: {len(wrong)} acknowledged payloads not at their seq, e.g. {wrong[:5]}"


def check_exactly_once(records: list[protocol.Delivered], expected_payloads: set[bytes]) -> None:
    counts = Counter(r.payload for r in records)
    repeated = [(p, c) for p, c in counts.items() if c != 1]
    assert not repeated, f"{len(repeated)} payloads appear more than once, e.g. {repeated[:5]}"
    missing = expected_payloads - counts.keys()
    extra = counts.keys() - expected_payloads
    assert not missing, f"{len(missing)} submitted payloads never sequenced, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} payloads sequenced that nobody submitted, e.g. {sorted(extra)[:5]}"


def check_sessions_in_order(records: list[protocol.Delivered], sessions: dict[str, list[bytes]]) -> None:
    """Each session's records carry client_seq 1..N in stream order, client_seq n holding the
    session's n-th payload."""
    by_session: dict[str, list[protocol.Delivered]] = {s: [] for s in sessions}
    for record in records:
        if record.session in by_session:
            by_session[record.session].append(record)
    for session, payloads in sessions.items():
        mine = by_session[session]
        client_seqs = [r.client_seq for r in mine]
        assert client_seqs == list(range(1, len(payloads) + 1)), (
            f"session {session}: client_seqs not 1..{len(payloads)} in order "
            f"(got {len(client_seqs)}, first out of place: "
            f"{next(((i + 1, c) for i, c in enumerate(client_seqs) if c != i + 1), None)})"
        )
        wrong = [(r.client_seq, r.payload) for r in mine if r.payload != payloads[r.client_seq - 1]]
        assert not wrong, f"session {session}: client_seq holds another payload, e.g. {wrong[:5]}"


def check_stream(recorder: StreamRecorder, last_seq: int, acked: dict[bytes, int]) -> None:
    """What a subscriber saw: from_seq..last_seq, no gap, no duplicate, acknowledged payloads
    at their numbers."""
    seqs = [m.seq for m in recorder.messages]
    expected = list(range(recorder.from_seq, last_seq + 1))
    if seqs != expected:
        first_bad = next((i for i, (a, b) in enumerate(zip(seqs, expected)) if a != b), min(len(seqs), len(expected)))
        raise AssertionError(
            f"subscriber {recorder.session} (from {recorder.from_seq}): {len(seqs)} messages, expected "
            f"{len(expected)}; first difference at index {first_bad}: "
            f"{seqs[max(0, first_bad - 2) : first_bad + 3]} vs {expected[max(0, first_bad - 2) : first_bad + 3]}"
        )
    payloads = Counter(m.payload for m in recorder.messages)
    repeated = [p for p, c in payloads.items() if c > 1]
    assert not repeated, f"subscriber {recorder.session}: payloads delivered twice, e.g. {repeated[:5]}"
    by_seq = {m.seq: m.payload for m in recorder.messages}
    wrong = [(p, s, by_seq.get(s)) for p, s in acked.items() if s >= recorder.from_seq and by_seq.get(s) != p]
    assert not wrong, f"subscriber {recorder.session}: acknowledged payloads not delivered at their seq, e.g. {wrong[:5]}"


async def replay(h: ClusterHarness, endpoints: list[str], total: int) -> StreamRecorder:
    """A new subscriber from seq 1 on ``endpoints``, stopped once it has read ``total`` messages."""
    recorder = StreamRecorder(endpoints, token=h.token, session="replay").start()
    try:
        await recorder.wait_until(total, timeout_s=20)
    finally:
        await recorder.stop()
    return recorder


def raw_frame(body: bytes, *, crc: int | None = None) -> bytes:
    """A frame with an arbitrary body (and, if given, a wrong checksum)."""
    return protocol.HEADER.pack(len(body), zlib.crc32(body) if crc is None else crc) + body


# --- 1. three clients, 10,000 messages each, the leader killed a third of the way ----------


def test_three_clients_finish_through_a_leader_kill_and_every_journal_agrees(running_cluster):
    h = running_cluster
    leader = h.wait_for_leader()
    total = CLIENT_COUNT * MESSAGES_PER_CLIENT
    sessions = {f"c{i}": [payload_of(i, n) for n in range(1, MESSAGES_PER_CLIENT + 1)] for i in range(CLIENT_COUNT)}
    print(f"{CLIENT_COUNT} clients x {MESSAGES_PER_CLIENT} messages; leader {leader['id']} is killed at {total // 3} acks")

    async def scenario() -> tuple[list[list[int]], int, list[int]]:
        acks = AckCounter(total // 3)
        clients = await connected_clients(h, list(sessions), in_flight_max=1000)
        try:

            async def kill_leader_a_third_of_the_way() -> int:
                await asyncio.wait_for(acks.reached.wait(), 60)
                at = acks.count
                h.kill(leader["id"])
                return at

            killer = asyncio.create_task(kill_leader_a_third_of_the_way())
            runs = [pipeline(client, sessions[client.session], timeout_s=120, on_ack=acks) for client in clients]
            results = await asyncio.gather(*runs)
            acked_at_kill = await killer
            return results, acked_at_kill, [c.failovers for c in clients]
        finally:
            await close_all(clients)

    started = time.monotonic()
    results, acked_at_kill, failovers = asyncio.run(scenario())
    print(
        f"all {total} submits acknowledged in {time.monotonic() - started:.2f} s; {acked_at_kill} were acked at the kill; "
        f"client failovers {failovers}"
    )
    assert acked_at_kill < total, "the leader was killed only after every submit was acknowledged"
    assert all(f >= 1 for f in failovers), f"every client should have followed the new leader: {failovers}"
    for seqs in results:
        assert all(isinstance(s, int) for s in seqs)

    h.restart(leader["id"])
    h.wait_converged(total, timeout_s=30)
    h.stop()

    records = check_journals_identical(h, total)
    check_exactly_once(records, {p for payloads in sessions.values() for p in payloads})
    acked = {payload: seq for session, seqs in zip(sessions, results) for payload, seq in zip(sessions[session], seqs)}
    assert len(set(acked.values())) == total, "two submits were acknowledged with the same sequence number"
    check_acknowledged(records, acked, where="journal")
    check_sessions_in_order(records, sessions)


# --- 2. subscribers on followers through a leader failover ---------------------------------


def test_subscribers_on_followers_see_a_gapless_stream_through_a_failover(running_cluster, caplog):
    caplog.set_level(logging.INFO, logger="raftseq.client")
    h = running_cluster
    leader = h.wait_for_leader()
    followers = followers_of(h, leader)
    per_client = 2000
    sessions = {f"s{i}": [payload_of(i, n) for n in range(1, per_client + 1)] for i in range(2)}
    total = per_client * len(sessions)
    late_from = total // 2

    async def scenario() -> tuple[dict[bytes, int], list[StreamRecorder]]:
        recorders = [StreamRecorder(h.endpoints, token=h.token, prefer=h.endpoint(f), session=f"sub-{f}").start() for f in followers]
        # And one on the leader that is about to die: it resumes on another node.
        recorders.append(StreamRecorder(h.endpoints, token=h.token, prefer=h.endpoint(leader["id"]), session="sub-leader").start())
        acks = AckCounter(total // 3)
        clients = await connected_clients(h, list(sessions), in_flight_max=200)
        try:

            async def kill_leader_then_subscribe_late() -> StreamRecorder:
                await asyncio.wait_for(acks.reached.wait(), 60)
                h.kill(leader["id"])
                return StreamRecorder(
                    h.endpoints, token=h.token, from_seq=late_from, prefer=h.endpoint(followers[1]), session="sub-late"
                ).start()

            killer = asyncio.create_task(kill_leader_then_subscribe_late())
            results = await asyncio.gather(*(pipeline(c, sessions[c.session], timeout_s=60, on_ack=acks) for c in clients))
            recorders.append(await killer)
            for recorder in recorders:
                await recorder.wait_until(total, timeout_s=30)
            acked = {p: s for session, seqs in zip(sessions, results) for p, s in zip(sessions[session], seqs)}
            return acked, recorders
        finally:
            await close_all(clients)
            for recorder in recorders:
                await recorder.stop()

    acked, recorders = asyncio.run(scenario())
    assert sorted(acked.values()) == list(range(1, total + 1)), "acknowledged numbers are not exactly 1..total"
    for recorder in recorders:
        print(f"subscriber {recorder.session}: {len(recorder.messages)} messages from {recorder.from_seq}")
        check_stream(recorder, total, acked)
    mismatches = [r.getMessage() for r in caplog.records if "node sent seq" in r.getMessage()]
    assert not mismatches, f"a node sent a subscriber a gap or a duplicate: {mismatches[:5]}"


# --- 3. a follower behind a compacted Raft log: snapshot plus journal catch-up -------------


@pytest.mark.parametrize("running_cluster", [COMPACTION], indirect=True, ids=["small-raft-log"])
def test_a_follower_behind_a_compacted_log_catches_up_by_snapshot_and_journal_fetch(running_cluster):
    h = running_cluster
    leader = h.wait_for_leader()
    follower = followers_of(h, leader)[0]
    snapshot_path = os.path.join(h.raft_dir(leader["id"]), "snapshot.bin")
    payloads = [b"p-%d" % n for n in range(1, 5001)]  # 200 before, 3000-4500 while down, 100 after
    sent = 0

    async def submit_next(client: SequencerClient, count: int) -> dict[bytes, int]:
        nonlocal sent
        chunk = payloads[sent : sent + count]
        sent += count
        seqs = await pipeline(client, chunk, timeout_s=30)
        return dict(zip(chunk, seqs))

    async def phase(body):
        async with SequencerClient(h.endpoints, session="compaction", token=h.token, in_flight_max=4) as client:
            return await body(client)

    # Before: the follower holds the first records.
    acked = asyncio.run(phase(lambda c: submit_next(c, 200)))
    h.wait_converged(200, timeout_s=20)
    h.kill(follower)
    killed_ns = time.time_ns()

    # While it is down: enough Raft entries for the leader to snapshot its machine and drop
    # the log the follower would need.
    async def until_compacted(client: SequencerClient) -> dict[bytes, int]:
        done: dict[bytes, int] = {}
        for _ in range(45):
            done.update(await submit_next(client, 100))
            compacted = os.path.exists(snapshot_path) and os.stat(snapshot_path).st_mtime_ns > killed_ns
            if compacted and len(done) >= MISSED_MIN:
                return done
        raise AssertionError(f"the leader never compacted its Raft log ({snapshot_path}) after {len(done)} messages")

    acked.update(asyncio.run(phase(until_compacted)))
    compacted_at = len(acked)
    print(f"leader {leader['id']} compacted its Raft log; {compacted_at} messages sequenced, {follower} had 200")

    h.restart(follower)
    filled = h.wait_hole_filled(follower, timeout_s=40)
    print(f"{follower} filled its journal hole: {filled['raftseq_catchup_fetched_records_total']:.0f} records fetched from peers")

    # After: more traffic, then every node holds the same stream; the caught-up follower
    # serves it from seq 1 across the filled hole.
    acked.update(asyncio.run(phase(lambda c: submit_next(c, 100))))
    total = len(acked)
    h.wait_converged(total, timeout_s=20)

    check_stream(asyncio.run(replay(h, [h.endpoint(follower)], total)), total, acked)
    h.stop()
    records = check_journals_identical(h, total)
    check_acknowledged(records, acked, where="journal")
    check_sessions_in_order(records, {"compaction": payloads[:total]})


#: The node closes a connection silent for its idle timeout: short here, so that a long read
#: is a matter of seconds.
SHORT_IDLE = {"gateway": {"idle_timeout_ms": 600, "heartbeat_interval_ms": 150}}


class SlowHoleJournal:
    """A journal with one hole, 1..`last`, that takes `store_s` per store: a large hole (or a
    slow disk) makes a catch-up read from its peer last many idle timeouts."""

    def __init__(self, last: int, store_s: float) -> None:
        self.holes = [(1, last)]
        self.store_s = store_s
        self.filled: list[bytes] = []
        self.next_seq = 1

    @property
    def fill_next_seq(self) -> int:
        return self.next_seq if self.holes else 0

    def fill(self, records: bytes, first_seq: int, last_seq: int) -> None:
        assert first_seq == self.next_seq, (first_seq, self.next_seq)
        time.sleep(self.store_s)  # the store blocks the loop, as a real fill and fsync do
        self.filled.append(records)
        self.next_seq = last_seq + 1
        if last_seq == self.holes[0][1]:
            self.holes.pop(0)


@pytest.mark.parametrize("running_cluster", [SHORT_IDLE], indirect=True, ids=["idle-timeout-600ms"])
def test_catch_up_of_a_large_hole_keeps_its_connection_to_the_peer(running_cluster, monkeypatch, caplog):
    """Catch-up reads a hole from a peer over the subscribe protocol and never submits: it
    must answer the peer's heartbeats, or the peer cuts it every idle timeout and the fill
    starts over on a new connection each time."""
    h = running_cluster
    total = 6000
    # 12 MB: more than the socket buffers hold, many reads, a few stores per read.
    asyncio.run(submit_all(h, [b"%05d" % n + b"." * 2043 for n in range(1, total + 1)]))
    h.wait_converged(total, timeout_s=20)
    idle_s = SHORT_IDLE["gateway"]["idle_timeout_ms"] / 1000
    monkeypatch.setattr(catchup, "FILL_RECORDS_MAX", 50)  # 120 stores of 25 ms: 5 idle timeouts
    journal = SlowHoleJournal(total, store_s=idle_s / 24)
    peer = PeerConfig(h.node_ids[0], "127.0.0.1:1", h.endpoint(h.node_ids[0]))
    failures = {"catchup": 0}
    fill = catchup.CatchUp(journal, [peer], node_id="tester", token=h.token, verify_failures=failures, on_filled=lambda: None)

    async def until_filled() -> None:
        task = asyncio.create_task(fill.run())
        try:
            while journal.holes and not task.done():
                await asyncio.sleep(0.05)
        finally:
            task.cancel()

    caplog.set_level(logging.INFO, logger="raftseq.catchup")
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(until_filled(), 60))
    seconds = time.monotonic() - started
    stops = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert not stops, f"catch-up was cut {len(stops)} times in {seconds:.1f} s: {stops[:3]}"
    assert seconds > 2 * idle_s, f"the fill took {seconds:.1f} s: too quick to outlast the idle timeout"
    records = b"".join(journal.filled)
    assert [frame.seq for frame in protocol.FrameReader("node").feed(records)] == list(range(1, total + 1))
    assert fill.records_fetched == total and failures == {"catchup": 0}


async def submit_all(h: ClusterHarness, payloads: list[bytes]) -> list[int]:
    async with SequencerClient(h.endpoints, session="filler", token=h.token) as client:
        return await pipeline(client, payloads, timeout_s=30)


# --- 4. every node killed with SIGKILL and restarted ---------------------------------------


#: The interval fsync policy (the node fsyncs from its event loop while the apply thread appends
#: and rolls segments) with small segments, so that rolls happen all the time.
INTERVAL_FSYNC = {"journal": {"fsync": "interval_ms=2", "segment_bytes_max": 16 * 1024}}


@pytest.mark.parametrize("running_cluster", [None, INTERVAL_FSYNC], indirect=True, ids=["defaults", "fsync-interval-small-segments"])
def test_every_acknowledged_message_survives_sigkill_of_every_node(running_cluster):
    h = running_cluster
    h.wait_for_leader()
    per_client = 1500
    sessions = {f"k{i}": [payload_of(i, n) for n in range(1, per_client + 1)] for i in range(2)}
    total = per_client * len(sessions)

    async def scenario() -> tuple[dict[bytes, int], dict[bytes, int]]:
        acked_before: dict[bytes, int] = {}
        acks = AckCounter(total // 2)
        clients = await connected_clients(h, list(sessions), in_flight_max=200)
        futures_by_payload: dict[bytes, asyncio.Future] = {}

        def remember(payload: bytes):
            def done(future: asyncio.Future) -> None:
                acks(future)
                futures_by_payload[payload] = future

            return done

        try:

            async def kill_everything_and_restart() -> None:
                await asyncio.wait_for(acks.reached.wait(), 60)
                for payload, future in futures_by_payload.items():
                    if not future.cancelled() and future.exception() is None:
                        acked_before[payload] = future.result()
                for node_id in h.node_ids:
                    h.kill(node_id)
                for node_id in h.node_ids:
                    h.restart(node_id)

            killer = asyncio.create_task(kill_everything_and_restart())

            async def run(client: SequencerClient) -> list[int]:
                deadline = time.monotonic() + 90
                futures = []
                for payload in sessions[client.session]:
                    await asyncio.wait_for(client.wait_for_room(), max(0.0, deadline - time.monotonic()))
                    future = client.submit_nowait(payload)
                    future.add_done_callback(remember(payload))
                    futures.append(future)
                return list(await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - time.monotonic())))

            results = await asyncio.gather(*(run(c) for c in clients))
            await killer
            acked = {p: s for session, seqs in zip(sessions, results) for p, s in zip(sessions[session], seqs)}
            return acked_before, acked
        finally:
            await close_all(clients)

    acked_before, acked = asyncio.run(scenario())
    print(f"{len(acked_before)} messages acknowledged before every node was killed; {len(acked)} in all")
    assert 0 < len(acked_before) < total
    assert all(acked[p] == s for p, s in acked_before.items()), "a message was acknowledged twice with different numbers"
    h.wait_for_leader()
    h.wait_converged(total, timeout_s=30)

    check_stream(asyncio.run(replay(h, h.endpoints, total)), total, acked)
    h.stop()
    records = check_journals_identical(h, total)
    check_acknowledged(records, acked_before, where="journal (acknowledged before the kill)")
    check_acknowledged(records, acked, where="journal")
    check_exactly_once(records, {p for payloads in sessions.values() for p in payloads})
    check_sessions_in_order(records, sessions)


# --- 5. bad input ---------------------------------------------------------------------------


class SteadySubmitter:
    """A well-behaved client submitting one message at a time on its own thread."""

    def __init__(self, h: ClusterHarness, *, session: str = "steady", limit: int = 100_000, timeout_s: float = 60.0) -> None:
        self.h = h
        self.session = session
        self.limit = limit
        self.timeout_s = timeout_s
        self.seqs: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="steady-submitter", daemon=True)

    def start(self) -> SteadySubmitter:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            with BlockingSequencerClient(self.h.endpoints, session=self.session, token=self.h.token, outcome_deadline_s=10.0) as client:
                for n in range(1, self.limit + 1):
                    if self._stop.is_set() or time.monotonic() > deadline:
                        return
                    seq = client.submit(b"steady-%d" % n)
                    with self._progress:
                        self.seqs.append(seq)
                        self._progress.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
            with self._progress:
                self._progress.notify_all()

    def wait_for(self, count: int, *, timeout_s: float = 10.0) -> None:
        with self._progress:
            ok = self._progress.wait_for(lambda: len(self.seqs) >= count or self.errors, timeout_s)
        assert ok and not self.errors, f"steady client: {len(self.seqs)} acks, errors {self.errors}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "steady client did not stop"


def burst_answers(conn: RawConnection, count: int) -> dict[int, list]:
    """The next `count` answers to submits on `conn` (an AckRange counted per submit), by
    client_seq; each must come within 10 s and none twice."""
    answers: dict[int, list] = {}
    deadline = time.monotonic() + 10
    while sum(map(len, answers.values())) < count:
        frame = conn.next_frame(timeout_s=max(0.1, deadline - time.monotonic()))
        assert frame is not None, f"{count - sum(map(len, answers.values()))} answers missing (closed or silent): {answers}"
        if isinstance(frame, protocol.AckRange):
            for i in range(frame.count):
                answers.setdefault(frame.first_client_seq + i, []).append(protocol.Ack(frame.first_client_seq + i, frame.first_seq + i))
        else:
            answers.setdefault(frame.client_seq, []).append(frame)
    twice = {n: a for n, a in answers.items() if len(a) != 1}
    assert not twice, f"submits answered more than once: {list(twice.items())[:5]}"
    return answers


@pytest.mark.parametrize("running_cluster", [SMALL_SESSION_WINDOW], indirect=True, ids=["in-flight-5"])
def test_bad_input_is_refused_while_a_normal_client_carries_on(running_cluster):
    h = running_cluster
    leader = h.wait_for_leader()
    follower = followers_of(h, leader)[0]
    rng = random.Random(h.seed)
    steady = SteadySubmitter(h).start()
    # Two silent connections, checked at the end: one never says hello, one says hello and
    # then nothing (no heartbeats). Each is closed at its deadline, not before.
    gateway = GatewayConfig()
    no_hello = RawConnection(h.endpoint(leader["id"]))
    idle = RawConnection(h.endpoint(follower))
    silent: dict[str, tuple[float, list]] = {}

    def until_closed(name: str, conn: RawConnection, started: float) -> None:
        frames = conn.frames_until_closed(timeout_s=max(gateway.hello_timeout_ms, gateway.idle_timeout_ms) / 1000 + 10)
        silent[name] = (time.monotonic() - started, frames)

    watchers = [threading.Thread(target=until_closed, args=("no hello", no_hello, time.monotonic()), daemon=True)]
    try:
        assert isinstance(idle.hello("idle", h.token), protocol.Welcome)
        watchers.append(threading.Thread(target=until_closed, args=("idle", idle, time.monotonic()), daemon=True))
        for watcher in watchers:
            watcher.start()
        steady.wait_for(5)

        def refused_and_closed(address: str, data: bytes, reason: RejectReason, what: str) -> None:
            with RawConnection(address) as conn:
                conn.send(data)
                frames = conn.frames_until_closed()
            assert len(frames) == 1 and isinstance(frames[0], protocol.Rejected), f"{what} on {address}: got {frames}"
            assert frames[0].reason is reason, f"{what} on {address}: {frames[0]}"

        body = msgspec.msgpack.encode(["hello", "x", h.token, protocol.PROTOCOL_VERSION])
        random_body = bytes(rng.randrange(256) for _ in range(64))
        garbage = [
            ("bad checksum", raw_frame(body, crc=zlib.crc32(body) ^ 1), RejectReason.BAD_FRAME),
            ("not msgpack", raw_frame(b"\xc1" * 16), RejectReason.BAD_FRAME),
            ("unknown frame tag", raw_frame(msgspec.msgpack.encode(["launch", 1])), RejectReason.BAD_FRAME),
            ("node-to-client frame", protocol.encode_frame(protocol.Ack(1, 1)), RejectReason.BAD_FRAME),
            ("zero length", protocol.HEADER.pack(0, 0), RejectReason.BAD_FRAME),
            ("random bytes", raw_frame(random_body, crc=rng.randrange(2**32)), RejectReason.BAD_FRAME),
            ("oversized length prefix", protocol.HEADER.pack(2**31 - 1, 0) + b"\x00" * 64, RejectReason.FRAME_TOO_LARGE),
            ("just over the frame limit", protocol.HEADER.pack(protocol.limits.FRAME_BYTES_MAX + 1, 0), RejectReason.FRAME_TOO_LARGE),
            ("submit before hello", protocol.encode_frame(protocol.Submit(1, b"x")), RejectReason.HELLO_REQUIRED),
            ("subscribe before hello", protocol.encode_frame(protocol.Subscribe(1)), RejectReason.HELLO_REQUIRED),
            (
                "hello with a bad session name",
                raw_frame(msgspec.msgpack.encode(["hello", "no spaces", h.token, 1])),
                RejectReason.BAD_FRAME,
            ),
        ]
        for address in (h.endpoint(leader["id"]), h.endpoint(follower)):
            for what, data, reason in garbage:
                refused_and_closed(address, data, reason, what)

            # Wrong token, wrong protocol version: refused in the handshake, disconnected.
            with RawConnection(address) as conn:
                answer = conn.hello("intruder", "not-the-token")
                assert isinstance(answer, protocol.Rejected) and answer.reason is RejectReason.AUTH_FAILED, answer
                assert conn.frames_until_closed() == []
            with RawConnection(address) as conn:
                answer = conn.hello("future", h.token, version=protocol.PROTOCOL_VERSION + 1)
                assert isinstance(answer, protocol.Rejected) and answer.reason is RejectReason.PROTOCOL_VERSION, answer
                assert conn.frames_until_closed() == []

            # A second hello on one connection.
            with RawConnection(address) as conn:
                assert isinstance(conn.hello("twice", h.token), protocol.Welcome)
                conn.send_frame(protocol.Hello("twice", h.token, protocol.PROTOCOL_VERSION))
                frames = conn.frames_until_closed()
                assert [type(f) for f in frames] == [protocol.Rejected] and frames[0].reason is RejectReason.BAD_FRAME, frames

            # Subscribe beyond the end: from_seq_unavailable (the connection stays usable).
            with RawConnection(address) as conn:
                assert isinstance(conn.hello("far-ahead", h.token), protocol.Welcome)
                conn.send_frame(protocol.Subscribe(10**12))
                answer = conn.next_frame()
                assert isinstance(answer, protocol.Rejected) and answer.reason is RejectReason.FROM_SEQ_UNAVAILABLE, answer
                conn.send_frame(protocol.StatusRequest())
                assert isinstance(conn.next_frame(), protocol.Status)

            # Below what exists: every journal starts at 1, and 0 is not a sequence number at
            # all; the frame itself is refused.
            with RawConnection(address) as conn:
                assert isinstance(conn.hello("below", h.token), protocol.Welcome)
                conn.send(raw_frame(msgspec.msgpack.encode(["subscribe", 0])))
                frames = conn.frames_until_closed()
                assert [type(f) for f in frames] == [protocol.Rejected] and frames[0].reason is RejectReason.BAD_FRAME, frames

        # A follower answers a submit with NotLeader naming the leader.
        with RawConnection(h.endpoint(follower)) as conn:
            assert isinstance(conn.hello("lost", h.token), protocol.Welcome)
            conn.send_frame(protocol.Submit(1, b"to the follower"))
            answer = conn.next_frame()
            assert isinstance(answer, protocol.NotLeader) and answer.leader == h.endpoint(leader["id"]), answer

        # A client_seq that skips ahead: sequence_gap with the expected number; the session
        # goes on from there on the same connection.
        with RawConnection(h.endpoint(leader["id"])) as conn:
            assert isinstance(conn.hello("skipper", h.token), protocol.Welcome)
            conn.send_frame(protocol.Submit(3, b"skipped ahead"))
            answer = conn.next_frame()
            assert isinstance(answer, protocol.Rejected), answer
            assert (answer.reason, answer.client_seq, answer.expected_client_seq) == (RejectReason.SEQUENCE_GAP, 3, 1), answer
            conn.send_frame(protocol.Submit(1, b"in order"))
            answer = conn.next_frame()
            assert isinstance(answer, protocol.Ack) and answer.client_seq == 1 and not answer.duplicate, answer
            conn.send_frame(protocol.Submit(1, b"in order"))
            again = conn.next_frame()
            assert isinstance(again, protocol.Ack) and again.duplicate and again.seq == answer.seq, again

        # Over in_flight_per_session_max: the first submit over it gets Busy and those behind it
        # no answer (nothing can be sequenced before it: the client sends it and all after it
        # again); sent again, it is taken once there is room, and the rest follow.
        burst = 200
        with RawConnection(h.endpoint(leader["id"])) as conn:
            assert isinstance(conn.hello("burst", h.token), protocol.Welcome)
            conn.send(b"".join(protocol.encode_frame(protocol.Submit(n, b"burst-%d" % n)) for n in range(1, burst + 1)))
            answers = burst_answers(conn, SESSION_LIMIT + 1)
            assert sorted(answers) == list(range(1, SESSION_LIMIT + 2)), answers
            assert all(isinstance(answers[n][0], protocol.Ack) for n in range(1, SESSION_LIMIT + 1)), answers
            [busy] = answers[SESSION_LIMIT + 1]
            assert isinstance(busy, protocol.Busy) and busy.limit == "in_flight_per_session" and busy.retry_after_ms > 0, busy
            # The client sends the refused one and everything after it again, as its window allows
            # (an answer to a submit behind the refused one would show up among these).
            for first in range(SESSION_LIMIT + 1, burst + 1, SESSION_LIMIT):
                last = min(burst, first + SESSION_LIMIT - 1)
                conn.send(b"".join(protocol.encode_frame(protocol.Submit(n, b"burst-%d" % n)) for n in range(first, last + 1)))
                got = burst_answers(conn, last - first + 1)
                assert sorted(got) == list(range(first, last + 1)) and all(isinstance(a[0], protocol.Ack) for a in got.values()), got

        # The client library reports a wrong token as Rejected(auth_failed).
        async def wrong_token() -> None:
            client = SequencerClient(h.endpoints, session="intruder", token="not-the-token")
            try:
                with pytest.raises(Rejected) as refused:
                    await client.connect()
                assert refused.value.reason is RejectReason.AUTH_FAILED
            finally:
                await client.close()

        asyncio.run(wrong_token())

        # The silent connections: closed at their deadlines (plus scheduling slack), not before.
        for watcher in watchers:
            watcher.join()
        after_s, frames = silent["no hello"]
        first_deadline_s = min(gateway.hello_timeout_ms, gateway.idle_timeout_ms) / 1000
        assert frames in ([], [protocol.Rejected(RejectReason.HELLO_REQUIRED, "no hello in time")]), frames
        assert first_deadline_s - 0.1 <= after_s <= first_deadline_s + 2, after_s
        after_s, frames = silent["idle"]
        assert frames == [] and gateway.idle_timeout_ms / 1000 - 0.1 <= after_s <= gateway.idle_timeout_ms / 1000 + 2, (after_s, frames)

        # Through all of that the normal client kept going.
        before = len(steady.seqs)
        steady.wait_for(before + 5)
    finally:
        no_hello.close()
        idle.close()
        steady.stop()
    assert not steady.errors, steady.errors
    assert steady.seqs == sorted(set(steady.seqs)), "the steady client's numbers are not increasing"
    print(f"steady client: {len(steady.seqs)} messages acknowledged during the bad input")


@pytest.mark.parametrize("running_cluster", [SMALL_SESSION_WINDOW], indirect=True, ids=["in-flight-5"])
def test_a_pipelining_client_over_the_session_limit_is_slowed_not_failed(running_cluster):
    h = running_cluster
    payloads = [b"eager-%d" % n for n in range(1, 501)]

    async def scenario() -> list[int]:
        async with SequencerClient(h.endpoints, session="eager", token=h.token, in_flight_max=100) as client:
            return await pipeline(client, payloads, timeout_s=60)

    seqs = asyncio.run(scenario())
    assert seqs == list(range(1, len(payloads) + 1)), "a lone session's messages should be numbered 1..N in order"
    h.wait_converged(len(payloads), timeout_s=10)
    h.stop()
    records = check_journals_identical(h, len(payloads))
    check_sessions_in_order(records, {"eager": payloads})


# --- 6. the raftseq command -----------------------------------------------------------------


def test_the_raftseq_command_reports_status_submits_and_tails(running_cluster):
    h = running_cluster
    raftseq = os.path.join(os.path.dirname(sys.executable), "raftseq")
    env = {**os.environ, "RAFTSEQ_TOKEN": h.token, "RAFTSEQ_ENDPOINTS": ",".join(h.endpoints)}

    def run(*args: str, stdin: str = "") -> str:
        done = subprocess.run([raftseq, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"raftseq {' '.join(args)} exited {done.returncode}: {done.stderr}"
        return done.stdout

    # A loaded machine can put a follower into a brief election: ask again until the cluster is
    # settled (one leader, the others its followers), within a bound.
    deadline = time.monotonic() + 20
    while True:
        report = json.loads(run("status", "--json"))
        settled = [n["role"] for n in report["nodes"]].count("leader") == 1 and all(
            n["role"] in ("leader", "follower") for n in report["nodes"]
        )
        if settled or time.monotonic() > deadline:
            break
    assert set(report) == {"leader", "nodes"}, report
    assert len(report["nodes"]) == 3, report
    for node in report["nodes"]:
        missing = {"id", "address", "pid", "role", "term", "commit_index", "last_seq"} - node.keys()
        assert not missing, f"status lacks {missing}: {node}"
    leaders = [n for n in report["nodes"] if n["role"] == "leader"]
    assert len(leaders) == 1 and report["leader"] == leaders[0]["address"], report
    assert {n["id"]: n["pid"] for n in report["nodes"]} == {i: h.pid(i) for i in h.node_ids}, report
    assert {n["address"] for n in report["nodes"]} == set(h.endpoints)
    assert all(n["role"] == "follower" for n in report["nodes"] if n is not leaders[0]), report

    text = run("status")
    assert f"leader: {report['leader']}" in text, text

    lines = run("submit", "--session", "shell", "alpha", "beta", "gamma").splitlines()
    assert lines == ["1\talpha", "2\tbeta", "3\tgamma"], lines
    lines = run("submit", "--session", "shell", stdin="delta\nepsilon\n").splitlines()
    assert lines == ["4\tdelta", "5\tepsilon"], lines

    rows = [json.loads(line) for line in run("tail", "--from", "1", "--limit", "5", "--text").splitlines()]
    assert [(r["seq"], r["session"], r["client_seq"], r["payload"]) for r in rows] == [
        (1, "shell", 1, "alpha"),
        (2, "shell", 2, "beta"),
        (3, "shell", 3, "gamma"),
        (4, "shell", 4, "delta"),
        (5, "shell", 5, "epsilon"),
    ], rows
    rows = [json.loads(line) for line in run("tail", "--from", "4", "--limit", "2").splitlines()]
    assert [(r["seq"], r["payload_b64"]) for r in rows] == [(4, "ZGVsdGE="), (5, "ZXBzaWxvbg==")], rows
    assert all(r["timestamp_ns"] > 0 for r in rows)


# --- the local cluster's ports ---------------------------------------------------------------


def test_free_base_port_stays_out_of_the_ephemeral_port_range():
    """A port inside the kernel's ephemeral range can be taken by any outgoing connection, and
    a connect to a local port nobody listens on yet can pick that very port as its source and
    connect to itself (TCP self-connect). Seen here: a status poll self-connected to a node's
    client port before the node bound it (the node died: address already in use), and a peer's
    Raft connection retry did the same to a Raft port (the node stayed term 0 for 15 s)."""
    path = "/proc/sys/net/ipv4/ip_local_port_range"
    if not os.path.exists(path):
        pytest.skip("no Linux ephemeral port range to check")
    with open(path) as f:
        low, high = (int(x) for x in f.read().split())
    offsets = (1, 2, 3, 101, 102, 103, 201, 202, 203)
    inside = []
    for seed in range(50):
        base = free_base_port(random.Random(seed))
        inside.extend((seed, base + o) for o in offsets if low <= base + o <= high)
    assert not inside, f"free_base_port chose {len(inside)} ports inside the ephemeral range {low}..{high}, e.g. (seed, port) {inside[:5]}"


QUICK_IDLE = {"gateway": {"idle_timeout_ms": 1000, "heartbeat_interval_ms": 200}}


@pytest.mark.parametrize("running_cluster", [QUICK_IDLE], indirect=True, ids=["idle-timeout-1s"])
def test_idle_clients_and_subscribers_keep_their_connections(running_cluster):
    """The node closes a connection that sends nothing for its idle timeout. A client with
    nothing to submit and a subscriber (which never submits) answer the node's heartbeats, so
    neither is cut off and resumed while the cluster is quiet."""
    h = running_cluster
    h.wait_for_leader()
    quiet_s = 3 * QUICK_IDLE["gateway"]["idle_timeout_ms"] / 1000

    class Resumes:
        count = 0

        def attach(self, client) -> None:
            pass

        def detach(self, client) -> None:
            pass

        def subscription_resumed(self) -> None:
            self.count += 1

    async def story() -> None:
        resumes = Resumes()
        async with SequencerClient(h.endpoints, session="quiet", token=h.token) as client:
            seq = await client.submit(b"the only message")
            received = []

            async def read() -> None:
                async for message in subscribe(h.endpoints, token=h.token, prefer=h.endpoints[-1], metrics=resumes):
                    received.append(message.seq)

            reader = asyncio.create_task(read())
            await asyncio.sleep(quiet_s)  # the quiet stretch itself is what is tested
            reader.cancel()
            assert received == [seq]
            assert client.reconnects == 0, f"an idle client lost its connection {client.reconnects} times"
            assert resumes.count == 0, f"an idle subscriber was cut off {resumes.count} times"
            assert await client.submit(b"after the quiet") == seq + 1

    asyncio.run(asyncio.wait_for(story(), 30))


@pytest.mark.parametrize("running_cluster", [QUICK_IDLE], indirect=True, ids=["idle-timeout-1s"])
def test_a_node_that_was_not_running_does_not_blame_its_clients_for_silence(running_cluster):
    """A node stopped (SIGSTOP) for three idle timeouts while its client heartbeats on: what
    the client sent waits in the socket, unread. Resumed, the node reads it and keeps the
    connection; it used to close it as "silent for 3 s" at once (a leader descheduled for 3.4 s
    on a loaded machine lost every client that way)."""
    h = running_cluster
    leader = h.wait_for_leader()
    node = followers_of(h, leader)[0]
    idle_s = QUICK_IDLE["gateway"]["idle_timeout_ms"] / 1000
    beat_s = QUICK_IDLE["gateway"]["heartbeat_interval_ms"] / 1000
    stop = threading.Event()
    with RawConnection(h.endpoint(node)) as conn:
        assert isinstance(conn.hello("beating", h.token), protocol.Welcome)

        def heartbeats() -> None:
            while not stop.wait(beat_s / 2):
                conn.send_frame(protocol.Heartbeat())

        beating = threading.Thread(target=heartbeats, daemon=True)
        beating.start()
        try:
            h.kill(node, signal.SIGSTOP)
            try:
                stop.wait(3 * idle_s)  # the node not running is what is tested
            finally:
                h.kill(node, signal.SIGCONT)
            # Two idle timeouts after it runs again: closed by then if it blamed the client.
            frames = []
            deadline = time.monotonic() + 2 * idle_s
            while time.monotonic() < deadline and not conn.closed_by_node:
                conn._receive(deadline)
                frames += conn.buffered
                conn.buffered.clear()
            assert not conn.closed_by_node, f"{node} closed a connection that heartbeat on while {node} was stopped"
            assert any(isinstance(f, protocol.Heartbeat) for f in frames), frames
        finally:
            stop.set()
            beating.join(5)
