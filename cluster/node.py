"""One raftseq node: the composition root of journal, state machine, Raft replica, batcher,
gateway, catch-up, scrub and metrics.

Everything runs on one asyncio loop: gateway, batcher, subscriptions, and pysyncobj with the
state machine and the journal (``cluster.raft``). An applied batch wakes the waiting
subscribers directly (``cluster.publication``). One role watcher follows the Raft member's role
and leader (it starts and stops the batcher) and the free disk.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable

from raftseq.cluster.batcher import Batcher
from raftseq.cluster.catchup import CatchUp
from raftseq.cluster.config import DISK_CHECK_INTERVAL_S, ROLE_WATCH_INTERVAL_S, JournalConfig, NodeConfig
from raftseq.cluster.data_dir import claim_data_dir
from raftseq.cluster.handover import Handover
from raftseq.cluster.gateway import Gateway
from raftseq.cluster.metrics import NodeCollector, NodeMetrics, page_maker
from raftseq.cluster.metrics_http import MetricsServer
from raftseq.cluster.publication import Publication
from raftseq.cluster.retention import JournalRetention, RetentionState, check_archive_dir
from raftseq.cluster import raft
from raftseq.cluster.raft import SequencerReplica
from raftseq.cluster.raft.log_store import disk_error, disk_failed
from raftseq.cluster.scrub import run_scrub
from raftseq.cluster.tls import node_client_tls
from raftseq.sequencer import protocol
from raftseq.sequencer.stream import SequencedStream
from raftseq.cluster.membership import Membership
from raftseq.cluster.membership_admin import membership_reply, refuse_if_removed, watch_for_removal
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.cluster.node_log import RepeatLimiter, RotatingNodeLog
from raftseq.sequencer.journal import Damage, FsyncPolicy, Journal, JournalCorruptError, Scrubber
from raftseq.sequencer.machine import ApplyResult, SequencerMachine
from raftseq.sequencer.protocol import Role

log = logging.getLogger("raftseq.node")

#: A node's journal holds the stream from its first number, or from where retention left it.
JOURNAL_START_SEQ = 1


class RaftLogUnreadable(NodeCannotRun):
    """pysyncobj could not open the node's Raft log."""

    def __init__(self, message: str) -> None:
        super().__init__(NodeExit.RAFT_LOG_UNREADABLE, message)


class AddressUnavailable(NodeCannotRun):
    """An address the node must listen on (client, Raft or metrics) cannot be listened on."""

    def __init__(self, role: str, setting: str, address: str, reason: str) -> None:
        super().__init__(
            NodeExit.ADDRESS_UNAVAILABLE,
            f"cannot listen for {role} on {address} ({setting}): {reason}; stop what listens there or change {setting}",
        )


