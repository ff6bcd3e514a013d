"""The pysyncobj adapter: one replicated entry point taking ``bytes``.

pysyncobj sees a single replicated method, ``apply_entry(batch: bytes)``; the batch format's
version travels inside the bytes (``sequencer.protocol.Batch``). Snapshots of the machine state
go through our own msgspec serializer; pysyncobj's own log entries and messages are pickled by
pysyncobj with protocol 5 (bytes stored raw). ``apply_entry`` never raises: a broken invariant
is logged and the process exits, so that the node restarts and recovers.

The Raft log is ours (``raft.log_store.RaftLogStore``, durability from the node config); the
snapshot file is written on a thread of its own (``raft.snapshot_files``: log compaction takes
the machine state as bytes on the loop, the write and its fsyncs happen off it). In power mode a
snapshot received from the leader is fsynced, with the directory, before pysyncobj clears the
log for it; one written here is fsynced before it is renamed into place, and the store syncs the
directory before the record that drops the entries it covers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import msgspec
from pysyncobj import SyncObjConf, replicated
from pysyncobj.node import TCPNode

from raftseq.cluster import invariant
from raftseq.cluster import membership as members
from raftseq.cluster.config import NodeConfig
from raftseq.cluster.membership import ChangeKind, Member, Membership, MembershipError
from raftseq.cluster.raft.link_cipher import link_password
from raftseq.cluster.raft.log_store import RaftLogStore, disk_error, disk_failed, sync_directory
from raftseq.cluster.raft.member import MEMBERSHIP_ADD, MEMBERSHIP_PROMOTE, MEMBERSHIP_REMOVE, RaftMember
from raftseq.cluster.raft.private_names import SYNCOBJ_LOGGER
from raftseq.cluster.raft.snapshot_files import SnapshotWriter
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.machine import ApplyResult, SequencerMachine, SnapshotError

log = logging.getLogger("raftseq.replica")


class RaftSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """Our snapshot file: the machine state plus what pysyncobj needs of its log around it."""

    format_version: int
    machine: bytes
    last_applied: tuple[bytes, int, int]  # pysyncobj log entry (command, index, term)
    previous: tuple[bytes, int, int]
    cluster: list[str]
    #: The membership (``cluster.membership``, JSON, without history) when the snapshot was
    #: taken; "" from a node before membership changes (a trailing field: older nodes skip it).
    membership: bytes = b""


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(RaftSnapshot)


class _NoBindTraceback(logging.Filter):
    """pysyncobj logs a traceback when it cannot bind the Raft address; the node says why in
    one line instead (``NodeExit.ADDRESS_UNAVAILABLE``), so that traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "failed to perform initialization"


