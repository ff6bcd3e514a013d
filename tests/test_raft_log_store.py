"""The node's Raft log on disk (``cluster.raft.log_store.RaftLogStore``).

Each test writes a log through pysyncobj's journal interface, damages or reopens its files, and
reads back what a restarted node would hold. Entries are ``(command, index, term)``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal

from raftseq.cluster import raft
from raftseq.cluster.local import free_base_port, local_configs
from raftseq.cluster.node_exit import NodeExit
from raftseq.cluster.raft import log_store
from raftseq.cluster.raft.log_store import RaftLogDamaged, RaftLogStore, segment_numbers
from test_raft_replica_disk import replica_of, submit

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0


def entry(index: int, term: int = 1, size: int = 40) -> tuple[bytes, int, int]:
    return (b"batch %d of term %d " % (index, term) + b"x" * size, index, term)


def write_log(directory: Path, last: int, **options) -> list[tuple[bytes, int, int]]:
    """A log of entries 1..last (1 a no-op of term 0, as pysyncobj starts one), closed."""
    store = RaftLogStore(str(directory), **options)
    written = [(b"\x01", 1, 0)] + [entry(i) for i in range(2, last + 1)]
    for e in written:
        store.add(*e)
    store.close()
    return written


def held(directory: Path, **options) -> list[tuple[bytes, int, int]]:
    store = RaftLogStore(str(directory), **options)
    try:
        return list(store[:])
    finally:
        store.close()


def segment(directory: Path, number: int = 1) -> Path:
    return directory / f"log-{number:08d}.seg"


def record_offsets(path: Path) -> list[int]:
    """Where each record of a segment starts."""
    data = path.read_bytes()
    offsets, offset = [], log_store._SEGMENT_HEADER.size
    while offset < len(data):
        offsets.append(offset)
        offset = log_store._record_at(data, offset)[0]
    return offsets


# --- writing and reading back ----------------------------------------------------------------


def test_entries_term_vote_and_commit_index_survive_a_reopen(tmp_path):
    store = RaftLogStore(str(tmp_path))
    for e in [(b"\x01", 1, 0)] + [entry(i) for i in range(2, 11)]:
        store.add(*e)
    store.setCurrentTerm(7, "127.0.0.1:9001")
    store.setRaftCommitIndex(6)
    store.close()

    again = RaftLogStore(str(tmp_path))
    assert [e[1] for e in again[:]] == list(range(1, 11))
    assert again[4] == entry(5)
    assert (again.getCurrentTerm(), again.getVotedForNodeId(), again.getRaftCommitIndex()) == (7, "127.0.0.1:9001", 6)
    again.setCurrentTerm(8, None)
    again.close()
    assert RaftLogStore(str(tmp_path)).getVotedForNodeId() is None


def test_term_and_vote_are_synced_with_their_directory_before_set_current_term_returns(tmp_path, monkeypatch):
    store = RaftLogStore(str(tmp_path))
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(log_store.os, "fsync", recording_fsync)
    store.setCurrentTerm(5, "127.0.0.1:9002")
    monkeypatch.undo()
    store.close()
    assert synced == [str(tmp_path / "term.tmp"), str(tmp_path)], "the file, then the directory holding its new name"
    assert (tmp_path / "term").exists() and not (tmp_path / "term.tmp").exists()


def test_no_file_descriptor_left_refuses_the_term_without_stopping_and_it_is_written_later(tmp_path, monkeypatch):
    store = RaftLogStore(str(tmp_path))

    def out_of_files(*args, **kwargs):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(log_store, "open", out_of_files, raising=False)
    with pytest.raises(OSError):
        store.setCurrentTerm(6, "127.0.0.1:9003")  # the node goes on; pysyncobj's handler stops
    monkeypatch.undo()
    store.onOneSecondTimer()
    store.close()
    again = RaftLogStore(str(tmp_path))
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (6, "127.0.0.1:9003")
    again.close()


def test_truncation_at_both_ends_and_clear_are_replayed(tmp_path):
    store = RaftLogStore(str(tmp_path))
    for e in [(b"\x01", 1, 0)] + [entry(i) for i in range(2, 21)]:
        store.add(*e)
    store.deleteEntriesFrom(14)  # a follower's conflict: 15.. go
    store.add(*entry(15, term=2))
    store.deleteEntriesTo(4)  # compaction: 1..4 go
    expected = [entry(i) for i in range(5, 15)] + [entry(15, term=2)]
    assert list(store[:]) == expected
    store.close()
    assert held(tmp_path) == expected

    store = RaftLogStore(str(tmp_path))
    store.clear()  # a snapshot installed
    store.add(*entry(40, term=3))
    store.add(*entry(41, term=3))
    store.close()
    assert held(tmp_path) == [entry(40, term=3), entry(41, term=3)]


def test_the_commit_index_read_back_never_passes_the_log_end(tmp_path):
    store = RaftLogStore(str(tmp_path))
    for e in [(b"\x01", 1, 0)] + [entry(i) for i in range(2, 11)]:
        store.add(*e)
    store.setRaftCommitIndex(10)
    store.onOneSecondTimer()
    store.deleteEntriesFrom(5)
    store.close()
    assert RaftLogStore(str(tmp_path)).getRaftCommitIndex() == 5


@pytest.mark.parametrize("durability", ["crash", "power"])
def test_compaction_deletes_whole_segments_and_rewrites_none(tmp_path, monkeypatch, durability):
    monkeypatch.setattr(log_store, "RAFT_LOG_SEGMENT_BYTES_MAX", 1024)
    store = RaftLogStore(str(tmp_path), durability=durability)
    for e in [(b"\x01", 1, 0)] + [entry(i, size=200) for i in range(2, 41)]:
        store.add(*e)
    wait_for(lambda: store.durable_index() == 40, "every entry written")
    numbers = segment_numbers(str(tmp_path))
    assert len(numbers) >= 8
    before = {n: (os.stat(segment(tmp_path, n)).st_ino, segment(tmp_path, n).read_bytes()) for n in numbers}
    store.deleteEntriesTo(20)  # entries 21.. remain
    first_kept = store._entry_segments[0]
    store.close()

    left = segment_numbers(str(tmp_path))
    assert first_kept > numbers[0] and left[0] == first_kept
    assert [n for n in left if n in numbers] == [n for n in numbers if n >= first_kept]
    for n in numbers[numbers.index(first_kept) : -1]:  # untouched, byte for byte (the last took a record)
        assert (os.stat(segment(tmp_path, n)).st_ino, segment(tmp_path, n).read_bytes()) == before[n]
    assert [e[1] for e in held(tmp_path)] == list(range(21, 41))


# --- torn tails and damage -------------------------------------------------------------------


def test_a_torn_tail_at_every_byte_of_the_last_record_is_cut_to_the_record_before(tmp_path):
    source = tmp_path / "source"
    written = write_log(source, 6)
    path = segment(source)
    last_start = record_offsets(path)[-1]
    size = path.stat().st_size
    for cut in range(last_start, size):
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(source, copy)
        with open(segment(copy), "r+b") as f:
            f.truncate(cut)
        store = RaftLogStore(str(copy))
        assert list(store[:]) == written[:-1], f"cut at byte {cut}"
        assert store.bytes_cut == cut - last_start
        store.add(*written[-1])  # the log goes on after the cut
        store.close()
        assert held(copy) == written, f"cut at byte {cut}"
        assert segment(copy).stat().st_size == size
        shutil.rmtree(copy)


def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path):
    written = write_log(tmp_path, 5)
    with open(segment(tmp_path), "ab") as f:
        f.write(b"\0" * 4096)  # the file grew but its data never reached the disk
    assert held(tmp_path) == written


def torn_batch(entries: list[tuple[bytes, int, int]], *, synced_to: int = 0) -> bytes:
    """What a power cut left of the writer's last batch: its first page lost (zeros), the
    records after it kept; with `synced_to`, a ``SYNCED_TO`` record naming that offset follows."""
    data = b"\0" * 4096
    for command, index, term in entries:
        data += log_store._encode(log_store._ENTRY.pack(log_store.ENTRY, index, term) + command)
    if synced_to:
        data += log_store._encode(log_store._OP.pack(log_store.SYNCED_TO, synced_to))
    return data


def test_a_power_cut_that_kept_records_after_a_lost_page_is_a_torn_tail(tmp_path):
    """Power-cut soak (durability power, seed 20261207): after a cut of all three nodes one
    refused to start, "raft/log-00000002.seg at byte 51680433: no record starts here": the
    writer's last batch, never synced, reached the disk in pieces, and a whole record after
    the lost page made the tail look like damage in the middle of the log."""
    written = write_log(tmp_path, 6, durability="power")
    path = segment(tmp_path)
    torn = torn_batch([entry(7), entry(8)])
    with open(path, "ab") as f:
        f.write(torn)
    store = RaftLogStore(str(tmp_path), durability="power")
    try:
        assert list(store[:]) == written, "the unsynced batch is cut, every synced entry kept"
        assert store.bytes_cut == len(torn)
        store.add(*entry(7))  # the log goes on after the cut
    finally:
        store.close()
    assert held(tmp_path, durability="power") == [*written, entry(7)]


def test_damage_that_an_fsync_covered_refuses_to_open_in_power_mode(tmp_path):
    """The same bytes, but a later SYNCED_TO names an offset past the damage: an fsync covered
    it, so it is damage, not a torn write."""
    write_log(tmp_path, 6, durability="power")
    path = segment(tmp_path)
    end = path.stat().st_size
    with open(path, "ab") as f:
        f.write(torn_batch([entry(7)], synced_to=end + 4096 + 1))
    with pytest.raises(RaftLogDamaged, match=f"{path} at byte {end}: no record starts here"):
        RaftLogStore(str(tmp_path), durability="power")


def test_a_flipped_bit_in_the_middle_refuses_to_open_naming_file_and_offset(tmp_path):
    write_log(tmp_path, 10)
    path = segment(tmp_path)
    offsets = record_offsets(path)
    damaged = offsets[4]
    data = bytearray(path.read_bytes())
    data[damaged + 20] ^= 0x10
    path.write_bytes(bytes(data))

    with pytest.raises(RaftLogDamaged) as caught:
        RaftLogStore(str(tmp_path))

    assert caught.value.path == str(path) and caught.value.offset == damaged
    assert str(caught.value) == f"{path} at byte {damaged}: a record whose checksum does not match"
    assert path.read_bytes() == bytes(data), "a damaged log is left as it is"


def test_a_flipped_bit_in_an_older_segment_refuses_to_open(tmp_path, monkeypatch):
    monkeypatch.setattr(log_store, "RAFT_LOG_SEGMENT_BYTES_MAX", 512)
    write_log(tmp_path, 20)
    assert len(segment_numbers(str(tmp_path))) > 2
    path = segment(tmp_path, 1)
    last = record_offsets(path)[-1]
    data = bytearray(path.read_bytes())
    data[last + 15] ^= 0x01  # the last record of a segment that is not the last one
    path.write_bytes(bytes(data))
    with pytest.raises(RaftLogDamaged, match=f"{path} at byte {last}: "):
        RaftLogStore(str(tmp_path))


def test_a_damaged_term_file_refuses_to_open(tmp_path):
    store = RaftLogStore(str(tmp_path))
    store.setCurrentTerm(3, "127.0.0.1:1")
    store.close()
    term = tmp_path / "term"
    data = bytearray(term.read_bytes())
    data[17] ^= 0x01
    term.write_bytes(bytes(data))
    with pytest.raises(RaftLogDamaged, match="checksum"):
        RaftLogStore(str(tmp_path))


def test_a_newer_format_is_refused_not_misread(tmp_path):
    write_log(tmp_path, 3)
    path = segment(tmp_path)
    data = bytearray(path.read_bytes())
    data[8] = 2
    path.write_bytes(bytes(data))
    with pytest.raises(RaftLogDamaged, match="format version 2"):
        RaftLogStore(str(tmp_path))


# --- migration from pysyncobj's FileJournal ---------------------------------------------------


def test_a_pysyncobj_raft_log_is_converted_with_its_entries_term_and_vote(tmp_path):
    old = FileJournal(str(tmp_path / "raft.log"))
    written = [(b"\x01", 1, 0)] + [entry(i, term=2) for i in range(2, 301)]
    for e in written:
        old.add(*e)
    old.deleteEntriesTo(100)  # compacted once, as a running node does
    old.setRaftCommitIndex(250)
    old.setCurrentTerm(4, "127.0.0.1:7202")  # stores the metadata file
    old._destroy()

    store = RaftLogStore(str(tmp_path))
    assert list(store[:]) == written[100:]
    assert (store.getCurrentTerm(), store.getVotedForNodeId(), store.getRaftCommitIndex()) == (4, "127.0.0.1:7202", 250)
    assert store.entries_migrated == 200
    store.add(*entry(301, term=4))
    store.close()

    assert (tmp_path / "raft.log").is_dir() and (tmp_path / "raft.log.migrated").is_file()
    assert held(tmp_path) == written[100:] + [entry(301, term=4)]
    # A release that reads raft.log refuses the converted directory instead of starting empty.
    with pytest.raises(IsADirectoryError):
        FileJournal(str(tmp_path / "raft.log"))


def test_a_conversion_cut_short_starts_again(tmp_path):
    old = FileJournal(str(tmp_path / "raft.log"))
    written = [(b"\x01", 1, 0)] + [entry(i) for i in range(2, 11)]
    for e in written:
        old.add(*e)
    old._destroy()
    segment(tmp_path).write_bytes(b"half a conversion")  # the process died while converting
    assert held(tmp_path) == written


def test_a_new_directory_is_marked_against_older_releases(tmp_path):
    RaftLogStore(str(tmp_path)).close()
    assert (tmp_path / "raft.log").is_dir()


# --- power mode ---------------------------------------------------------------------------------


class BlockedFsync:
    """An fsync that waits until released, counting calls."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        assert self.released.wait(WAIT_S), "fsync never released"


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_power_mode_counts_entries_durable_only_after_their_fsync(tmp_path):
    fsync = BlockedFsync()
    fsync.released.set()  # opening syncs what is there
    store = RaftLogStore(str(tmp_path), durability="power", fsync=fsync)
    store.setCurrentTerm(1, None)
    fsync.released.clear()
    synced = threading.Event()
    store.on_durable = synced.set
    for e in [(b"\x01", 1, 0)] + [entry(i) for i in range(2, 6)]:
        store.add(*e)
    wait_for(lambda: fsync.calls >= 2, "the writer to reach its fsync")
    assert store.durable_index() == 0
    assert not synced.is_set()

    fsync.released.set()
    wait_for(lambda: store.durable_index() == 5, "durable index 5")
    assert synced.is_set()
    assert store.syncs < 5, "one fsync covers every entry queued before it"
    store.close()


