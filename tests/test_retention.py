"""Journal retention: the pure policy (``sequencer.journal.retention``), the journal's release of
old segments and its start after a restart, the node-side floor and archive
(``cluster.retention``), the ``Truncated`` reply for old and new clients, the runner's fallback
to snapshots, and ``raftseq journal verify`` over an archive directory."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import msgspec
import pytest

from raftseq.clients.errors import Truncated as TruncatedError
from raftseq.cluster import retention as node_retention
from raftseq.cluster.cli import main as cli_main
from raftseq.clients.connection import open_connection
from raftseq.cluster.config import NodeConfig, RetentionConfig
from raftseq.cluster.membership import Member
from raftseq.cluster.gateway import Gateway
from raftseq.cluster.metrics import NodeMetrics
from raftseq.cluster.publication import Publication
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import Journal
from raftseq.sequencer.journal.retention import (
    FIRST_RETAINED_FILE,
    RetentionPolicy,
    SegmentSpan,
    plan_retention,
    read_first_retained,
)
from raftseq.sequencer.machine import SequencerMachine
from raftseq.sequencer.stream import SequencedStream

S = 1_000_000_000  # one second of log time, in ns
SEGMENT_BYTES = limits.SEGMENT_BYTES_MIN


def frame(seq: int) -> bytes:
    """Record `seq`: log time `seq` seconds."""
    return protocol.encode_delivered(seq, seq * S, "s", seq, b"p%d" % seq)


def span(first: int, end: int, size: int = 100, log_time_s: int = 0, sealed: bool = True) -> SegmentSpan:
    return SegmentSpan(first, end, size, (log_time_s or end - 1) * S, sealed)


# --- the policy (pure) --------------------------------------------------------------------

SPANS = [span(1, 101), span(101, 201), span(201, 301), span(301, 351, sealed=False)]


def test_no_bound_removes_nothing():
    plan = plan_retention(RetentionPolicy(), SPANS, floor_seq=10_000, newest_log_time_ns=10_000 * S)
    assert plan.remove == () and plan.first_retained_seq == 1 and plan.held_segments == 0


def test_bytes_bound_removes_oldest_first_until_within():
    plan = plan_retention(RetentionPolicy(bytes_max=250), SPANS, floor_seq=10_000, newest_log_time_ns=350 * S)
    assert [s.first_seq for s in plan.remove] == [1, 101]
    assert plan.first_retained_seq == 201


def test_records_bound():
    plan = plan_retention(RetentionPolicy(records_max=200), SPANS, floor_seq=10_000, newest_log_time_ns=350 * S)
    # 350 records held; without 1..100 250, without 101..200 150 <= 200.
    assert [s.first_seq for s in plan.remove] == [1, 101]


def test_age_bound_reads_log_time_only():
    # Segment newest records at 100 s, 200 s, 300 s; the journal's newest at 350 s.
    plan = plan_retention(RetentionPolicy(age_s_max=100), SPANS, floor_seq=10_000, newest_log_time_ns=350 * S)
    assert [s.first_seq for s in plan.remove] == [1, 101]  # 250 s and 150 s old; 50 s stays
    plan = plan_retention(RetentionPolicy(age_s_max=100), SPANS, floor_seq=10_000, newest_log_time_ns=250 * S)
    assert [s.first_seq for s in plan.remove] == [1]


def test_the_floor_holds_and_says_how_much():
    plan = plan_retention(RetentionPolicy(bytes_max=100), SPANS, floor_seq=150, newest_log_time_ns=350 * S)
    assert [s.first_seq for s in plan.remove] == [1]  # 101..200 reaches the floor
    assert plan.first_retained_seq == 101
    assert plan.held_segments == 2 and plan.held_bytes == 200
    nothing = plan_retention(RetentionPolicy(bytes_max=100), SPANS, floor_seq=0, newest_log_time_ns=350 * S)
    assert nothing.remove == () and nothing.held_segments == 3


def test_a_segment_ending_at_the_floor_may_go_but_not_one_holding_it():
    assert [s.first_seq for s in plan_retention(RetentionPolicy(records_max=1), SPANS, floor_seq=101, newest_log_time_ns=0).remove] == [1]
    assert plan_retention(RetentionPolicy(records_max=1), SPANS, floor_seq=100, newest_log_time_ns=0).remove == ()


def test_the_tail_never_leaves():
    spans = [span(1, 101), span(101, 201)]  # the last one is the tail, even if sealed
    plan = plan_retention(RetentionPolicy(records_max=1), spans, floor_seq=10_000, newest_log_time_ns=0)
    assert [s.first_seq for s in plan.remove] == [1]


# --- the journal: release, restart, replay below its start ---------------------------------


def fill(journal: Journal, first: int, last: int) -> None:
    for seq in range(first, last + 1):
        journal.append(frame(seq), seq, seq)


def test_release_records_the_start_and_a_restart_starts_there(tmp_path):
    directory = str(tmp_path / "j")
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 400)
        sealed = journal.sealed_segments()
        assert len(sealed) >= 3
        keep_from = sealed[2].first_seq
        gone = journal.release_below(keep_from)
        assert [s.first_seq for s in gone] == [sealed[0].first_seq, sealed[1].first_seq]
        node_retention.remove_files(gone, directory)
        assert journal.first_seq == keep_from and journal.first_retained_seq == keep_from
    assert read_first_retained(directory) == keep_from
    # A node's journal starts at 1: without the record it would see a hole 1..keep_from-1.
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        assert journal.holes == [] and journal.recovery.missing_first == 0
        assert journal.first_seq == keep_from and journal.last_seq == 400
        assert [r.seq for r in journal.records(keep_from, keep_from + 2)] == [keep_from, keep_from + 1, keep_from + 2]
        fill(journal, 401, 405)


def test_release_up_to_a_hole_leaves_a_journal_that_starts_with_the_hole(tmp_path):
    """A node back from a Raft snapshot holds 1..K, a hole K+1..J and J+1..: its retention
    floor is the hole's start, so the segments up to K may go; the journal then starts with
    the hole, now and after a restart, and the hole is still filled from a peer."""
    directory = str(tmp_path / "j")
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 300)
        hole_first = journal.last_seq + 1
        journal.skip_to(hole_first + 500)
        fill(journal, hole_first + 500, hole_first + 520)
        assert journal.holes == [(hole_first, hole_first + 499)]
        gone = journal.release_below(hole_first)
        assert gone and gone[-1].end_seq == hole_first
        node_retention.remove_files(gone, directory)
        assert journal.first_seq == hole_first and journal.first_retained_seq == hole_first
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        assert journal.holes == [(hole_first, hole_first + 499)]
        assert journal.first_seq == hole_first and journal.last_seq == hole_first + 520
        for first in range(hole_first, hole_first + 500, 100):
            journal.fill(b"".join(frame(seq) for seq in range(first, first + 100)), first, first + 99)
        assert journal.holes == []
        assert [r.seq for r in journal.records(hole_first, hole_first + 2)] == [hole_first, hole_first + 1, hole_first + 2]


def test_a_crash_between_the_record_and_the_unlink_leaves_readable_old_segments(tmp_path):
    directory = str(tmp_path / "j")
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 300)
        keep_from = journal.sealed_segments()[1].first_seq
        journal.release_below(keep_from)  # files not removed: the process died here
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        assert journal.holes == [] and journal.first_seq == 1 and journal.first_retained_seq == keep_from


def test_replaying_raft_entries_below_the_journal_start_is_not_a_divergence(tmp_path):
    """A Raft snapshot older than what retention left (the leader's, after a discarded Raft
    log) replays entries whose records the journal no longer holds: they count as held."""
    directory = str(tmp_path / "j")
    machine = SequencerMachine()
    batches = [protocol.encode_batch(i * S, [protocol.Entry("s", i, b"x" * 200)]) for i in range(1, 201)]
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        stream = SequencedStream(machine, journal)
        for batch in batches:
            stream.apply(batch)
        keep_from = journal.sealed_segments()[1].first_seq
        node_retention.remove_files(journal.release_below(keep_from), directory)
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        replay = SequencedStream(SequencerMachine(), journal)
        for batch in batches:
            replay.apply(batch)
        assert replay.records_appended == 0 and replay.records_already_held == 200
        assert replay.machine.stream_crc == machine.stream_crc


# --- the node's side: floor, archive, failures ------------------------------------------------


class Machine:
    last_seq = 0
    last_log_time_ns = 0


def keeper(tmp_path, journal: Journal, config: RetentionConfig, *, snapshot_floor: int = 0) -> node_retention.JournalRetention:
    return node_retention.JournalRetention(
        config,
        journal,
        [],
        data_dir=str(tmp_path),
        node_id="n1",
        token="",
        snapshot_floor_seq=lambda: snapshot_floor,
        applied=lambda: (journal.last_seq, journal.last_seq * S),
    )


def test_the_floor_is_the_lowest_need_and_names_it(tmp_path):
    with Journal.open(str(tmp_path / "j"), segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 50)

        def floor(**kwargs) -> tuple[int, str]:
            found = node_retention.retention_floor(**kwargs)
            return found.seq, found.held_by

        assert floor(peers_need={}, peer_ids=[], journal=journal, snapshot_floor_seq=0, applied_seq=50) == (51, "the applied state")
        assert floor(peers_need={"n2": 30}, peer_ids=["n2"], journal=journal, snapshot_floor_seq=40, applied_seq=50) == (30, "peer n2")
        assert floor(peers_need={"n2": 30}, peer_ids=["n2"], journal=journal, snapshot_floor_seq=20, applied_seq=50)[1] == (
            "the newest state-machine snapshot"
        )
        unknown = floor(peers_need={"n2": 30}, peer_ids=["n2", "n3"], journal=journal, snapshot_floor_seq=0, applied_seq=50)
        assert unknown[0] == 0 and "n3" in unknown[1]
        journal.skip_to(60)  # a hole 51..59
        assert floor(peers_need={}, peer_ids=[], journal=journal, snapshot_floor_seq=0, applied_seq=80)[1] == "this node's journal hole"


def run(coro):
    return asyncio.run(coro)


def test_delete_within_bytes_and_the_snapshot_floor_holds(tmp_path):
    directory = str(tmp_path / "j")
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 600)
        before = journal.size_bytes
        config = RetentionConfig(journal_bytes_max=2 * SEGMENT_BYTES)
        held = keeper(tmp_path, journal, config, snapshot_floor=2)
        assert run(held.check()) == 0 and journal.first_seq == 1
        assert held.state.held_bytes > 0 and held.state.held_by == "the newest state-machine snapshot"
        free = keeper(tmp_path, journal, config)
        assert run(free.check()) > 0
        assert journal.size_bytes <= 2 * SEGMENT_BYTES < before
        assert free.state.first_retained_seq == journal.first_seq > 1
        assert free.state.held_bytes == 0 and free.state.bytes_removed == before - journal.size_bytes
        names = sorted(os.listdir(directory))
        assert names[0] == FIRST_RETAINED_FILE or int(names[0][:20]) == journal.first_seq


def test_archive_dir_round_trip_verifies(tmp_path, capsys):
    directory = str(tmp_path / "j")
    archive = str(tmp_path / "archive")
    os.makedirs(archive)
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 600)
        run(keeper(tmp_path, journal, RetentionConfig(records_max=100, archive_dir=archive)).check())
        first = journal.first_seq
    assert first > 1
    assert cli_main(["journal", "verify", archive]) == 0
    out = capsys.readouterr().out
    assert f"ok: {first - 1} records (1..{first - 1})" in out
    assert cli_main(["journal", "verify", directory]) == 0
    assert f"({first}..600)" in capsys.readouterr().out
    # The archive and the journal together are the whole stream, byte for byte.
    with Journal.open(archive, readonly=True) as old, Journal.open(directory, readonly=True) as new:
        records = [r.seq for r in old.records()] + [r.seq for r in new.records()]
    assert records == list(range(1, 601))


def test_an_unwritable_archive_dir_is_one_line_at_start():
    with pytest.raises(NodeCannotRun) as caught:
        node_retention.check_archive_dir(RetentionConfig(archive_dir="/proc/1/raftseq-archive"))  # not even root writes there
    assert caught.value.code is NodeExit.INVALID_CONFIG and "\n" not in str(caught.value)


def test_an_archive_dir_that_is_a_file_is_one_line_at_start(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NodeCannotRun) as caught:
        node_retention.check_archive_dir(RetentionConfig(archive_dir=str(target)))
    assert caught.value.code is NodeExit.INVALID_CONFIG and "\n" not in str(caught.value)
    assert f"retention.archive_dir {target} is not writable" in str(caught.value)


def test_an_archive_dir_that_fails_later_keeps_everything(tmp_path, caplog):
    directory = str(tmp_path / "j")
    archive = tmp_path / "archive"
    archive.mkdir()
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 600)
        files = sorted(os.listdir(directory))
        held = keeper(tmp_path, journal, RetentionConfig(records_max=100, archive_dir=str(archive)))
        archive.rmdir()
        archive.write_text("now a file")  # the archive is gone: copying into it fails
        assert run(held.check()) == 0 and run(held.check()) == 0
        assert sorted(os.listdir(directory)) == files and journal.first_seq == 1
        assert held.state.archive_failures == 2 and held.state.archive_lag_bytes > 0
    failures = [r for r in caplog.records if "cannot archive" in r.getMessage()]
    assert len(failures) == 1, "a failure repeated is logged once"


def test_a_failing_archive_command_keeps_the_segment_and_a_working_one_archives(tmp_path, caplog):
    directory = str(tmp_path / "j")
    log_file = tmp_path / "archived.txt"
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 600)
        failing = keeper(
            tmp_path,
            journal,
            RetentionConfig(records_max=100, archive_command=[sys.executable, "-c", "import sys; sys.exit('bucket unreachable')"]),
        )
        assert run(failing.check()) == 0 and journal.first_seq == 1
        assert any("exited 1" in r.getMessage() and "bucket unreachable" in r.getMessage() for r in caplog.records)
        script = f"import sys; open({str(log_file)!r}, 'a').write(sys.argv[1] + chr(10))"
        working = keeper(tmp_path, journal, RetentionConfig(records_max=100, archive_command=[sys.executable, "-c", script]))
        removed = run(working.check())
        assert removed > 0 and journal.first_seq > 1
    handed = log_file.read_text().split()
    assert len(handed) == removed and all(p.endswith(".seg") for p in handed)


def test_a_hanging_archive_command_is_cut_off(tmp_path):
    with Journal.open(str(tmp_path / "j"), segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 600)
        config = RetentionConfig(
            records_max=100, archive_command=[sys.executable, "-c", "import time; time.sleep(30)"], archive_command_timeout_s=0.5
        )
        held = keeper(tmp_path, journal, config)
        assert run(held.check()) == 0 and journal.first_seq == 1 and held.state.archive_failures == 1


# --- config -------------------------------------------------------------------------------------


def test_retention_below_the_snapshot_floor_is_refused():
    problems = RetentionConfig(records_max=10).problems(segment_bytes_max=64 * limits.MIB, compaction_entries_min=5000)
    assert problems and "below the snapshot floor" in problems[0]
    problems = RetentionConfig(journal_bytes_max=limits.MIB).problems(segment_bytes_max=64 * limits.MIB, compaction_entries_min=5000)
    assert problems and "2 x journal.segment_bytes_max" in problems[0]
    assert RetentionConfig(archive_dir="rel/dir").problems(segment_bytes_max=SEGMENT_BYTES, compaction_entries_min=1)


def test_a_node_config_below_the_floor_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "n1.toml"
    config.write_text(
        'id = "n1"\ndata_dir = "%s"\nraft_address = "127.0.0.1:1"\nclient_address = "127.0.0.1:2"\npeers = []\n'
        "[retention]\nrecords_max = 10\n" % (tmp_path / "d")
    )
    code = cli_main(["node", "--config", str(config), "--insecure"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == NodeExit.INVALID_CONFIG and len(err) == 1 and "below the snapshot floor" in err[0]


# --- the reply to a subscription below the start ---------------------------------------------


def test_truncated_reply_for_new_and_old_clients():
    new = node_retention.truncated_reply(protocol.Subscribe(5, True), 100)
    assert new == protocol.Truncated(5, 100)
    old = node_retention.truncated_reply(protocol.Subscribe(5), 100)
    assert isinstance(old, protocol.Rejected) and old.reason is protocol.RejectReason.FROM_SEQ_UNAVAILABLE
    assert "before seq 100" in old.detail

    # What a 0.2 node (Subscribe without the new field) makes of a 0.3 client's: from_seq.
    class OldSubscribe(protocol.Frame, tag="subscribe"):
        from_seq: int

    body = protocol.encode_frame(protocol.Subscribe(5, True))[protocol.HEADER_BYTES :]
    assert msgspec.msgpack.decode(body, type=OldSubscribe) == OldSubscribe(5)


def test_the_client_error_carries_the_first_number():
    error = TruncatedError(5, 100)
    assert error.first_seq == 100 and error.from_seq == 5 and "100" in str(error)


def test_a_journal_starting_with_a_hole_moves_its_start_to_where_peers_hold(tmp_path):
    """A node that (re)joins empty behind every peer's retention (``cluster.catchup``)."""
    directory = str(tmp_path / "j")
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        journal.skip_to(501)  # a Raft snapshot at 500 on an empty journal: hole 1..500
        fill(journal, 501, 510)
        journal.start_at(300)
        assert journal.holes == [(300, 500)] and journal.first_seq == 300 and journal.first_retained_seq == 300
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        assert journal.holes == [(300, 500)] and journal.first_seq == 300
        journal.start_at(501)  # past the whole hole: nothing left to fetch
        assert journal.holes == [] and journal.first_seq == 501
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        assert journal.holes == [] and journal.first_seq == 501 and journal.recovery.missing_first == 0


