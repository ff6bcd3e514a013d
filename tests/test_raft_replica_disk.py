"""The replica's disk work off the loop: Raft snapshots written on their own thread
(``cluster.raft.snapshot_files``) and group commit in power durability (``cluster.batcher``).

The serializer's own rules with a write the test holds open; then three replicas on one loop:
a slow snapshot fsync (the loop must not stall for it), one that never ends (a compaction cut
short mid-write must restart on the old snapshot and the whole log), the journal segments a
snapshot covers (all synced first), and a slow Raft log fsync (one covers several batches).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from pysyncobj import FAIL_REASON
from pysyncobj.config import SERIALIZER_STATE

from raftseq.cluster import raft
from raftseq.cluster.batcher import Batcher, PendingSubmit
from raftseq.cluster.local import free_base_port, local_configs
from raftseq.cluster.raft import SequencerReplica
from raftseq.cluster.raft.replica import _snapshot_decoder
from raftseq.cluster.raft.snapshot_files import WRITING_SUFFIX, BackgroundSerializer, SnapshotWriter
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import FsyncPolicy, Journal, list_segment_files
from raftseq.sequencer.machine import SequencerMachine
from raftseq.sequencer.stream import SequencedStream

WAIT_S = 10.0
#: How long a slow snapshot fsync takes in the stall test, and the longest loop stall allowed.
SLOW_FSYNC_S = 0.6
LOOP_STALL_MAX_S = 0.3


# --- the serializer ------------------------------------------------------------------------------


class HeldWrite:
    """A ``SnapshotWriter`` whose writes wait for ``release`` (or fail halfway with `fail`)."""

    def __init__(self, content: bytes, *, fail: bool = False) -> None:
        self.content = content
        self.fail = fail
        self.release = threading.Event()
        self.started = threading.Event()
        self.writer = SnapshotWriter(self.prepare)

    def prepare(self, raft_data: tuple):
        def write(path: str) -> None:
            with open(path, "wb") as f:
                f.write(self.content[: len(self.content) // 2])
                self.started.set()
                assert self.release.wait(WAIT_S), "the test never released the write"
                if self.fail:
                    raise OSError(5, "Input/output error")
                f.write(self.content[len(self.content) // 2 :])

        return write


def serializer_for(path: Path, held: HeldWrite) -> BackgroundSerializer:
    return BackgroundSerializer(str(path), 4096, held.writer, lambda filename: ())


def ended(serializer: BackgroundSerializer) -> tuple:
    assert serializer.wait(WAIT_S), "the snapshot thread did not end"
    return serializer.checkSerializing()


def test_the_snapshot_replaces_the_old_one_only_once_written_and_nothing_is_sent_meanwhile(tmp_path):
    path = tmp_path / "snapshot.bin"
    path.write_bytes(b"old snapshot")
    held = HeldWrite(b"new snapshot " * 100)
    serializer = serializer_for(path, held)
    assert serializer.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)
    serializer.serialize((None, "last", "previous", set()), 41)
    assert held.started.wait(WAIT_S)
    assert serializer.checkSerializing() == (SERIALIZER_STATE.SERIALIZING, 41)
    serializer.serialize((None, "last", "previous", set()), 99)  # ignored: one at a time
    assert serializer.getTransmissionData("follower") is None, "a half-written snapshot is never sent"
    assert path.read_bytes() == b"old snapshot"
    held.release.set()
    assert ended(serializer) == (SERIALIZER_STATE.SUCCESS, 41)
    assert path.read_bytes() == held.content
    assert not os.path.exists(str(path) + WRITING_SUFFIX)
    data, first, last = serializer.getTransmissionData("follower")
    assert first and data == held.content[:4096]


def test_a_failed_write_keeps_the_old_snapshot_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "snapshot.bin"
    path.write_bytes(b"old snapshot")
    held = HeldWrite(b"new snapshot " * 100, fail=True)
    serializer = serializer_for(path, held)
    serializer.serialize((None, "last", "previous", set()), 7)
    held.release.set()
    assert ended(serializer) == (SERIALIZER_STATE.FAILED, 7)
    assert path.read_bytes() == b"old snapshot"
    assert not os.path.exists(str(path) + WRITING_SUFFIX)
    assert serializer.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None), "the next compaction may start"


def test_a_snapshot_from_the_leader_received_meanwhile_is_not_overwritten_by_the_older_one(tmp_path):
    path = tmp_path / "snapshot.bin"
    path.write_bytes(b"old snapshot")
    held = HeldWrite(b"own older snapshot " * 100)
    serializer = serializer_for(path, held)
    serializer.serialize((None, "last", "previous", set()), 7)
    assert held.started.wait(WAIT_S)
    assert serializer.setTransmissionData((b"leader's snapshot", True, False)) is False
    assert serializer.setTransmissionData((b"", False, True)) is True
    held.release.set()
    assert ended(serializer) == (SERIALIZER_STATE.FAILED, 7)
    assert path.read_bytes() == b"leader's snapshot"


def test_a_write_left_by_a_stopped_node_is_removed_on_start(tmp_path):
    path = tmp_path / "snapshot.bin"
    Path(str(path) + WRITING_SUFFIX).write_bytes(b"half a snapshot")
    serializer_for(path, HeldWrite(b""))
    assert not os.path.exists(str(path) + WRITING_SUFFIX)


# --- three replicas on one loop ------------------------------------------------------------------

COMPACTING = {"raft": {"log_compaction_min_entries": 20, "log_compaction_min_time_s": 0.5}}


def replica_of(config, loop, **journal_options) -> tuple[SequencerReplica, Journal]:
    journal = Journal.open(config.journal_dir, fsync=FsyncPolicy.parse("never"), **journal_options)
    core = SequencedStream(SequencerMachine(config.machine.machine_config()), journal)
    return SequencerReplica(config, core, loop=loop, on_applied=lambda result: None), journal


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


async def leader_of(members) -> SequencerReplica:
    deadline = time.monotonic() + WAIT_S
    while not any(r._isLeader() for r, _ in members):
        assert time.monotonic() < deadline, "no leader"
        await asyncio.sleep(0.005)
    return next(r for r, _ in members if r._isLeader())


#: pysyncobj's answers to a proposal that a leader change dropped: propose it again, to the
#: leader there is then (the machine applies a session's number once).
LEADER_LOST = {FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED, FAIL_REASON.NOT_LEADER, FAIL_REASON.LEADER_CHANGED}


async def submit(members, session: str, numbers: range, payload_bytes: int = 0) -> None:
    """Propose (`session`, n) for each n in `numbers` to the leader among `members`, one at a
    time, each until committed. Three replicas on one loop may hold an election under load (the
    first submit after start once came back DISCARDED): a proposal a leader change dropped goes
    again to the new leader."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + WAIT_S
    for n in numbers:
        payload = b"payload %d " % n + b"x" * payload_bytes
        while True:
            leader = await leader_of(members)
            batch = protocol.encode_batch(time.time_ns(), [protocol.Entry(session, n, payload)])
            done = loop.create_future()
            leader.apply_entry(batch, callback=lambda result, error, done=done: done.set_result(error))
            error = await asyncio.wait_for(done, WAIT_S)
            if error == FAIL_REASON.SUCCESS:
                break
            assert error in LEADER_LOST and time.monotonic() < deadline, f"({session}, {n}): pysyncobj answered {error}"


