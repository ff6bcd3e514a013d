"""The Raft links' guard: bounded frames, bounded strangers, a listener that stays open.

pysyncobj's ``TcpConnection`` reads a 4-byte length prefix and buffers the body until it is
complete, *then* authenticates it; its buffer is ``bytes``, copied on every read. A stranger
sending the prefix 2^31-1 and a stream of bytes thus made a node buffer without bound, in
quadratic time: 96 MiB stalled a follower ~20 s, 64 MiB sent to the leader forced a failover.
Its ``TcpServer`` closes the listening socket for good on any accept error (EMFILE): the node
then never again heard a peer that connects to it.

``GuardedConnection`` and ``GuardedServer`` replace them (``raft.patches.install()``):

* **Frames are bounded at their length prefix.** A prefix above the link's maximum (before
  the first authenticated frame, ``RAFT_LINK_HANDSHAKE_FRAME_BYTES_MAX``; after it, or
  without a password, ``RAFT_LINK_FRAME_BATCHES_MAX`` times the Raft batch bytes) or below
  0 drops the link at once, counted in ``frames_refused``. Before a link authenticated,
  reading stops while a whole frame is buffered: it buffers one frame (plus one read) before
  that frame is authenticated; after, at most a maximum frame's bytes (plus one read).
* **The buffer is a ``bytearray``**: appending and consuming cost what they carry.
* **Strangers are bounded.** An accepted link is a stranger until one frame from it decrypted
  (or, without a password, parsed). At most ``RAFT_LINK_STRANGERS_MAX`` at once (a new one
  drops the oldest), each for ``RAFT_LINK_STRANGER_DEADLINE_S``; both counted in
  ``strangers_dropped``.
* **Peer pickles are loaded with an allow-list** (``raft.safe_pickle``).
* **Each link has a key of its own** after its ends exchanged their random keys
  (``LinkCipher.for_link``), and reconnects for new ones after ``RAFT_LINK_MESSAGES_MAX``
  messages; a message whose number does not rise above the last one is refused (a replay).
* **With node keys, each end proves which member it is** (``NodeIdentity``, link version 4).
  The random keys are ephemeral X25519 keys; the accepting end's answer carries its signature
  of both and of its public key, checked against the member this end connected to; the
  connecting end's claim of a member address carries its signature of both keys and both
  ends' public keys. A
  link that fails either check is dropped before pysyncobj sees it; pysyncobj's own flow is
  unchanged (the connection turns the signed messages into the ones pysyncobj expects).
* **Accept errors back off and retry**: the listener pauses ``RAFT_ACCEPT_BACKOFF_MIN_S``,
  doubling up to ``RAFT_ACCEPT_BACKOFF_MAX_S``, counted in ``accept_errors``; never closes.

A member driven by a ``LoopPoller`` carries its own ``LinkGuard`` there (its limits from its
configuration, its counters, its timers on the loop); links of any other poller share
``DEFAULT_GUARD`` and check stranger deadlines on each accept.
"""

from __future__ import annotations

import collections
import logging
import pickle
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pysyncobj.tcp_connection
import pysyncobj.transport
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import SERVER_STATE, TcpServer

from raftseq.cluster.config import (
    RAFT_ACCEPT_BACKOFF_MAX_S,
    RAFT_ACCEPT_BACKOFF_MIN_S,
    RAFT_LINK_FRAME_BATCHES_MAX,
    RAFT_LINK_HANDSHAKE_FRAME_BYTES_MAX,
    RAFT_LINK_MESSAGES_MAX,
    RAFT_LINK_STRANGER_DEADLINE_S,
    RAFT_LINK_STRANGERS_MAX,
    RaftConfig,
)
from raftseq.cluster.raft import safe_pickle
from raftseq.cluster.raft.link_cipher import LINK_KEY_BYTES, LinkCipher, LinkHandshake, LinkIdentityError, NodeIdentity

log = logging.getLogger("raftseq.raft_link")

#: pysyncobj's length prefix: a native signed 32-bit int.
_PREFIX = struct.Struct("i")


class LinkLimits(NamedTuple):
    frame_bytes_max: int
    handshake_frame_bytes_max: int = RAFT_LINK_HANDSHAKE_FRAME_BYTES_MAX
    strangers_max: int = RAFT_LINK_STRANGERS_MAX
    stranger_deadline_s: float = RAFT_LINK_STRANGER_DEADLINE_S
    accept_backoff_min_s: float = RAFT_ACCEPT_BACKOFF_MIN_S
    accept_backoff_max_s: float = RAFT_ACCEPT_BACKOFF_MAX_S

    @classmethod
    def for_batch_bytes(cls, append_entries_batch_bytes: int) -> LinkLimits:
        return cls(frame_bytes_max=RAFT_LINK_FRAME_BATCHES_MAX * append_entries_batch_bytes)