# --- a subscriber that falls behind retention (the gateway in-process) ------------------------


class OneNode:
    """The reads a gateway makes of its node (``cluster.node_reads.ClientFacingNode``): a
    follower whose journal is `journal`."""

    role = protocol.Role.FOLLOWER
    disk_low = False

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    @property
    def published_seq(self) -> int:
        return self.journal.last_seq

    def is_leader(self) -> bool:
        return False

    def leader_client_address(self) -> str:
        return ""

    def last_client_seq(self, session: str) -> int:
        return 0

    def session_owner(self, session: str) -> int:
        return 0


def test_a_subscriber_overtaken_by_retention_gets_truncated_where_it_stands(tmp_path):
    """The subscriber has read 1..100 and waits at 101; then retention removes 101 and more
    before it is woken. It is answered ``Truncated(101, first)`` (before: its cursor found
    nothing to read, and the subscriber got nothing more and was never told why)."""
    directory = str(tmp_path / "j")
    config = NodeConfig(id="n1", data_dir=str(tmp_path), raft_address="127.0.0.1:1", client_address="127.0.0.1:0", peers=[], insecure=True)

    async def scenario(journal: Journal) -> tuple[list[int], TruncatedError, int]:
        publication = Publication(journal, recheck_interval_s=0.05)
        gateway = Gateway(config, OneNode(journal), batcher=None, journal=journal, publication=publication, metrics=NodeMetrics())
        await gateway.start()
        host, port = gateway._server.sockets[0].getsockname()[:2]
        link = await open_connection(f"{host}:{port}", session="reader", token="", timeout_s=5)
        seen: list[int] = []
        first = 0
        try:
            with pytest.raises(TruncatedError) as caught:
                async for frames in link.subscribe(1, silence_s=5, truncated_known=True):
                    seen.extend(f.seq for f in frames)
                    if seen[-1] == 100:
                        fill(journal, 101, 600)
                        keep = next(s for s in journal.sealed_segments() if s.first_seq > 101)
                        first = keep.first_seq
                        node_retention.remove_files(journal.release_below(first), directory)
                        publication.wake()
        finally:
            link.close()
            await gateway.stop()
        return seen, caught.value, first

    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 100)
        seen, truncated, first = asyncio.run(asyncio.wait_for(scenario(journal), 20))
    assert seen == list(range(1, 101))
    assert (truncated.from_seq, truncated.first_seq) == (101, first)


