"""The asyncio client: connect, find the leader, submit (pipelined), resubmit, subscribe, resume.

First use. A client connects when it is first needed: ``async with``, ``connect()``, or the
first ``submit``/``submit_batch``. ``submit_nowait``/``submit_batch_nowait`` cannot wait for a
connection, and a session's numbering is known only once a node welcomed it, so before the
first connection they raise ``NotConnected`` at once. ``close()`` is final: every call after
it raises ``ClientClosed`` at once and nothing reconnects.

Exactly once per session: every submit gets the session's next ``client_seq`` and keeps it for
life. Whatever happens to a connection — leader killed, ``NotLeader``, ``Busy``,
``OutcomeUnknown`` — every submit not yet acknowledged is sent again, in ``client_seq`` order,
under the same number; the sequencer applies each ``(session, client_seq)`` at most once and
answers a retry of an applied submit with the number it already has. After a ``Busy`` of a
credential's rate quota it paces itself: as many as the node took of its last sending, once per
``retry_after_ms``, the rest held until then.

One client per session. Each client has a random ``owner`` id it sends in every hello: the
newest client to start submitting on a session takes it over (its first submit claims it, in
the cluster's log order), and an
older one still using it gets ``SessionTakenOver`` for every submit not yet acknowledged, and
stops (it does not reconnect: that would take the session back). A retry under a client_seq
the session used for another payload (two clients sharing a name) fails with
``SessionConflict``, never an acknowledgement.

Counting. A client counts what happens to it in plain integers on itself — ``reconnects``,
``resubmits``, ``failovers`` (with their durations in ``failover_durations``),
``submits_acked``, ``submits_outcome_unknown``, ``submits_rejected`` — cheap on the hot path
and readable at any time. Metrics are opt-in: give the client (and ``subscribe``) a
``metrics=`` sink, ``clients.metrics.ClientMetricsCollector``, which reads those counters at
scrape time. This module never imports a metrics library.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import secrets
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol

import msgspec

from raftseq.clients.connection import FATAL_REASONS, Connection, leader_named_by, open_connection
from raftseq.clients.endpoints import endpoint_addresses, endpoints_from_env, token_from_env
from raftseq.clients import errors
from raftseq.clients.errors import Busy, ClientClosed, NotConnected, OutcomeUnknown, Rejected, SequencerError, Truncated, rejection
from raftseq.clients.tls import ClientTls, TlsError, tls_from_env
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason, payload_digest, payload_digests

log = logging.getLogger("raftseq.client")


class Message(msgspec.Struct, frozen=True, gc=False):
    """One sequenced message, as a subscriber receives it. ``timestamp_ns`` is the log time:
    the leader's clock when it sequenced the batch holding this message."""

    seq: int
    timestamp_ns: int
    session: str
    client_seq: int
    payload: bytes


#: Upper bounds (seconds) of the buckets of ``SequencerClient.failover_durations``: from a quick
#: reconnect to the same leader up to a minute without one.
FAILOVER_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds before submits are sent again after a refusal (a gap, an unknown outcome), and at
#: most after a ``Busy``, which says how long to wait (``retry_after_ms``): a node that refuses
#: for a stalled disk says 500 ms, and resending sooner only has it refuse again.
RESEND_DELAY_S = 0.02
RESEND_DELAY_BUSY_MAX_S = 1.0
#: Paced by a credential's rate quota (``SequencerClient._quota_refused``), the client resends
#: as many submits as the node took of its last sending; a chunk the node took whole is followed
#: by one this fraction larger (and one more): the quota may have left room.
QUOTA_PACING_GROWTH = 0.25

#: A leader that acknowledged nothing for this long while submits wait is suspect: the client
#: asks the other endpoints who leads and moves at once to a leader one of them names (a
#: paused or cut-off leader is left in about an election, not after the whole
#: ``heartbeat_timeout_s`` or the leader's step-down). A slow leader the others still follow
#: keeps its clients. Healthy, a leader acknowledges within milliseconds.
LEADER_SUSPECT_SILENCE_S = 0.25
#: How often the silence is looked at, and how long one probe of a node may take (a paused
#: node accepts the TCP connection and never answers the hello).
LEADER_SILENCE_CHECK_S = 0.05
LEADER_PROBE_TIMEOUT_S = 0.25


class DurationHistogram:
    """Durations counted into fixed buckets, as plain integers (cheap to update, read by a
    metrics collector at scrape time). ``counts[i]`` holds the durations ``<= buckets[i]`` and
    above the bound before; the last count holds those above every bound."""

    __slots__ = ("buckets", "counts", "sum_s")

    def __init__(self, buckets: Sequence[float]) -> None:
        if not buckets or any(b >= c for b, c in zip(buckets, buckets[1:])):
            raise ValueError("buckets must be a non-empty, strictly increasing sequence")
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum_s += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