def _listen_problem(address: str) -> str:
    """Why ``address`` cannot be listened on (pysyncobj only says that it could not)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_server((host, int(port))).close()
    except OSError as exc:
        return str(exc)
    return "pysyncobj could not bind it"


def _log_append_damage(damage: Damage) -> None:
    log.error("journal damaged, found by an append: %s; sealed it, refusing it until repaired from a peer", damage.describe())


def discard_raft_log(config: NodeConfig) -> str:
    """Move the Raft log, its metadata and the snapshot aside; returns where they went.

    The node then starts as an empty Raft member: the leader sends it entries or a snapshot,
    and the journal (kept) is caught up from a peer. The vote it gave in the current term is
    lost with the log, so the node casts no vote for a while after starting (``Node``).
    """
    target = os.path.join(config.raft_dir, f"discarded-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.makedirs(target)
    for name in os.listdir(config.raft_dir):
        path = os.path.join(config.raft_dir, name)
        if os.path.isfile(path):
            os.replace(path, os.path.join(target, name))
    return target


class Node:
    """The composition root: builds the journal, machine, Raft replica, batcher, gateway,
    catch-up and metrics of one node, wires them, and runs them on one loop.

    Gateway and metrics receive the node as a small protocol of reads
    (``cluster.node_reads``): the properties and methods below are those reads.
    """

    def __init__(self, config: NodeConfig, *, votes_blocked_s: float = 0.0) -> None:
        self.config = config
        self.votes_blocked_s = votes_blocked_s
        self.metrics = NodeMetrics()
        os.makedirs(config.data_dir, exist_ok=True)
        check_archive_dir(config.retention)
        self.journal = open_journal(config.journal_dir, config.journal)
        self.journal.fsync_observer = self.metrics.fsync_latency.observe
        self.journal.on_damage = _log_append_damage
        self.journal.on_write_failed = self._journal_write_failed
        recovery = self.journal.recovery
        if recovery.bytes_cut:
            log.warning(
                "journal tail cut: %d bytes of %s after seq %d (%s)",
                recovery.bytes_cut,
                recovery.segment,
                recovery.last_good_seq,
                recovery.reason,
            )
        if recovery.missing_first:
            log.error(
                "journal lacks its first records %d..%d (no segment file holds them); fetching them from a peer",
                recovery.missing_first,
                recovery.missing_last,
            )
        for damage in self.journal.damage:
            log.error("journal damaged, found on start: %s; refusing it until repaired from a peer", damage.describe())
        self.scrubber = Scrubber(self.journal)
        self.core = SequencedStream(SequencerMachine(config.machine.machine_config()), self.journal)
        self.publication = Publication(self.journal, recheck_interval_s=config.gateway.heartbeat_interval_ms / 1000)
        self.role = Role.FOLLOWER
        #: The Raft term in which this node last became leader (as the role watcher saw it).
        self.leader_term = 0
        #: Raft address of the leader this node knows ("" if none), and the term it last saw a
        #: leader in.
        self.leader_address = ""
        self.leader_seen_term = 0
        self.disk_low = False
        #: The Raft log's writer was behind its bound at the last disk check (logged on change).
        self.raft_log_backlog_seen = False
        self.replica: SequencerReplica | None = None
        self.batcher: Batcher | None = None
        self.gateway: Gateway | None = None
        self.catchup: CatchUp | None = None
        self.retention = JournalRetention(
            config.retention,
            self.journal,
            config.peers,
            data_dir=config.data_dir,
            node_id=config.id,
            token=config.client_token,
            tls=node_client_tls(config.tls),
            snapshot_floor_seq=lambda: self.core.machine.snapshot_floor_seq(),
            applied=lambda: (self.core.machine.last_seq, self.core.machine.last_log_time_ns),
            members=self._other_members,
        )
        #: Set (with why) when this node learns that it was removed from the cluster.
        self.removed = asyncio.Event()
        self.removed_why = ""
        #: Planned leadership transfers away from this node (``LeaderTransfer``).
        self.handover = Handover(self)
        #: Tasks the role watcher started (a drained node's handover), kept until they end.
        self._background: set[asyncio.Task] = set()

    def _other_members(self) -> list:
        """The other members as this node knows them now (learners too: they fetch from the
        journal); the config's peers until the replica runs. Retention asks these."""
        if self.replica is None:
            return list(self.config.peers)
        return [m for m in self.replica.membership.members if m.id != self.config.id]

    # --- reads (cluster.node_reads) -----------------------------------------------------

    @property
    def published_seq(self) -> int:
        """Last committed sequence number this node knows: applied here or held in the journal
        (which may run ahead of the machine while Raft replays after a restart)."""
        return max(self.journal.last_seq, self.core.machine.last_seq)

    @property
    def readable_seq(self) -> int:
        return self.publication.readable_seq

    @property
    def last_log_time_ns(self) -> int:
        return self.core.machine.last_log_time_ns

    def session_table(self) -> tuple[int, int, int]:
        machine = self.core.machine  # read once: a restored snapshot replaces the machine
        return machine.session_count, machine.session_table_bytes, machine.sessions_evicted

    @property
    def catchup_missing(self) -> int:
        return self.journal.missing_count

    @property
    def journal_scrubbed_bytes(self) -> int:
        return self.scrubber.bytes_read

    @property
    def catchup_fetched(self) -> int:
        return self.catchup.records_fetched if self.catchup is not None else 0

    @property
    def journal_needs_from(self) -> int:
        journal = self.journal
        needs = [journal.last_seq + 1]
        if journal.holes:
            needs.append(journal.holes[0][0])
        repair = journal.repair_range
        if repair is not None:
            needs.append(repair[0])
        return min(needs)

    @property
    def retention_state(self) -> RetentionState:
        return self.retention.state

    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def raft_log_backlogged(self) -> bool:
        return self.replica is not None and self.replica.raft_log.writer_backlogged()

    def leader_client_address(self) -> str:
        if self.role is Role.LEADER:
            return self.config.client_address
        return self.replica.leader_client_address() if self.replica is not None else ""

    def last_client_seq(self, session: str) -> int:
        return self.core.machine.last_client_seq(session)

    def session_owner(self, session: str) -> int:
        return self.core.machine.owner_of(session)

    def snapshot_list(self, sm_type: str) -> protocol.SnapshotList:
        machine = self.core.machine  # read once: a restored snapshot replaces the machine
        return protocol.SnapshotList(sm_type, machine.snapshots_of(sm_type), machine.last_seq)

    def member_request(self, request: protocol.MemberRequest, reply) -> None:
        membership_reply(self, request, reply)

    def _removed(self, why: str) -> None:
        self.removed_why = why
        self.removed.set()

    async def transfer_leadership(self, to: str) -> protocol.LeaderTransferred:
        return await self.handover.transfer(to)

    def raft_status(self) -> dict:
        if self.replica is None:
            return {}
        try:
            return self.replica.getStatus()
        except Exception:  # noqa: BLE001 - best effort for display
            return {}

    def raft_counters(self) -> dict[str, int]:
        if self.replica is None:
            return dict.fromkeys(raft.RAFT_COUNTERS, 0)
        return self.replica.counters()

    def membership_view(self) -> tuple[Membership | None, dict[tuple[str, str], int]]:
        replica = self.replica
        if replica is None:
            return None, {}
        return replica.membership, dict(replica.membership_changes)

    def status(self) -> protocol.Status:
        status = self.raft_status()
        return protocol.Status(
            self.config.id,
            self.role,
            self.leader_client_address(),
            int(status.get("raft_term", 0) or 0),
            int(status.get("commit_idx", 0) or 0),
            self.published_seq,
            self.core.machine.last_log_time_ns,
            os.getpid(),
            self.config.client_address,
            self.config.raft_address,
            self.config.metrics_address,
            self.journal_needs_from,
        )

    def collector(self) -> NodeCollector:
        """The metrics collector over this node (what ``/metrics`` serves)."""
        return NodeCollector(self.config, self.metrics, self, journal=self.journal, batcher=self.batcher)

    # --- Raft's side ----------------------------------------------------------------------

    def _applied(self, result: ApplyResult) -> None:
        """Called inside a Raft tick after each applied batch."""
        m = self.metrics
        m.batches_applied += 1
        if result.first_seq:
            count = result.last_seq - result.first_seq + 1
            m.messages_sequenced += count
            m.batch_size.observe(result.entry_count)
        self.publication.wake()

    def wake_subscribers(self) -> None:
        """New records are readable (fetched into a hole by catch-up)."""
        self.publication.wake()

    # --- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        raft.install()
        loop = asyncio.get_running_loop()
        self.batcher = Batcher(self.config.batcher, self._propose, loop=loop)
        self.batcher.latency_observer = self.metrics.ack_latency.observe
        self.batcher.priority_latency_observer = self.metrics.priority_ack_latency.observe
        self.gateway = Gateway(
            self.config, self, batcher=self.batcher, journal=self.journal, publication=self.publication, metrics=self.metrics
        )
        try:
            await self.gateway.start()
        except OSError as exc:
            self.journal.close()
            raise AddressUnavailable("clients", "client_address", self.config.client_address, exc.strerror or str(exc)) from None
        try:
            refuse_if_removed(self.config)
        except NodeCannotRun:
            await self.gateway.stop()
            self.journal.close()
            raise
        try:
            self.replica = SequencerReplica(
                self.config,
                self.core,
                loop=loop,
                on_applied=self._applied,
                on_restored=self.publication.wake,
                on_removed=self._removed,
                votes_blocked_s=self.votes_blocked_s,
            )
        except Exception as exc:  # noqa: BLE001 - pysyncobj raises anything on a damaged log
            failure: Exception
            if raft.is_bind_error(exc):
                address = self.config.raft_address
                failure = AddressUnavailable("Raft", "raft_address", address, _listen_problem(address))
            elif isinstance(exc, raft.RaftLogDamaged):
                failure = NodeCannotRun(
                    NodeExit.RAFT_LOG_DAMAGED,
                    f"the Raft log is damaged: {exc}. To discard it and rejoin from the leader (snapshot and "
                    "journal catch-up), start the node with --discard-raft-log",
                )
            else:
                failure = RaftLogUnreadable(
                    f"cannot open the Raft log in {self.config.raft_dir}: {exc!r}. To discard it and rejoin from the "
                    "leader (snapshot and journal catch-up), start the node with --discard-raft-log"
                )
            await self.gateway.stop()
            self.journal.close()
            raise failure from None
        self.replica.raft_log.sync_observer = self.metrics.raft_log_synced
        self.replica.after_applying = self.gateway.flush_queued
        self.replica.before_tick = self.gateway.priority_reads.take
        if self.replica.raft_log.power:  # group commit: batches go on while the leader's fsync runs
            self.batcher.unsynced = self.replica.unsynced_entries
            self.replica.on_durable = self.batcher.flush
        self.catchup = CatchUp(
            self.journal,
            self.config.peers,
            node_id=self.config.id,
            token=self.config.client_token,
            tls=node_client_tls(self.config.tls),
            verify_failures=self.metrics.verify_failures,
            on_filled=self.publication.wake,
            repair_attempts_max=self.config.journal.repair_attempts_max,
            members=self._other_members,
        )
        metrics_server = None
        if self.config.metrics_address:
            metrics_server = MetricsServer(self.config.metrics_address, page_maker(self.collector()))
            try:
                await metrics_server.start()
            except OSError as exc:
                await self.gateway.stop()
                self.replica.destroy()
                self.journal.close()
                raise AddressUnavailable("metrics", "metrics_address", self.config.metrics_address, exc.strerror or str(exc)) from None
        log.info(
            "node %s up: clients %s, raft %s, metrics %s, journal %s (seq %d..%d)",
            self.config.id,
            self.config.client_address + (" (TLS)" if self.config.tls.enabled else ""),
            self.config.raft_address,
            self.config.metrics_address or "off",
            self.config.journal_dir,
            self.journal.first_seq,
            self.journal.last_seq,
        )
        watcher = asyncio.create_task(self._watch(), name="role-watcher")
        catchup = asyncio.create_task(self.catchup.run(), name="catch-up")
        scrub = asyncio.create_task(run_scrub(self.scrubber, bytes_per_s=self.config.journal.scrub_bytes_per_s), name="scrub")
        retention = asyncio.create_task(self.retention.run(), name="retention")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        removed = asyncio.create_task(self.removed.wait(), name="removed")
        removal_watch = asyncio.create_task(watch_for_removal(self), name="removal-watch")
        # A background task that fails is a bug: the node stops with its traceback instead of
        # running on without it (a retention task ended by an uncaught refusal once left every
        # journal growing past its bound, silently). One that ends normally (a scrub set to 0,
        # the removal watch once it saw this node removed) just stops being waited for.
        background = (watcher, scrub, retention, removal_watch)
        waited = {stopping, catchup, removed, *background}
        try:
            while not (stopping.done() or catchup.done() or removed.done()):
                done, waited = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task in background and not task.cancelled() and task.exception() is not None:
                        log.critical("the node's %s task failed; the node stops", task.get_name())
                        task.result()
            if removed.done():
                raise NodeCannotRun(NodeExit.REMOVED, f"{self.removed_why}; it stops, and is refused if it comes back")
            if catchup.done():
                catchup.result()  # NodeCannotRun when no peer can repair the journal
                raise AssertionError("catch-up ended")
        finally:
            log.info("node %s stopping", self.config.id)
            stopping.cancel()
            removed.cancel()
            removal_watch.cancel()
            watcher.cancel()
            catchup.cancel()
            scrub.cancel()
            retention.cancel()
            for task in list(self._background):
                task.cancel()
            if metrics_server is not None:
                await metrics_server.stop()
            self.batcher.stop("node shutting down")
            await self.gateway.stop()
            self.replica.destroy()
            self.journal.close()

    def _propose(self, data: bytes, callback) -> None:
        self.replica.apply_entry(data, callback=callback)

    async def _watch(self) -> None:
        """Follow the replica's role and the disk; start and stop the batcher."""
        disk_checked = 0.0
        while True:
            self._follow_role()
            now = time.monotonic()
            if now - disk_checked >= DISK_CHECK_INTERVAL_S:
                disk_checked = now
                self._check_disk()
            if self.journal.fsync_policy.mode == "interval":
                self.journal.sync_if_due()
            await asyncio.sleep(ROLE_WATCH_INTERVAL_S)

    def _follow_role(self) -> None:
        """Take the replica's leader and role as they are now: start the batcher when this node
        leads, stop it when it no longer does.

        A leader whose term changed stepped down and was elected again between two looks (a
        transfer away and back within one ``ROLE_WATCH_INTERVAL_S``): that is a step-down too.
        Its batcher may be held by the transfer that ended its leadership, and what it had in
        flight belongs to the old term; seen as leading on, it would hold its queued submits
        forever."""
        replica = self.replica
        role, term = replica.role(), replica.term()
        leader = replica.leader_raft_address()
        if leader and (leader != self.leader_address or term != self.leader_seen_term):
            # A leader of another term is another leader, though at the same address (one that
            # stepped down and was elected again between two looks).
            self.metrics.leader_changes += 1
            self.leader_seen_term = term
        if leader != self.leader_address:
            log.info("leader is now %s (term %d)", leader or "unknown", term)
            self.leader_address = leader
        if role is Role.LEADER and self.role is Role.LEADER and term != self.leader_term:
            log.info("role leader -> leader (term %d -> %d: stepped down and elected again)", self.leader_term, term)
            self.batcher.stop("no longer leader")
            self.role = Role.FOLLOWER
        if role != self.role:
            log.info("role %s -> %s (term %d)", self.role.value, role.value, term)
            self.role = role
            if role is Role.LEADER:
                self.leader_term = term
                self.batcher.start()
                if self.gateway.draining:
                    self._keep_leadership_off()
            else:
                self.batcher.stop("no longer leader")

    def _keep_leadership_off(self) -> None:
        """Elected while drained: propose nothing, and hand leadership over (``cluster.handover``)."""
        log.warning("elected while drained: proposing nothing, handing leadership over")
        self.batcher.hold()
        task = asyncio.create_task(self.handover.keep_off_while_drained(lambda: self.gateway.draining), name="drained-handover")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _journal_write_failed(self, exc: OSError, what: str) -> None:
        """The journal could not be written (a full disk, a disk error) after the machine
        applied the batch: the node cannot go on. It stops with ``DISK_FAILED``, a code that is
        not restarted blindly (a restart on a full disk would fail the same way, again and
        again: a crash loop); restarted once there is room, it rebuilds the journal from its
        Raft log."""
        disk_failed(disk_error(f"cannot write the journal in {self.config.journal_dir} ({what})", exc))

    def _check_disk(self) -> None:
        try:
            free = shutil.disk_usage(self.config.data_dir).free
        except OSError:
            return
        low = free < self.config.journal.disk_free_bytes_min
        if low != self.disk_low:
            log.warning(
                "free disk %s: %d bytes (minimum %d)%s",
                "LOW" if low else "ok",
                free,
                self.config.journal.disk_free_bytes_min,
                ": submits refused, no new Raft entries taken until there is room" if low else "",
            )
        self.disk_low = low
        backlogged = False
        if self.replica is not None:
            self.replica.raft_log.space_low = low
            backlogged = self.replica.raft_log.writer_backlogged()
        if backlogged != self.raft_log_backlog_seen:
            self.raft_log_backlog_seen = backlogged
            if backlogged:
                log.warning(
                    "the Raft log's writer is behind its bound (%d bytes queued; a stalled disk?): submits refused, "
                    "no new Raft entries taken, leadership handed over until it catches up",
                    self.replica.raft_log.writer_backlog_bytes(),
                )
            else:
                log.warning("the Raft log's writer caught up")
        if (low or backlogged) and self.role is Role.LEADER and self.replica is not None:
            # A leader that refuses every submit (its disk low, or its Raft log's writer behind
            # its bound: a stalled disk) would stall the cluster while two healthy nodes wait:
            # hand leadership to one of them (asked again each second until done).
            self.replica.request_handover()


