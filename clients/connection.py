"""One connection to a node: the client side of the node conversation, written once.

Every program that talks to a node — the client library, subscribers, ``raftseq status``,
catch-up from a peer, the state-machine tools, the chaos workload, the benchmarks — opens its
link here (``open_connection``) and reads it here:

* **Handshake.** ``Hello(session, token, protocol version, last acked)``; the node answers
  ``Welcome`` (role, leader, the session's last applied client_seq, its heartbeat interval) or
  ``Rejected`` (raised as ``Rejected``; a refused token as ``TokenRequired`` when none was
  sent, else ``TokenRejected``). Frames that arrive together with the welcome are kept
  and returned by the first ``receive``.
* **Framing.** ``sequencer.protocol`` encodes and decodes; ``receive`` reads one chunk within a
  deadline and returns its frames. A read loop that passes its own ``asyncio.timeout`` as
  ``deadline`` moves that one deadline forward per read (no task per read, as
  ``asyncio.wait_for`` would make). A damaged stream (``FrameError``) or a closed one raises
  ``ConnectionError`` once the good frames before it were returned.
* **Heartbeats.** The node closes a connection that sends nothing for its idle timeout, and
  sends a ``Heartbeat`` itself at least every interval. Every read here answers with one
  ``Heartbeat`` per interval, so a reader that never writes (a subscriber, catch-up, a long
  range read) keeps its connection however long it reads.
* **Who leads.** ``leader_named_by(address)`` says hello and reads the answer's role and
  leader (a client whose leader stopped acknowledging asks the other nodes).
* **Requests.** ``request`` sends a frame and returns the first answer of the expected type
  (``status`` for ``StatusRequest``); ``request_once`` does it on a connection of its own.
* **Subscribing.** ``subscribe(from_seq)`` yields ``Delivered`` frames (a list per read),
  checked to be
  ``from_seq, from_seq + 1, …`` (a wrong number raises ``ConnectionError``). With
  ``checked=False`` (raw mode) they come exactly as the node sent them, gaps and repeats
  included, for callers that must record what the node did (the chaos subscribers). On a
  connection opened with ``keep_raw=True`` each item is ``(Delivered, its bytes as received)``
  (catch-up stores those bytes). ``receive_bytes`` hands over the stream undecoded (a benchmark
  counting records by their headers).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from raftseq.clients.endpoints import parse_endpoint
from raftseq.clients.errors import Rejected, SequencerError, Truncated, authentication_error, rejection
from raftseq.clients.tls import ClientTls, client_context, handshake_error, tls_required_error
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.protocol import RejectReason

#: Bytes asked of the socket per read: large enough that a subscriber catching up reads many
#: records per loop iteration, small enough to bound what one read hands to the framer.
READ_BYTES = limits.CLIENT_READ_BYTES

_HEARTBEAT = protocol.encode_frame(protocol.Heartbeat())

#: Refusals that no retry on another node can cure.
FATAL_REASONS = (RejectReason.AUTH_FAILED, RejectReason.PROTOCOL_VERSION, RejectReason.RESERVED_SESSION, RejectReason.SESSION_TAKEN_OVER)

AnswerT = TypeVar("AnswerT")


class Connection:
    """One open connection to a node, after the handshake (``open_connection``)."""

    def __init__(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        welcome: protocol.Welcome,
        framer: protocol.FrameReader,
        early: list,
        *,
        read_chunk_bytes: int = READ_BYTES,
    ) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.welcome = welcome
        self.framer = framer
        self.read_chunk_bytes = read_chunk_bytes
        self._early = early  # frames that arrived together with the welcome
        self.heartbeat_interval_s = welcome.heartbeat_interval_ms / 1000
        self.next_heartbeat = time.monotonic() + self.heartbeat_interval_s

    # --- writing --------------------------------------------------------------------------

    def send(self, frame: object) -> None:
        """Queue one frame for the node (no wait: ``drain`` waits for room)."""
        self.writer.write(protocol.encode_frame(frame))

    def send_bytes(self, data: bytes) -> None:
        """Queue frames already encoded (``protocol.encode_frame``)."""
        self.writer.write(data)

    @property
    def closing(self) -> bool:
        return self.writer.transport.is_closing()

    @property
    def write_buffer_bytes(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    def abort(self) -> None:
        """Reset the connection at once (unsent data is dropped)."""
        self.writer.transport.abort()

    def close(self) -> None:
        try:
            self.writer.close()
        except RuntimeError:  # its loop is already closed
            pass

    def heartbeat_if_due(self) -> None:
        """Send one ``Heartbeat`` per interval: called after each read, this keeps a
        connection that sends nothing else open (the node closes silent ones)."""
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat_interval_s
            if not self.writer.transport.is_closing():
                self.writer.write(_HEARTBEAT)

    # --- reading --------------------------------------------------------------------------

    async def _read(self, timeout_s: float | None, deadline: asyncio.Timeout | None) -> bytes:
        if deadline is None:
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(self.read_chunk_bytes)
        else:
            deadline.reschedule(asyncio.get_running_loop().time() + timeout_s)
            data = await self.reader.read(self.read_chunk_bytes)
        if not data:
            raise ConnectionError(f"{self.address} closed the connection")
        self.heartbeat_if_due()
        return data

    async def receive(self, timeout_s: float | None, *, deadline: asyncio.Timeout | None = None) -> list:
        """The frames of the next read (at least one chunk of bytes; possibly no whole frame
        yet), within `timeout_s` (``TimeoutError``; None: no limit of its own). `deadline`: the caller's own
        ``asyncio.timeout`` around its read loop, moved to now + `timeout_s`, instead of a
        new timer per read. Raises ``ConnectionError`` when the node closes the connection or
        sends a damaged frame (after returning the good frames before it)."""
        frames = self._early
        if frames:
            self._early = []
        else:
            if self.framer.error is not None:
                raise ConnectionError(f"{self.address}: bad frame: {self.framer.error.detail}")
            frames = self.framer.feed(await self._read(timeout_s, deadline))
        if frames and isinstance(frames[-1], protocol.FrameError):
            frames.pop()  # the reader stays failed: the next receive raises
            if not frames:
                raise ConnectionError(f"{self.address}: bad frame: {self.framer.error.detail}")
        return frames

    async def receive_bytes(self, timeout_s: float) -> bytes:
        """The next chunk of the stream, undecoded (heartbeats answered as for frames). Only
        for a stream whose frames are all still unread: nothing may be left of the handshake."""
        if self._early or self.framer.buffered_bytes:
            raise ConnectionError(f"{self.address}: frames arrived with the welcome; the stream cannot be read raw")
        return await self._read(timeout_s, None)

    async def request(self, frame: object, answer: type[AnswerT], timeout_s: float) -> AnswerT:
        """Send `frame` and return the first frame of type `answer` within `timeout_s`.
        ``Rejected`` from the node raises ``Rejected`` (``AUTH_FAILED``/``PROTOCOL_VERSION``)
        or ``ConnectionError`` (any other reason: perhaps a node that predates the request)."""
        self.send(frame)
        async with asyncio.timeout(timeout_s):
            while True:
                for item in await self.receive(None):
                    if isinstance(item, answer):
                        return item
                    if isinstance(item, protocol.Rejected):
                        raise refusal(item)

    async def status(self, timeout_s: float) -> protocol.Status:
        return await self.request(protocol.StatusRequest(), protocol.Status, timeout_s)

    async def subscribe(
        self, from_seq: int, *, silence_s: float, checked: bool = True, truncated_known: bool = False
    ) -> AsyncIterator[list]:
        """Ask for the stream from `from_seq` and yield, per read, the list of ``Delivered``
        frames it brought (``(frame, bytes)`` pairs on a ``keep_raw`` connection) for as long
        as the node sends them. ``checked``: each must be the next number (else
        ``ConnectionError``); unchecked (raw mode) they come as the node sent them. A node
        silent for `silence_s` (not even a heartbeat) raises ``TimeoutError``; ``Rejected``
        raises ``Rejected`` (fatal reasons) or ``ConnectionError``, ``Busy`` raises
        ``ConnectionError``; with ``truncated_known``, a node that no longer holds `from_seq`
        raises ``Truncated`` (else it refuses with ``from_seq_unavailable``: a ``ConnectionError``)."""
        self.send(protocol.Subscribe(from_seq, truncated_known))
        expected = from_seq
        keep_raw = self.framer.keep_raw
        delivered = protocol.Delivered
        while True:
            batch = []
            for item in await self.receive(silence_s):
                frame = item[0] if keep_raw else item
                kind = type(frame)
                if kind is delivered:
                    if checked:
                        if frame.seq != expected:
                            if batch:
                                yield batch
                            raise ConnectionError(f"{self.address} sent seq {frame.seq}, expected {expected}")
                        expected += 1
                    batch.append(item)
                elif kind is protocol.Truncated:
                    raise Truncated(frame.from_seq, frame.first_seq)
                elif kind is protocol.Rejected or kind is protocol.Busy:
                    if batch:
                        yield batch
                    raise refusal(frame) if kind is protocol.Rejected else ConnectionError(f"{self.address} is busy: {frame.limit}")
            if batch:
                yield batch


def refusal(frame: protocol.Rejected) -> Exception:
    """The exception for a ``Rejected`` frame: ``Rejected`` when no other node would answer
    differently (wrong token, protocol version), else ``ConnectionError`` (try another)."""
    if frame.reason in FATAL_REASONS:
        return rejection(frame.reason, frame.detail)
    return ConnectionError(f"{frame.reason.value}: {frame.detail}")


async def open_connection(
    address: str,
    *,
    session: str,
    token: str,
    timeout_s: float,
    last_acked: int = 0,
    owner: int = 0,
    snapshot_publisher: bool = False,
    keep_raw: bool = False,
    read_chunk_bytes: int = READ_BYTES,
    stream_buffer_bytes: int | None = None,
    tls: ClientTls = None,
) -> Connection:
    """Connect to `address` (``host:port``) and say hello as `session`; returns once the node
    welcomes us, within `timeout_s` for the connect and again for the answer. Raises
    ``Rejected`` when the node refuses the hello (``TokenRequired``/``TokenRejected``, both
    ``AuthenticationError``, for the token), ``ValueError`` for an address that is not
    ``HOST:PORT``, ``ConnectionError``/``OSError`` or
    ``TimeoutError`` when it cannot be reached or answers wrongly. ``keep_raw``: frames come
    with their bytes as received. ``stream_buffer_bytes``: how much the socket reader buffers
    before it stops reading (asyncio's default, 64 KiB, when None). ``owner``: the client
    instance's id (``Hello.owner``; 0: none); ``snapshot_publisher``: the hello says so (only
    then is an ``@snap/`` session accepted). ``tls``: reach a TLS port (``clients.tls``; a
    mismatch or a refused certificate raises ``TlsError``)."""
    host, port = parse_endpoint(address)
    options: dict = {} if stream_buffer_bytes is None else {"limit": stream_buffer_bytes}
    context, server_hostname = client_context(tls)
    if context is not None:
        options.update(ssl=context, server_hostname=server_hostname or host, ssl_handshake_timeout=timeout_s)
    try:
        # Not asyncio.wait_for: on Python 3.11 a cancellation that arrives once the connection is
        # made but before wait_for returns is swallowed (wait_for returns the connection), and a
        # task being stopped (a relay's follower) carries on with it.
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, **options)
    except ssl.SSLError as exc:
        raise handshake_error(address, exc) from None
    try:
        hello = protocol.Hello(session, token, protocol.PROTOCOL_VERSION, last_acked, owner, snapshot_publisher)
        writer.write(protocol.encode_frame(hello))
        framer = protocol.FrameReader("node", keep_raw=keep_raw)
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    data = await reader.read(read_chunk_bytes)
                except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows here
                    raise handshake_error(address, exc) from None
                if not data:
                    # With TLS, also how a node refuses a client certificate it does not trust
                    # (asyncio closes without the alert): said, but retried like any close.
                    hint = " (with TLS: perhaps it refused this client's certificate)" if tls is not None else ""
                    raise ConnectionError(f"{address} closed the connection during the handshake{hint}")
                items = framer.feed(data)
                for i, item in enumerate(items):
                    frame = item[0] if keep_raw and isinstance(item, tuple) else item
                    if isinstance(frame, protocol.FrameError):
                        raise ConnectionError(f"{address}: bad frame during the handshake: {frame.detail}")
                    if isinstance(frame, protocol.Rejected):
                        if frame.reason is RejectReason.AUTH_FAILED:
                            raise tls_required_error(address, frame.detail) or authentication_error(token, frame.detail)
                        raise rejection(frame.reason, frame.detail)
                    if isinstance(frame, protocol.Welcome):
                        return Connection(address, reader, writer, frame, framer, items[i + 1 :], read_chunk_bytes=read_chunk_bytes)
    except BaseException:
        writer.close()
        raise


async def leader_named_by(address: str, *, session: str, token: str, timeout_s: float, tls: ClientTls = None) -> tuple[str, bool]:
    """Who leads, as the node at `address` says in its welcome: ``(address, True)`` when it
    leads itself, ``(leader, False)`` for the leader it follows (``""``: none known, or the
    node could not be asked within `timeout_s`). The connection is closed at once."""
    try:
        link = await open_connection(address, session=session, token=token, timeout_s=timeout_s, tls=tls)
    except (OSError, ConnectionError, TimeoutError, SequencerError):
        return "", False
    link.close()
    if link.welcome.role is protocol.Role.LEADER:
        return address, True
    return link.welcome.leader, False


async def request_once(
    address: str, frame: object, answer: type[AnswerT], *, session: str, token: str, timeout_s: float, tls: ClientTls = None
) -> AnswerT:
    """``Connection.request`` on a connection of its own to `address`, closed after: up to
    `timeout_s` to connect and as long again for the answer. Raises what ``open_connection``
    and ``request`` raise."""
    connection = await open_connection(address, session=session, token=token, timeout_s=timeout_s, tls=tls)
    try:
        return await connection.request(frame, answer, timeout_s)
    finally:
        connection.close()


__all__ = [
    "Connection",
    "FATAL_REASONS",
    "READ_BYTES",
    "Rejected",
    "SequencerError",
    "leader_named_by",
    "open_connection",
    "refusal",
    "request_once",
]