class ClientMetricsSink(Protocol):
    """What ``metrics=`` takes: ``clients.metrics.ClientMetricsCollector`` (or one of its
    ``labelled(...)`` views). A client attaches itself when created and detaches when closed;
    in between the sink reads the client's counters when it is scraped. A subscription reports
    each resume."""

    def attach(self, client: SequencerClient) -> None: ...

    def detach(self, client: SequencerClient) -> None: ...

    def subscription_resumed(self) -> None: ...


class _Group:
    """The submits of one ``submit_batch`` call: one future for all their numbers."""

    __slots__ = ("future", "results", "remaining")

    def __init__(self, future: asyncio.Future, size: int) -> None:
        self.future = future
        self.results = [0] * size
        self.remaining = size


class _Pending:
    __slots__ = ("client_seq", "payload", "digest", "future", "group", "index", "sent")

    def __init__(
        self, client_seq: int, payload: bytes, digest: int, future: asyncio.Future | None, group: _Group | None = None, index: int = 0
    ) -> None:
        self.client_seq = client_seq
        self.payload = payload
        #: ``payload_digest(payload)``, sent with the payload: the node keeps it to tell a retry
        #: from another payload under the same number (computed here, so that the nodes need not).
        self.digest = digest
        self.future = future
        self.group = group
        self.index = index
        self.sent = False

    def resolve(self, seq: int) -> None:
        group = self.group
        if group is None:
            if not self.future.done():
                self.future.set_result(seq)
            return
        group.results[self.index] = seq
        group.remaining -= 1
        if group.remaining == 0 and not group.future.done():
            group.future.set_result(group.results)

    def fail(self, error: BaseException) -> None:
        future = self.future if self.group is None else self.group.future
        if not future.done():
            future.set_exception(error)


#: Bytes of payload per SubmitBatch frame, leaving room for framing under FRAME_BYTES_MAX.
_SUBMIT_BATCH_BYTES = protocol.limits.FRAME_BYTES_MAX - protocol.limits.SUBMIT_BATCH_FRAMING_BYTES
#: What one payload adds to a SubmitBatch besides its bytes: its length prefix and its digest.
_SUBMIT_BATCH_ENTRY_BYTES = protocol.limits.SUBMIT_BATCH_ENTRY_OVERHEAD_BYTES


def _submit_frames(pendings: list[_Pending]) -> bytes:
    """Frames for `pendings` (consecutive client_seq): SubmitBatch runs, Submit for singles."""
    parts = []
    i = 0
    n = len(pendings)
    while i < n:
        first = pendings[i].client_seq
        payloads = [pendings[i].payload]
        digests = [pendings[i].digest]
        size = len(payloads[0])
        j = i + 1
        while (
            j < n
            and pendings[j].client_seq == first + (j - i)
            and j - i < protocol.limits.SUBMIT_BATCH_ENTRIES_MAX
            and size + len(pendings[j].payload) + _SUBMIT_BATCH_ENTRY_BYTES <= _SUBMIT_BATCH_BYTES
        ):
            payloads.append(pendings[j].payload)
            digests.append(pendings[j].digest)
            size += len(pendings[j].payload) + _SUBMIT_BATCH_ENTRY_BYTES
            j += 1
        if len(payloads) == 1:
            parts.append(protocol.encode_frame(protocol.Submit(first, payloads[0], digests[0])))
        else:
            parts.append(protocol.encode_frame(protocol.SubmitBatch(first, payloads, digests)))
        i = j
    return b"".join(parts)