def test_a_segment_that_cannot_be_read_is_marked_damaged_and_not_removed(tmp_path, caplog):
    directory = str(tmp_path / "j")
    with Journal.open(directory, segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 600)
        oldest = journal.sealed_segments()[0]
        with open(oldest.path, "r+b") as f:  # the last record's last byte: its checksum fails
            f.seek(oldest.size - 1)
            byte = f.read(1)
            f.seek(oldest.size - 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        keeper_ = keeper(tmp_path, journal, RetentionConfig(records_max=100, check_interval_s=0.01))

        async def two_rounds() -> None:
            task = asyncio.create_task(keeper_.run())
            while not any("retention check failed" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # more rounds: the damaged segment holds the floor
            task.cancel()

        asyncio.run(asyncio.wait_for(two_rounds(), 10))
        assert journal.damage.covering(oldest.end_seq - 1) is not None
        assert journal.first_seq == 1 and os.path.exists(oldest.path)
        assert keeper_.state.held_by == "this node's damaged segment"


def test_a_node_with_an_unwritable_archive_dir_exits_5_with_one_line_and_writes_nothing(tmp_path):
    data_dir = tmp_path / "d"
    config = tmp_path / "n1.toml"
    config.write_text(
        'id = "n1"\ndata_dir = "%s"\nraft_address = "127.0.0.1:1"\nclient_address = "127.0.0.1:2"\npeers = []\n'
        '[retention]\njournal_bytes_max = 1073741824\narchive_dir = "/proc/1/raftseq-archive"\n' % data_dir
    )
    done = subprocess.run(
        [sys.executable, "-m", "raftseq.cluster.cli", "node", "--config", str(config), "--insecure"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if "CRITICAL" in line]
    assert done.returncode == NodeExit.INVALID_CONFIG, done.stderr
    assert len(lines) == 1 and "retention.archive_dir /proc/1/raftseq-archive is not writable" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    journal = data_dir / "journal"  # made empty by the data directory's lock, before the check
    assert not journal.exists() or not list(journal.iterdir()), "the journal was written before the check"


def test_the_floor_follows_the_current_membership(tmp_path):
    """A removed peer stops holding the floor and a member added since the config was written
    holds it until it answers (the ops soak: after n2 was replaced by n4, n4 kept waiting for
    n2 and removed nothing, and n1 and n3 never asked n4)."""
    config_peers = [Member("n2", "127.0.0.1:1", "127.0.0.1:2")]
    current: list[Member] = [Member("n4", "127.0.0.1:3", "127.0.0.1:4")]
    with Journal.open(str(tmp_path / "j"), segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
        fill(journal, 1, 600)
        held = node_retention.JournalRetention(
            RetentionConfig(journal_bytes_max=2 * SEGMENT_BYTES),
            journal,
            config_peers,
            data_dir=str(tmp_path),
            node_id="n1",
            token="",
            snapshot_floor_seq=lambda: 0,
            applied=lambda: (journal.last_seq, journal.last_seq * S),
            members=lambda: current,
        )
        held.peers_need = {"n2": 5}
        assert not held.plan().remove and held.state.held_by == "peer n4 (not heard from yet)"
        held.peers_need["n4"] = 601
        assert held.plan().remove and "n2" not in held.state.held_by
        current.clear()  # n4 removed too: nobody holds the floor
        held.peers_need = {}
        assert held.plan().remove


@pytest.mark.parametrize(
    "answer",
    [
        protocol.Rejected(protocol.RejectReason.SHUTTING_DOWN, "node draining"),
        protocol.Rejected(protocol.RejectReason.AUTH_FAILED, "wrong token"),
        protocol.Rejected(protocol.RejectReason.TOO_MANY_SESSIONS, "full"),
    ],
    ids=lambda a: a.reason.value,
)
def test_a_peer_that_refuses_the_status_hello_keeps_its_last_need_and_retention_goes_on(tmp_path, answer):
    """The ops soak: a peer draining for a leader transfer refused the retention check's hello;
    the refusal (a ``Rejected``, not a ``ConnectionError``) escaped the check and ended the
    retention task for good, on every node: for 7 minutes until a restart the journals grew
    from 12 to 200 MiB over a 12 MiB bound, with no log line. A refusal is no answer: the
    peer's last need stays, and the check goes on."""

    async def scenario() -> tuple[int, dict[str, int]]:
        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(limits.FRAME_BYTES_MAX)  # the hello
            writer.write(protocol.encode_frame(answer))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with Journal.open(str(tmp_path / "j"), segment_bytes_max=SEGMENT_BYTES, start_seq=1) as journal:
                fill(journal, 1, 600)
                held = node_retention.JournalRetention(
                    RetentionConfig(journal_bytes_max=2 * SEGMENT_BYTES),
                    journal,
                    [Member("n2", "127.0.0.1:1", f"127.0.0.1:{port}")],
                    data_dir=str(tmp_path),
                    node_id="n1",
                    token="t",
                    snapshot_floor_seq=lambda: 0,
                    applied=lambda: (journal.last_seq, journal.last_seq * S),
                )
                held.peers_need = {"n2": 300}
                removed = await asyncio.wait_for(held.check(), 10)
                return removed, dict(held.peers_need)
        finally:
            server.close()
            await server.wait_closed()

    removed, needs = asyncio.run(scenario())
    assert needs == {"n2": 300}
    assert removed > 0  # below the peer's last need, segments still leave