def test_power_mode_a_truncation_lowers_the_durable_index_until_synced(tmp_path):
    fsync = BlockedFsync()
    fsync.released.set()
    store = RaftLogStore(str(tmp_path), durability="power", fsync=fsync)
    for e in [(b"\x01", 1, 0)] + [entry(i) for i in range(2, 11)]:
        store.add(*e)
    wait_for(lambda: store.durable_index() == 10, "durable index 10")
    fsync.released.clear()
    store.deleteEntriesFrom(6)  # 7.. go
    store.add(*entry(7, term=2))
    assert store.durable_index() == 6
    fsync.released.set()
    wait_for(lambda: store.durable_index() == 7, "durable index 7")
    store.close()
    assert held(tmp_path)[-1] == entry(7, term=2)


def test_power_mode_a_stalled_disk_never_blocks_the_loop_and_reports_its_backlog(tmp_path, monkeypatch):
    """fsync hangs (a stalled disk): ``add`` (on the loop) goes on returning at once; past the
    bound the store says it is backlogged (the node then takes no new entries); when the disk
    comes back everything queued is written, in order."""
    monkeypatch.setattr(log_store, "RAFT_LOG_WRITE_QUEUE_BYTES_MAX", 16 * 1024)
    fsync = BlockedFsync()
    fsync.released.set()
    store = RaftLogStore(str(tmp_path), durability="power", fsync=fsync)
    store.add(b"\x01", 1, 0)
    wait_for(lambda: store.durable_index() == 1, "the first entry on disk")
    fsync.released.clear()
    store.add(*entry(2))
    wait_for(lambda: fsync.calls >= 3, "the writer stuck in its fsync")
    added = threading.Event()
    last = 2 + 4 * log_store.RAFT_LOG_WRITE_QUEUE_BYTES_MAX // len(entry(3, size=1000)[0])

    def add_more() -> None:
        for index in range(3, last + 1):
            store.add(*entry(index, size=1000))
        added.set()

    threading.Thread(target=add_more, daemon=True).start()
    assert added.wait(WAIT_S / 2), "add() waited for a stalled disk: the loop would be blocked"
    assert store.writer_backlogged()
    assert store.writer_backlog_bytes() > log_store.RAFT_LOG_WRITE_QUEUE_BYTES_MAX
    assert store.durable_index() == 1

    fsync.released.set()
    wait_for(lambda: store.durable_index() == last, f"durable index {last}")
    assert not store.writer_backlogged() and store.writer_backlog_bytes() == 0
    store.close()
    assert [e[1] for e in held(tmp_path)] == list(range(1, last + 1))