def compacted(config, replica: SequencerReplica) -> bool:
    return os.path.exists(os.path.join(config.raft_dir, "snapshot.bin")) and replica._SyncObj__raftLog[0][1] > 1


def test_a_slow_snapshot_fsync_does_not_stall_the_loop(tmp_path, monkeypatch):
    """Log compaction used to write and fsync the snapshot inside a Raft tick: the loop stood
    still for the whole fsync (4-6 ms on a quiet disk, the p99.9 of the acks)."""
    raft.install()
    configs = local_configs(str(tmp_path), free_base_port(), insecure=True, overrides=COMPACTING)
    real_fsync = os.fsync

    def slow_for_snapshots(fd: int) -> None:
        if "snapshot.bin" in fd_path(fd):
            time.sleep(SLOW_FSYNC_S)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_for_snapshots)

    async def run_cluster() -> float:
        loop = asyncio.get_running_loop()
        members = [replica_of(config, loop) for config in configs]
        longest = 0.0
        stop = asyncio.Event()

        async def probe() -> None:
            nonlocal longest
            while not stop.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.001)
                longest = max(longest, time.monotonic() - before)

        try:
            prober = asyncio.ensure_future(probe())
            await submit(members, "slow-snapshot", range(1, 61))
            deadline = time.monotonic() + WAIT_S
            while not all(compacted(config, r) for config, (r, _) in zip(configs, members)):
                assert time.monotonic() < deadline, "no compaction on every node"
                await asyncio.sleep(0.01)
            stop.set()
            await prober
            return longest
        finally:
            for replica, journal in members:
                replica.destroy()
                journal.close()

    longest = asyncio.run(run_cluster())
    assert longest < LOOP_STALL_MAX_S, f"the loop stood still for {longest:.3f} s while a snapshot was synced"


