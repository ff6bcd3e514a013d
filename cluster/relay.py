"""A relay: a non-voting process that follows the cluster and serves its stream to many subscribers.

It reads the stream from an upstream (a node, or another relay: relays chain) the way a node's
catch-up reads a peer (``catchup.copy_records``: raw records, numbers checked), verifies every
record again as its journal stores it (``sequencer.journal``, the nodes' format), and serves
the same client protocol as a node through the same gateway (``cluster.gateway``):

* ``Subscribe(from_seq)`` from its own journal, gapless, resumable, up to what it holds. A
  subscriber that has been within ``subscriber_lag_max_records`` of the head and falls further
  behind is disconnected (``Busy``, limit ``subscriber_lag``) and resumes from its next number.
* ``SnapshotQuery`` is asked of the upstream; the answer lists only snapshots whose chunks the
  relay already holds, so a late joiner reads them here.
* ``Submit`` gets ``NotLeader`` with the cluster leader's client address (learned from the
  upstream's welcome and status): the client library follows it to the cluster.
* ``StatusRequest`` gets the relay's ``Status`` (role follower, its last number, the leader).

Retention: with ``retention`` bounds (the nodes' ``[retention]`` settings, ``--retention-from``)
the relay sends old segments out of its journal as a node does (``cluster.retention``: deleted,
or archived), and a subscription below its first number is answered ``Truncated`` as a node
answers it. Its retention floor has no peers in it: it is the newest snapshot of each
state-machine type its clients asked about (its first chunk: a late joiner can load it here);
a snapshot whose chunks retention removed is no longer listed.

It follows a follower of the cluster when one answers (the leader sequences; subscribers'
fan-out belongs on followers): each node's welcome says whether it leads, and the status poll
notices a followed node that has become the leader. It fails over across its upstream endpoints
and resumes by number. On every (re)connection it
asks for its own last record again and compares the bytes: an upstream that holds a different
record under that number (another cluster, or one that went backwards and sequenced other
messages) stops the relay with a clear error (exit code 5) before anything of it is stored or
served. An upstream that welcomes the relay with the relay's own id is the relay itself.
"""

from __future__ import annotations

import asyncio
import logging
import os

from raftseq.clients.connection import FATAL_REASONS, Connection, Rejected, open_connection
from raftseq.clients.sm.snapshots import query_snapshots
from raftseq.cluster.catchup import CatchUpError, PeerTruncated, copy_records
from raftseq.cluster.config import BUSY_RETRY_AFTER_FULL_MS
from raftseq.cluster.data_dir import claim_data_dir
from raftseq.cluster.gateway import Gateway
from raftseq.cluster.metrics import RelayCollector, RelayMetrics, page_maker
from raftseq.cluster.metrics_http import MetricsServer
from raftseq.cluster.node import JOURNAL_START_SEQ, AddressUnavailable, open_journal, run_until_stopped, setup_logging
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.cluster.publication import Publication
from raftseq.cluster.tls import node_client_tls
from raftseq.clients.tls import TlsError
from raftseq.cluster.retention import JournalRetention, RetentionState, check_archive_dir
from raftseq.cluster.relay_config import (
    RELAY_RETRY_DELAY_MAX_S,
    RELAY_RETRY_DELAY_MIN_S,
    RELAY_SNAPSHOT_QUERIES_MAX,
    RELAY_SNAPSHOT_TYPES_KEPT_MAX,
    RELAY_UPSTREAM_BEHIND_POLLS_MAX,
    RELAY_UPSTREAM_LEADER_POLLS_MAX,
    RELAY_UPSTREAM_LEADERLESS_POLLS_MAX,
    RELAY_UPSTREAM_POLL_INTERVAL_S,
    RELAY_UPSTREAM_TIMEOUT_S,
    RelayConfig,
)
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import JournalRecordError
from raftseq.sequencer.protocol import RejectReason, Role

log = logging.getLogger("raftseq.relay")


class UpstreamDiverged(NodeCannotRun):
    """The upstream holds a different record under a number this relay holds (or is this relay)."""

    def __init__(self, detail: str) -> None:
        super().__init__(NodeExit.INVALID_CONFIG, detail)