def open_journal(directory: str, settings: JournalConfig) -> Journal:
    """The journal in `directory` as a node (or a relay) keeps it, from ``JOURNAL_START_SEQ``;
    ``NodeCannotRun`` when it cannot be opened."""
    try:
        return Journal.open(
            directory,
            segment_bytes_max=settings.segment_bytes_max,
            fsync=FsyncPolicy.parse(settings.fsync),
            clock_ns=time.monotonic_ns,
            verify_bytes=settings.verify_on_open_bytes,
            start_seq=JOURNAL_START_SEQ,
        )
    except JournalCorruptError as exc:
        raise NodeCannotRun(NodeExit.JOURNAL_DAMAGED, f"cannot open the journal in {directory}: {exc}") from None
    except OSError as exc:
        raise NodeCannotRun(
            NodeExit.DATA_DIR_UNUSABLE, f"cannot open the journal in {directory}: {exc.strerror or exc}: {exc.filename}"
        ) from None


class _NodeLogFilter(logging.Filter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id
        self.node: Node | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        node = self.node
        record.term = node.replica.term() if node is not None and node.replica is not None else 0
        record.last_seq = node.published_seq if node is not None else 0
        return True


def setup_logging(node_id: str, level: str = "INFO", *, log_file: str = "") -> _NodeLogFilter:
    """One event per line: time, level, node, term, last sequence number, logger, message.
    Lines of one kind beyond a rate are dropped and counted (``node_log.RepeatLimiter``). To
    stderr, or to `log_file`, rotated by size, with stdout and stderr following it."""
    handler: logging.Handler
    if log_file:
        handler = RotatingNodeLog(log_file, own_standard_streams=True)
    else:
        handler = logging.StreamHandler()
    node_filter = _NodeLogFilter(node_id)
    handler.addFilter(RepeatLimiter())
    handler.addFilter(node_filter)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s level=%(levelname)s node=%(node_id)s term=%(term)s last_seq=%(last_seq)s logger=%(name)s msg=%(message)r"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return node_filter


def run_node(config: NodeConfig, *, discard_raft_log_first: bool = False, log_file: str = "") -> int:
    node_filter = setup_logging(config.id, log_file=log_file)
    try:
        # First of all: nothing in the data directory is opened before this process owns it.
        data_dir_lock = claim_data_dir(config.data_dir, (config.journal_dir, config.raft_dir))
    except NodeCannotRun as exc:
        log.critical("%s", exc)
        return exc.code
    with data_dir_lock:
        return _run_locked(config, node_filter, discard_raft_log_first=discard_raft_log_first)


def _run_locked(config: NodeConfig, node_filter: _NodeLogFilter, *, discard_raft_log_first: bool) -> int:
    votes_blocked_s = 0.0
    if discard_raft_log_first:
        moved = discard_raft_log(config)
        votes_blocked_s = max(1.0, 2 * config.raft.election_timeout_max_s)
        log.warning("Raft log discarded (moved to %s); no votes for %.1f s", moved, votes_blocked_s)

    async def serve(stop: asyncio.Event) -> None:
        node = Node(config, votes_blocked_s=votes_blocked_s)
        node_filter.node = node
        await node.run(stop)

    return run_until_stopped(serve, log=log)


#: Allocations between two collections of the youngest generation (Python's default: 700). A
#: submit's objects live a few ms; at 150k msg/s they outlived a collection every 700
#: allocations, were promoted, and kept triggering full collections: a saturated leader made
#: one a second, 31-45 ms each with the loop stopped, collecting nothing (benchmarks/
#: README_cluster.md, "Garbage collection on a saturated leader"). At 50,000 they die young.
GC_YOUNG_ALLOCATIONS_MAX = 50_000


def tune_gc() -> None:
    """This process's collector: the youngest generation collected every
    ``GC_YOUNG_ALLOCATIONS_MAX`` allocations, the older ones as Python's defaults have it."""
    gc.set_threshold(GC_YOUNG_ALLOCATIONS_MAX, *gc.get_threshold()[1:])


def run_until_stopped(serve: Callable[[asyncio.Event], Awaitable[None]], *, log: logging.Logger) -> int:
    """Run ``serve(stop)`` on a new event loop until it returns; SIGTERM and SIGINT set `stop`.
    The exit code: ``NodeExit.STOPPED``, or the code of the ``NodeCannotRun`` that ended it
    (logged as critical on `log`). The collector is tuned first (``tune_gc``)."""
    tune_gc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        asyncio.run(main())
    except NodeCannotRun as exc:
        log.critical("%s", exc)
        return exc.code
    return NodeExit.STOPPED