class SequencerReplica(RaftMember):
    """A Raft member whose replicated state is a ``SequencedStream``, driven by ``loop``
    (``raft.loop_poller``): construct it, use it and destroy it on the loop's thread, after
    ``raft.install()``.

    ``on_applied(result)`` is called after every applied batch, with the journal already
    holding its records.
    """

    def __init__(
        self,
        config: NodeConfig,
        core: SequencedStream,
        *,
        loop: asyncio.AbstractEventLoop,
        on_applied: Callable[[ApplyResult], None],
        on_restored: Callable[[], None] | None = None,
        on_removed: Callable[[str], None] | None = None,
        votes_blocked_s: float = 0.0,
    ) -> None:
        self.node_config = config
        self.core = core
        self._on_applied = on_applied
        self._on_restored = on_restored
        self._on_removed = on_removed
        #: The term in which this node, as leader, proposed a learner's promotion whose callback
        #: has not come (0: none). A leader that lost leadership before that entry committed,
        #: and caught up past it by a snapshot, never gets the callback: in a later term the
        #: mark is stale, and would otherwise refuse every membership change until a restart.
        self._promotion_asked_term = 0
        #: Membership changes asked of this node as leader, by (kind as operators name it,
        #: outcome): plain integers, every key present (read by the metrics' scrape thread).
        self.membership_changes = {(kind, outcome): 0 for kind in members.CHANGE_KIND_NAMES.values() for outcome in members.CHANGE_OUTCOMES}
        #: The membership this node holds (saved in its data directory on every change).
        self.membership = members.load(config.data_dir) or Membership.of_config(config)
        self.on_membership_entry = self._membership_entry
        self.membership_refusal = self._membership_refusal
        self.set_learners(m.raft_address for m in self.membership.learners())
        #: Called on the loop when the Raft log's durable index may have risen (power mode):
        #: the leader's batcher proposes what waited for it (``cluster.batcher``, group commit).
        self.on_durable: Callable[[], None] | None = None
        #: Journal files the last snapshot's thread fsynced (``Journal.unsynced_files``): told to
        #: the journal by the next snapshot's prepare, on the loop.
        self._journal_files_synced: list[str] = []
        os.makedirs(config.raft_dir, exist_ok=True)
        #: The Raft log (raises ``RaftLogDamaged`` on a damaged one).
        self.raft_log = RaftLogStore(config.raft_dir, durability=config.durability)
        r = config.raft
        password = None if config.insecure and not config.raft_password else link_password(config)
        self._identity = getattr(password, "identity", None)
        self._admit_members()
        conf = SyncObjConf(
            password=password,
            bindAddress=config.raft_address,
            journalFile=self.raft_log,
            fullDumpFile=os.path.join(config.raft_dir, "snapshot.bin"),
            serializer=SnapshotWriter(self._prepare_snapshot),
            deserializer=self._read_snapshot,
            raftMinTimeout=r.election_timeout_min_s,
            raftMaxTimeout=r.election_timeout_max_s,
            appendEntriesUseBatch=r.append_entries_use_batch,
            appendEntriesPeriod=r.append_entries_period_s,
            appendEntriesBatchSizeBytes=r.append_entries_batch_bytes,
            connectionTimeout=r.connection_timeout_s,
            connectionRetryTime=r.connection_retry_s,
            leaderFallbackTimeout=r.leader_fallback_timeout_s,
            logCompactionMinEntries=r.log_compaction_min_entries,
            logCompactionMinTime=r.log_compaction_min_time_s,
            commandsQueueSize=r.commands_queue_size,
            autoTick=False,
            # One attempt: a Raft address that cannot be bound fails the start (pysyncobj's
            # default retries forever, in a busy loop when it does not tick on a thread).
            maxBindRetries=1,
            autoTickPeriod=r.tick_period_s,
            dynamicMembershipChange=True,
            useFork=False,
        )
        pysyncobj_log = logging.getLogger(SYNCOBJ_LOGGER)
        quiet = _NoBindTraceback()
        pysyncobj_log.addFilter(quiet)
        try:
            super().__init__(
                config.raft_address,
                [m.raft_address for m in self.membership.members if m.id != config.id],
                conf,
                loop=loop,
                commit_notify_delay_s=r.commit_notify_delay_s,
                votes_blocked_s=votes_blocked_s,
            )
        except BaseException:
            self.raft_log.close()
            raise
        finally:
            pysyncobj_log.removeFilter(quiet)
        self.addOnTickCallback(self._promote_caught_up)

    # --- the replicated entry point -----------------------------------------------------

    @replicated
    def apply_entry(self, batch):
        """Apply one committed batch on every node. Never raises."""
        try:
            result = self.core.apply(batch)
        except AssertionError as exc:
            invariant.fail_stop("apply: %s", exc)
        except Exception as exc:  # noqa: BLE001 - apply must not raise into pysyncobj
            invariant.fail_stop("apply failed: %r", exc)
        if result.error:
            # Every replica decodes the same bytes the same way: a batch this version cannot
            # read changes nothing anywhere, but it means a leader wrote a format we lack.
            log.error("raft entry not applied: %s", result.error)
        try:
            self._on_applied(result)
        except Exception as exc:  # noqa: BLE001
            invariant.fail_stop("after apply: %r", exc)
        return result

    # --- snapshots ------------------------------------------------------------------------

    def _prepare_snapshot(self, raft_data: tuple) -> Callable[[str], None]:
        """On the loop: what the snapshot holds, now. Returns the function that writes it and
        fsyncs it (on the snapshot thread, ``raft.snapshot_files``): the machine state is taken
        here as bytes, so the thread reads nothing the loop changes."""
        last_applied, previous, cluster = raft_data
        snapshot = RaftSnapshot(
            1,
            self.core.machine.snapshot(),
            (bytes(last_applied[0]), last_applied[1], last_applied[2]),
            (bytes(previous[0]), previous[1], previous[2]),
            sorted(node.id for node in cluster),
            members.encode_membership(self.membership.without_history()),
        )
        journal = self.core.journal
        journal.synced(self._journal_files_synced)  # by the last snapshot's thread, which has ended
        files = journal.unsynced_files()
        directory = journal.directory

        def write(filename: str) -> None:
            # Everything below the snapshot must be on disk before pysyncobj drops the log: the
            # journal's open segment, and what it sealed and indexed since the last snapshot
            # without an fsync (fsync "never"), with the directory that names them. A failed
            # fsync is never retried as if the data were written: the node stops.
            for path in files:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # removed or replaced since (retention, a repair: it syncs its own file)
                try:
                    os.fsync(fd)
                except OSError as exc:
                    disk_failed(disk_error(f"cannot sync the journal file {path}", exc))
                finally:
                    os.close(fd)
            try:
                sync_directory(directory)
            except OSError as exc:
                disk_failed(disk_error(f"cannot sync the journal directory {directory}", exc))
            self._journal_files_synced = files  # read by the next prepare, after this thread ended
            data = _snapshot_encoder.encode(snapshot)
            with open(filename, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        return write

    def _read_snapshot(self, filename: str) -> tuple:
        try:
            with open(filename, "rb") as f:
                snapshot = _snapshot_decoder.decode(f.read())
                if self.raft_log.power:
                    # A snapshot from the leader replaces the log: it is on disk first.
                    try:
                        os.fsync(f.fileno())
                        sync_directory(os.path.dirname(os.path.abspath(filename)))
                    except OSError as exc:
                        disk_failed(f"cannot sync the Raft snapshot {filename}: {exc}")
            machine = SequencerMachine.restore(snapshot.machine)
        except (OSError, msgspec.MsgspecError, UnicodeDecodeError, SnapshotError) as exc:
            invariant.fail_stop("cannot load the Raft snapshot %s: %s", filename, exc)
        self.core.replace_machine(machine)
        log.info("machine state restored from snapshot at seq %d", machine.last_seq)
        if self._on_restored is not None:
            self._on_restored()
        if snapshot.membership:
            try:
                held = members.decode_membership(snapshot.membership, source=filename)
            except MembershipError as exc:
                invariant.fail_stop("cannot load the Raft snapshot %s: %s", filename, exc)
            if held.number > self.membership.number:
                self._adopt(self.membership.then(held))
        # The members as this node reaches them (its own addresses for them, as its log and
        # config gave them: a proxy or NAT may put other addresses in the leader's snapshot,
        # and a snapshot of raftseq 0.2 names no membership).
        cluster = {TCPNode(m.raft_address) for m in self.membership.members}
        # A compaction cut short after its snapshot: pysyncobj would clear the whole log.
        self.raft_log.align_to_snapshot(tuple(snapshot.previous), tuple(snapshot.last_applied))
        return tuple(snapshot.last_applied), tuple(snapshot.previous), cluster

    # --- group commit (power durability) ---------------------------------------------------

    def unsynced_entries(self) -> int:
        """Raft entries proposed here and not yet on this node's disk: waiting in pysyncobj's
        queue for the next tick, or in the log above its durable index (0 in crash mode)."""
        if not self.raft_log.power:
            return 0
        log_store = self.raft_log
        last = log_store[-1][1] if len(log_store) else 0
        return len(self._SyncObj__commandsQueue._FastQueue__queue) + max(0, last - log_store.durable_index())

    def raftseq_durable_advanced(self) -> None:
        super().raftseq_durable_advanced()
        if self.on_durable is not None and not self._destroyed:
            self.on_durable()

    # --- state ----------------------------------------------------------------------------

    def getStatus(self) -> dict:  # noqa: N802 (pysyncobj's name)
        """pysyncobj's status, with ``durable_idx``: the last index on this node's disk."""
        status = super().getStatus()
        status["durable_idx"] = self.raft_log.durable_index()
        status["writer_backlog_bytes"] = self.raft_log.writer_backlog_bytes()
        return status

    def leader_client_address(self) -> str:
        return self.client_address_of(self.leader_raft_address())

    def client_address_of(self, raft_address: str) -> str:
        """The client address of the member at `raft_address` ("" for none), as the membership says."""
        member = self.membership.by_raft_address(raft_address) if raft_address else None
        if member is not None:
            return member.client_address
        return self.node_config.peer_client_address(raft_address) if raft_address else ""

    # --- planned leadership transfer (cluster.handover) -------------------------------------

    def last_log_index(self) -> int:
        """The index of the last entry of this node's Raft log (0: an empty log)."""
        log_entries = self.raft_log
        return log_entries[-1][1] if len(log_entries) else 0

    def follower_match_index(self, raft_address: str) -> int:
        """On the leader: the last index `raft_address` is known to hold (-1: not a follower)."""
        return self.getStatus().get(f"match_idx_server_{raft_address}", -1)

    def hand_leadership_to(self, raft_address: str) -> None:
        """On the leader, once `raft_address` holds its whole log: have it stand for election
        at once (pysyncobj's TimeoutNow; its vote request skips the pre-vote). This node steps
        down when the target's vote request, of a newer term, arrives."""
        self.transferLeadership(raft_address, callback=self._hand_over_answered)

    @staticmethod
    def _hand_over_answered(result: object, error: int) -> None:
        if error:
            log.warning("leadership transfer refused by pysyncobj (reason %s)", error)

    # --- membership (cluster.membership; the entries ride in pysyncobj's own) -----------------

    def change_membership(self, kind: ChangeKind, member: Member, callback: Callable[[object, int], None]) -> members.MemberChange:
        """On the leader: propose the change of `kind` about `member`; ``callback(result,
        error)`` once it is committed (or failed). Raises ``MembershipError`` (one line, nothing
        proposed) for a change that cannot follow the current membership, one that would leave
        the voters after it without a quorum of reachable members, or while another change is
        in flight. Counted in ``membership_changes``."""
        try:
            return self._propose_change(kind, member, callback)
        except MembershipError:
            self._count_change(kind, "refused")
            raise

    def _count_change(self, kind: ChangeKind, outcome: str) -> None:
        self.membership_changes[members.CHANGE_KIND_NAMES[kind], outcome] += 1

    def _propose_change(self, kind: ChangeKind, member: Member, callback: Callable[[object, int], None]) -> members.MemberChange:
        """``change_membership`` without counting a refusal (a promotion is asked each tick
        until it can be proposed)."""
        if self._change_in_progress():
            raise MembershipError("another membership change is in progress; try again when it is done")
        change = self.membership.change(kind, member)
        reachable = {m.id for m in self.membership.members if m.raft_address in self.connected_members()}
        problem = members.quorum_problem([m.id for m in change.after.voters()], reachable)
        if problem:
            raise MembershipError(f"{kind} {member.id} refused: {problem}")
        if kind == "remove" and change.member.raft_address == self.node_config.raft_address:
            raise MembershipError("the leader cannot remove itself: leadership is handed over first")
        raft_kind = {"learner": MEMBERSHIP_ADD, "promote": MEMBERSHIP_PROMOTE, "remove": MEMBERSHIP_REMOVE}[kind]

        def ended(result: object, error: int) -> None:
            self._count_change(kind, "failed" if error else "committed")
            callback(result, error)

        self.propose_membership(raft_kind, change.member.raft_address, members.encode_change(change), ended)
        return change

    def adopt_newer(self, membership: Membership) -> None:
        """A membership learned from a peer (not through the log): taken when newer."""
        if membership.number > self.membership.number:
            self._adopt(self.membership.then(membership))

    def _admit_members(self) -> None:
        """Link identity and learners as the membership says."""
        if self._identity is not None:
            self._identity.set_members({m.raft_address: bytes.fromhex(m.raft_public_key) for m in self.membership.members})
        self.set_learners(m.raft_address for m in self.membership.learners())

    def _localized(self, membership: Membership) -> Membership:
        """`membership` with the Raft address this node already reaches each known member by
        (a change or snapshot carries the leader's; behind a proxy or NAT they differ)."""
        known = {m.id: m.raft_address for m in self.membership.members}
        members_here = [msgspec.structs.replace(m, raft_address=known.get(m.id, m.raft_address)) for m in membership.members]
        return msgspec.structs.replace(membership, members=members_here)

    def _adopt(self, membership: Membership) -> None:
        before = self.membership
        membership = self._localized(membership)
        self.membership = membership
        try:
            members.save(self.node_config.data_dir, membership)
        except OSError as exc:
            disk_failed(f"cannot write the membership to {self.node_config.data_dir}: {exc}")
        self._admit_members()
        log.warning(
            "membership %d (was %d): voters %s, learners %s",
            membership.number,
            before.number,
            ",".join(m.id for m in membership.voters()) or "-",
            ",".join(m.id for m in membership.learners()) or "-",
        )
        if self.node_config.id in membership.removed and self._on_removed is not None:
            self._on_removed(f"this node ({self.node_config.id}) was removed from the cluster by membership change {membership.number}")

    def _membership_entry(self, kind: str, address: str, change_bytes: bytes, reverse: bool) -> str:
        """A membership entry appended (applied after a restart, or undone): adopt what it
        names. Returns the Raft address this node knows the member by (pysyncobj's key)."""
        try:
            change = members.decode_change(change_bytes)
        except MembershipError as exc:
            log.error("membership entry for %s not understood: %s", address, exc)
            return address
        known = self.membership.member(change.member.id)
        local = known.raft_address if known is not None else address
        self._membership_moved(change, reverse)
        return local

    def _membership_moved(self, change: members.MemberChange, reverse: bool) -> None:
        if reverse:
            if self.membership.number == change.after.number:
                self._adopt(self.membership.back_to(change.before))
        elif change.after.number > self.membership.number:
            self._adopt(self.membership.then(change.after))

    def _membership_refusal(self, kind: str, address: str, change_bytes: bytes) -> str:
        try:
            change = members.decode_change(change_bytes)
        except MembershipError as exc:
            return str(exc)
        if change.before.number != self.membership.number:
            return f"the membership changed meanwhile (now {self.membership.number}, the change follows {change.before.number})"
        if kind == MEMBERSHIP_REMOVE and address == self.node_config.raft_address:
            return "the leader cannot remove itself"
        return ""

    def _change_in_progress(self) -> bool:
        """A membership entry not yet committed is in the log, or this leader's promotion of a
        learner, proposed in its current term, has not been answered."""
        return self.membership_entry_pending() or self._promotion_asked_term == self._getTerm()

    def _promote_caught_up(self) -> None:
        """On the leader, each tick: a learner holding every committed entry gets its vote."""
        if not self.learner_addresses():
            return  # every tick of every node: nothing more without learners
        learners = self.membership.learners()
        if not learners or not self._isLeader() or self._change_in_progress():
            return
        match = self.voter_match_indexes()
        commit = self.commit_index()
        for learner in learners:
            if match.get(learner.raft_address, 0) >= commit:
                try:
                    self._propose_change("promote", learner, self._promoted)
                except MembershipError:
                    continue  # not now (a quorum not reachable): the next tick asks again
                self._promotion_asked_term = self._getTerm()
                log.warning(
                    "learner %s caught up (match index %d, commit index %d): promoting it", learner.id, match[learner.raft_address], commit
                )
                return

    def _promoted(self, result: object, error: int) -> None:
        self._promotion_asked_term = 0
        if error:
            log.warning("promotion not committed (pysyncobj reason %s); will ask again", error)
