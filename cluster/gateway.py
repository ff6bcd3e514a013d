"""The client gateway: one asyncio TCP port per node.

A connection starts with ``Hello`` (shared-secret token, compared in constant time, and the
protocol version). Then:

* ``Submit`` — on the leader, queued for the batcher and answered after commit (``Ack``,
  ``Rejected`` from the state machine, or ``OutcomeUnknown``); on a follower, ``NotLeader``
  with the leader's client address; over a limit, ``Busy`` with a retry hint.
* ``Subscribe(from_seq)`` — served by any node: replay from the journal, then live tail, up to
  what this node has applied. The journal is read only while the socket drains, so a slow
  subscriber holds at most the transport's write high-water mark plus two read blocks
  (``SUBSCRIBER_BLOCK_BYTES``); ``subscriber_buffer_bytes_max`` bounds the answers that pile up
  unread before the node stops reading a connection.
* ``SnapshotQuery(sm_type)`` — served by any node: ``SnapshotList``, the state-machine
  snapshots its machine indexes for that type (``sequencer.machine``, the snapshot index).
* Heartbeats both ways; a connection silent for ``idle_timeout_ms`` is closed. One whose
  writes are pending is not idle: its client sends its heartbeat after it reads, and it reads
  at its own pace; it is closed once silent for ``pending_writes_idle_timeout_ms`` (a
  relay's lag bound cuts a slow subscriber that falls too far behind before that).

Garbage (a framing error, a frame that is not for a node, a submit before hello) is answered
with ``Rejected`` and the connection is closed; the node carries on.

Sessions (``docs/sessions.md``): a hello for a session named ``@snap/…`` is refused
(``reserved_session``) unless it says it is a snapshot publisher. A hello with an ``owner``
fences its session: the connection's first submit carries a claim, and once that is applied the
session's connections on this node whose claims were applied earlier are told
``session_taken_over`` and closed (one on another node learns it from the machine's refusal of
its next submit). Reasons such a client
knows are sent only to clients with an owner; older ones get ``KNOWN_TO_OLD_CLIENTS``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING

from raftseq.clients.tls import TLS_CERTIFICATE_REQUIRED_DETAIL, TLS_REQUIRED_DETAIL
from raftseq.cluster import invariant, stage_probe, tls
from raftseq.cluster.batcher import CommitOutcome, PendingSubmit, held_bytes_most
from raftseq.cluster.credentials import Access
from raftseq.cluster.priority_reads import PriorityReads
from raftseq.cluster.quotas import LIMIT_CHECKS
from raftseq.cluster.retention import truncated_reply
from raftseq.cluster.config import (
    BUSY_RETRY_AFTER_FULL_MS,
    BUSY_RETRY_AFTER_IN_FLIGHT_MS,
    BUSY_RETRY_AFTER_LEADER_QUEUE_MS,
    BUSY_RETRY_AFTER_RAFT_LOG_BACKLOG_MS,
    GATEWAY_STOP_WAIT_S,
)
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import JournalCorruptError
from raftseq.sequencer.machine import EntryResult, Outcome
from raftseq.sequencer.protocol import RejectReason

if TYPE_CHECKING:
    from raftseq.cluster.batcher import Batcher
    from raftseq.cluster.config import NodeConfig
    from raftseq.cluster.credentials import Grant
    from raftseq.cluster.metrics import NodeMetrics
    from raftseq.cluster.node_reads import ClientFacingNode
    from raftseq.cluster.publication import Publication
    from raftseq.cluster.relay_config import RelayConfig
    from raftseq.sequencer.journal import Journal, JournalCursor

log = logging.getLogger("raftseq.gateway")

#: The detail of ``Rejected(AUTH_FAILED)`` to a hello without a token (a wrong one is "wrong token").
TOKEN_REQUIRED_DETAIL = "a token is required"

_encode = protocol.encode_frame

#: The digests of a SubmitBatch that carries none: 0 (not given) for every payload.
_NO_DIGESTS = (0,) * limits.SUBMIT_BATCH_ENTRIES_MAX
#: Acks one AckRange may say: a batch's worth.
_ACK_RUN_MAX = limits.BATCH_ENTRIES_MAX


class TakingStream(asyncio.StreamReader):
    """A connection's stream whose bytes, as the transport hands them over, its gateway may
    take at once (``take`` returns True) instead of buffering them and waking the connection's
    task, which reads them on the loop's next turn: a turn of a busy leader is hundreds of
    microseconds of Raft work (send -> ack p50 at 10k msg/s 2.09 -> 1.47 ms; the leader's CPU
    per message -10 to -13%: no task switch and no stream buffer copy per read)."""

    take: Callable[[bytes], bool] | None = None
    #: Bytes buffered and not yet read: while any are, nothing is taken (order).
    unread_bytes = 0

    def feed_data(self, data: bytes) -> None:
        take = self.take
        if take is not None and not self.unread_bytes and take(data):
            return
        self.unread_bytes += len(data)
        super().feed_data(data)

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self.unread_bytes -= len(data)
        return data


class Connection:
    __slots__ = (
        "gateway",
        "reader",
        "writer",
        "peer",
        "session",
        "owner",
        "claim_pending",
        "claim_applied",
        "in_flight",
        "in_flight_bytes",
        "subscription",
        "last_read",
        "read_ns",
        "reading",
        "last_write",
        "closed",
        "_out",
        "_flush_scheduled",
        "_run_client_seq",
        "_run_seq",
        "_run_count",
        "acked",
        "grant",
        "handshaking",
        "certificate_name",
        "probe_acks",
        "busy_from",
    )

    def __init__(self, gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.gateway = gateway
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.session = ""
        #: ``Hello.owner``: 0 for a client that predates fencing (it knows none of its reasons).
        self.owner = 0
        #: The next submit is the connection's first on this node: it claims the session.
        self.claim_pending = False
        #: Its claim was applied: it held the session (until a later claim took it over).
        self.claim_applied = False
        self.in_flight = 0
        #: Payload bytes of this connection's submits not yet answered.
        self.in_flight_bytes = 0
        self.subscription: asyncio.Task | None = None
        now = time.monotonic()
        self.last_read = now
        #: When the bytes being handled were read (``time.monotonic_ns``): the time every
        #: submit in them came in.
        self.read_ns = 0
        #: Its task waits for its next read (``reader.read``), nothing unread buffered.
        self.reading = False
        self.last_write = now
        self.closed = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # A run of acks with consecutive client_seq and seq, sent as one AckRange.
        self._run_client_seq = 0
        self._run_seq = 0
        self._run_count = 0
        #: ``sequenced`` as one object for the connection's life: the batcher answers runs of
        #: submits that share it at once (``PendingSubmit.acked``).
        self.acked = self.sequenced
        #: What its hello's token grants (``cluster.credentials``); None before the hello.
        self.grant: Grant | None = None
        #: The task upgrading it to TLS, while it does (nothing is written meanwhile), and the
        #: CN of its client certificate once it did (``cluster.tls``; "": none).
        self.handshaking: asyncio.Task | None = None
        self.certificate_name = ""
        #: Acks queued and not yet written, ``(first seq, count)``, while ``stage_probe`` records.
        self.probe_acks: list[tuple[int, int]] = []
        #: The client_seq last answered ``Busy`` and not yet sent again (0: none): what the
        #: client sent behind it is refused unanswered (``Gateway._submit``).
        self.busy_from = 0

    # --- writing --------------------------------------------------------------------------

    def send(self, frame: protocol.Frame) -> None:
        self.send_bytes(_encode(frame))

    def send_bytes(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop iteration goes out in one write."""
        if self.closed:
            return
        if self._run_count:
            self._close_run()
        self._out.append(data)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.gateway.flush_later(self)

    def ack(self, client_seq: int, seq: int, count: int = 1) -> None:
        """Queue acks of `count` submits (client_seq + i got seq + i); consecutive ones (both
        numbers rising by one) go out as one AckRange."""
        if stage_probe.recording and self.session.startswith(stage_probe.sessions):
            self.probe_acks.append((seq, count))
        run = self._run_count
        if run and client_seq == self._run_client_seq + run and seq == self._run_seq + run and run + count <= _ACK_RUN_MAX:
            self._run_count = run + count
            return
        assert count <= _ACK_RUN_MAX, f"{count} acks at once, more than a batch holds"
        if run:
            self._close_run()
        self._run_client_seq, self._run_seq, self._run_count = client_seq, seq, count
        self._schedule_flush()

    def _close_run(self) -> None:
        count = self._run_count
        self._run_count = 0
        if count == 1:
            self._out.append(_encode(protocol.Ack(self._run_client_seq, self._run_seq)))
        elif count > 1:
            self._out.append(_encode(protocol.AckRange(self._run_client_seq, self._run_seq, count)))

    def flush(self) -> None:
        """Write everything queued, in one write."""
        self._flush_scheduled = False
        if self._run_count:
            self._close_run()
        if self.closed or not self._out or self.handshaking is not None:
            self._out.clear()
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError):
            self.close()
            return
        self.last_write = time.monotonic()
        if self.probe_acks:
            written_ns = time.monotonic_ns()
            for first_seq, count in self.probe_acks:
                stage_probe.acks_written(first_seq, count, written_ns)
            self.probe_acks.clear()

    def rejected(self, reason: RejectReason, detail: str = "", client_seq: int = 0, expected_client_seq: int = 0) -> protocol.Rejected:
        """The ``Rejected`` frame for this client: a reason it knows (``KNOWN_TO_OLD_CLIENTS``
        for a client without an owner, with the reason itself in the detail)."""
        if not self.owner and reason in protocol.KNOWN_TO_OLD_CLIENTS:
            detail = f"{reason.value}: {detail}" if detail else reason.value
            reason = protocol.KNOWN_TO_OLD_CLIENTS[reason]
        return protocol.Rejected(reason, detail[: limits.DETAIL_CHARS_MAX], client_seq, expected_client_seq)

    def reject_and_close(self, reason: RejectReason, detail: str, client_seq: int = 0) -> None:
        self.gateway.metrics.refused(reason.value)
        self.send(self.rejected(reason, detail, client_seq))
        self.flush()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.subscription is not None:
            self.subscription.cancel()
        if self.handshaking is not None:
            self.handshaking.cancel()
        self.gateway.priority_reads.unwatch(self.writer.transport)
        try:
            self.writer.close()
        except RuntimeError:
            pass

    # --- replies from the batcher ---------------------------------------------------------

    def sequenced(self, first_client_seq: int, first_seq: int, count: int, payload_bytes: int) -> None:
        """`count` of this connection's submits were new, from the batcher: client_seq
        ``first_client_seq + i`` got ``first_seq + i`` (``reply`` for each, at once)."""
        self.in_flight -= count
        self.in_flight_bytes -= payload_bytes
        gateway = self.gateway
        if gateway.waiting_for_room:
            gateway.room_freed.set()
        if not self.closed:
            self.ack(first_client_seq, first_seq, count)
            self._flush_if_priority()

    def _flush_if_priority(self) -> None:
        """A priority credential's answers go out at once, from inside the Raft tick that
        committed them, not after the rest of the tick and the bulk acks queued before them."""
        grant = self.grant
        if grant is not None and grant.priority and not self.closed:
            self.flush()

    def reply(self, client_seq: int, outcome: object, payload_bytes: int) -> None:
        """The outcome of one of this connection's submits, from the batcher."""
        self.in_flight -= 1
        self.in_flight_bytes -= payload_bytes
        gateway = self.gateway
        if gateway.waiting_for_room:
            gateway.room_freed.set()
        if type(outcome) is int:  # sequenced
            if not self.closed:
                self.ack(client_seq, outcome)
        else:
            self._answer(client_seq, outcome)
        self._flush_if_priority()

    def _answer(self, client_seq: int, outcome: object) -> None:
        """The outcome of one of this connection's submits that is not a bare sequence number."""
        metrics = self.gateway.metrics
        if isinstance(outcome, EntryResult):
            if outcome.outcome is Outcome.SEQUENCED:
                if not self.closed:
                    self.ack(outcome.client_seq, outcome.seq)
            elif outcome.outcome is Outcome.DUPLICATE:
                metrics.duplicates += 1
                self.send_bytes(_encode(protocol.Ack(outcome.client_seq, outcome.seq, True)))
            elif outcome.reason is RejectReason.SESSION_TAKEN_OVER:
                self.reject_and_close(outcome.reason, "another client took the session over", outcome.client_seq)
            else:
                metrics.refused(outcome.reason.value)
                self.send(self.rejected(outcome.reason, "", outcome.client_seq, outcome.expected_client_seq))
        else:
            assert isinstance(outcome, CommitOutcome), f"unexpected outcome {outcome!r}"
            metrics.refused("outcome_unknown")
            self.send(protocol.OutcomeUnknown(client_seq, outcome.error[: limits.DETAIL_CHARS_MAX]))