#: What a guard counts (``LinkGuard.counters()``), by attribute name.
LINK_COUNTERS = ("frames_refused", "strangers_dropped", "accept_errors", "identities_refused")


class LinkGuard:
    """One member's link limits, counters, strangers and (with a loop) timers."""

    def __init__(self, limits: LinkLimits, call_later: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self.limits = limits
        self.call_later = call_later
        self.frames_refused = 0
        self.strangers_dropped = 0
        self.accept_errors = 0
        #: Links dropped in the handshake of node keys: a claim or an answer not signed by the
        #: member's key, or a key that is no X25519 key.
        self.identities_refused = 0
        #: Accepted links not yet authenticated, oldest first, with their deadlines.
        self._strangers: collections.OrderedDict[GuardedConnection, float] = collections.OrderedDict()

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in LINK_COUNTERS}

    def strangers(self) -> int:
        return len(self._strangers)

    def admit_stranger(self, conn: GuardedConnection) -> None:
        self.drop_late_strangers()
        while len(self._strangers) >= self.limits.strangers_max:
            oldest = next(iter(self._strangers))
            self._drop_stranger(oldest, "too many unauthenticated Raft links")
        self._strangers[conn] = time.monotonic() + self.limits.stranger_deadline_s
        if self.call_later is not None:
            self.call_later(self.limits.stranger_deadline_s, self.drop_late_strangers)

    def forget(self, conn: GuardedConnection) -> None:
        self._strangers.pop(conn, None)

    def drop_late_strangers(self) -> None:
        now = time.monotonic()
        for conn, deadline in list(self._strangers.items()):
            if deadline > now:
                break  # oldest first: the others are later still
            self._drop_stranger(conn, "unauthenticated Raft link past its deadline")

    def _drop_stranger(self, conn: GuardedConnection, why: str) -> None:
        self._strangers.pop(conn, None)
        self.strangers_dropped += 1
        log.debug("%s: dropped (%d so far)", why, self.strangers_dropped)
        conn.disconnect()


#: The guard of links whose poller carries none (a member not driven by a loop).
DEFAULT_GUARD = LinkGuard(LinkLimits.for_batch_bytes(RaftConfig().append_entries_batch_bytes))


def guard_of(poller: object) -> LinkGuard:
    guard = getattr(poller, "link_guard", None)
    return guard if isinstance(guard, LinkGuard) else DEFAULT_GUARD


#: What ``GuardedConnection._raftseq_signed_out`` returns for a message not to be sent.
_NOT_SENT = object()


def _member_at(identity: NodeIdentity, host: str, port: int) -> str | None:
    """The member whose Raft address pysyncobj connects to as (`host`, `port`): its address
    with the host resolved as pysyncobj resolves it."""
    for address in identity.members():
        member_host, _, member_port = address.rpartition(":")
        if int(member_port) == port and (member_host == host or globalDnsResolver().resolve(member_host) == host):
            return address
    return None