def test_a_compaction_cut_short_while_its_snapshot_is_written_restarts_on_the_old_one_and_the_whole_log(tmp_path, monkeypatch):
    raft.install()
    configs = local_configs(str(tmp_path), free_base_port(), insecure=True, overrides=COMPACTING)
    first_dir = configs[0].raft_dir
    writing = os.path.join(first_dir, "snapshot.bin" + WRITING_SUFFIX)
    real_fsync = os.fsync
    held = threading.Event()
    held.set()
    holding = threading.Event()
    released = threading.Event()

    def held_for_the_first_node(fd: int) -> None:
        if fd_path(fd) == writing and not held.is_set():
            holding.set()
            released.wait(WAIT_S)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_for_the_first_node)

    async def run_cluster() -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        members = [replica_of(config, loop) for config in configs]
        try:
            first = members[0][0]
            await submit(members, "cut", range(1, 61))
            deadline = time.monotonic() + WAIT_S
            while not compacted(configs[0], first):
                assert time.monotonic() < deadline, "no first compaction on the first node"
                await asyncio.sleep(0.01)
            held.clear()  # the next snapshot of the first node never reaches the disk
            await submit(members, "cut", range(61, 121))
            while not holding.is_set():  # from here no snapshot of this node is renamed
                assert time.monotonic() < deadline + WAIT_S, "no second compaction started"
                await asyncio.sleep(0.01)
            # The first node knows all 120 committed before it goes (a follower learns the last
            # commit from the leader's next message: gone with it, 119 was all it could apply).
            while first.core.machine.last_seq < 120:
                assert time.monotonic() < deadline + WAIT_S, f"the first node applied up to {first.core.machine.last_seq}, not 120"
                await asyncio.sleep(0.005)
            old_snapshot = Path(first_dir, "snapshot.bin").read_bytes()
            return first._SyncObj__raftLog[-1][1], old_snapshot
        finally:
            for replica, journal in members:
                replica.destroy()
                journal.close()

    last, old_snapshot = asyncio.run(run_cluster())
    released.set()  # the thread ends after its node is gone; its file is never renamed
    deadline = time.monotonic() + WAIT_S
    while any(t.name == "raft-snapshot-writer" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the snapshot thread did not end"
        time.sleep(0.01)
    assert Path(first_dir, "snapshot.bin").read_bytes() == old_snapshot
    with open(writing, "r+b") as f:  # and the power went with half of it written
        f.truncate(os.path.getsize(writing) // 2)

    async def restart_first() -> tuple[list, int]:
        replica, journal = replica_of(configs[0], asyncio.get_running_loop())
        try:
            assert not os.path.exists(writing), "the half-written snapshot is removed on start"
            deadline = time.monotonic() + WAIT_S
            while replica.core.machine.last_seq < 120:
                assert time.monotonic() < deadline, f"the restarted node applied up to {replica.core.machine.last_seq}, not 120"
                await asyncio.sleep(0.005)
            return list(replica._SyncObj__raftLog[:]), replica.core.machine.last_seq
        finally:
            replica.destroy()
            journal.close()

    monkeypatch.setattr(os, "fsync", real_fsync)
    log_after, last_seq = asyncio.run(restart_first())
    assert log_after[-1][1] == last, f"the log ends at {log_after[-1][1]}, not {last}"
    assert last_seq == 120


#: Messages the snapshot must cover in the journal-sync test: ~20 segments of 4 KiB.
COVERED_MIN = 40


def snapshot_covers(config) -> int:
    """The last sequence number the node's Raft snapshot covers (0: none)."""
    try:
        with open(os.path.join(config.raft_dir, "snapshot.bin"), "rb") as f:
            return SequencerMachine.restore(_snapshot_decoder.decode(f.read()).machine).last_seq
    except FileNotFoundError:
        return 0


def test_every_journal_segment_below_the_snapshot_is_synced_before_the_log_drops_its_entries(tmp_path, monkeypatch):
    """The journal seals a full segment without fsync under its default policy ("never"), and
    compaction synced only the journal's tail: records in a segment sealed since the last
    snapshot could be lost with a power cut after the Raft log dropped the entries holding
    them, and then no node could rebuild them."""
    raft.install()
    configs = local_configs(str(tmp_path), free_base_port(), insecure=True, overrides=COMPACTING)
    real_fsync = os.fsync
    synced: set[str] = set()

    def recorded(fd: int) -> None:
        synced.add(fd_path(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)

    async def run_cluster() -> None:
        loop = asyncio.get_running_loop()
        members = [replica_of(config, loop, segment_bytes_max=limits.SEGMENT_BYTES_MIN) for config in configs]
        try:
            first = members[0][0]
            deadline = time.monotonic() + 3 * WAIT_S
            n = 0
            while not (compacted(configs[0], first) and snapshot_covers(configs[0]) >= COVERED_MIN):
                assert time.monotonic() < deadline, f"no compaction covering {COVERED_MIN} messages on the first node"
                n += 1
                await submit(members, "segments", range(n, n + 1), payload_bytes=1500)
        finally:
            for replica, journal in members:
                replica.destroy()
                journal.close()

    asyncio.run(run_cluster())
    covered = snapshot_covers(configs[0])
    segments = list_segment_files(configs[0].journal_dir)
    below = [path for (first_seq, path), (next_first, _) in zip(segments, segments[1:]) if next_first <= covered]
    assert len(below) >= 2, f"the test wants segments sealed below the snapshot (at {covered}): {segments}"
    assert not [path for path in below if path not in synced], "journal segments below the snapshot never synced"


# --- group commit: the batcher proposes while the leader's fsync runs ----------------------------

#: How long each Raft log fdatasync takes in the group-commit test, and the submits' spacing.
SLOW_FDATASYNC_S = 0.02
SUBMIT_EVERY_S = 0.001


def test_with_a_slow_fsync_one_fsync_of_the_leader_covers_several_batches(tmp_path, monkeypatch):
    """Power durability: the batcher waited for each commit, and the commit for the fsync, so
    each fsync covered ~1 entry (1.3 measured). Wired as a node wires it (``unsynced``,
    ``on_durable``), batches go on while the leader's fsync runs."""
    raft.install()
    overrides = {
        "durability": "power",
        "batcher": {"unsynced_entries_max": 8},
        "raft": {"log_compaction_min_entries": 1000, "log_compaction_min_time_s": 60.0},
    }
    configs = local_configs(str(tmp_path), free_base_port(), insecure=True, overrides=overrides)
    real_fdatasync = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(SLOW_FDATASYNC_S)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow)  # read by each Raft log store as it opens

    async def run_cluster() -> tuple[int, int, list[int]]:
        loop = asyncio.get_running_loop()
        members = [replica_of(config, loop) for config in configs]
        try:
            await submit(members, "warm-up", range(1, 2))
            leader = await leader_of(members)
            batcher = Batcher(configs[0].batcher, lambda data, done: leader.apply_entry(data, callback=done), loop=loop)
            batcher.unsynced = leader.unsynced_entries
            leader.on_durable = batcher.flush
            batcher.start()
            answered: list[int] = []
            all_done = loop.create_future()

            def reply(client_seq: int, outcome: object, payload_bytes: int) -> None:
                answered.append(client_seq)
                if len(answered) == 100 and not all_done.done():
                    all_done.set_result(None)

            syncs, entries = leader.raft_log.syncs, leader.raft_log.entries_synced
            for n in range(1, 101):
                assert batcher.offer(PendingSubmit("grouped", n, b"payload %d" % n, reply))
                await asyncio.sleep(SUBMIT_EVERY_S)
            await asyncio.wait_for(all_done, WAIT_S * 3)
            return leader.raft_log.syncs - syncs, leader.raft_log.entries_synced - entries, answered
        finally:
            for replica, journal in members:
                replica.destroy()
                journal.close()

    syncs, entries, answered = asyncio.run(run_cluster())
    assert answered == list(range(1, 101))
    assert entries / syncs >= 2.0, f"{entries} entries in {syncs} fsyncs of the leader: {entries / syncs:.2f} per fsync"
