"""Journal retention on a node: the retention floor, and sending old segments out of the journal.

Every ``retention.check_interval_s`` the node asks its peers what they still need, works out
the *retention floor* and lets the policy (``sequencer.journal.retention``) pick the oldest
sealed segments over the configured bounds and wholly below the floor. Each is then archived
(moved into ``archive_dir``, or handed to ``archive_command``) or deleted; the journal records
its new first number before any file goes.

The retention floor is the lowest of:

* **what a peer still fetches from this node** — each peer's ``Status.journal_needs_from``: its
  first hole (a lagging follower that received a Raft snapshot lacks the records before it) or
  first damaged segment, else its last number + 1 (a follower that falls behind later needs
  everything after what it holds). A peer's last answer is kept in ``PEERS_FILE`` so a restart
  does not forget a peer that is down; a peer never heard from holds the floor at 0 (nothing
  leaves) until it answers or is removed from the cluster;
* **this node's own holes and damage** — nothing at or above the first of them leaves (the
  journal's numbering stays whole below what catch-up fills or repairs);
* **the newest state-machine snapshots** — ``SequencerMachine.snapshot_floor_seq``: for the newest
  snapshot of each state-machine type and version and each unfinished upload, its first chunk
  and the first message after what it covers, so a late joiner can always load it and go on;
* **what the machine has applied** — records the Raft log may still replay on a restart are
  recognised below the journal's start (``SequencedStream``), so the floor need not hold them,
  but it never passes the last applied number + 1.

A failing archive (a directory that cannot be written, a command that fails or hangs) keeps the
segment in the journal, is logged once per kind of failure, counted, and retried at the next
check: nothing leaves the journal before it is archived.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence

import msgspec

from raftseq.clients.connection import request_once
from raftseq.clients.errors import SequencerError
from raftseq.clients.tls import ClientTls, TlsError
from raftseq.cluster.catchup import Peer
from raftseq.cluster.config import RetentionConfig
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import INDEX_SUFFIX, SEGMENT_SUFFIX, Journal, JournalCorruptError, JournalError, Segment, list_segment_files
from raftseq.sequencer.journal.retention import RetentionPlan, SegmentSpan, plan_retention, remove_first_retained, write_first_retained

log = logging.getLogger("raftseq.retention")

#: What each peer last said it still needs (``Status.journal_needs_from``), by peer id, in the
#: node's data directory.
PEERS_FILE = "retention_peers.json"
#: How long a peer's status answer may take before it counts as not answering this round.
PEER_STATUS_TIMEOUT_S = 2.0
#: Sealed segments whose newest log time one check reads (one record each, on the node's loop):
#: after a start, 1000 segments read at once held the loop ~120 ms on the shared 2-core box.
LOG_TIME_READS_PER_CHECK = 16

_peers_decoder = msgspec.json.Decoder(dict[str, int])


class RetentionFloor(msgspec.Struct, frozen=True):
    """The lowest number someone may still need from this journal, and who needs it."""

    seq: int
    held_by: str


def retention_floor(
    *, peers_need: dict[str, int], peer_ids: Sequence[str], journal: Journal, snapshot_floor_seq: int, applied_seq: int
) -> RetentionFloor:
    """The retention floor (see the module's text). A peer of `peer_ids` missing from
    `peers_need` was never heard from: the floor is 0."""
    candidates = [(applied_seq + 1, "the applied state")]
    for peer_id in peer_ids:
        need = peers_need.get(peer_id, 0)
        candidates.append((need, f"peer {peer_id}" if need else f"peer {peer_id} (not heard from yet)"))
    if journal.holes:
        candidates.append((journal.holes[0][0], "this node's journal hole"))
    repair = journal.repair_range
    if repair is not None:
        candidates.append((repair[0], "this node's damaged segment"))
    if snapshot_floor_seq:
        candidates.append((snapshot_floor_seq, "the newest state-machine snapshot"))
    seq, held_by = min(candidates)
    return RetentionFloor(seq, held_by)


def check_archive_dir(config: RetentionConfig) -> None:
    """Raise ``NodeCannotRun`` (one line) when ``archive_dir`` cannot be written."""
    directory = config.archive_dir
    if not directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".raftseq-write-check-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as exc:
        raise NodeCannotRun(
            NodeExit.INVALID_CONFIG, f"retention.archive_dir {directory} is not writable: {exc.strerror or exc}; fix it or unset it"
        ) from None


def truncated_reply(subscribe: protocol.Subscribe, first_seq: int) -> protocol.Truncated | protocol.Rejected:
    """The answer to a subscription below the journal's first retained number `first_seq`:
    ``Truncated`` to a client that knows it, else (a 0.2 client) ``Rejected(FROM_SEQ_UNAVAILABLE)``
    naming the first number held, which such a client takes as "try another node"."""
    if subscribe.truncated_known:
        return protocol.Truncated(subscribe.from_seq, first_seq)
    return protocol.Rejected(
        protocol.RejectReason.FROM_SEQ_UNAVAILABLE,
        f"truncated: retention removed the records before seq {first_seq} on this node (from_seq {subscribe.from_seq})",
    )


class ArchiveFailed(Exception):
    """A segment could not be archived; it stays in the journal."""


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segment_files(segment: Segment) -> list[str]:
    """The files of a sealed segment: the segment and its index (if it has one)."""
    index = segment.path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX
    return [segment.path, index] if os.path.exists(index) else [segment.path]


def archive_to_dir(segment: Segment, directory: str) -> None:
    """Copy the segment's files into `directory`, each fsynced under a temporary name and
    renamed into place (the directory fsynced): the archive holds it whole before the journal
    lets it go. Raises ``ArchiveFailed``."""
    try:
        if segment.first_seq > 1 and not list_segment_files(directory):
            # An archive that does not start at 1 says where it starts (``journal verify``).
            write_first_retained(directory, segment.first_seq)
        for path in segment_files(segment):
            target = os.path.join(directory, os.path.basename(path))
            tmp = target + ".part"
            shutil.copyfile(path, tmp)
            _fsync_path(tmp)
            os.replace(tmp, target)
        _fsync_path(directory)
    except (OSError, JournalCorruptError) as exc:
        raise ArchiveFailed(f"cannot archive {segment.path} into {directory}: {getattr(exc, 'strerror', None) or exc}") from None


def archive_by_command(segment: Segment, argv: Sequence[str], timeout_s: float) -> None:
    """Run the archive command with the segment's path appended. Raises ``ArchiveFailed``
    unless it exits 0 within `timeout_s`."""
    try:
        done = subprocess.run([*argv, segment.path], capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ArchiveFailed(f"archive command {argv[0]} ran over {timeout_s:g} s on {segment.path}") from None
    except OSError as exc:
        raise ArchiveFailed(f"archive command {argv[0]} cannot run: {exc.strerror or exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise ArchiveFailed(f"archive command {argv[0]} exited {done.returncode} on {segment.path}: {said[-1] if said else 'no output'}")


def remove_files(segments: Sequence[Segment], directory: str) -> None:
    """Delete the released segments' files, oldest first (a crash midway leaves a run of old
    segments below the journal's start, removed at the next check), then fsync `directory`."""
    for segment in segments:
        for path in segment_files(segment):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    _fsync_path(directory)


class RetentionState(msgspec.Struct):
    """What the metrics read of retention (``cluster.node_reads``)."""

    first_retained_seq: int = 0
    floor_seq: int = 0
    held_by: str = ""
    #: Bytes over the bounds that stay: held by the floor or waiting for the archive.
    held_bytes: int = 0
    #: Bytes over the bounds whose archiving failed at the last check.
    archive_lag_bytes: int = 0
    segments_removed: int = 0
    bytes_removed: int = 0
    archive_failures: int = 0
    #: Last applied log time minus the log time of the oldest segment's newest record, in seconds.
    oldest_age_s: float = 0.0


class JournalRetention:
    """Runs retention for one node's journal (on the node's loop; file work in a thread)."""

    def __init__(
        self,
        config: RetentionConfig,
        journal: Journal,
        peers: Sequence[Peer],
        *,
        data_dir: str,
        node_id: str,
        token: str,
        tls: ClientTls = None,
        snapshot_floor_seq: Callable[[], int],
        applied: Callable[[], tuple[int, int]],
        members: Callable[[], Sequence[Peer]] | None = None,
    ) -> None:
        """`peers`: the config's; `members`, when given, the current other members (they
        change with ``raftseq member``: a removed peer stops holding the floor, a new one
        holds it until it answers)."""
        self.config = config
        self.policy = config.policy()
        self.journal = journal
        self._config_peers = list(peers)
        self._members = members
        self.data_dir = data_dir
        self.session = f"retention.{node_id}"
        self.token = token
        self.tls = tls
        self._snapshot_floor_seq = snapshot_floor_seq
        #: (last applied number, its log time in ns).
        self._applied = applied
        self.peers_need = self._load_peers()
        self.state = RetentionState(first_retained_seq=journal.first_retained_seq)
        self._log_times: dict[int, int] = {}  # segment first_seq -> its newest record's log time
        self._last_failure = ""
        self._last_hold = ""

    # --- peers --------------------------------------------------------------------------

    @property
    def peers(self) -> list[Peer]:
        return list(self._members()) if self._members is not None else self._config_peers

    def _peers_path(self) -> str:
        return os.path.join(self.data_dir, PEERS_FILE)

    def _load_peers(self) -> dict[str, int]:
        try:
            with open(self._peers_path(), "rb") as f:
                return _peers_decoder.decode(f.read())
        except FileNotFoundError:
            return {}
        except msgspec.MsgspecError as exc:
            log.error("%s is unreadable (%s): every peer counts as not heard from", self._peers_path(), exc)
            return {}

    def _save_peers(self) -> None:
        path = self._peers_path()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(self.peers_need))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    async def ask_peers(self) -> None:
        """Ask each peer what it still needs; keep the answers (and the old ones of peers that
        did not answer)."""
        changed = False
        for peer in self.peers:
            need = await self._peer_needs(peer)
            if need and self.peers_need.get(peer.id) != need:
                self.peers_need[peer.id] = need
                changed = True
        if changed:
            await asyncio.to_thread(self._save_peers)

    async def _peer_needs(self, peer: Peer) -> int:
        """What `peer` says it still needs; 0 when it gives no answer: unreachable, or a
        refusal (a node draining or shutting down, a token it no longer takes, a full session
        table). Its last answer then keeps holding the floor."""
        try:
            status = await request_once(
                peer.client_address,
                protocol.StatusRequest(),
                protocol.Status,
                session=self.session,
                token=self.token,
                timeout_s=PEER_STATUS_TIMEOUT_S,
                tls=self.tls,
            )
        except (OSError, ConnectionError, TimeoutError, ValueError, TlsError, SequencerError) as exc:
            log.debug("peer %s gave no status: %s", peer.id, exc)
            return 0
        return status.journal_needs_from

    # --- one check ------------------------------------------------------------------------

    def spans(self, young_log_time_ns: int) -> list[SegmentSpan]:
        """The journal's segments as the policy reads them. A sealed segment's newest log time
        is read once (its last record), oldest segments first, at most
        ``LOG_TIME_READS_PER_CHECK`` per check; until then, and for the tail, it counts as
        `young_log_time_ns` (too young to leave by age)."""
        spans = []
        journal = self.journal
        reads_left = LOG_TIME_READS_PER_CHECK
        for segment in journal.segments():
            if not segment.count:
                continue
            log_time = self._log_times.get(segment.first_seq)
            if log_time is None:
                log_time = young_log_time_ns
                if segment.sealed and reads_left and journal.damage.covering(segment.end_seq - 1) is None:
                    reads_left -= 1
                    last = segment.end_seq - 1
                    try:
                        log_time = next(journal.records(last, last)).log_time_ns
                    except JournalCorruptError as exc:  # the scrub would find it too: repaired from a peer
                        journal.mark_damaged(exc.seq, exc.path, exc.offset, str(exc))
                        raise
                    self._log_times[segment.first_seq] = log_time
            spans.append(SegmentSpan(segment.first_seq, segment.end_seq, segment.size, log_time, segment.sealed))
        return spans

    def plan(self) -> RetentionPlan:
        applied_seq, applied_log_time_ns = self._applied()
        floor = retention_floor(
            peers_need=self.peers_need,
            peer_ids=[p.id for p in self.peers],
            journal=self.journal,
            snapshot_floor_seq=self._snapshot_floor_seq(),
            applied_seq=applied_seq,
        )
        spans = self.spans(applied_log_time_ns)
        plan = plan_retention(self.policy, spans, floor_seq=floor.seq, newest_log_time_ns=applied_log_time_ns)
        state = self.state
        state.floor_seq, state.held_by, state.held_bytes = floor.seq, floor.held_by, plan.held_bytes
        state.oldest_age_s = (applied_log_time_ns - spans[0].last_log_time_ns) / 1e9 if spans else 0.0
        if plan.held_segments and floor.held_by != self._last_hold:
            log.warning(
                "retention holds %d segments (%d bytes) over its bounds: the retention floor is seq %d, needed by %s",
                plan.held_segments,
                plan.held_bytes,
                floor.seq,
                floor.held_by,
            )
        self._last_hold = floor.held_by if plan.held_segments else ""
        return plan

    async def check(self) -> int:
        """One round: ask peers, plan, archive and release. Returns the segments removed."""
        if not self.policy.active:
            self.state.first_retained_seq = self.journal.first_retained_seq
            return 0
        await self.ask_peers()
        plan = self.plan()
        archived: list[SegmentSpan] = []
        lag = 0
        for i, span in enumerate(plan.remove):
            segment = self.journal.segment_for(span.first_seq)
            assert segment is not None and segment.sealed, f"retention picked {span}, not a sealed segment"
            try:
                if self.config.archive_dir or self.config.archive_command:
                    await asyncio.to_thread(self._archive, segment)
            except ArchiveFailed as exc:
                lag = sum(s.size_bytes for s in plan.remove[i:])
                self.state.archive_failures += 1
                if str(exc) != self._last_failure:
                    log.error("%s; the segment stays in the journal, retried in %g s", exc, self.config.check_interval_s)
                self._last_failure = str(exc)
                break
            archived.append(span)
        else:
            self._last_failure = ""
        self.state.archive_lag_bytes = lag
        self.state.held_bytes += lag
        if not archived:
            self.state.first_retained_seq = self.journal.first_retained_seq
            return 0
        first_kept = archived[-1].end_seq
        journal = self.journal
        if not self._crosses_need(first_kept):
            # The record first (its fsyncs off the loop), then the journal lets the segments go.
            await asyncio.to_thread(write_first_retained, journal.directory, first_kept)
        if self._crosses_need(first_kept):
            # A hole or damage appeared below it meanwhile: the record goes back to what the
            # journal holds, and the next check plans again.
            if journal.first_retained_seq:
                await asyncio.to_thread(write_first_retained, journal.directory, journal.first_retained_seq)
            else:
                await asyncio.to_thread(remove_first_retained, journal.directory)
            return 0
        released = journal.release_below(first_kept, recorded=True)
        await asyncio.to_thread(remove_files, released, self.journal.directory)
        for segment in released:
            self._log_times.pop(segment.first_seq, None)
        state = self.state
        state.first_retained_seq = first_kept
        state.segments_removed += len(released)
        state.bytes_removed += sum(s.size for s in released)
        log.info(
            "retention: journal now starts at seq %d (%d segments, %d bytes %s)",
            first_kept,
            len(released),
            sum(s.size for s in released),
            self._where(),
        )
        return len(released)

    def _crosses_need(self, seq: int) -> bool:
        journal = self.journal
        repair = journal.repair_range
        return bool(journal.holes and journal.holes[0][0] < seq) or (repair is not None and repair[0] < seq)

    def _where(self) -> str:
        if self.config.archive_dir:
            return f"archived in {self.config.archive_dir}"
        if self.config.archive_command:
            return f"archived by {self.config.archive_command[0]}"
        return "deleted"

    def _archive(self, segment: Segment) -> None:
        config = self.config
        if config.archive_dir:
            archive_to_dir(segment, config.archive_dir)
        elif config.archive_command:
            archive_by_command(segment, config.archive_command, config.archive_command_timeout_s)

    async def run(self) -> None:
        """Check every ``check_interval_s`` until cancelled. A check that fails (a segment that
        cannot be read, a file that cannot be removed) is logged and tried again at the next."""
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            try:
                await self.check()
            except (JournalError, OSError) as exc:
                log.error("retention check failed: %s; nothing more removed this round", exc)
