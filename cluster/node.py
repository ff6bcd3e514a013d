"""One raftseq node: journal, state machine, Raft replica, batcher, gateway and metrics.

Everything runs on one asyncio loop: gateway, batcher, subscriptions, and pysyncobj with the
state machine and the journal (``cluster.raft_loop``). An applied batch wakes the waiting
subscribers directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import time

from pysyncobj import SyncObjException

from raftseq.cluster.batcher import Batcher
from raftseq.cluster.catchup import CatchUp
from raftseq.cluster.config import NodeConfig
from raftseq.cluster.gateway import Gateway
from raftseq.cluster.metrics import NodeCollector, NodeMetrics, serve_metrics
from raftseq.cluster.replica import SequencerReplica
from raftseq.sequencer import protocol
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.journal import FsyncPolicy, Journal
from raftseq.sequencer.machine import ApplyResult, SequencerMachine

log = logging.getLogger("raftseq.node")


class RaftLogUnreadable(Exception):
    """pysyncobj could not open the node's Raft log."""


class RaftAddressUnavailable(Exception):
    """The node's Raft address cannot be listened on."""


def _listen_problem(address: str) -> str:
    """Why ``address`` cannot be listened on (pysyncobj only says that it could not)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_server((host, int(port))).close()
    except OSError as exc:
        return str(exc)
    return "pysyncobj could not bind it"


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
    def __init__(self, config: NodeConfig, *, votes_blocked_s: float = 0.0) -> None:
        self.config = config
        self.votes_blocked_s = votes_blocked_s
        self.metrics = NodeMetrics()
        os.makedirs(config.data_dir, exist_ok=True)
        self.journal = Journal.open(
            config.journal_dir,
            segment_bytes_max=config.journal.segment_bytes_max,
            fsync=FsyncPolicy.parse(config.journal.fsync),
            clock_ns=time.monotonic_ns,
        )
        self.journal.fsync_observer = self.metrics.fsync_latency.observe
        recovery = self.journal.recovery
        if recovery.bytes_cut:
            log.warning(
                "journal tail cut: %d bytes of %s after seq %d (%s)",
                recovery.bytes_cut,
                recovery.segment,
                recovery.last_good_seq,
                recovery.reason,
            )
        self.core = SequencedStream(SequencerMachine(config.machine.machine_config()), self.journal)
        #: Last sequence number subscribers may read: published, and below any journal hole.
        self.readable_seq = self.journal.contiguous_last_seq
        self.role = "follower"
        self.leader_address = ""
        self.disk_low = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.replica: SequencerReplica | None = None
        self.batcher: Batcher | None = None
        self.gateway: Gateway | None = None
        self.catchup: CatchUp | None = None
        self._readable_event: asyncio.Event | None = None
        self._waiters = 0  # subscriptions inside wait_readable

    # --- queries used by the gateway and metrics -------------------------------------------

    @property
    def published_seq(self) -> int:
        """Last committed sequence number this node knows: applied here or held in the journal
        (which may run ahead of the machine while Raft replays after a restart)."""
        return max(self.journal.last_seq, self.core.machine.last_seq)

    @property
    def catchup_missing(self) -> int:
        return self.journal.missing_count

    def is_leader(self) -> bool:
        return self.role == "leader"

    def leader_client_address(self) -> str:
        if self.role == "leader":
            return self.config.client_address
        return self.replica.leader_client_address() if self.replica is not None else ""

    def last_client_seq(self, session: str) -> int:
        return self.core.machine.last_client_seq(session)

    def raft_status(self) -> dict:
        if self.replica is None:
            return {}
        try:
            return self.replica.getStatus()
        except Exception:  # noqa: BLE001 - best effort for display
            return {}

    def status(self) -> protocol.Status:
        status = self.raft_status()
        return protocol.Status(
            self.config.id,
            protocol.Role(self.role),
            self.leader_client_address(),
            int(status.get("raft_term", 0) or 0),
            int(status.get("commit_idx", 0) or 0),
            self.published_seq,
            self.core.machine.last_log_time_ns,
            os.getpid(),
            self.config.client_address,
            self.config.raft_address,
            self.config.metrics_address,
        )

    async def wait_readable(self, seq: int) -> None:
        """Return once ``readable_seq >= seq`` (or after a heartbeat interval, to re-check)."""
        self._waiters += 1
        try:
            while True:
                self.readable_seq = self.journal.contiguous_last_seq
                if self.readable_seq >= seq:
                    return
                event = self._readable_event
                try:
                    await asyncio.wait_for(event.wait(), self.config.gateway.heartbeat_interval_ms / 1000)
                except TimeoutError:
                    return
        finally:
            self._waiters -= 1

    # --- Raft's side ----------------------------------------------------------------------

    def _applied(self, result: ApplyResult) -> None:
        """Called inside a Raft tick after each applied batch."""
        m = self.metrics
        m.batches_applied += 1
        if result.first_seq:
            count = result.last_seq - result.first_seq + 1
            m.messages_sequenced += count
            m.batch_size.observe(result.entry_count)
        self.wake_subscribers()

    def wake_subscribers(self) -> None:
        """New records are readable (applied, or fetched into a hole): wake the waiting
        subscriptions."""
        self.readable_seq = self.journal.contiguous_last_seq
        if not self._waiters:
            return  # nobody waits; a subscriber reads the journal's position before it waits
        event = self._readable_event
        self._readable_event = asyncio.Event()
        event.set()

    # --- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._readable_event = asyncio.Event()
        self.batcher = Batcher(self.config.batcher, self._propose, loop=loop)
        self.batcher.latency_observer = self.metrics.ack_latency.observe
        self.gateway = Gateway(self)
        await self.gateway.start()
        try:
            self.replica = SequencerReplica(
                self.config,
                self.core,
                loop=loop,
                on_applied=self._applied,
                on_restored=self.wake_subscribers,
                votes_blocked_s=self.votes_blocked_s,
            )
        except SyncObjException as exc:
            if exc.args != ("BindError",):
                raise
            log.critical("cannot listen for Raft on %s: %s", self.config.raft_address, _listen_problem(self.config.raft_address))
            await self.gateway.stop()
            self.journal.close()
            raise RaftAddressUnavailable(self.config.raft_address) from None
        except Exception as exc:  # noqa: BLE001 - pysyncobj raises anything on a damaged log
            log.critical(
                "cannot open the Raft log in %s: %r. To discard it and rejoin from the leader "
                "(snapshot and journal catch-up), start the node with --discard-raft-log",
                self.config.raft_dir,
                exc,
            )
            await self.gateway.stop()
            self.journal.close()
            raise RaftLogUnreadable(str(exc)) from None
        self.catchup = CatchUp(self)
        if self.config.metrics_address:
            serve_metrics(self.config.metrics_address, lambda: NodeCollector(self))
        log.info(
            "node %s up: clients %s, raft %s, metrics %s, journal %s (seq %d..%d)",
            self.config.id,
            self.config.client_address,
            self.config.raft_address,
            self.config.metrics_address or "off",
            self.config.journal_dir,
            self.journal.first_seq,
            self.journal.last_seq,
        )
        watcher = asyncio.create_task(self._watch(), name="role-watcher")
        catchup = asyncio.create_task(self.catchup.run(), name="catch-up")
        try:
            await stop.wait()
        finally:
            log.info("node %s stopping", self.config.id)
            watcher.cancel()
            catchup.cancel()
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
            replica = self.replica
            role = replica.role()
            leader = replica.leader_raft_address()
            if leader != self.leader_address:
                if leader:
                    self.metrics.leader_changes += 1
                log.info("leader is now %s (term %d)", leader or "unknown", replica.term())
                self.leader_address = leader
            if role != self.role:
                log.info("role %s -> %s (term %d)", self.role, role, replica.term())
                self.role = role
                if role == "leader":
                    self.batcher.start()
                else:
                    self.batcher.stop("no longer leader")
            now = time.monotonic()
            if now - disk_checked >= 1.0:
                disk_checked = now
                self._check_disk()
            if self.journal.fsync_policy.mode == "interval" and self.replica is not None:
                # Appends and segment rolls hold this lock too (journal catch-up included).
                with self.replica.apply_lock:
                    self.journal.sync_if_due()
            await asyncio.sleep(0.01)

    def _check_disk(self) -> None:
        try:
            free = shutil.disk_usage(self.config.data_dir).free
        except OSError:
            return
        low = free < self.config.journal.disk_free_bytes_min
        if low != self.disk_low:
            log.warning("free disk %s: %d bytes (minimum %d)", "LOW" if low else "ok", free, self.config.journal.disk_free_bytes_min)
        self.disk_low = low
        if low and self.role == "leader" and self.replica is not None:
            # A leader that refuses every submit would stall the cluster while two healthy
            # nodes wait: hand leadership to one of them (asked again each second until done).
            self.replica.request_handover()


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


def setup_logging(node_id: str, level: str = "INFO") -> _NodeLogFilter:
    """One event per line: time, level, node, term, last sequence number, logger, message."""
    handler = logging.StreamHandler()
    node_filter = _NodeLogFilter(node_id)
    handler.addFilter(node_filter)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s level=%(levelname)s node=%(node_id)s term=%(term)s last_seq=%(last_seq)s "
            "logger=%(name)s msg=%(message)r"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return node_filter


#: Exit code of a node whose Raft log cannot be opened.
EXIT_RAFT_LOG_UNREADABLE = 3
#: Exit code of a node that cannot listen on its Raft address.
EXIT_RAFT_ADDRESS_UNAVAILABLE = 4


def run_node(config: NodeConfig, *, discard_raft_log_first: bool = False) -> int:
    node_filter = setup_logging(config.id)
    votes_blocked_s = 0.0
    if discard_raft_log_first:
        moved = discard_raft_log(config)
        votes_blocked_s = max(1.0, 2 * config.raft.election_timeout_max_s)
        log.warning("Raft log discarded (moved to %s); no votes for %.1f s", moved, votes_blocked_s)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        node = Node(config, votes_blocked_s=votes_blocked_s)
        node_filter.node = node
        await node.run(stop)

    try:
        asyncio.run(main())
    except RaftLogUnreadable:
        return EXIT_RAFT_LOG_UNREADABLE
    except RaftAddressUnavailable:
        return EXIT_RAFT_ADDRESS_UNAVAILABLE
    return 0