class GuardedConnection(TcpConnection):
    """pysyncobj's ``TcpConnection`` with bounded frames and buffer, and the allow-list."""

    def __init__(self, poller, *args, **kwargs) -> None:  # noqa: ANN001 (pysyncobj's signature)
        self._raftseq_guard = guard_of(poller)
        self._raftseq_authenticated = False
        self._raftseq_forget_link_key()
        super().__init__(poller, *args, **kwargs)
        self._TcpConnection__readBuffer = bytearray()
        if kwargs.get("socket") is not None:
            self._raftseq_guard.admit_stranger(self)

    def connect(self, host, port):  # noqa: ANN001,ANN201 (pysyncobj's signature)
        self._raftseq_authenticated = False
        self._raftseq_forget_link_key()
        self._raftseq_outgoing = True
        identity = self._raftseq_identity()
        #: The member this link connects to (with node keys): its answer must carry its signature.
        self._raftseq_peer = _member_at(identity, host, port) if identity is not None else None
        result = super().connect(host, port)
        self._TcpConnection__readBuffer = bytearray()
        return result

    def disconnect(self) -> None:
        self._raftseq_guard.forget(self)
        super().disconnect()
        self._raftseq_forget_link_key()
        self._TcpConnection__readBuffer = bytearray()

    # --- the link's own key (``LinkCipher.for_link``) -------------------------------------------

    _raftseq_outgoing = False
    _raftseq_peer: str | None = None

    def _raftseq_forget_link_key(self) -> None:
        self._raftseq_link_cipher: LinkCipher | None = None
        #: A message wrapped with this end's random key arrived: the other end knows both keys.
        self._raftseq_heard_wrapped = False
        self._raftseq_sent = 0
        #: With node keys: this end's part in the handshake (made for its first message),
        #: whether the other end proved which member it is, and (connecting end) whether this
        #: end sent its signed claim.
        self._raftseq_handshake: LinkHandshake | None = None
        self._raftseq_peer_proved = False
        self._raftseq_claimed = False

    def _raftseq_identity(self) -> NodeIdentity | None:
        return getattr(self.encryptor, "identity", None) if self.encryptor else None

    def _raftseq_signed_out(self, identity: NodeIdentity, message: Any) -> Any:
        """With node keys, what this end sends in place of pysyncobj's handshake messages
        (``LinkHandshake``): its ephemeral key as its random key (the accepting end: with its
        signature), and the connecting end's address with its signature. ``_NOT_SENT`` when
        the link was dropped, or for a Raft message pysyncobj sends on a link it opened before
        the handshake is done (it may: the link counts as connected once the socket is)."""
        if self._raftseq_handshake is None:
            # pysyncobj's first message on a link is this end's random key, just made.
            assert message is self.recvRandKey, "the first message of a link is its random key"
            handshake = self._raftseq_handshake = LinkHandshake(identity, peer=self._raftseq_peer if self._raftseq_outgoing else None)
            self.recvRandKey = handshake.key
            if self._raftseq_outgoing:
                return handshake.key
            try:
                return handshake.answer(self.sendRandKey)
            except LinkIdentityError as exc:
                self._raftseq_refuse_identity(exc)
                return _NOT_SENT
        if self._raftseq_outgoing and not self._raftseq_claimed:
            if not (self._raftseq_peer_proved and message == identity.address):
                # Lost, as Raft allows; pysyncobj sent it unwrapped and the other end dropped the link.
                return _NOT_SENT
            self._raftseq_claimed = True
            return self._raftseq_handshake.claim()
        return message

    def _raftseq_signed_in(self, message: Any) -> Any:
        """With node keys, the handshake message pysyncobj expects in place of a signed one
        (``LinkHandshake``); raises ``LinkIdentityError`` when a check fails."""
        handshake = self._raftseq_handshake
        if self._raftseq_outgoing and self.sendRandKey is None:
            if handshake is None or self._raftseq_peer is None:
                raise LinkIdentityError("this node connected to no member")
            message = handshake.take_answer(message)
        elif not self._raftseq_outgoing and self.sendRandKey is not None:
            assert handshake is not None, "the accepting end answered before a claim can come"
            message = handshake.take_claim(message)
        else:
            return message  # the connecting end's random key: checked by the answer
        self._raftseq_peer_proved = True
        return message

    def _raftseq_cipher(self, *, sending: bool) -> Any:
        """The cipher of the next message: the cluster key until both random keys are known
        (and, when sending, until the other end has shown it knows them too: the message
        that tells it this end's key goes under the cluster key), the link's own after."""
        if self.sendRandKey is None or self.recvRandKey is None or (sending and not self._raftseq_heard_wrapped):
            return self.encryptor
        if self._raftseq_link_cipher is None:
            shared = self._raftseq_handshake.shared if self._raftseq_handshake is not None else b""
            self._raftseq_link_cipher = self.encryptor.for_link(self.sendRandKey, self.recvRandKey, shared)
        return self._raftseq_link_cipher

    def send(self, message: Any) -> None:
        """pysyncobj's send, under the link's own key once there is one; a link that has sent
        ``RAFT_LINK_MESSAGES_MAX`` messages reconnects (new random keys, a new link key)."""
        if not self.encryptor:
            super().send(message)
            return
        self._raftseq_sent += 1
        if self._raftseq_sent > RAFT_LINK_MESSAGES_MAX:
            log.info("Raft link reconnects for new keys after %d messages", RAFT_LINK_MESSAGES_MAX)
            self.disconnect()
            return
        identity = self._raftseq_identity()
        if identity is not None:
            message = self._raftseq_signed_out(identity, message)
            if message is _NOT_SENT:
                return
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = pysyncobj.tcp_connection.zlib.compress(pysyncobj.tcp_connection.pickle.dumps(message), 3)
        framed = self._raftseq_cipher(sending=True).encrypt_framed(data, _PREFIX)
        if self._TcpConnection__writeBuffer:
            self._TcpConnection__writeBuffer += framed
        else:
            # Nothing waits to be sent (the usual case): the frame becomes the buffer, not
            # copied into it (pysyncobj's sending takes a bytearray as it takes bytes).
            self._TcpConnection__writeBuffer = framed
        self._TcpConnection__trySendBuffer()

    def _raftseq_frame_bytes_max(self) -> int:
        """The handshake's bound until a frame decrypted; without a password there is no
        handshake (an outgoing link's first frame may be an AppendEntries)."""
        limits = self._raftseq_guard.limits
        if self._raftseq_authenticated or not self.encryptor:
            return limits.frame_bytes_max
        return limits.handshake_frame_bytes_max

    def _raftseq_refuse_frame(self, length: int) -> None:
        guard = self._raftseq_guard
        guard.frames_refused += 1
        log.warning(
            "Raft link dropped: frame of %d bytes announced, at most %d (%s; %d refused so far)",
            length,
            self._raftseq_frame_bytes_max(),
            "authenticated" if self._raftseq_authenticated else "not authenticated",
            guard.frames_refused,
        )
        self.disconnect()

    def _raftseq_open(self, data: memoryview) -> Any:
        """A frame's message: decrypted (refusing a replay) and unpickled with the allow-list."""
        if self.encryptor:
            cipher = self._raftseq_cipher(sending=False)
            timestamp = cipher.extract_timestamp(data)
            if timestamp <= self.recvLastTimestamp:
                raise ValueError("link message not after the last one (a replay)")
            self.recvLastTimestamp = timestamp
            data = cipher.decrypt(data)
        return safe_pickle.loads(pysyncobj.tcp_connection.zlib.decompress(data))

    def _raftseq_refuse_identity(self, exc: LinkIdentityError) -> None:
        guard = self._raftseq_guard
        guard.identities_refused += 1
        log.warning("Raft link dropped: %s (node keys, docs/operating.md; %d refused so far)", exc, guard.identities_refused)
        self.disconnect()

    def _raftseq_prefix_ok(self, buffer: bytearray) -> bool:
        """Whether the frame at the head of ``buffer`` may be buffered (refused if not)."""
        if len(buffer) < _PREFIX.size:
            return True
        (length,) = _PREFIX.unpack_from(buffer)
        if 0 <= length <= self._raftseq_frame_bytes_max():
            return True
        self._raftseq_refuse_frame(length)
        return False

    def _TcpConnection__processRead(self) -> bool:  # noqa: N802 (pysyncobj's name)
        """pysyncobj's read, into a ``bytearray``. It stops (the poller reports the socket again
        once the buffer was parsed) when a whole frame is buffered and the link has not
        authenticated yet, or when the buffer holds a frame of the maximum size."""
        buffer = self._TcpConnection__readBuffer
        if not self._raftseq_prefix_ok(buffer):
            return False
        if len(buffer) >= _PREFIX.size and len(buffer) - _PREFIX.size >= _PREFIX.unpack_from(buffer)[0]:
            if not self._raftseq_authenticated or len(buffer) >= self._raftseq_guard.limits.frame_bytes_max:
                return False
        sock = self._TcpConnection__socket
        try:
            incoming = sock.recv(self._TcpConnection__recvBufferSize)
        except OSError as exc:
            if exc.errno not in (socket.errno.EAGAIN, socket.errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return False
        buffer += incoming
        return self._raftseq_prefix_ok(buffer)

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802 (pysyncobj's name)
        """pysyncobj's parse (cipher, random key), with the allow-list unpickler."""
        buffer = self._TcpConnection__readBuffer
        if self.state == CONNECTION_STATE.DISCONNECTED or not self._raftseq_prefix_ok(buffer) or len(buffer) < _PREFIX.size:
            return None
        (length,) = _PREFIX.unpack_from(buffer)
        end = _PREFIX.size + length
        if len(buffer) < end:
            return None
        try:
            # Read in place: the view is gone before the buffer drops the frame (``del``).
            message = self._raftseq_open(memoryview(buffer)[_PREFIX.size : end])
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("link message for another connection")
                # The other end knew this end's key when it sent this: it knows both now.
                self._raftseq_heard_wrapped = True
            if self._raftseq_identity() is not None and not self._raftseq_peer_proved:
                message = self._raftseq_signed_in(message)
            if self.encryptor and self.sendRandKey is None and not (isinstance(message, bytes) and len(message) == LINK_KEY_BYTES):
                raise ValueError("a link's random key is not 32 bytes")  # pysyncobj would take anything
        except pickle.UnpicklingError as exc:
            log.warning("Raft link dropped: %s (%d refused so far)", exc, safe_pickle.refused_count())
            self.disconnect()
            return None
        except LinkIdentityError as exc:
            self._raftseq_refuse_identity(exc)
            return None
        except Exception:  # noqa: BLE001 - as pysyncobj: a message that is not ours drops the link
            self.disconnect()
            return None
        del buffer[:end]
        if not self._raftseq_authenticated:
            self._raftseq_authenticated = True
            self._raftseq_guard.forget(self)
        return message


class GuardedServer(TcpServer):
    """pysyncobj's ``TcpServer`` accepting ``GuardedConnection``s, backing off on errors."""

    _raftseq_backoff_s = 0.0

    def _TcpServer__onNewConnection(self, descr, event) -> None:  # noqa: N802,ANN001 (pysyncobj's names)
        guard = guard_of(self._TcpServer__poller)
        if event & POLL_EVENT_TYPE.ERROR:
            self._raftseq_accept_failed(guard, OSError("error condition on the Raft listening socket"))
            return
        if not event & POLL_EVENT_TYPE.READ:
            return
        try:
            sock, _ = self._TcpServer__socket.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._raftseq_accept_failed(guard, exc)
            return
        self._raftseq_backoff_s = 0.0
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._TcpServer__sendBufferSize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._TcpServer__recvBufferSize)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError:
            sock.close()  # the peer is gone already
            return
        conn = GuardedConnection(
            self._TcpServer__poller,
            socket=sock,
            timeout=self._TcpServer__connectionTimeout,
            sendBufferSize=self._TcpServer__sendBufferSize,
            recvBufferSize=self._TcpServer__recvBufferSize,
            keepalive=self._TcpServer__keepalive,
        )
        self._TcpServer__onNewConnectionCallback(conn)

    def _raftseq_accept_failed(self, guard: LinkGuard, exc: OSError) -> None:
        """Count, log, and pause the listener (with a timer; without one the poller's next
        report retries)."""
        guard.accept_errors += 1
        limits = guard.limits
        self._raftseq_backoff_s = min(limits.accept_backoff_max_s, max(limits.accept_backoff_min_s, 2 * self._raftseq_backoff_s))
        log.warning(
            "Raft listener: accept failed (%s); accepting again in %.2f s (%d errors so far)",
            exc,
            self._raftseq_backoff_s,
            guard.accept_errors,
        )
        if guard.call_later is None or self._TcpServer__fileno is None:
            return
        self._TcpServer__poller.unsubscribe(self._TcpServer__fileno)
        guard.call_later(self._raftseq_backoff_s, self._raftseq_resume)

    def _raftseq_resume(self) -> None:
        if self._TcpServer__state == SERVER_STATE.BINDED and self._TcpServer__fileno is not None:
            self._TcpServer__poller.subscribe(
                self._TcpServer__fileno, self._TcpServer__onNewConnection, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
            )


# --- who an incoming link says it is ----------------------------------------------------------

_original_incoming_message = pysyncobj.transport.TCPTransport._onIncomingMessageReceived


def incoming_message(transport: Any, conn: TcpConnection, message: Any) -> None:
    """pysyncobj's handling of an incoming link's first messages (key exchange, then the
    member address it claims), where a claim can no longer cut a member off.

    pysyncobj links two members over the one connection that the member with the greater
    address opens. It took any authenticated link that named a member as that member's link,
    leaving the member's own link open and unused: a link that claimed a member and closed again
    cut that member off for good (the member saw its own link still open, and the other side
    never connects). Now a claim of a member that this node connects to itself is refused (that
    member never connects here), and a claim of a member that connects here replaces its
    previous link, which is closed so that the member, if it is the real one, connects again.
    A claim that is not an address (an unhashable value broke pysyncobj's table) drops the link.
    """
    identity_phase = conn.sendRandKey or not transport._syncObj.encryptor
    if not identity_phase or isinstance(message, list):
        _original_incoming_message(transport, conn, message)
        return
    if not isinstance(message, str):
        log.warning("Raft link dropped: it claimed to be a %s, not a member address", type(message).__name__)
        transport._unknownConnections.discard(conn)
        conn.disconnect()
        return
    node = transport._nodeAddrToNode.get(message)
    if node is not None and transport._shouldConnect(node):
        log.warning("Raft link dropped: it claimed to be %s, a member that never connects to this node", message)
        transport._unknownConnections.discard(conn)
        conn.disconnect()
        return
    previous = transport._connections.get(node) if node is not None else None
    _original_incoming_message(transport, conn, message)
    if previous is not None and previous is not conn and transport._connections.get(node) is conn:
        previous.disconnect()  # no longer in the table: pysyncobj's disconnect callback finds no member