class Relay:
    """One relay process's state: its journal, its gateway, the task that follows the upstream.
    Implements what the gateway reads of a node (``node_reads.ClientFacingNode``)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.metrics = RelayMetrics()
        #: How the relay reaches its upstream's client ports (``cluster.tls``; None: plaintext).
        self.upstream_tls = node_client_tls(config.tls)
        os.makedirs(config.data_dir, exist_ok=True)
        self.journal = open_journal(config.journal_dir, config.journal)
        if self.journal.holes or self.journal.damage:
            # A relay's journal is written in order; a hole or damage means its files were
            # changed under it. Its copy is only a copy: start it again from an empty directory.
            self.journal.close()
            raise NodeCannotRun(
                NodeExit.JOURNAL_DAMAGED,
                f"the relay's journal in {config.journal_dir} has holes or damage; remove the directory and start the relay again",
            )
        self.publication = Publication(self.journal, recheck_interval_s=config.gateway.heartbeat_interval_ms / 1000)
        self.role = Role.FOLLOWER
        self.disk_low = False
        #: A relay has no Raft member (the log filter asks).
        self.replica = None
        #: The cluster leader's client address, as the upstream last said ("" if unknown).
        self.leader = ""
        #: The upstream being followed, and its last number as its status last said.
        self.upstream_address = ""
        self.upstream_last_seq = 0
        self.last_log_time_ns = 0
        self._snapshot_queries = 0
        #: The connection the stream comes on (the status poll drops it when its node lost the cluster).
        self._following: Connection | None = None
        self.gateway: Gateway | None = None
        #: Per state-machine type its clients asked about, the first chunk of the newest snapshot
        #: it listed (the retention floor keeps it), oldest question first.
        self._snapshot_floors: dict[str, int] = {}
        self.retention = JournalRetention(
            config.retention,
            self.journal,
            [],
            data_dir=config.data_dir,
            node_id=config.id,
            token=config.client_token,
            snapshot_floor_seq=self._snapshot_floor_seq,
            applied=lambda: (self.journal.last_seq, self.last_log_time_ns),
        )

    @property
    def retention_state(self) -> RetentionState:
        return self.retention.state

    @property
    def journal_bytes(self) -> int:
        return self.journal.size_bytes

    def _snapshot_floor_seq(self) -> int:
        return min(self._snapshot_floors.values(), default=0)

    # --- what the gateway reads (node_reads.ClientFacingNode) ----------------------------

    @property
    def published_seq(self) -> int:
        return self.journal.last_seq

    def is_leader(self) -> bool:
        return False

    def leader_client_address(self) -> str:
        return self.leader

    def last_client_seq(self, session: str) -> int:
        return 0  # a relay keeps no session table; a client that submits is sent to the leader

    def session_owner(self, session: str) -> int:
        return 0

    def status(self) -> protocol.Status:
        return protocol.Status(
            self.config.id,
            self.role,
            self.leader,
            0,
            0,
            self.published_seq,
            self.last_log_time_ns,
            os.getpid(),
            self.config.client_address,
            "",
            self.config.metrics_address,
        )

    def snapshot_list(self, sm_type: str):  # noqa: ANN201 - an awaitable of the frame to answer
        return self._snapshots_from_upstream(sm_type)

    async def _snapshots_from_upstream(self, sm_type: str) -> protocol.Frame:
        """The upstream's snapshot index for `sm_type`, less the snapshots whose chunks this relay
        does not hold yet, as of what it holds."""
        if self._snapshot_queries >= RELAY_SNAPSHOT_QUERIES_MAX:
            self.metrics.refused("busy")
            return protocol.Busy(0, BUSY_RETRY_AFTER_FULL_MS, "snapshot_queries")
        self._snapshot_queries += 1
        try:
            snapshots = await query_snapshots(
                self.config.upstream,
                sm_type,
                token=self.config.client_token,
                session=f"relay.{self.config.id}.query",
                tls=self.upstream_tls,
                timeout_s=RELAY_UPSTREAM_TIMEOUT_S,
                prefer=self.upstream_address,
            )
        except ConnectionError as exc:
            return protocol.Rejected(RejectReason.INTERNAL, f"relay {self.config.id}: no upstream answered: {exc}"[:200])
        finally:
            self._snapshot_queries -= 1
        held = self.publication.readable_seq
        first = self.journal.first_retained_seq
        listed = [info for info in snapshots if first <= info.first_seq and info.last_seq <= held]
        if listed:
            self._snapshot_floors.pop(sm_type, None)
            self._snapshot_floors[sm_type] = listed[0].first_seq  # the newest (listed first)
            while len(self._snapshot_floors) > RELAY_SNAPSHOT_TYPES_KEPT_MAX:
                del self._snapshot_floors[next(iter(self._snapshot_floors))]
        return protocol.SnapshotList(sm_type, listed, held)

    # --- following the upstream -------------------------------------------------------------

    def _store(self, records: list[bytes], first: int, last: int) -> None:
        """Records ``first..last`` from the upstream, as received: the first may be the one this
        relay holds last (asked again to compare), the rest are appended and served."""
        journal = self.journal
        if first <= journal.last_seq:
            assert first == journal.last_seq, f"upstream sent {first}, relay asked from {journal.last_seq}"
            own = journal.read_bytes(first, first)
            if records[0] != own:
                self.metrics.verify_failures["upstream_diverged"] += 1
                raise UpstreamDiverged(
                    f"upstream {self.upstream_address} holds a different record under seq {first} than this relay's journal "
                    f"({len(records[0])} bytes, {len(own)} here): it is another cluster, or a cluster that went back and "
                    "sequenced other messages. Nothing of it was stored or served. Point the relay at its own cluster, "
                    f"or remove {self.config.journal_dir} to follow this one from the start"
                )
            records = records[1:]
            first += 1
            if first > last:
                return
        try:
            journal.append(b"".join(records), first, last)
        except JournalRecordError as exc:
            self.metrics.verify_failures["catchup"] += 1
            raise CatchUpError(f"records {first}..{last} from the upstream fail verification: {exc}") from None
        self.last_log_time_ns = protocol.decode_delivered_body(memoryview(records[-1])[protocol.HEADER_BYTES :]).log_time_ns
        self.metrics.upstream_records += last - first + 1
        self.publication.wake()

    async def follow(self) -> None:
        """Follow the upstream endpoints, forever, preferring a follower (``_choose_upstream``);
        raises ``NodeCannotRun`` when one is this relay, refuses its token, or diverges from its
        journal."""
        delay = RELAY_RETRY_DELAY_MIN_S
        followed = -1  # index of the upstream followed last: the next choice starts after it
        while True:
            chosen = await self._choose_upstream(followed)
            if chosen is not None:
                followed, connection = chosen
                try:
                    if await self._follow_one(connection):
                        delay = RELAY_RETRY_DELAY_MIN_S
                        continue
                finally:
                    connection.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RELAY_RETRY_DELAY_MAX_S)

    async def _choose_upstream(self, followed: int) -> tuple[int, Connection] | None:
        """Connect to the upstream endpoints in turn, from the one after `followed`, and return the
        first that welcomes the relay as a follower of a known leader (the leader sequences:
        subscribers' fan-out belongs on followers). Failing that, the best of the others: the
        leader, then a node that knows no leader. None when none answered."""
        upstream = self.config.upstream
        count = len(upstream)
        fallback: tuple[int, int] | None = None  # (rank, index)
        for step in range(count):
            index = (followed + 1 + step) % count
            connection = await self._connect(upstream[index])
            if connection is None:
                continue
            rank = upstream_rank(connection.welcome)
            if rank == 0 or (step == count - 1 and (fallback is None or rank <= fallback[0])):
                return index, connection
            connection.close()
            if fallback is None or rank < fallback[0]:
                fallback = (rank, index)
        if fallback is None:
            return None
        # The welcome said what it is; the link was closed while the others were asked.
        connection = await self._connect(upstream[fallback[1]])
        return None if connection is None else (fallback[1], connection)

    async def _connect(self, address: str) -> Connection | None:
        """A connection to the upstream at `address`, welcomed; None when it cannot be reached or
        refused for a reason another endpoint may not have. Raises ``NodeCannotRun`` for a refused
        token or a TLS mismatch."""
        try:
            return await open_connection(
                address,
                session=f"relay.{self.config.id}",
                token=self.config.client_token,
                timeout_s=RELAY_UPSTREAM_TIMEOUT_S,
                keep_raw=True,
                tls=self.upstream_tls,
            )
        except Rejected as exc:
            if exc.reason in FATAL_REASONS:
                raise NodeCannotRun(NodeExit.INVALID_CONFIG, f"upstream {address} refused the relay: {exc}") from None
            log.warning("upstream %s refused the relay: %s", address, exc)
        except TlsError as exc:
            raise NodeCannotRun(NodeExit.INVALID_CONFIG, f"upstream {address}: {exc} (the relay's [tls] ca_file)") from None
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.info("upstream %s unreachable: %s", address, exc or type(exc).__name__)
        return None

    async def _follow_one(self, connection: Connection) -> bool:
        """Copy the stream from one upstream until it stops. True when it delivered something."""
        welcome = connection.welcome
        if welcome.node_id == self.config.id:
            raise UpstreamDiverged(f"upstream {connection.address} is this relay itself (it welcomed us as {welcome.node_id})")
        self.upstream_address = connection.address
        if welcome.leader:
            self.leader = welcome.leader
        self.metrics.upstream_connects += 1
        journal = self.journal
        before = journal.last_seq
        # From the last record held (compared, not stored again), or the first.
        from_seq = before or max(journal.first_retained_seq, JOURNAL_START_SEQ)
        log.info("following %s (%s, %s) from seq %d", connection.address, welcome.node_id, welcome.role.value, from_seq)
        self._following = connection
        try:
            await copy_records(connection, from_seq, self._store, verify_failures=self.metrics.verify_failures)
        except PeerTruncated as exc:
            if before or exc.first_seq <= from_seq:
                log.error(
                    "upstream %s no longer holds seq %d (its retention removed the stream before seq %d): this relay cannot "
                    "follow it from its journal; remove %s to follow from there",
                    connection.address,
                    from_seq,
                    exc.first_seq,
                    self.config.journal_dir,
                )
                return False
            # An empty relay of a cluster whose retention removed the start: its journal starts there.
            log.warning("upstream %s starts at seq %d (retention): the relay's journal starts there", connection.address, exc.first_seq)
            journal.skip_to(exc.first_seq)
            journal.start_at(exc.first_seq)
            self.retention.state.first_retained_seq = exc.first_seq
            return True
        except (CatchUpError, OSError, TimeoutError) as exc:
            log.info("upstream %s stopped at seq %d: %s", connection.address, self.journal.last_seq, exc or type(exc).__name__)
        finally:
            self._following = None
        return self.journal.last_seq > before

    async def poll_upstream(self) -> None:
        """Ask the upstream being followed for its status every interval: the cluster's leader
        (where submits are sent) and the upstream's last number (the relay's lag)."""
        link: Connection | None = None
        leaderless = 0
        leading = 0
        behind = 0
        try:
            while True:
                await asyncio.sleep(RELAY_UPSTREAM_POLL_INTERVAL_S)
                address = self.upstream_address
                if not address:
                    continue
                try:
                    if link is None or link.address != address or link.closing:
                        if link is not None:
                            if link.address != address:
                                leaderless = leading = behind = 0  # counted of the upstream followed before
                            link.close()
                        link = None
                        link = await open_connection(
                            address,
                            session=f"relay.{self.config.id}.status",
                            token=self.config.client_token,
                            timeout_s=RELAY_UPSTREAM_TIMEOUT_S,
                            tls=self.upstream_tls,
                        )
                    status = await link.status(RELAY_UPSTREAM_TIMEOUT_S)
                except (OSError, ConnectionError, TimeoutError, Rejected):
                    if link is not None:
                        link.close()
                    link = None
                    continue
                self.upstream_last_seq = status.last_seq
                following = self._following
                followed = following is not None and following.address == address
                # The upstream followed became the leader: look for a follower again (when none
                # answers, ``_choose_upstream`` comes back to the leader, and this asks again).
                leading = leading + 1 if status.role is Role.LEADER and len(self.config.upstream) > 1 else 0
                if leading >= RELAY_UPSTREAM_LEADER_POLLS_MAX and followed:
                    log.info("upstream %s leads the cluster (%d polls); looking for a follower to follow", address, leading)
                    leading = 0
                    following.abort()
                # An upstream that holds fewer records than the relay cannot serve it; the relay
                # waits for its own last number there, silently but for this.
                behind = behind + 1 if status.last_seq < self.journal.last_seq else 0
                if behind >= RELAY_UPSTREAM_BEHIND_POLLS_MAX and followed:
                    log.warning(
                        "upstream %s holds up to seq %d, below this relay's %d, for %d polls: a node behind or one "
                        "that lost records, or another cluster, or a cluster that went back (the relay compares its "
                        "record %d once the upstream holds it, and stops if it differs); following another",
                        address,
                        status.last_seq,
                        self.journal.last_seq,
                        behind,
                        self.journal.last_seq,
                    )
                    behind = 0
                    following.abort()
                if status.leader:
                    self.leader = status.leader
                    leaderless = 0
                    continue
                # A node cut off from the cluster serves what it has and then nothing: leave it.
                leaderless += 1
                if leaderless >= RELAY_UPSTREAM_LEADERLESS_POLLS_MAX and followed:
                    log.warning("upstream %s knows no leader (%d polls); following another", address, leaderless)
                    leaderless = 0
                    following.abort()
        finally:
            if link is not None:
                link.close()

    # --- running ----------------------------------------------------------------------------

    def collector(self) -> RelayCollector:
        return RelayCollector(self.config.id, self.metrics, self)

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        try:
            check_archive_dir(config.retention)
        except NodeCannotRun:
            self.journal.close()
            raise
        self.gateway = Gateway(
            config,
            self,
            batcher=None,
            journal=self.journal,
            publication=self.publication,
            metrics=self.metrics,
            subscriber_lag_max_records=config.subscriber_lag_max_records,
        )
        try:
            await self.gateway.start()
        except OSError as exc:
            self.journal.close()
            raise AddressUnavailable("clients", "client_address", config.client_address, exc.strerror or str(exc)) from None
        metrics_server = None
        if config.metrics_address:
            metrics_server = MetricsServer(config.metrics_address, page_maker(self.collector()))
            try:
                await metrics_server.start()
            except OSError as exc:
                await self.gateway.stop()
                self.journal.close()
                raise AddressUnavailable("metrics", "metrics_address", config.metrics_address, exc.strerror or str(exc)) from None
        log.info(
            "relay %s up: clients %s, upstream %s, metrics %s, journal %s (seq %d..%d)",
            config.id,
            config.client_address + (" (TLS)" if config.tls.enabled else ""),
            ",".join(config.upstream),
            config.metrics_address or "off",
            config.journal_dir,
            self.journal.first_seq,
            self.journal.last_seq,
        )
        follower = asyncio.create_task(self.follow(), name="relay-follow")
        poller = asyncio.create_task(self.poll_upstream(), name="relay-poll")
        retention = asyncio.create_task(self.retention.run(), name="relay-retention")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait((stopping, follower), return_when=asyncio.FIRST_COMPLETED)
            if follower.done():
                follower.result()  # NodeCannotRun: pointed at itself, refused, diverged
        finally:
            for task in (follower, poller, retention, stopping):
                task.cancel()
            await asyncio.gather(follower, poller, retention, stopping, return_exceptions=True)
            await self.gateway.stop()
            if metrics_server is not None:
                await metrics_server.stop()
            self.journal.close()
            log.info("relay %s stopped at seq %d", config.id, self.journal.last_seq)


def upstream_rank(welcome: protocol.Welcome) -> int:
    """How much a relay wants to follow the upstream that welcomed it so, lowest first: 0 a
    follower (a node or a relay) of a known leader, 1 the leader, 2 one that knows no leader (cut
    off from the cluster, or electing: it serves what it has, then nothing)."""
    if welcome.role is Role.LEADER:
        return 1
    return 0 if welcome.leader else 2


def run_relay(config: RelayConfig, *, log_file: str = "") -> int:
    """Run a relay in the foreground until SIGTERM or SIGINT; its exit code (``NodeExit``)."""
    relay_filter = setup_logging(config.id, log_file=log_file)
    try:
        data_dir_lock = claim_data_dir(config.data_dir, (config.journal_dir,))
    except NodeCannotRun as exc:
        log.critical("%s", exc)
        return exc.code

    async def serve(stop: asyncio.Event) -> None:
        relay = Relay(config)
        relay_filter.node = relay
        await relay.run(stop)

    with data_dir_lock:
        return run_until_stopped(serve, log=log)