class Gateway:
    """A node's client port, and a relay's (``cluster.relay``): a relay has no batcher (it is
    never leader: submits are answered ``NotLeader`` with the cluster's leader), answers
    snapshot queries from its upstream (``snapshot_list`` returns an awaitable), and disconnects
    subscribers that fall more than ``subscriber_lag_max_records`` behind (0: never)."""

    def __init__(
        self,
        config: NodeConfig | RelayConfig,
        node: ClientFacingNode,
        *,
        batcher: Batcher | None,
        journal: Journal,
        publication: Publication,
        metrics: NodeMetrics,
        subscriber_lag_max_records: int = 0,
    ) -> None:
        self.node = node
        self.node_config = config
        self.config = config.gateway
        self.batcher = batcher
        self.journal = journal
        self.publication = publication
        self.metrics = metrics
        self.subscriber_lag_max_records = subscriber_lag_max_records
        #: Answers on their way (a relay's snapshot queries, asked of its upstream).
        self._answering: set[asyncio.Task] = set()
        self.connections: set[Connection] = set()
        #: The connections of ``connections`` still waiting for their hello, oldest first,
        #: and those whose hello was welcomed (``connections_max``).
        self.awaiting_hello: dict[Connection, None] = {}
        self.welcomed: set[Connection] = set()
        #: Connections not read while their submits (or the node's) hold their byte bound,
        #: and the event an answered submit sets to wake them (``_wait_for_room``).
        self.waiting_for_room = 0
        self.room_freed = asyncio.Event()
        self.subscribers = 0
        self._server: asyncio.base_events.Server | None = None
        self._ticker: asyncio.Task | None = None
        self.access = Access(config, metrics.credential_refusals)
        #: TLS on the port (``cluster.tls``; None: plaintext), and the task following its files.
        self.tls = tls.server_tls(config.tls)
        self._tls_watch: asyncio.Task | None = None
        self._credentials_watch: asyncio.Task | None = None
        #: Operator requests under way (a leadership transfer), kept until they finish.
        self._admin_tasks: set[asyncio.Task] = set()
        #: ``Drain`` was asked: no new subscriptions (``raftseq node drain``).
        self.draining = False
        #: Since when (``time.monotonic``) the node has been listening again after its own loop
        #: was not run for a heartbeat interval or more (``_loop_was_late``): silence counts
        #: from then, not from what its clients sent while it could not read.
        self.listening_since = float("-inf")
        #: Connections with bytes queued to write (``flush_later``; one entry per connection
        #: and flush), and whether a write of them on the loop's next turn is scheduled.
        self._unflushed: list[Connection] = []
        self._flush_soon = False
        #: The sockets of priority connections, read between the loop's handles: before each
        #: Raft tick (the node), each bulk read (``_take_now``, ``_read_frames``) and each write
        #: of queued acks (``flush_queued``).
        self.priority_reads = PriorityReads()

    # --- writing what connections queued -----------------------------------------------

    def flush_later(self, conn: Connection) -> None:
        """Write what `conn` queued by the loop's next turn (``flush_queued``)."""
        self._unflushed.append(conn)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_on_next_turn)

    def _flush_on_next_turn(self) -> None:
        self._flush_soon = False
        self.flush_queued()

    def flush_queued(self) -> None:
        """Write what every connection queued, each in one write: on the loop's next turn,
        and on a leader right after a Raft tick applied committed batches (``after_applying``),
        before that tick sends its AppendEntries: the acks no longer wait behind the round."""
        self.priority_reads.take()
        unflushed = self._unflushed
        if not unflushed:
            return
        self._unflushed = []
        for conn in unflushed:
            conn.flush()

    async def start(self) -> None:
        host, port = self.node_config.client_address.rsplit(":", 1)
        self._server = await tls.start_server(
            self._serve, host, int(port), limit=limits.SOCKET_READ_BYTES, backlog=limits.LISTEN_BACKLOG, tls=self.tls, reader=TakingStream
        )
        if self.tls is not None:
            self._tls_watch = asyncio.create_task(self.tls.watch(), name="gateway-tls")
        self._ticker = asyncio.create_task(self._tick(), name="gateway-heartbeats")
        self._credentials_watch = asyncio.create_task(self.access.watch(self._credentials_changed), name="gateway-credentials")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in (self._ticker, self._credentials_watch, self._tls_watch):
            if task is not None:
                task.cancel()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), GATEWAY_STOP_WAIT_S)
            except TimeoutError:
                pass

    async def _tick(self) -> None:
        interval = self.config.heartbeat_interval_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval / 2
            await asyncio.sleep(interval / 2)
            self._loop_was_late(loop.time() - due)
            if stage_probe.recording:
                stage_probe.write()
            now = time.monotonic()
            beat = None
            for conn in list(self.connections):
                if now > self._idle_at(conn):
                    log.info("closing %s (session %r): silent for %.1f s", conn.peer, conn.session, now - conn.last_read)
                    conn.close()
                elif now - conn.last_write >= interval and conn.session:
                    if beat is None:
                        beat = _encode(protocol.Heartbeat(self.node.published_seq))
                    conn.send_bytes(beat)

    def _idle_at(self, conn: Connection) -> float:
        """When `conn` counts as idle (``time.monotonic``), as things stand: its idle timeout
        after it was last heard from, or, while writes to it are pending, the longer
        ``pending_writes_idle_timeout_ms``. Its client answers heartbeats after it reads, and it
        reads at its own pace: a subscriber behind a socket that drains slowly is not gone."""
        config = self.config
        pending = conn.writer.transport.get_write_buffer_size()
        heard = max(conn.last_read, self.listening_since)
        return heard + (config.pending_writes_idle_timeout_ms if pending else config.idle_timeout_ms) / 1000

    def _loop_was_late(self, late_s: float) -> None:
        """A timer of this loop ran `late_s` after it was due. A heartbeat interval or more
        late, the node itself was not running (descheduled, stopped, a long pause): what its
        clients sent meanwhile waits unread in their sockets, so their silence counts from now.
        (A node whose loop was not run for 3.4 s on a loaded machine closed every client as
        silent and lost them all.)"""
        interval = self.config.heartbeat_interval_ms / 1000
        if late_s >= interval:
            now = time.monotonic()
            if now - self.listening_since >= interval:
                log.info("this node's loop ran %.1f s late: its clients' silence counts from now", late_s)
            self.listening_since = now

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        self._admit(conn)
        framer = protocol.FrameReader("client")
        try:
            await self._run(conn, framer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except ssl.SSLError as exc:  # a TLS record no key made, an alert: the client's doing
            log.info("closing %s: TLS: %s", conn.peer, exc.reason or exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one connection must not take the node down
            log.exception("connection %s failed", conn.peer)
        finally:
            if isinstance(reader, TakingStream):
                reader.take = None
            conn.close()
            self.connections.discard(conn)
            self.awaiting_hello.pop(conn, None)
            self.welcomed.discard(conn)
            self._count_connections()
            if conn.grant is not None:
                conn.grant.disconnect(conn.session, conn.subscription is not None)

    # --- admission: connections waiting for their hello have their own, smaller table ------

    def _admit(self, conn: Connection) -> None:
        """Take a new connection in as one waiting for its hello. When those are at their
        limit, the oldest of them is pushed out: a flood of silent sockets can only push
        itself out, never hold the port against clients that say hello at once."""
        if len(self.awaiting_hello) >= self.config.preauth_connections_max:
            # Busy, not Rejected: a client whose hello was on its way connects again (a
            # refusal during the handshake is final for it).
            oldest = next(iter(self.awaiting_hello))
            del self.awaiting_hello[oldest]
            self._refuse_connection(oldest, "awaiting_hello")
        self.awaiting_hello[conn] = None
        self.connections.add(conn)
        self._count_connections()

    def _authenticated(self, conn: Connection) -> bool:
        """A connection's hello passed: move it to the authenticated table, or answer ``Busy``
        and close it when that table is full. True when it was taken in."""
        self.awaiting_hello.pop(conn, None)
        if len(self.welcomed) >= self.config.connections_max:
            self._refuse_connection(conn, "connections")
            return False
        self.welcomed.add(conn)
        self._count_connections()
        return True

    def _refuse_connection(self, conn: Connection, limit: str) -> None:
        self.metrics.refused("busy")
        conn.send(protocol.Busy(0, BUSY_RETRY_AFTER_FULL_MS, limit))
        conn.flush()
        conn.close()

    def _credentials_changed(self, grants: list[Grant]) -> None:
        """The credentials file changed the rights of `grants`: their connections that may no
        longer do what they do (revoked, outside the session prefixes, subscribed without the
        role) are refused and closed."""
        changed = set(grants)
        for conn in list(self.connections):
            grant = conn.grant
            if grant in changed and not conn.closed:
                self._watch_if_priority(conn)
                problem = grant.session_refusal(conn.session) or (conn.subscription is not None and grant.role_refusal(submit=False))
                if problem:
                    log.info("closing %s (session %r): %s", conn.peer, conn.session, problem)
                    conn.reject_and_close(RejectReason.AUTH_FAILED, problem)

    def _watch_if_priority(self, conn: Connection) -> None:
        """Read `conn` between the loop's handles while its credential has priority."""
        if conn.grant is not None and conn.grant.priority:
            self.priority_reads.watch(conn.writer.transport)
        else:
            self.priority_reads.unwatch(conn.writer.transport)

    def _count_connections(self) -> None:
        metrics = self.metrics
        metrics.clients_awaiting_hello = len(self.awaiting_hello)
        metrics.clients_connected = len(self.welcomed)

    async def _run(self, conn: Connection, framer: protocol.FrameReader) -> None:
        if self.tls is not None:
            try:
                if not await self._tls_handshake(conn):
                    return
            except TimeoutError:
                conn.reject_and_close(RejectReason.HELLO_REQUIRED, "no hello in time")
                return
        while True:
            try:
                # One deadline moved forward per read: asyncio.wait_for would wrap every read in a
                # task of its own, two loop iterations on each submit's way in.
                async with asyncio.timeout(None) as deadline:
                    await self._read_frames(conn, framer, deadline)
                return
            except TimeoutError:
                if not conn.session:
                    conn.reject_and_close(RejectReason.HELLO_REQUIRED, "no hello in time")
                    return
                self._loop_was_late(asyncio.get_running_loop().time() - deadline.when())
                now = time.monotonic()
                if now >= self._idle_at(conn):
                    log.info("closing %s (session %r): silent for %.1f s", conn.peer, conn.session, now - conn.last_read)
                    return
                # Its writes are pending (or were until lately): read on.

    async def _read_frames(self, conn: Connection, framer: protocol.FrameReader, deadline: asyncio.Timeout) -> None:
        reader = conn.reader
        if isinstance(reader, TakingStream):
            reader.take = functools.partial(self._take_now, conn, framer)
        loop = asyncio.get_running_loop()
        hello_deadline = loop.time() + self.config.hello_timeout_ms / 1000
        while not conn.closed:
            # Until it counts as idle (``_idle_at``: longer while writes to it are pending).
            deadline.reschedule(loop.time() + self._idle_at(conn) - time.monotonic() if conn.session else hello_deadline)
            conn.reading = True
            try:
                data = await reader.read(limits.SOCKET_READ_BYTES)
            finally:
                conn.reading = False
            if not data:
                return
            self.priority_reads.take(conn.writer.transport)
            conn.last_read = time.monotonic()
            conn.read_ns = time.monotonic_ns()
            for frame in framer.feed(data):
                if isinstance(frame, protocol.FrameError):
                    self._refuse_unreadable(conn, framer, frame, data)
                    return
                kind = type(frame)
                if conn.in_flight and (kind is protocol.Submit or kind is protocol.SubmitBatch):
                    # One read can complete several frames (and finish one framed earlier): the
                    # check before the read bounds the bytes read, not the submits framed. A
                    # submit past the bound waits for room here, as if it were not read yet,
                    # rather than being refused (the client would resend all behind it).
                    frame_bytes = len(frame.payload) if kind is protocol.Submit else sum(map(len, frame.payloads))
                    if self._submits_held_full(conn, frame_bytes):
                        deadline.reschedule(None)
                        await self._wait_for_room(conn, frame_bytes)
                        if conn.closed:
                            return
                        conn.read_ns = time.monotonic_ns()
                self._dispatch(conn, frame)
                if conn.closed:
                    return
            # Backpressure: stop reading while the answers to this client pile up unread.
            transport = conn.writer.transport
            if transport.get_write_buffer_size() > self.config.subscriber_buffer_bytes_max:
                await conn.writer.drain()
            if self._submits_held_full(conn):
                deadline.reschedule(None)
                await self._wait_for_room(conn)

    def _refuse_unreadable(self, conn: Connection, framer: protocol.FrameReader, frame: protocol.FrameError, data: bytes) -> None:
        """Close `conn` over bytes that are no frame, telling it why (a TLS handshake sent to a
        plaintext port, before any frame: that)."""
        if not conn.session and not framer.frames_read and tls.is_tls_hello(data):
            self._tls_refused(conn, tls.REFUSED_TLS_CLIENT, "a TLS handshake on a plaintext port")
        else:
            log.info("closing %s: %s", conn.peer, frame.detail)
        rejected = frame.as_rejected()
        conn.reject_and_close(rejected.reason, rejected.detail)

    def _take_now(self, conn: Connection, framer: protocol.FrameReader, data: bytes) -> bool:
        """Handle `data` as the transport hands it over (``TakingStream``), as ``_read_frames``
        would on the loop's next turn; False (the stream buffers it for the task) unless the
        task waits for it with nothing buffered, the hello is done, and nothing in it could have
        to wait (``_may_take_now``)."""
        # The bytes of a frame begun in earlier reads count too: this read may complete it.
        if not conn.reading or conn.closed or not conn.session or not self._may_take_now(conn, len(data) + framer.buffered_bytes):
            return False
        self.priority_reads.take(conn.writer.transport)  # a priority frame waiting goes first
        conn.last_read = time.monotonic()
        conn.read_ns = time.monotonic_ns()
        try:
            for frame in framer.feed(data):
                if isinstance(frame, protocol.FrameError):
                    self._refuse_unreadable(conn, framer, frame, data)
                    return True
                self._dispatch(conn, frame)
                if conn.closed:
                    return True
        except ConnectionError:
            conn.close()
        except Exception:  # noqa: BLE001 - one connection must not take the node down
            log.exception("connection %s failed", conn.peer)
            conn.close()
        return True

    def _may_take_now(self, conn: Connection, nbytes: int) -> bool:
        """Whether a read of `nbytes` may be handled whatever frames it holds: answers to the
        client are not piling up, and none of its submits could pass a byte bound (they would
        have to wait for room, ``_submits_held_full``, which only the task can)."""
        if conn.writer.transport.get_write_buffer_size() > self.config.subscriber_buffer_bytes_max:
            return False
        batcher = self.batcher
        if batcher is None:
            return True
        if conn.in_flight_bytes + nbytes > self.config.in_flight_bytes_per_connection_max:
            return False
        return batcher.has_room(held_bytes_most(nbytes, conn.session), priority=conn.grant is not None and conn.grant.priority)

    async def _tls_handshake(self, conn: Connection) -> bool:
        """Upgrade `conn` to TLS within the hello timeout, counted as waiting for its hello
        meanwhile (``cluster.tls``). False when it did not: refused (logged, counted, a
        plaintext client told so) or closed (it left, or was pushed out of the table)."""
        conn.handshaking = asyncio.current_task()
        try:
            refusal, detail = await self.tls.handshake(conn.writer, self.config.hello_timeout_ms / 1000)
        except asyncio.CancelledError:
            if not conn.closed:
                raise
            asyncio.current_task().uncancel()  # its own close cancelled it: nothing left to do
            return False
        finally:
            conn.handshaking = None
        if not refusal:
            conn.certificate_name = tls.certificate_name(conn.writer)
            return True
        if refusal != "closed":
            self._tls_refused(conn, refusal, detail)
        if refusal == tls.REFUSED_PLAINTEXT:
            conn.reject_and_close(RejectReason.AUTH_FAILED, f"{TLS_REQUIRED_DETAIL}: connect with TLS (clients.tls)")
        elif refusal == tls.REFUSED_NO_CERTIFICATE:
            conn.reject_and_close(RejectReason.AUTH_FAILED, f"{TLS_CERTIFICATE_REQUIRED_DETAIL}: give the client cert_file and key_file")
        return False

    def _tls_refused(self, conn: Connection, refusal: str, detail: str) -> None:
        log.warning("TLS: %s from %s: %s", refusal, conn.peer, detail)
        self.metrics.tls_refusals[refusal] += 1

    # --- byte bounds: a connection whose submits hold their bytes is not read ------------------

    def _submits_held_full(self, conn: Connection, frame_bytes: int = limits.FRAME_BYTES_MAX) -> bool:
        """Whether `conn` has submits in flight and `frame_bytes` more of them (by default: one
        more frame, before it is read) could pass its byte bound or the node's
        (``in_flight_bytes_per_connection_max``, ``batcher.held_bytes_max``). A connection with
        nothing in flight is always read (hello, status, subscribe; a submit then gets ``Busy``
        if the node is full)."""
        batcher = self.batcher
        if not conn.in_flight or batcher is None:
            return False
        return conn.in_flight_bytes + frame_bytes > self.config.in_flight_bytes_per_connection_max or not batcher.has_room(
            frame_bytes, priority=conn.grant is not None and conn.grant.priority
        )

    async def _wait_for_room(self, conn: Connection, frame_bytes: int = limits.FRAME_BYTES_MAX) -> None:
        """Read nothing more from `conn` until answered submits make room: its submits wait
        in its own socket and the client's memory, not in this node's, and the node spends
        no time refusing them. Every answer wakes the waiting connections; the wait ends at
        the latest when the batcher's commit timeout answers what is held. The connection
        counts as heard from meanwhile (it cannot be heard while it is not read)."""
        interval_s = self.config.heartbeat_interval_ms / 1000
        self.waiting_for_room += 1
        try:
            while not conn.closed and self._submits_held_full(conn, frame_bytes):
                self.room_freed.clear()
                try:
                    async with asyncio.timeout(interval_s):  # wait_for (3.11) could lose a cancel
                        await self.room_freed.wait()
                except TimeoutError:
                    pass
                conn.last_read = time.monotonic()
        finally:
            self.waiting_for_room -= 1

    def _dispatch(self, conn: Connection, frame: object) -> None:
        kind = type(frame)
        if kind is protocol.Submit or kind is protocol.SubmitBatch:
            if not conn.session:
                conn.reject_and_close(RejectReason.HELLO_REQUIRED, "submit before hello")
                return
            if kind is protocol.Submit:
                self._submit(conn, frame.client_seq, (frame.payload,), (frame.digest,))
            elif frame.digests and len(frame.digests) != len(frame.payloads):
                conn.reject_and_close(RejectReason.BAD_FRAME, f"{len(frame.digests)} digests for {len(frame.payloads)} payloads")
            elif frame.first_client_seq + len(frame.payloads) - 1 > protocol.CLIENT_SEQ_MAX:
                # Numbered past the last client_seq: no node could decode a batch holding it.
                conn.reject_and_close(RejectReason.BAD_FRAME, f"client_seq above {protocol.CLIENT_SEQ_MAX}")
            else:
                self._submit(conn, frame.first_client_seq, frame.payloads, frame.digests or _NO_DIGESTS)
        elif kind is protocol.Hello:
            self._hello(conn, frame)
        elif kind is protocol.Heartbeat:
            pass
        elif not conn.session:
            conn.reject_and_close(RejectReason.HELLO_REQUIRED, f"{kind.__name__} before hello")
        elif kind is protocol.Subscribe:
            self._subscribe(conn, frame)
        elif kind is protocol.StatusRequest:
            conn.send(self.node.status())
        elif kind is protocol.SnapshotQuery:
            self._snapshot_query(conn, frame)
        elif kind is protocol.MemberRequest:
            self.node.member_request(frame, conn.send)
        elif kind is protocol.LeaderTransfer:
            self._leader_transfer(conn, frame)
        elif kind is protocol.Drain:
            self._drain(conn)

    def _leader_transfer(self, conn: Connection, request: protocol.LeaderTransfer) -> None:
        """Hand leadership over (``cluster.handover``); the answer comes when it is done."""

        async def transfer() -> None:
            answer = await self.node.transfer_leadership(request.to)
            if not conn.closed:
                conn.send(answer)

        self._admin_task(transfer(), "leader-transfer")

    def _drain(self, conn: Connection) -> None:
        """Take no more clients: refuse subscriptions from now on and close the subscribers
        (they resume on another node); if this node leads, hand leadership over (submits are
        then answered ``NotLeader``). Answers ``Drained``."""
        self.draining = True
        for other in list(self.connections):
            if other.subscription is not None:
                other.reject_and_close(RejectReason.SHUTTING_DOWN, "node draining: resume on another node")

        async def drain() -> None:
            if self.node.is_leader():
                moved = await self.node.transfer_leadership("")
                if not moved.ok:
                    self.draining = False
                    answer = protocol.Drained(False, moved.leader, f"leadership not handed over: {moved.detail}")
                else:
                    answer = protocol.Drained(True, moved.leader, "")
            else:
                answer = protocol.Drained(True, self.node.leader_client_address(), "")
            log.warning("draining: %s", "done" if answer.ok else answer.detail)
            if not conn.closed:
                conn.send(answer)

        self._admin_task(drain(), "drain")

    def _admin_task(self, work: Coroutine, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._admin_tasks.add(task)
        task.add_done_callback(self._admin_tasks.discard)

    def _snapshot_query(self, conn: Connection, query: protocol.SnapshotQuery) -> None:
        """The node's snapshot index for one state-machine type, as of what it has applied.
        Any node answers (the index is replicated state); the chunks it points to are read
        with an ordinary subscription. A relay's answer comes from its upstream (an awaitable
        of the frame to send)."""
        answer = self.node.snapshot_list(query.sm_type)
        if isinstance(answer, protocol.SnapshotList):
            conn.send(answer)
        else:
            task = asyncio.create_task(self._send_when_answered(conn, answer), name="snapshot-query")
            self._answering.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self._answering.discard)

    async def _send_when_answered(self, conn: Connection, answer: Awaitable[protocol.Frame]) -> None:
        conn.send(await answer)

    def claim_reply(self, conn: Connection) -> Callable[[int, object, int], None]:
        """The reply of a connection's claiming submit: once it is applied and the session is
        this connection's, the session's other fenced connections on this node are told."""

        def reply(client_seq: int, outcome: object, payload_bytes: int) -> None:
            conn.reply(client_seq, outcome, payload_bytes)
            if isinstance(outcome, CommitOutcome):
                conn.claim_pending = True  # perhaps never applied: the next submit claims again
                return
            if self.node.session_owner(conn.session) != conn.owner:
                return
            conn.claim_applied = True
            # The connections whose claims were applied before this one (claims are applied,
            # and their replies come, in log order); one whose claim is still on its way will
            # take the session back when it is applied.
            for other in list(self.connections):
                if other.session == conn.session and other.claim_applied and other.owner != conn.owner and not other.closed:
                    log.info("session %r taken over by %s from %s", conn.session, conn.peer, other.peer)
                    other.reject_and_close(RejectReason.SESSION_TAKEN_OVER, f"taken over by a newer connection from {conn.peer}")

        return reply

    def _hello(self, conn: Connection, hello: protocol.Hello) -> None:
        if conn.session:
            conn.reject_and_close(RejectReason.BAD_FRAME, "second hello on one connection")
            return
        if hello.protocol_version != protocol.PROTOCOL_VERSION:
            conn.reject_and_close(
                RejectReason.PROTOCOL_VERSION,
                f"this node speaks protocol {protocol.PROTOCOL_VERSION}, the client {hello.protocol_version}",
            )
            return
        grant = self.access.authenticate(hello.token, conn.certificate_name)
        if grant is None:
            self._refuse_connection(conn, LIMIT_CHECKS)
            return
        problem = grant if isinstance(grant, str) else grant.session_refusal(hello.session)
        if isinstance(grant, str) or problem:
            # One reason for every case, so that clients of every version see a refusal; the
            # detail (and the log) says which: no token at all, one that is not ours, a
            # credential revoked or outside its session prefixes (``cluster.credentials``).
            problem = problem or TOKEN_REQUIRED_DETAIL
            log.warning("authentication failed from %s (session %r): %s", conn.peer, hello.session, problem)
            conn.reject_and_close(RejectReason.AUTH_FAILED, problem)
            return
        conn.owner = hello.owner
        if hello.session.startswith(protocol.SNAPSHOT_SESSION_PREFIX) and not hello.snapshot_publisher:
            conn.reject_and_close(
                RejectReason.RESERVED_SESSION,
                f"sessions named {protocol.SNAPSHOT_SESSION_PREFIX}... are for state-machine snapshot publishers",
            )
            return
        if not self._authenticated(conn):
            return
        limit = grant.connect(hello.session)
        if limit:
            self._refuse_connection(conn, limit)
            return
        conn.grant = grant
        conn.session = hello.session
        self._watch_if_priority(conn)
        conn.claim_pending = bool(hello.owner)
        node = self.node
        conn.send(
            protocol.Welcome(
                self.node_config.id,
                protocol.PROTOCOL_VERSION,
                node.role,
                node.leader_client_address(),
                node.last_client_seq(hello.session),
                self.config.heartbeat_interval_ms,
                self.node_config.machine.dedup_window,
            )
        )

    def _submit(self, conn: Connection, first_client_seq: int, payloads: tuple | list, digests: Sequence[int]) -> None:
        """Submits ``first_client_seq + i`` of ``payloads[i]`` (with the client's digest
        ``digests[i]``, 0: none), each answered on its own."""
        node = self.node
        metrics = self.metrics
        grant = conn.grant
        assert grant is not None, "a submit on a connection without a hello"
        if grant.checked:
            refusal = grant.role_refusal(submit=True)
            if refusal:
                conn.reject_and_close(RejectReason.AUTH_FAILED, refusal)
                return
        batcher = self.batcher
        if batcher is None or not node.is_leader():
            leader = node.leader_client_address()
            for i in range(len(payloads)):
                metrics.refused("not_leader")
                conn.send(protocol.NotLeader(leader, first_client_seq + i))
            return
        if conn.busy_from:
            if first_client_seq > conn.busy_from:
                # Sent before the client heard of its Busy, and sent again by it after the
                # refused one (nothing can be sequenced before it). Taken now, they only reached
                # Raft to be refused there (sequence gap), and answered one by one, each answer
                # made the client send its whole window again: a bulk credential over its quota
                # fell from 100k to 7k msg/s, at 114 us of leader CPU per message.
                metrics.refused("busy", len(payloads))
                return
            conn.busy_from = 0
        admitted, quota_retry_ms, quota = len(payloads), 0, ""
        if grant.checked:
            admitted, quota_retry_ms, quota = grant.admit(payloads, time.monotonic())
        limit = None
        if node.disk_low:
            limit = ("disk_free", BUSY_RETRY_AFTER_FULL_MS)
        elif node.raft_log_backlogged():
            # The Raft log's writer is behind its bound (a stalled disk): nothing new is taken
            # until it catches up, so that the loop never waits for it and memory stays bounded.
            limit = ("raft_log_backlog", BUSY_RETRY_AFTER_RAFT_LOG_BACKLOG_MS)
            metrics.busy_raft_log_backlog += len(payloads)
        session = conn.session
        reply = conn.reply
        acked = conn.acked
        owner = conn.owner
        read_ns = conn.read_ns
        in_flight_max = self.config.in_flight_per_session_max
        in_flight_bytes_max = self.config.in_flight_bytes_per_connection_max
        priority = grant.priority
        if (
            len(payloads) > 1
            and limit is None
            and admitted == len(payloads)
            and not conn.claim_pending
            and conn.in_flight + len(payloads) <= in_flight_max
            and conn.in_flight_bytes + (payload_bytes := sum(map(len, payloads))) <= in_flight_bytes_max
        ):
            # Every submit is within the connection's bounds: if the batcher takes them all,
            # each would have been taken one by one too (the loop below is for the rest).
            submits = [
                PendingSubmit(session, first_client_seq + i, payload, reply, owner, False, digests[i], read_ns, acked)
                for i, payload in enumerate(payloads)
            ]
            if batcher.offer_all(submits, priority=priority):
                conn.in_flight += len(submits)
                conn.in_flight_bytes += payload_bytes
                batcher.flush()
                return
        for i, payload in enumerate(payloads):
            client_seq = first_client_seq + i
            if limit is None and i >= admitted:
                limit = (quota, quota_retry_ms)
            if limit is None and conn.in_flight >= in_flight_max:
                limit = ("in_flight_per_session", BUSY_RETRY_AFTER_IN_FLIGHT_MS)
            if limit is None and conn.in_flight_bytes + len(payload) > in_flight_bytes_max:
                limit = ("in_flight_bytes_per_connection", BUSY_RETRY_AFTER_IN_FLIGHT_MS)
            if conn.claim_pending and limit is None:
                submit = PendingSubmit(session, client_seq, payload, self.claim_reply(conn), owner, True, digests[i], read_ns)
                if not batcher.offer(submit, propose=False, priority=priority):
                    limit = ("leader_queue", BUSY_RETRY_AFTER_LEADER_QUEUE_MS)
                else:
                    conn.claim_pending = False
            elif limit is None and not batcher.offer(
                PendingSubmit(session, client_seq, payload, reply, owner, False, digests[i], read_ns, acked),
                propose=False,
                priority=priority,
            ):
                limit = ("leader_queue", BUSY_RETRY_AFTER_LEADER_QUEUE_MS)
            if limit is not None:
                # Everything after the first refusal is refused too: a session's submits are
                # sequenced in client_seq order, so the client sends this one and everything
                # after it again. Only this one is answered (``busy_from``).
                metrics.refused("busy")
                if not conn.busy_from:
                    conn.busy_from = client_seq
                    conn.send(protocol.Busy(client_seq, limit[1], limit[0]))
                continue
            conn.in_flight += 1
            conn.in_flight_bytes += len(payload)
        batcher.flush()

    def _subscribe(self, conn: Connection, subscribe: protocol.Subscribe) -> None:
        node = self.node
        metrics = self.metrics
        if conn.subscription is not None:
            conn.reject_and_close(RejectReason.BAD_FRAME, "one subscription per connection")
            return
        assert conn.grant is not None, "a subscribe on a connection without a hello"
        refusal = conn.grant.role_refusal(submit=False)
        if refusal:
            conn.reject_and_close(RejectReason.AUTH_FAILED, refusal)
            return
        if self.draining:
            conn.reject_and_close(RejectReason.SHUTTING_DOWN, "node draining: subscribe to another node")
            return
        if self.subscribers >= self.config.subscribers_max:
            metrics.refused("busy")
            conn.send(protocol.Busy(0, BUSY_RETRY_AFTER_FULL_MS, "subscribers"))
            return
        first = self.journal.first_seq or 1
        end = node.published_seq
        damage = self.journal.damage.covering(subscribe.from_seq)
        if damage is not None:
            self._refuse_damaged(conn, subscribe.from_seq, damage.first_seq, damage.last_seq)
            return
        if self.journal.has_hole_within(subscribe.from_seq, subscribe.from_seq):
            # Missing here (catch-up fetches it): another node serves it now, and a peer's
            # catch-up learns that this node lacks it too.
            metrics.refused(RejectReason.FROM_SEQ_UNAVAILABLE.value)
            conn.reject_and_close(
                RejectReason.FROM_SEQ_UNAVAILABLE,
                f"seq {subscribe.from_seq} is missing on this node (being fetched); read it from another node",
            )
            return
        if subscribe.from_seq < self.journal.first_retained_seq:
            metrics.refused(RejectReason.FROM_SEQ_UNAVAILABLE.value)
            conn.send(truncated_reply(subscribe, self.journal.first_retained_seq))
            return
        if subscribe.from_seq < first or subscribe.from_seq > end + 1:
            metrics.refused(RejectReason.FROM_SEQ_UNAVAILABLE.value)
            conn.send(
                protocol.Rejected(
                    RejectReason.FROM_SEQ_UNAVAILABLE,
                    f"this node serves {first}..{end + 1} (from_seq {subscribe.from_seq})",
                )
            )
            return
        limit = conn.grant.subscribe()
        if limit:
            metrics.refused("busy")
            conn.send(protocol.Busy(0, BUSY_RETRY_AFTER_FULL_MS, limit))
            return
        conn.subscription = asyncio.create_task(self._serve_subscription(conn, subscribe))

    async def _drained_within_lag(self, conn: Connection, cursor: JournalCursor, lag_max: int) -> bool:
        """Wait for `conn`'s socket to drain, checking every heartbeat interval that its
        subscription is no more than `lag_max` records behind the head. One that is gets
        ``Busy`` (limit ``subscriber_lag``) and is closed: it resumes from its next number, and
        a client that stopped reading holds nothing here but its socket buffer meanwhile. False
        when it was disconnected."""
        interval_s = self.config.heartbeat_interval_ms / 1000
        while True:
            behind = self.publication.readable_seq - (cursor.next_seq - 1)
            if behind > lag_max:
                log.info("disconnecting subscriber %s (session %r): %d records behind (bound %d)", conn.peer, conn.session, behind, lag_max)
                self.metrics.subscriber_lag_disconnects += 1
                self.metrics.refused("busy")
                conn.send(protocol.Busy(0, BUSY_RETRY_AFTER_IN_FLIGHT_MS, "subscriber_lag"))
                conn.flush()
                conn.close()
                # What it has not read is dropped, not held until it reads (it may never).
                conn.writer.transport.abort()
                return False
            try:
                async with asyncio.timeout(interval_s):  # wait_for (3.11) could lose a cancel
                    await conn.writer.drain()
                return True
            except TimeoutError:
                pass

    def _refuse_damaged(self, conn: Connection, seq: int, first_seq: int, last_seq: int) -> None:
        """Refuse a subscription at `seq`, damaged on this node: ``from_seq_unavailable``, which
        every client takes as "try another node"."""
        conn.reject_and_close(
            RejectReason.FROM_SEQ_UNAVAILABLE,
            f"seq {seq} is damaged on this node (seq {first_seq}..{last_seq}, being repaired); read it from another node",
        )

    async def _serve_subscription(self, conn: Connection, subscribe: protocol.Subscribe) -> None:
        from_seq = subscribe.from_seq
        metrics = self.metrics
        publication = self.publication
        self.subscribers += 1
        metrics.subscribers = self.subscribers
        writer = conn.writer
        cursor = self.journal.cursor(from_seq)
        metrics.subscriber_cursors.add(cursor)
        journal = self.journal
        lag_max = self.subscriber_lag_max_records
        #: The subscription was within the lag bound once: from then on, falling behind by
        #: more is lagging (a late joiner replaying a longer backlog is not, until it catches up).
        live = False
        try:
            while not conn.closed:
                if cursor.next_seq < journal.first_retained_seq:
                    # Retention removed what this subscriber reads next (it fell that far behind).
                    conn.send(truncated_reply(protocol.Subscribe(cursor.next_seq, subscribe.truncated_known), journal.first_retained_seq))
                    conn.flush()  # before the connection closes below
                    return
                limit = publication.readable_seq
                if lag_max and not live:
                    live = limit - (cursor.next_seq - 1) <= lag_max
                if journal.damage:
                    damage = journal.damage.next_from(cursor.next_seq)
                    if damage is not None and damage.first_seq <= limit:
                        if damage.first_seq <= cursor.next_seq:
                            self._refuse_damaged(conn, cursor.next_seq, damage.first_seq, damage.last_seq)
                            return
                        limit = damage.first_seq - 1
                if cursor.next_seq <= limit:
                    count, block = cursor.read_block(limit, limits.SUBSCRIBER_BLOCK_BYTES)
                    if count:
                        conn.flush()  # keep frame order: anything queued goes first
                        writer.write(block)
                        conn.last_write = time.monotonic()
                        metrics.delivered += count
                        if lag_max and live:
                            if not await self._drained_within_lag(conn, cursor, lag_max):
                                return
                        else:
                            await writer.drain()
                        continue
                await publication.wait_readable(cursor.next_seq)
        except JournalCorruptError as exc:
            # Damage on disk is not a broken invariant: refuse this range (the client reads it
            # from another node) and let catch-up repair it from a peer.
            damage = journal.mark_damaged(exc.seq, exc.path, exc.offset, str(exc))
            if damage is not None:
                log.error("journal damaged, found by a read: %s; refusing it until repaired from a peer", damage.describe())
            if journal.damage.covering(exc.seq) is None:
                invariant.fail_stop("journal read for a subscriber outside sealed segments: %s", exc)
            self._refuse_damaged(conn, exc.seq, exc.seq, exc.seq)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            metrics.subscriber_cursors.discard(cursor)
            cursor.close()
            self.subscribers -= 1
            metrics.subscribers = self.subscribers
            conn.close()