class SequencerClient:
    """A client session of a raftseq cluster.

    ``endpoints`` are client addresses of any nodes, in any form ``clients.endpoints`` accepts
    (``"h1:7001,h2:7001"``, ``["h1:7001", "h2:7001"]``, ``[("h1", 7001), ("h2", 7001)]``); the
    leader is found from them. ``from_env`` takes them (and the token) from the environment.
    ``session`` names this client's submit stream: reusing it after a restart continues its
    numbering. Keyword options:

    * ``token`` — the cluster's client token ("" when authentication is off); a refused one
      raises ``TokenRequired`` (none given) or ``TokenRejected`` at once;
    * ``in_flight_max`` — submits sent and not yet acknowledged; ``submit_nowait`` raises
      ``Busy`` beyond it, ``submit`` waits for room. Lowered to the cluster's dedup window
      (``machine.dedup_window``, 4096 by default) when a node says it is smaller;
    * ``connect_timeout_s`` — per connection attempt;
    * ``reconnect_backoff_max_s`` — the longest pause between reconnect rounds;
    * ``outcome_deadline_s`` — ``submit`` raises ``OutcomeUnknown`` if no outcome arrives in
      this time (the submit stays queued and is still resubmitted);
    * ``heartbeat_timeout_s`` — a node silent this long is taken for dead;
    * ``snapshot_publisher`` — this client publishes state-machine snapshots (``clients.sm``):
      only such a client may use a session named ``@snap/…`` (else ``Rejected``,
      ``reserved_session``, at once);
    * ``metrics`` — an opt-in sink (``clients.metrics.ClientMetricsCollector``) that reads this
      client's counters at scrape time, until ``close``; its subscriptions report resumes to it;
    * ``tls`` — reach nodes whose client ports speak TLS: a ``clients.tls.TlsOptions``
      (``ca_file``, ``cert_file``/``key_file`` for mutual TLS, ``server_hostname``) or an
      ``ssl.SSLContext`` of the caller's; None (default): plaintext. A mismatch (plaintext to a
      TLS port or the reverse) or a refused certificate raises a ``clients.tls.TlsError`` at
      once (``TlsRequired``, ``TlsNotOffered``, ``TlsHandshakeFailed``). ``from_env`` takes
      it from ``$RAFTSEQ_TLS_CA``, ``$RAFTSEQ_TLS_CERT``, ``$RAFTSEQ_TLS_KEY``.

    Counters, plain integers any thread may read: ``reconnects`` (connections lost),
    ``resubmits`` (submits sent again under their client_seq), ``failovers`` (connected to a
    leader again after a loss; each one's duration, from noticing the loss, in
    ``failover_durations`` and the last in ``last_failover_s``), ``silent_leaders_left``
    (connections left because the other nodes named another leader while this one
    acknowledged nothing, ``LEADER_SUSPECT_SILENCE_S``), ``submits_acked``,
    ``submits_outcome_unknown`` (submits whose caller got ``OutcomeUnknown``) and
    ``submits_rejected`` (by ``RejectReason``).
    """

    def __init__(
        self,
        endpoints: str | Iterable[str | tuple[str, int]],
        *,
        session: str,
        token: str = "",
        in_flight_max: int = 10_000,
        connect_timeout_s: float = 2.0,
        reconnect_backoff_max_s: float = 0.1,
        outcome_deadline_s: float = 30.0,
        heartbeat_timeout_s: float = 2.0,
        snapshot_publisher: bool = False,
        metrics: ClientMetricsSink | None = None,
        tls: ClientTls = None,
    ) -> None:
        if in_flight_max < 1:
            raise ValueError("in_flight_max must be >= 1")
        #: This client instance's id in every hello (never 0: 0 is a client without one).
        self.owner = secrets.randbits(protocol.limits.OWNER_BITS) or 1
        self.snapshot_publisher = snapshot_publisher
        self.endpoints = endpoint_addresses(endpoints)
        self.session = session
        self.token = token
        self.tls = tls
        self.in_flight_max = in_flight_max
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_backoff_max_s = reconnect_backoff_max_s
        self.outcome_deadline_s = outcome_deadline_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._next_client_seq = 1
        self._last_acked = 0
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._link: Connection | None = None
        self._leader_hint = ""
        self._connected = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._resend_from: int | None = None
        self._resend_delay_s = RESEND_DELAY_S
        #: The first client_seq of what was last sent in order on this connection (a resend,
        #: or the first submits after connecting): a quota ``Busy`` for client_seq N says the
        #: node took N - this of them.
        self._sent_from = 1
        #: After a credential's rate quota refused a submit: submits resent per retry-after
        #: (``_quota_refused``; 0: not pacing, everything pending goes at once).
        self._paced_chunk = 0
        self._quota_busy_since_chunk = False
        #: ``loop.time()`` of the next resend while ``_wait_to_resend`` waits for it.
        self._resend_at = 0.0
        self._fatal: SequencerError | None = None
        # Counters for the caller (and metrics).
        self.reconnects = 0
        self.resubmits = 0
        self.failovers = 0
        self.last_failover_s = 0.0
        self.failover_durations = DurationHistogram(FAILOVER_BUCKETS_S)
        self.silent_leaders_left = 0
        self.submits_acked = 0
        self.submits_outcome_unknown = 0
        # Every reason present from the start: a reader on another thread iterates it safely.
        self.submits_rejected: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)
        self._metrics = metrics
        if metrics is not None:
            metrics.attach(self)

    @classmethod
    def from_env(cls, *, session: str, environ: Mapping[str, str] | None = None, **options: object) -> SequencerClient:
        """A client of the cluster in ``$RAFTSEQ_ENDPOINTS`` (else the local cluster's endpoints,
        ``clients.endpoints.DEFAULT_ENDPOINTS``) with the token in ``$RAFTSEQ_TOKEN`` (unless
        ``token=`` is given). `environ` replaces ``os.environ``; `options` are the constructor's.
        A malformed ``$RAFTSEQ_ENDPOINTS`` raises ``ValueError``."""
        options.setdefault("token", token_from_env(environ))
        options.setdefault("tls", tls_from_env(environ))
        return cls(endpoints_from_env(environ), session=session, **options)

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> SequencerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the leader (found from any endpoint); once connected, the client reconnects
        by itself and this waits for the connection. Raises ``NotConnected`` if no node answers
        within a few rounds (a later call tries again), ``TokenRequired``/``TokenRejected`` for
        the token and ``Rejected`` for the protocol version, ``ClientClosed`` after ``close``."""
        if self._closed:
            raise ClientClosed()
        if self._fatal is not None:
            raise self._fatal
        async with self._connect_lock:  # concurrent first calls share one connection
            if self._task is None:
                link = await self._find_leader(rounds=5)
                if self._closed:
                    link.close()
                    raise ClientClosed()
                self._adopt(link)
                self._task = asyncio.create_task(self._run(), name=f"raftseq-client-{self.session}")
                return
        await self._connected.wait()

    async def _connect_on_first_use(self) -> None:
        if self._task is None:
            await self.connect()

    def _check_usable(self) -> None:
        """Raise at once what a submit now would meet: closed, refused for good, never connected."""
        if self._closed:
            raise ClientClosed()
        if self._fatal is not None:
            raise self._fatal
        if self._task is None:
            raise NotConnected("not connected yet: await connect() (or submit(), which connects) before submit_nowait")

    async def close(self) -> None:
        """Stop, for good. Submits not yet acknowledged fail with ``ClientClosed`` (a
        ``NotConnected``), and so does every later call. Closing twice is harmless."""
        self._closed = True
        if self._link is not None:
            # First, so that a read in flight ends at once: on Python 3.11 wait_for can swallow
            # the task's cancellation when its read completes at the same moment, and the task
            # would then wait for the next frame or its heartbeat timeout.
            self._link.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._link is not None:
            self._link.close()
            self._link = None
        error = ClientClosed()
        for pending in self._pending.values():
            pending.fail(error)
            future = pending.future if pending.group is None else pending.group.future
            if future.done() and not future.cancelled():
                future.exception()  # mark retrieved: closing is not a crash
        self._pending.clear()
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.detach(self)

    @property
    def next_client_seq(self) -> int:
        return self._next_client_seq

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def connected(self) -> bool:
        """True while the client holds a connection to the leader."""
        return self._connected.is_set()

    # --- submitting -----------------------------------------------------------------------

    def submit_nowait(self, payload: bytes) -> asyncio.Future:
        """Queue `payload`; the returned future gives its sequence number once committed.
        Raises ``NotConnected`` before the first connection (``connect``), ``ClientClosed``
        after ``close``."""
        self._check_usable()
        if len(self._pending) >= self.in_flight_max:
            raise Busy(f"{len(self._pending)} submits in flight (in_flight_max {self.in_flight_max})")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes")
        payload = bytes(payload)
        if len(payload) > protocol.limits.PAYLOAD_BYTES_MAX:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {protocol.limits.PAYLOAD_BYTES_MAX}")
        client_seq = self._next_client_seq
        self._next_client_seq += 1
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(client_seq, payload, payload_digest(payload), future)
        self._pending[client_seq] = pending
        if len(self._pending) >= self.in_flight_max:
            self._room.clear()
        link = self._link
        if link is not None and self._resend_from is None and not link.writer.transport.is_closing():
            link.writer.write(protocol.encode_frame(protocol.Submit(client_seq, payload, pending.digest)))
            pending.sent = True
        return future

    def submit_batch_nowait(self, payloads: Sequence[bytes]) -> asyncio.Future:
        """Queue many payloads at once (sent as ``SubmitBatch`` frames); the returned future
        gives their sequence numbers, in order, once all are committed. Each payload is its
        own submit with its own client_seq: the same exactly-once rules apply to each. Raises
        ``NotConnected`` before the first connection, ``ClientClosed`` after ``close``."""
        self._check_usable()
        if not payloads:
            raise ValueError("no payloads")
        if len(self._pending) + len(payloads) > self.in_flight_max:
            raise Busy(f"{len(self._pending)} submits in flight, {len(payloads)} more exceed in_flight_max {self.in_flight_max}")
        limit = protocol.limits.PAYLOAD_BYTES_MAX
        for payload in payloads:
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise TypeError("payloads must be bytes")
            if len(payload) > limit:
                raise ValueError(f"payload of {len(payload)} bytes exceeds {limit}")
        future = asyncio.get_running_loop().create_future()
        group = _Group(future, len(payloads))
        first = self._next_client_seq
        self._next_client_seq += len(payloads)
        pending_map = self._pending
        batch = []
        payloads = [bytes(payload) for payload in payloads]
        for i, (payload, digest) in enumerate(zip(payloads, payload_digests(payloads))):
            pending = _Pending(first + i, payload, digest, None, group, i)
            pending_map[first + i] = pending
            batch.append(pending)
        if len(pending_map) >= self.in_flight_max:
            self._room.clear()
        link = self._link
        if link is not None and self._resend_from is None and not link.writer.transport.is_closing():
            link.writer.write(_submit_frames(batch))
            for pending in batch:
                pending.sent = True
        return future

    async def submit_batch(self, payloads: Sequence[bytes]) -> list[int]:
        """Sequence many payloads; returns their sequence numbers in order (connects first
        if the client never did)."""
        if len(payloads) > self.in_flight_max:
            raise ValueError(f"{len(payloads)} payloads exceed in_flight_max {self.in_flight_max}")
        await self._connect_on_first_use()
        await self.wait_for_room(len(payloads))
        future = self.submit_batch_nowait(payloads)
        first = self._next_client_seq - len(payloads)
        try:
            async with asyncio.timeout(self.outcome_deadline_s):  # wait_for (3.11) could lose a cancel
                return await asyncio.shield(future)
        except TimeoutError:
            pending = self._pending
            self.submits_outcome_unknown += sum(1 for client_seq in range(first, first + len(payloads)) if client_seq in pending)
            raise OutcomeUnknown(first, self.outcome_deadline_s) from None

    async def wait_for_room(self, count: int = 1) -> None:
        """Return once ``count`` more submits fit in the in-flight window."""
        while len(self._pending) + count > self.in_flight_max:
            self._room.clear()
            await self._room.wait()

    async def submit(self, payload: bytes) -> int:
        """Sequence `payload`; returns its global sequence number once committed (connects
        first if the client never did)."""
        await self._connect_on_first_use()
        await self.wait_for_room()
        future = self.submit_nowait(payload)
        try:
            # Not asyncio.wait_for: in Python 3.11 a cancel that came with the ack was lost (a
            # submitting loop cancelled at that moment went on).
            async with asyncio.timeout(self.outcome_deadline_s):
                return await asyncio.shield(future)
        except TimeoutError:
            self.submits_outcome_unknown += 1
            raise OutcomeUnknown(self._client_seq_of(future), self.outcome_deadline_s) from None

    def _client_seq_of(self, future: asyncio.Future) -> int:
        for client_seq, pending in self._pending.items():
            if pending.future is future:
                return client_seq
        return 0

    # --- the connection loop --------------------------------------------------------------

    def _adopt(self, link: Connection) -> None:
        self._link = link
        welcome = link.welcome
        # A session name reused after a restart continues where it left off.
        if welcome.last_client_seq >= self._next_client_seq and not self._pending:
            self._next_client_seq = welcome.last_client_seq + 1
        # After a failover every unacknowledged submit is resent, and the node recognises a
        # resend only within its dedup window: one older than that would be refused as stale
        # although it was sequenced. So the window of submits in flight never exceeds it.
        if 0 < welcome.dedup_window < self.in_flight_max:
            log.info("in_flight_max %d lowered to the cluster's dedup window %d", self.in_flight_max, welcome.dedup_window)
            self.in_flight_max = welcome.dedup_window
        self._connected.set()
        self._paced_chunk = 0  # another node, other buckets
        self._resend_all()

    def _resend_all(self, from_seq: int = 0) -> None:
        """Send every pending submit (from `from_seq` on) again, in client_seq order; while
        pacing for a quota, only the next ``_paced_chunk`` of them (the rest go after the
        next retry-after)."""
        link = self._link
        if link is None or link.writer.transport.is_closing():
            return
        chunk = self._paced_chunk
        if chunk and not self._quota_busy_since_chunk:
            chunk += int(chunk * QUOTA_PACING_GROWTH) + 1  # all of the last chunk was taken
        self._quota_busy_since_chunk = False
        resend = []
        rest = None
        for client_seq, pending in self._pending.items():
            if client_seq < from_seq:
                continue
            if chunk and len(resend) == chunk:
                rest = client_seq
                break
            if pending.sent:
                self.resubmits += 1
            pending.sent = True
            resend.append(pending)
        if resend:
            link.writer.write(_submit_frames(resend))
        self._sent_from = resend[0].client_seq if resend else self._next_client_seq
        self._resend_from = rest
        if rest is None:
            self._paced_chunk = 0
            self._resend_delay_s = RESEND_DELAY_S
        else:
            self._paced_chunk = chunk

    def _quota_refused(self, client_seq: int) -> None:
        """A credential's rate quota refused `client_seq`. The node refuses what was sent
        behind it unanswered; sent again whole, the window would mostly be refused again. What
        it took of the last sending (client_seq less ``_sent_from``) is about what one
        retry-after lets in: resends go in chunks of that many, one per retry-after."""
        if client_seq >= self._sent_from:
            self._paced_chunk = max(1, client_seq - self._sent_from)
        else:  # refused from an earlier sending: it says nothing of the last one's
            self._paced_chunk = max(1, self._paced_chunk)
        self._quota_busy_since_chunk = True

    async def _run(self) -> None:
        while not self._closed:
            link = self._link
            watch = asyncio.create_task(self._leave_if_silent(link), name=f"raftseq-client-watch-{self.session}")
            try:
                await self._read(link)
            except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.info("session %s: connection to %s lost: %s", self.session, link.address, exc)
            except _LeaderMoved as moved:
                self._leader_hint = moved.leader
            finally:
                watch.cancel()
            link.close()
            self._link = None
            self._connected.clear()
            if self._closed or self._fatal is not None:
                return  # refused for good (taken over: reconnecting would take the session back)
            lost_at = time.monotonic()
            self.reconnects += 1
            try:
                new_link = await self._find_leader(rounds=None)
            except (Rejected, TlsError) as exc:
                self._fail_all(exc)
                return
            self.failovers += 1
            self.last_failover_s = time.monotonic() - lost_at
            self.failover_durations.observe(self.last_failover_s)
            self._adopt(new_link)

    async def _leave_if_silent(self, link: Connection) -> None:
        """While `link` is the leader's: once no submit has been acknowledged for
        ``LEADER_SUSPECT_SILENCE_S`` while submits wait, ask the other endpoints who leads
        (again every check while it lasts); if one names another node and still nothing was
        acknowledged, drop `link` with that node as the hint. Acknowledgements, not bytes: a
        leader cut off from its peers still sends heartbeats."""
        waiting_since: float | None = None
        acked = self.submits_acked
        while not link.closing:
            await asyncio.sleep(LEADER_SILENCE_CHECK_S)
            now = time.monotonic()
            if not self._pending or waiting_since is None or self.submits_acked != acked:
                waiting_since = now if self._pending else None
                acked = self.submits_acked
                continue
            if now - waiting_since < LEADER_SUSPECT_SILENCE_S:
                continue
            leader = await self._leader_elsewhere(link.address)
            if leader and self.submits_acked == acked:
                log.info(
                    "session %s: no ack from %s for %.2f s; %s leads now",
                    self.session,
                    link.address,
                    time.monotonic() - waiting_since,
                    leader,
                )
                self.silent_leaders_left += 1
                self._leader_hint = leader
                link.abort()
                return

    async def _leader_elsewhere(self, current: str) -> str:
        """A leader other than `current` as the other endpoints name it ("" if none does): a
        node that leads itself first, else one another node follows."""
        probe = functools.partial(
            leader_named_by,
            session=f"{self.session.removeprefix(protocol.SNAPSHOT_SESSION_PREFIX)}.probe",
            token=self.token,
            timeout_s=min(self.connect_timeout_s, LEADER_PROBE_TIMEOUT_S),
            tls=self.tls,
        )
        others = [address for address in self.endpoints if address != current]
        named = await asyncio.gather(*(probe(address) for address in others))
        leaders = sorted((not leads, leader) for leader, leads in named if leader and leader != current)
        return leaders[0][1] if leaders else ""

    async def _read(self, link: Connection) -> None:
        # One deadline moved forward per read (asyncio.wait_for would make a task per read).
        async with asyncio.timeout(None) as deadline:
            await self._read_frames(link, deadline)

    async def _read_frames(self, link: Connection, deadline: asyncio.Timeout) -> None:
        receive = link.receive
        silence_s = self.heartbeat_timeout_s
        while not self._closed:
            for frame in await receive(silence_s, deadline=deadline):
                self._handle(frame)
            if self._resend_from is not None:
                await self._wait_to_resend(link)
                self._resend_all(self._resend_from)
            if link.write_buffer_bytes > protocol.limits.CLIENT_WRITE_BUFFER_BYTES_MAX:
                # A node stops reading a session whose submits hold its byte bound until
                # commits make room: waiting for that is not the node's silence.
                deadline.reschedule(asyncio.get_running_loop().time() + protocol.limits.CLIENT_WRITE_DRAIN_TIMEOUT_S)
                await link.drain()

    async def _wait_to_resend(self, link: Connection) -> None:
        """Wait ``_resend_delay_s`` before a resend, handling what the node sends meanwhile:
        acks, and a quota ``Busy`` for what was sent last, which sizes the next chunk and moves
        the resend to its retry-after."""
        loop = asyncio.get_running_loop()
        self._resend_at = loop.time() + self._resend_delay_s
        while (left := self._resend_at - loop.time()) > 0:
            try:
                frames = await link.receive(left)
            except TimeoutError:
                return
            for frame in frames:
                self._handle(frame)

    def _handle(self, frame: object) -> None:
        kind = type(frame)
        if kind is protocol.AckRange:
            pop = self._pending.pop
            first_client_seq = frame.first_client_seq
            first_seq = frame.first_seq
            acked = 0
            for i in range(frame.count):
                pending = pop(first_client_seq + i, None)
                if pending is not None:
                    pending.resolve(first_seq + i)
                    acked += 1
            self.submits_acked += acked
            last = first_client_seq + frame.count - 1
            if last > self._last_acked:
                self._last_acked = last
            if len(self._pending) < self.in_flight_max:
                self._room.set()
        elif kind is protocol.Ack:
            pending = self._pending.pop(frame.client_seq, None)
            if pending is not None:
                pending.resolve(frame.seq)
                self.submits_acked += 1
            if frame.client_seq > self._last_acked:
                self._last_acked = frame.client_seq
            if len(self._pending) < self.in_flight_max:
                self._room.set()
        elif kind is protocol.Heartbeat:
            pass
        elif kind is protocol.NotLeader:
            raise _LeaderMoved(frame.leader)
        elif kind is protocol.Busy:
            if frame.client_seq in self._pending:
                self._resend_delay_s = max(self._resend_delay_s, min(frame.retry_after_ms / 1000, RESEND_DELAY_BUSY_MAX_S))
                if frame.limit in protocol.BUSY_QUOTA_LIMITS:
                    self._quota_refused(frame.client_seq)
                    self._resend_at = max(self._resend_at, asyncio.get_running_loop().time() + self._resend_delay_s)
            self._schedule_resend(frame.client_seq)
        elif kind is protocol.OutcomeUnknown:
            self._schedule_resend(frame.client_seq)
        elif kind is protocol.Rejected:
            self._rejected(frame)

    def _schedule_resend(self, client_seq: int) -> None:
        if client_seq in self._pending and (self._resend_from is None or client_seq < self._resend_from):
            self._resend_from = client_seq

    def _rejected(self, frame: protocol.Rejected) -> None:
        if frame.reason is RejectReason.SESSION_TAKEN_OVER:
            self._fail_all(rejection(frame.reason, frame.detail))
            raise ConnectionError(f"session {self.session!r} taken over by another client")
        if frame.reason is RejectReason.SEQUENCE_GAP and frame.expected_client_seq in self._pending:
            # An earlier submit was refused (busy, leader change); it and all after it go again.
            self._schedule_resend(frame.expected_client_seq)
            return
        if frame.reason is RejectReason.SEQUENCE_GAP and 0 < frame.expected_client_seq <= self._last_acked:
            # The cluster's (committed) session state is behind what it acknowledged to this
            # client: every resend would meet the same gap. Stop, with the typed error.
            self._fail_all(errors.SessionForgotten(self.session, frame.expected_client_seq, self._last_acked))
            raise ConnectionError(f"session {self.session!r} forgotten by the cluster")
        pending = self._pending.pop(frame.client_seq, None) if frame.client_seq else None
        error = rejection(frame.reason, frame.detail, expected_client_seq=frame.expected_client_seq)
        if pending is not None:
            self.submits_rejected[frame.reason] += 1
            pending.fail(error)
            return
        if frame.reason in FATAL_REASONS:
            self._fail_all(error)
            raise ConnectionError(str(error))

    def _fail_all(self, error: SequencerError) -> None:
        self._fatal = error
        if isinstance(error, Rejected):
            self.submits_rejected[error.reason] += len(self._pending)
        for pending in self._pending.values():
            pending.fail(error)
        self._pending.clear()
        self._room.set()

    def _hello_options(self) -> dict:
        return {
            "session": self.session,
            "token": self.token,
            "last_acked": self._last_acked,
            "owner": self.owner,
            "snapshot_publisher": self.snapshot_publisher,
            "timeout_s": self.connect_timeout_s,
            "tls": self.tls,
        }

    async def _find_leader(self, *, rounds: int | None) -> Connection:
        """Connect to the leader: try the hint, then every endpoint, following ``leader``."""
        backoff = 0.02
        attempt = 0
        last_error: Exception | None = None
        while rounds is None or attempt < rounds:
            attempt += 1
            candidates = ([self._leader_hint] if self._leader_hint else []) + random.sample(self.endpoints, len(self.endpoints))
            for address in dict.fromkeys(candidates):
                if self._closed:
                    raise ClientClosed()
                try:
                    link = await open_connection(address, **self._hello_options())
                except (Rejected, TlsError):
                    raise
                except (OSError, ConnectionError, TimeoutError) as exc:
                    last_error = exc
                    continue
                welcome = link.welcome
                if welcome.role is protocol.Role.LEADER:
                    self._leader_hint = address
                    return link
                link.close()
                if welcome.leader and welcome.leader != address:
                    self._leader_hint = welcome.leader
                    try:
                        link = await open_connection(welcome.leader, **self._hello_options())
                    except (OSError, ConnectionError, TimeoutError) as exc:
                        last_error = exc
                        continue
                    if link.welcome.role is protocol.Role.LEADER:
                        return link
                    link.close()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.reconnect_backoff_max_s)
        raise NotConnected(f"no leader found among {self.endpoints}: {last_error}")

    # --- subscribing ----------------------------------------------------------------------

    async def subscribe(self, from_seq: int = 1) -> AsyncIterator[Message]:
        """Messages ``from_seq, from_seq + 1, …`` with no gap and no duplicate, forever.

        Served by any node over its own connections (it needs no ``connect``); on a lost
        connection it resumes at last + 1 on any live node (reported to this client's
        ``metrics`` sink, if it has one). Raises ``ClientClosed`` after ``close``.
        """
        if self._closed:
            raise ClientClosed()
        if from_seq < 1:
            raise ValueError("from_seq must be >= 1")
        async for message in subscribe(
            self.endpoints,
            from_seq=from_seq,
            token=self.token,
            # A subscriber submits nothing: its session is not reserved, whatever this one is.
            session=f"{self.session.removeprefix(protocol.SNAPSHOT_SESSION_PREFIX)}.sub",
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            reconnect_backoff_max_s=self.reconnect_backoff_max_s,
            metrics=self._metrics,
            tls=self.tls,
        ):
            yield message


class _LeaderMoved(Exception):
    def __init__(self, leader: str) -> None:
        super().__init__(leader)
        self.leader = leader


async def subscribe(
    endpoints: str | Iterable[str | tuple[str, int]],
    *,
    from_seq: int = 1,
    token: str = "",
    session: str = "subscriber",
    heartbeat_timeout_s: float = 2.0,
    connect_timeout_s: float = 2.0,
    reconnect_backoff_max_s: float = 0.1,
    prefer: str = "",
    metrics: ClientMetricsSink | None = None,
    tls: ClientTls = None,
) -> AsyncIterator[Message]:
    """The stream from `from_seq` on, from any of `endpoints` (any form ``clients.endpoints``
    accepts; ``prefer`` first), resuming at last + 1 on another node when one dies. Raises
    ``TokenRequired``/``TokenRejected`` at once when the cluster refuses the token, and a
    ``clients.tls.TlsError`` when TLS cannot be agreed (``tls``: as ``SequencerClient``'s).

    ``metrics`` (opt-in, e.g. ``clients.metrics.ClientMetricsCollector``) is told of every
    resume: each time the subscription, interrupted, reaches a node again and asks it for the
    stream from its next number.

    A node whose retention removed `from_seq` says so (``protocol.Truncated``); the others are
    asked in turn, and when every endpoint said so ``Truncated`` is raised, carrying the lowest
    first number they hold."""
    expected = from_seq
    truncated: dict[str, Truncated] = {}
    interrupted = False
    backoff = 0.02
    order = endpoint_addresses(endpoints)
    if prefer in order:
        order.remove(prefer)
        order.insert(0, prefer)
    index = 0
    while True:
        address = order[index % len(order)]
        index += 1
        try:
            link = await open_connection(address, session=session, token=token, timeout_s=connect_timeout_s, tls=tls)
        except (OSError, ConnectionError, TimeoutError):
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, reconnect_backoff_max_s)
            continue
        if interrupted:
            interrupted = False
            if metrics is not None:
                metrics.subscription_resumed()
        try:
            async with contextlib.aclosing(link.subscribe(expected, silence_s=heartbeat_timeout_s, truncated_known=True)) as stream:
                async for frames in stream:
                    backoff = 0.02
                    truncated.clear()
                    for frame in frames:
                        expected += 1
                        yield Message(frame.seq, frame.log_time_ns, frame.session, frame.client_seq, frame.payload)
        except Truncated as exc:
            truncated[address] = exc
            if len(truncated) >= len(set(order)):
                raise min(truncated.values(), key=lambda e: e.first_seq) from None
            log.info("subscription on %s: %s; asking another node", address, exc)
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.info("subscription on %s interrupted at %d: %s", address, expected, exc)
            interrupted = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, reconnect_backoff_max_s)
        finally:
            link.close()
