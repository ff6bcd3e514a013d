"""The chaos workload: clients submitting unique payloads, subscribers on chosen nodes, and the
final read of every node — all recorded in one history (``chaos_tests.history``).

It runs on its own asyncio loop in a background thread (``Workload.start`` / ``stop``), so the
nemesis can act from the test's thread meanwhile.

* **Clients** use the public ``SequencerClient``: each submits payloads ``c<i>-<n>`` (unique in
  the history) at a steady rate with up to ``window`` submits in flight. ``invoke`` is recorded
  before the submit leaves; the outcome when its future resolves: a sequence number is ``ok``,
  ``Rejected`` is ``fail`` (definite), anything else (``OutcomeUnknown``, the client closed
  with the submit in flight) is ``unknown``. With ``client_resets`` a client's connection is
  aborted now and then mid-stream (a connection reset while submits are in flight): the
  library must resubmit under the same ``client_seq``. A client whose session the cluster has
  forgotten (``sequence_gap`` expecting ``client_seq`` 1: only after a power cut lost the
  cluster's state) carries on under a new session, ``…-c1-2``, as an application would.
* **Subscribers** read through ``clients.connection`` in raw mode rather than through
  ``clients.subscribe``: that generator quietly reconnects when a node sends a wrong number,
  which would hide exactly what the checker looks for. Each subscriber stays on one
  node until the connection fails, then resumes at last + 1 on the next node, recording every
  ``sub_connect`` / ``sub_reconnect`` and every delivery as the node sent it. With
  ``subscriber_drops`` it drops its own connection now and then and resumes.
* **Final read**: after healing, every node is read from sequence number 1 to the last number
  it reports, over the same protocol, one node at a time, and recorded as ``final_read``.

Every loop here is bounded by a deadline; ``stop`` waits for in-flight submits for at most
``drain_s`` and then records what is left as ``unknown``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from chaos_tests.history import HistoryRecorder
from raftseq.clients import SequencerClient
from raftseq.clients.connection import Rejected, open_connection
from raftseq.clients.tls import ClientTls
from raftseq.clients.errors import Truncated
from raftseq.sequencer.protocol import RejectReason
from raftseq.cluster.status import node_status

CONNECT_TIMEOUT_S = 1.0
#: A subscriber that hears nothing (not even a heartbeat) for this long moves to another node.
SUBSCRIBER_SILENCE_S = 2.0
FINAL_READ_TIMEOUT_S = 60.0
#: A final read that may meet records no node can serve any more (a journal prefix lost to a
#: power cut in crash durability): no record for this long means the node cannot serve the
#: next one; each probe for the first servable seq after it waits this long.
FINAL_READ_STALL_S = 5.0
FINAL_READ_PROBE_S = 1.0
#: Unservable ranges a final read looks past.
FINAL_READ_HOLES_MAX = 8
#: A node still fetching a range it lacks (a hole, a journal prefix lost to a power cut)
#: refuses it with ``from_seq_unavailable``; the final read asks again this often until its
#: deadline.
FINAL_READ_RETRY_S = 0.5
START_TIMEOUT_S = 15.0


@dataclass
class WorkloadConfig:
    clients: int = 3
    #: Submits per second per client (steady schedule).
    rate_per_client: float = 200.0
    #: Submits in flight per client at most; past it the client waits.
    window: int = 64
    #: Each subscriber's node: subscriber i starts on ``subscriber_nodes[i]`` (an endpoint).
    subscriber_nodes: Sequence[str] = ()
    #: Mean seconds between connection resets of each client (0: never).
    client_resets_every_s: float = 0.0
    #: Mean seconds between self-inflicted drops of each subscriber (0: never).
    subscriber_drops_every_s: float = 0.0
    payload_pad: int = 40
    session_prefix: str = "chaos"


@dataclass
class _ClientStats:
    invoked: int = 0
    ok: int = 0
    failed: int = 0
    unknown: int = 0
    resets: int = 0


@dataclass
class WorkloadStats:
    clients: dict[str, _ClientStats] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)
    reconnects: dict[str, int] = field(default_factory=dict)
    last_ok_ns: int = 0
    #: Sessions started because the cluster had forgotten one (after a power cut).
    new_sessions: int = 0
    #: Subscribers that fell behind retention and stopped.
    truncated: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(c.ok for c in self.clients.values())

    @property
    def invoked(self) -> int:
        return sum(c.invoked for c in self.clients.values())


class Workload:
    """Clients and subscribers against `endpoints`, recording into `history`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        token: str,
        history: HistoryRecorder,
        rng: random.Random,
        config: WorkloadConfig | None = None,
        tls: ClientTls = None,
        priority_token: str = "",
    ) -> None:
        self.endpoints = list(endpoints)
        self.token = token
        #: The token of a credential with ``priority``: the first client submits through the
        #: leader's priority lane with it ("": every client uses `token`).
        self.priority_token = priority_token
        #: How clients and subscribers reach TLS client ports (``clients.tls``; None: plaintext).
        self.tls = tls
        self.history = history
        self.config = config or WorkloadConfig()
        # Separate streams so that one choice does not shift the others between runs.
        self._client_rngs = [random.Random(rng.random()) for _ in range(self.config.clients)]
        self._sub_rngs = [random.Random(rng.random()) for _ in self.config.subscriber_nodes]
        self._run_tag = f"{rng.randrange(16**6):06x}"
        self.stats = WorkloadStats()
        self.errors: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._finished: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._started = threading.Event()
        self._clients: list[SequencerClient] = []
        #: Indexes of the clients whose session the cluster has forgotten.
        self._forgotten: set[int] = set()

    # --- lifecycle (called from the test's thread) ----------------------------------------

    def start(self) -> None:
        """Connect the clients, start submitting and subscribing; returns once all run."""
        self._thread = threading.Thread(target=self._thread_main, name="chaos-workload", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise RuntimeError(f"workload did not start in {START_TIMEOUT_S} s: {self.errors}")
        if self.errors:
            self.stop(drain_s=0)
            raise RuntimeError(f"workload failed to start: {self.errors}")

    def stop(self, *, drain_s: float = 10.0) -> WorkloadStats:
        """Stop submitting, wait up to `drain_s` for in-flight submits, close everything."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(drain_s), self._loop)
            future.result(timeout=drain_s + 30)
            self._thread.join(timeout=10)
        return self.stats

    def wait_for_acks(self, count: int, *, timeout_s: float) -> bool:
        """Wait until at least `count` submits in total were acknowledged."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stats.ok >= count:
                return True
            time.sleep(0.05)
        return self.stats.ok >= count

    def ok_since(self, t_ns: int) -> bool:
        """True once a submit was acknowledged after monotonic time `t_ns`."""
        return self.stats.last_ok_ns > t_ns

    # --- the loop thread ------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        config = self.config
        try:
            for i in range(config.clients):
                self._clients.append(await self._connect(f"{config.session_prefix}-{self._run_tag}-c{i + 1}", i))
        except Exception as exc:  # noqa: BLE001 - reported to the starting thread
            self.errors.append(f"client connect: {exc!r}")
            self._started.set()
            for client in self._clients:
                await client.close()
            return
        for i, client in enumerate(self._clients):
            self._tasks.append(asyncio.create_task(self._submitter(i, client), name=f"chaos-c{i + 1}"))
        for i, node in enumerate(config.subscriber_nodes):
            self._tasks.append(asyncio.create_task(self._subscriber(i, node), name=f"chaos-s{i + 1}"))
        self._started.set()
        await self._finished.wait()  # set at the end of _shutdown

    async def _shutdown(self, drain_s: float) -> None:
        self._stop.set()
        submitters = self._tasks[: len(self._clients)]
        subscribers = self._tasks[len(self._clients) :]
        # Each submitter notices the stop within 0.1 s; the bound is for safety only.
        _, late = await asyncio.wait(submitters, timeout=5.0) if submitters else (set(), set())
        for task in late:
            task.cancel()
        deadline = time.monotonic() + drain_s
        while any(c.in_flight for c in self._clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in self._clients:
            await client.close()  # what is still in flight resolves as NotConnected: unknown
        await asyncio.sleep(0)  # let the done-callbacks record those
        for task in subscribers:
            task.cancel()
        await asyncio.gather(*subscribers, return_exceptions=True)
        self._finished.set()

    # --- clients --------------------------------------------------------------------------

    async def _connect(self, session: str, index: int) -> SequencerClient:
        token = self.priority_token if index == 0 and self.priority_token else self.token
        client = SequencerClient(self.endpoints, session=session, token=token, in_flight_max=self.config.window, tls=self.tls)
        await asyncio.wait_for(client.connect(), START_TIMEOUT_S)
        return client

    async def _new_session(self, index: int, client: SequencerClient) -> SequencerClient:
        """Replace a client whose session the cluster forgot by one under a new session."""
        self._forgotten.discard(index)
        session = f"{self.config.session_prefix}-{self._run_tag}-c{index + 1}-{self.stats.new_sessions + 2}"
        self.stats.new_sessions += 1
        self.history.note("session forgotten", old=client.session, new=session)
        await client.close()
        fresh = await self._connect(session, index)
        self._clients[index] = fresh
        return fresh

    async def _submitter(self, index: int, client: SequencerClient) -> None:
        config = self.config
        name = f"c{index + 1}"
        stats = self.stats.clients.setdefault(name, _ClientStats())
        rng = self._client_rngs[index]
        history = self.history
        pad = "." * config.payload_pad
        interval = 1.0 / config.rate_per_client
        next_reset = _next_event(rng, config.client_resets_every_s)
        started = time.monotonic()
        n = 0
        while not self._stop.is_set():
            if index in self._forgotten:
                try:
                    client = await self._new_session(index, client)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    self.errors.append(f"{name}: a new session: {exc!r}")
                    self._forgotten.add(index)
                    await asyncio.sleep(0.1)
                    continue
            due = started + n * interval
            delay = due - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            if client.in_flight >= client.in_flight_max:
                try:
                    await asyncio.wait_for(client.wait_for_room(), 0.1)
                except TimeoutError:
                    pass
                continue
            n += 1
            payload = f"{name}-{n:07d}-{pad}"
            client_seq = client.next_client_seq
            op = history.invoke(name, client.session, client_seq, payload)
            stats.invoked += 1
            future = client.submit_nowait(payload.encode())
            future.add_done_callback(lambda f, op=op: self._completed(stats, op, f, index))
            if next_reset and time.monotonic() - started >= next_reset:
                next_reset += _next_event(rng, config.client_resets_every_s)
                if _abort_client_connection(client):
                    stats.resets += 1

    def _completed(self, stats: _ClientStats, op: int, future: asyncio.Future, index: int) -> None:
        if future.cancelled():
            stats.unknown += 1
            self.history.complete_unknown(op, "cancelled")
            return
        error = future.exception()
        if error is None:
            stats.ok += 1
            self.history.complete_ok(op, future.result())
            self.stats.last_ok_ns = time.monotonic_ns()
        elif isinstance(error, Rejected):
            stats.failed += 1
            self.history.complete_fail(op, str(error))
            if error.reason is RejectReason.SEQUENCE_GAP and error.expected_client_seq == 1:
                self._forgotten.add(index)
        else:
            stats.unknown += 1
            self.history.complete_unknown(op, f"{type(error).__name__}: {error}")

    # --- subscribers ----------------------------------------------------------------------

    async def _subscriber(self, index: int, first_node: str) -> None:
        name = f"s{index + 1}"
        rng = self._sub_rngs[index]
        order = [first_node] + [e for e in self.endpoints if e != first_node]
        expected = 1
        attempt = 0
        connected_once = False
        drops_every = self.config.subscriber_drops_every_s
        while not self._stop.is_set():
            node = order[attempt % len(order)]
            attempt += 1
            drop_after = _next_event(rng, drops_every)
            if connected_once:
                self.history.sub_reconnect(name, node, expected)
                self.stats.reconnects[name] = self.stats.reconnects.get(name, 0) + 1
            else:
                self.history.sub_connect(name, node, expected)
                connected_once = True
            try:
                expected, moved_on = await self._stream(name, node, expected, drop_after)
            except (OSError, ConnectionError, TimeoutError):
                moved_on = True
            except Truncated as exc:
                # It fell behind retention on every node: it cannot go on without a gap.
                self.history.note("subscriber truncated", sub=name, from_seq=exc.from_seq, first_seq=exc.first_seq)
                self.stats.truncated.append(name)
                return
            if not moved_on:
                attempt -= 1  # a deliberate drop: back to the same node
            await asyncio.sleep(0.02)

    async def _stream(self, name: str, node: str, expected: int, drop_after: float) -> tuple[int, bool]:
        """Deliveries from `node` from `expected` on, recorded as the node sent them (raw
        mode). Returns (next expected, whether the node failed us) when the connection ends or
        `drop_after` seconds pass."""
        history = self.history
        try:
            connection = await open_connection(
                node, session=f"{name}-{self._run_tag}", token=self.token, timeout_s=CONNECT_TIMEOUT_S, tls=self.tls
            )
        except Rejected:
            return expected, True
        try:
            async with asyncio.timeout(drop_after or None) as until:
                async for frames in connection.subscribe(expected, silence_s=SUBSCRIBER_SILENCE_S, checked=False):
                    for frame in frames:
                        # Recorded as the node sent it: a gap or repeat is the checker's to find.
                        history.deliver(name, node, frame.seq, frame.session, frame.client_seq, frame.payload)
                        self.stats.deliveries[name] = self.stats.deliveries.get(name, 0) + 1
                        expected = max(expected, frame.seq + 1)
                    if self._stop.is_set():
                        return expected, False
        except TimeoutError:
            return expected, not until.expired()  # a silent node, or the planned drop
        except (ConnectionError, Rejected):
            return expected, True
        finally:
            connection.close()
        return expected, False


def _next_event(rng: random.Random, mean_s: float) -> float:
    return rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0


def _abort_client_connection(client: SequencerClient) -> bool:
    """Reset the client's connection to its node, with submits in flight (a fault the library
    must absorb). Reaches into the client: there is no public way to break a connection."""
    link = client._link  # noqa: SLF001 - fault injection
    if link is None or link.closing:
        return False
    link.abort()
    return True


# --- the final read ----------------------------------------------------------------------


async def _read_node(endpoint: str, token: str, last_seq: int, timeout_s: float, tls: ClientTls) -> list[tuple[int, str, int, bytes]]:
    """Records 1..last_seq as `endpoint` serves them (one connection, no failover, raw mode)."""
    records: list[tuple[int, str, int, bytes]] = []
    try:
        async with asyncio.timeout(timeout_s):
            connection = await open_connection(endpoint, session="chaos-final-read", token=token, timeout_s=CONNECT_TIMEOUT_S, tls=tls)
            try:
                async for frames in connection.subscribe(1, silence_s=timeout_s, checked=False):
                    records += [(f.seq, f.session, f.client_seq, f.payload) for f in frames]
                    if len(records) >= last_seq:
                        break
            finally:
                connection.close()
    except TimeoutError:
        raise TimeoutError(f"final read of {endpoint}: {len(records)} of {last_seq} records in {timeout_s:.0f} s") from None
    except (ConnectionError, Rejected) as exc:
        raise ConnectionError(f"final read of {endpoint}: after {len(records)} records: {exc}") from None
    return records[:last_seq]


async def read_range(endpoint: str, token: str, first: int, last_seq: int, *, stall_s: float, tls: ClientTls = None) -> tuple[list, bool]:
    """Records first..last_seq; ``(records, True)`` when the node sent no record for `stall_s`
    before the last."""
    records: list[tuple[int, str, int, bytes]] = []
    connection = await open_connection(endpoint, session="chaos-final-read", token=token, timeout_s=CONNECT_TIMEOUT_S, tls=tls)
    try:
        stream = aiter(connection.subscribe(first, silence_s=SUBSCRIBER_SILENCE_S, checked=False))
        while not records or records[-1][0] < last_seq:
            try:
                async with asyncio.timeout(stall_s):
                    frames = await anext(stream)
            except TimeoutError:
                return records, True
            records += [(f.seq, f.session, f.client_seq, f.payload) for f in frames]
    finally:
        connection.close()
    return [r for r in records if r[0] <= last_seq], False


async def _read_node_past_holes(endpoint: str, token: str, last_seq: int, history: HistoryRecorder, node: str, tls: ClientTls) -> list:
    """Records 1..last_seq as `endpoint` can still serve them: where it stalls, the first seq
    it serves again is searched (binary, by probes) and the read goes on from there; each
    unservable range is noted in the history (``unservable``)."""
    records: list = []
    first = 1
    for _ in range(FINAL_READ_HOLES_MAX):
        got, stalled = await read_range(endpoint, token, first, last_seq, stall_s=FINAL_READ_STALL_S, tls=tls)
        records += got
        if not stalled:
            return records
        stuck = got[-1][0] + 1 if got else first
        low, high = stuck + 1, last_seq + 1  # the first servable seq is in low..high (high: none)
        last_served, _ = await read_range(endpoint, token, last_seq, last_seq, stall_s=FINAL_READ_PROBE_S, tls=tls)
        if not last_served:
            low = high  # nothing after the stall is served: no search
        while low < high:
            middle = (low + high) // 2
            probe, _ = await read_range(endpoint, token, middle, middle, stall_s=FINAL_READ_PROBE_S, tls=tls)
            if probe:
                high = middle
            else:
                low = middle + 1
        history.note("unservable", node=node, first=stuck, last=low - 1)
        if low > last_seq:
            return records
        first = low
    return records


def final_read(
    endpoints: Sequence[str],
    *,
    token: str,
    history: HistoryRecorder,
    timeout_s: float = FINAL_READ_TIMEOUT_S,
    past_holes: bool = False,
    tls: ClientTls = None,
) -> dict[str, int]:
    """Read every node's whole stream into the history (over TLS with `tls`); returns records
    read per endpoint.
    A node that cannot be asked or read is recorded with what it gave (possibly nothing).
    `past_holes`: where a loss is expected, ranges no node can serve any more are noted and
    skipped (``_read_node_past_holes``) instead of failing the read."""

    async def run() -> dict[str, int]:
        counts = {}
        for endpoint in endpoints:
            status = await node_status(endpoint, token=token, timeout_s=CONNECT_TIMEOUT_S, tls=tls)
            last_seq = status.get("last_seq", 0)
            node = status.get("id", endpoint)
            records: list = []
            if status.get("role") != "unreachable" and last_seq:
                deadline = time.monotonic() + timeout_s
                while True:
                    try:
                        if past_holes:
                            async with asyncio.timeout(timeout_s):
                                records = await _read_node_past_holes(endpoint, token, last_seq, history, node, tls)
                        else:
                            records = await _read_node(endpoint, token, last_seq, timeout_s, tls)
                        break
                    except ConnectionError as exc:
                        if RejectReason.FROM_SEQ_UNAVAILABLE.value not in str(exc) or time.monotonic() > deadline:
                            raise
                    await asyncio.sleep(FINAL_READ_RETRY_S)  # the node is fetching what it lacks
            history.final_read(node, records)
            counts[endpoint] = len(records)
        return counts

    return asyncio.run(run())