EIO_SCRIPT = """
import errno, os, sys, time
from raftseq.cluster.raft.log_store import RaftLogStore
calls = []
def failing(fd):
    calls.append(fd)
    if len(calls) > 2:  # opening's syncs pass; the first group commit fails
        raise OSError(errno.EIO, os.strerror(errno.EIO))
store = RaftLogStore(sys.argv[1], durability="power", fsync=failing)
store.add(b"\\x01", 1, 0)
time.sleep(10)
print("still running")
"""


def test_an_fsync_error_in_power_mode_ends_the_process_with_disk_failed(tmp_path):
    done = subprocess.run([sys.executable, "-c", EIO_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == NodeExit.DISK_FAILED, done.stdout + done.stderr
    assert "still running" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"cannot write or sync the Raft log in {tmp_path}" in lines[0] and os.strerror(errno.EIO) in lines[0]


def test_opening_in_power_mode_syncs_what_crash_mode_wrote(tmp_path):
    write_log(tmp_path, 5)  # crash mode: never fsynced
    fsync = BlockedFsync()
    fsync.released.set()
    store = RaftLogStore(str(tmp_path), durability="power", fsync=fsync)
    assert fsync.calls >= 2  # the segment and the directory
    assert store.durable_index() == 5
    store.close()


# --- a compaction cut short between its snapshot and its record --------------------------------


def drop_last_compaction_record(directory: Path) -> None:
    """Remove the last record dropping compacted entries: the snapshot reached the disk, the
    record saying so did not (a crash between the two)."""
    for number in reversed(segment_numbers(str(directory))):
        path = segment(directory, number)
        data = path.read_bytes()
        offsets = record_offsets(path)
        for at in reversed(offsets):
            end, body = log_store._record_at(data, at)
            if body[0] == log_store.DROP_BEFORE:
                path.write_bytes(data[:at] + data[end:])
                return
    raise AssertionError("no compaction record found")


def test_a_compaction_cut_short_keeps_the_entries_after_its_snapshot(tmp_path):
    """pysyncobj clears the whole log when its first entries are not the snapshot's: entries
    after the snapshot, acknowledged by this node, would be lost on the restart."""
    raft.install()
    overrides = {"raft": {"log_compaction_min_entries": 20, "log_compaction_min_time_s": 0.5}}
    configs = local_configs(str(tmp_path), free_base_port(), insecure=True, overrides=overrides)

    async def run_cluster() -> int:
        loop = asyncio.get_running_loop()
        members = [replica_of(config, loop) for config in configs]
        try:
            deadline = time.monotonic() + WAIT_S
            await submit(members, "compaction", range(1, 121))
            first = members[0][0]
            while not (os.path.exists(os.path.join(configs[0].raft_dir, "snapshot.bin")) and first._SyncObj__raftLog[0][1] > 1):
                assert time.monotonic() < deadline + WAIT_S, "no compaction on the first node"
                await asyncio.sleep(0.005)
            return first._SyncObj__raftLog[-1][1]
        finally:
            for replica, journal in members:
                replica.destroy()
                journal.close()

    last = asyncio.run(run_cluster())
    raft_dir = Path(configs[0].raft_dir)
    drop_last_compaction_record(raft_dir)

    async def restart_first() -> list:
        replica, journal = replica_of(configs[0], asyncio.get_running_loop())
        try:
            deadline = time.monotonic() + WAIT_S
            while replica._SyncObj__raftLastApplied <= 1:  # the snapshot is loaded on the first ticks
                assert time.monotonic() < deadline, "the snapshot was not loaded"
                await asyncio.sleep(0.005)
            return list(replica._SyncObj__raftLog[:])
        finally:
            replica.destroy()
            journal.close()

    log_after = asyncio.run(restart_first())
    assert log_after[-1][1] == last, f"entries after the snapshot were dropped: the log ends at {log_after[-1][1]}, not {last}"
