"""The frames of the client protocol: what clients and nodes say to each other.

Each frame is a tagged msgspec ``Struct`` encoded as a msgpack array whose first element is the
tag (``framing`` puts the length and checksum in front). Schema evolution: new fields are added
at the end with defaults; a reader ignores trailing fields it does not know; field types never
change. ``PROTOCOL_VERSION`` travels in ``Hello`` and ``Welcome``. New frame types
(``SnapshotQuery``/``SnapshotList``, ``MemberRequest``/``MemberReply``) need no new protocol version: only clients that use them
send them, and a node that predates them answers ``Rejected(bad_frame)``.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal, Union

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.protocol.fields import (
    SNAPSHOT_LIST_MAX,
    Address,
    ClientSeq,
    Count,
    Detail,
    Owner,
    Payload,
    PayloadDigest,
    Seq,
    Session,
    SmType,
    TimeNs,
    Token,
)
from raftseq.sequencer.protocol.snapshot_chunks import SnapshotHeader

__all__ = [
    "KNOWN_TO_OLD_CLIENTS",
    "PROTOCOL_VERSION",
    "Ack",
    "AckRange",
    "BUSY_LIMIT_CREDENTIAL_BYTES",
    "BUSY_LIMIT_CREDENTIAL_MESSAGES",
    "BUSY_QUOTA_LIMITS",
    "Busy",
    "ClientFrame",
    "Delivered",
    "Drain",
    "Drained",
    "Frame",
    "Heartbeat",
    "Hello",
    "MEMBERS_LISTED_MAX",
    "REMOVED_LISTED_MAX",
    "MemberInfo",
    "MemberReply",
    "MemberRequest",
    "LeaderTransfer",
    "LeaderTransferred",
    "NodeFrame",
    "NotLeader",
    "OutcomeUnknown",
    "Rejected",
    "RejectReason",
    "Role",
    "SnapshotInfo",
    "SnapshotList",
    "SnapshotQuery",
    "Status",
    "StatusRequest",
    "Submit",
    "SubmitBatch",
    "Subscribe",
    "Truncated",
    "Welcome",
]

PROTOCOL_VERSION = 1


class RejectReason(enum.Enum):
    """Why a node refused something. Sent as its string value."""

    BAD_FRAME = "bad_frame"  # undecodable, wrong types, bad checksum
    FRAME_TOO_LARGE = "frame_too_large"
    AUTH_FAILED = "auth_failed"
    PROTOCOL_VERSION = "protocol_version"
    HELLO_REQUIRED = "hello_required"
    SEQUENCE_GAP = "sequence_gap"  # client_seq skips ahead; `expected_client_seq` says the next
    STALE_CLIENT_SEQ = "stale_client_seq"  # applied long ago, outside the dedup window
    TOO_MANY_SESSIONS = "too_many_sessions"
    FROM_SEQ_UNAVAILABLE = "from_seq_unavailable"  # subscribe below the journal's start
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    # Sent only to clients whose hello carries an ``owner`` (they know these reasons); an
    # older client gets ``KNOWN_TO_OLD_CLIENTS[reason]`` with the new reason in the detail.
    #: A retry of an applied client_seq whose payload differs from the one applied.
    SESSION_CONFLICT = "session_conflict"
    #: A newer hello (another client) took this session over; this client must stop.
    SESSION_TAKEN_OVER = "session_taken_over"
    #: The session name is reserved (``SNAPSHOT_SESSION_PREFIX``) for snapshot publishers.
    RESERVED_SESSION = "reserved_session"


#: What a client whose hello has no ``owner`` (it predates these reasons) is sent instead.
KNOWN_TO_OLD_CLIENTS = {
    RejectReason.SESSION_CONFLICT: RejectReason.BAD_FRAME,
    RejectReason.SESSION_TAKEN_OVER: RejectReason.BAD_FRAME,
    RejectReason.RESERVED_SESSION: RejectReason.BAD_FRAME,
}


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    UNKNOWN = "unknown"


class Frame(msgspec.Struct, frozen=True, array_like=True, tag_field="t", gc=False):
    """Base of every wire frame (array-encoded, tag first)."""


# --- client -> node -----------------------------------------------------------------------


class Hello(Frame, tag="hello"):
    """First frame on every connection. Binds the connection to `session`."""

    session: Session
    token: Token
    protocol_version: int
    #: Highest client_seq this client has seen acknowledged (0: none); informational.
    last_client_seq_acked: Count = 0
    #: This client's random instance id (0: a client that predates session fencing). A hello
    #: with an owner takes the session over from any other owner, in the replicated order
    #: (``sequencer.machine``), and says the client knows the session reasons of ``RejectReason``.
    owner: Owner = 0
    #: The client publishes state-machine snapshots: only then may ``session`` start with
    #: ``SNAPSHOT_SESSION_PREFIX``.
    snapshot_publisher: bool = False


class Submit(Frame, tag="sub"):
    """Sequence `payload` as the session's message number `client_seq`."""

    client_seq: ClientSeq
    payload: Payload
    #: ``payload_digest(payload)``, computed by the client so that the node need not (0: not
    #: given). A wrong one only misleads this session's own retry checks.
    digest: PayloadDigest = 0


class SubmitBatch(Frame, tag="subs"):
    """``Submit`` for each payload, numbered ``first_client_seq``, ``first_client_seq + 1``, …

    One frame for many submits: the same semantics as that many ``Submit`` frames in a row,
    answered the same way (``Ack``/``AckRange``, ``Busy``, … per client_seq).
    """

    first_client_seq: ClientSeq
    payloads: Annotated[list[Payload], msgspec.Meta(min_length=1, max_length=limits.SUBMIT_BATCH_ENTRIES_MAX)]
    #: ``payload_digest`` of each payload (as ``Submit.digest``), or empty: not given.
    digests: Annotated[list[PayloadDigest], msgspec.Meta(max_length=limits.SUBMIT_BATCH_ENTRIES_MAX)] = []


class Subscribe(Frame, tag="subscribe"):
    """Deliver the stream from `from_seq` on, then keep delivering as it grows."""

    from_seq: Seq
    #: The client knows ``Truncated`` (0.3+). A subscription below the node's first retained
    #: number is answered ``Truncated``; without this (a 0.2 client, which could not decode it)
    #: ``Rejected(FROM_SEQ_UNAVAILABLE)`` whose detail names the first number still held.
    truncated_known: bool = False


class StatusRequest(Frame, tag="status?"):
    pass


class Heartbeat(Frame, tag="hb"):
    """Sent by both sides when idle. From a node, `last_seq` is its last committed number."""

    last_seq: Count = 0


# --- node -> client -----------------------------------------------------------------------


class Welcome(Frame, tag="welcome"):
    node_id: str
    protocol_version: int
    role: Role
    #: Client address of the leader as this node knows it, or "" when unknown.
    leader: Address
    #: Highest client_seq of this session the node has applied (0: unknown session).
    last_client_seq: Count
    heartbeat_interval_ms: int
    #: The node's dedup window (0: a node that does not say): a resend is recognised only
    #: within it, so a client never holds more submits unacknowledged than this.
    dedup_window: Count = 0


class Ack(Frame, tag="ack"):
    """`client_seq` is committed as sequence number `seq`. `duplicate`: it already was."""

    client_seq: ClientSeq
    seq: Seq
    duplicate: bool = False


class AckRange(Frame, tag="acks"):
    """``Ack`` for ``count`` submits: client_seq ``first_client_seq + i`` is committed as
    ``first_seq + i``. Sent for runs of consecutive numbers on both sides."""

    first_client_seq: ClientSeq
    first_seq: Seq
    count: Annotated[int, msgspec.Meta(ge=1, le=limits.BATCH_ENTRIES_MAX)]


class Busy(Frame, tag="busy"):
    """A limit was hit; `client_seq` was not taken. Retry after the hint, from `client_seq`
    on: the submits sent behind it on the connection are not answered until it comes again.
    `limit` names the limit; ``BUSY_QUOTA_LIMITS`` are a credential's rates (a client's own
    pace, not the node's load)."""

    client_seq: Count
    retry_after_ms: int
    limit: str = ""


#: ``Busy.limit`` of a credential's rate quotas: messages a second, and payload bytes a second.
BUSY_LIMIT_CREDENTIAL_MESSAGES = "credential_messages_per_s"
BUSY_LIMIT_CREDENTIAL_BYTES = "credential_bytes_per_s"
BUSY_QUOTA_LIMITS = frozenset({BUSY_LIMIT_CREDENTIAL_MESSAGES, BUSY_LIMIT_CREDENTIAL_BYTES})


class NotLeader(Frame, tag="notleader"):
    """This node does not take submits. `leader` is the leader's client address, "" if unknown."""

    leader: Address
    client_seq: Count = 0


class OutcomeUnknown(Frame, tag="unknown"):
    """The node cannot tell whether `client_seq` was sequenced (leader lost, commit timeout).

    Never a failure: resubmit under the same client_seq; the sequencer applies it at most once
    and answers a retry of an applied submit with the number it already has.
    """

    client_seq: ClientSeq
    detail: Detail = ""


class Rejected(Frame, tag="rejected"):
    reason: RejectReason
    detail: Detail = ""
    client_seq: Count = 0
    #: With SEQUENCE_GAP: the client_seq the sequencer expects next for this session.
    expected_client_seq: Count = 0


class Delivered(Frame, tag="d"):
    """One sequenced message. A journal record is exactly this frame."""

    seq: Seq
    log_time_ns: TimeNs
    session: Session
    client_seq: ClientSeq
    payload: Payload


class Truncated(Frame, tag="truncated"):
    """The answer to ``Subscribe(from_seq)`` below what this node's journal retains: retention
    removed the records before `first_seq` (the first it still holds). Read them from an
    archive, or start from a state-machine snapshot and subscribe after it. Sent only to a
    subscription that says it knows this frame (``Subscribe.truncated_known``)."""

    from_seq: Seq
    first_seq: Seq


class Status(Frame, tag="status"):
    node_id: str
    role: Role
    leader: Address
    term: Count
    commit_index: Count
    last_seq: Count
    last_log_time_ns: Count
    pid: Count = 0
    client_address: Address = ""
    raft_address: Address = ""
    #: host:port of the node's Prometheus endpoint, "" when metrics are off (or an older node).
    metrics_address: Address = ""
    #: The lowest number this node's journal still has to fetch from a peer (its first hole or
    #: damaged segment, else its last number + 1): peers' retention keeps it. 0: an older node.
    journal_needs_from: Count = 0


# --- state-machine snapshots: the index query (any node answers from its machine) ----------


class SnapshotInfo(SnapshotHeader):
    """One complete state-machine snapshot the cluster holds: what it is and where its chunks are.

    The chunks are the messages of ``session`` numbered ``first_seq..last_seq`` (other sessions'
    messages may sit between them); read them with an ordinary subscription from ``first_seq``.
    ``bytes_sha256`` covers the concatenated chunk data; ``digest`` is the state machine's own
    digest of the state, checked after restoring it.
    """

    session: Session
    first_seq: Seq
    last_seq: Seq
    #: Log time of the last chunk.
    log_time_ns: TimeNs


class SnapshotQuery(Frame, tag="snaps?"):
    """Which snapshots of state-machine type `sm_type` does the cluster hold? Any node answers."""

    sm_type: SmType


class SnapshotList(Frame, tag="snaps"):
    """The answer to ``SnapshotQuery``: the node's index, newest ``covered_seq`` first, as of
    its applied sequence number ``last_seq``."""

    sm_type: SmType
    snapshots: Annotated[list[SnapshotInfo], msgspec.Meta(max_length=SNAPSHOT_LIST_MAX)]
    last_seq: Count


# --- membership (``raftseq member``): a request any node takes, answered by the node (``list``)
# or by the leader (``add``, ``remove``, ``promote``). Only ``raftseq member`` sends them; a node
# that predates them answers ``Rejected(bad_frame)`` (no new protocol version, as above).

#: Members listed in one reply at most (a cluster has at most 7 voters and a learner), and
#: removed ids (the rest are counted, not listed).
MEMBERS_LISTED_MAX = 16
REMOVED_LISTED_MAX = 64
#: A node id on the wire (as ``cluster.config.NodeId``), and a public key in hex.
NodeIdText = Annotated[str, msgspec.Meta(max_length=32)]
PublicKeyText = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[0-9a-fA-F]*\Z")]

MemberOp = Literal["list", "add", "remove", "promote"]


class MemberInfo(msgspec.Struct, frozen=True, array_like=True):
    id: NodeIdText
    raft_address: Address
    client_address: Address
    raft_public_key: PublicKeyText = ""
    learner: bool = False


class MemberRequest(Frame, tag="member?"):
    """``list``: the membership as the node holds it. ``add`` (a new node as a learner, promoted
    by the leader once caught up), ``remove``, ``promote``: on the leader only."""

    op: MemberOp
    node_id: NodeIdText = ""
    raft_address: Address = ""
    client_address: Address = ""
    raft_public_key: PublicKeyText = ""


class MemberReply(Frame, tag="member"):
    """The answer to ``MemberRequest``: ``error`` is "" when it was done (a change: committed);
    ``retry`` says the same request should go again (to ``leader``, or after a hand-over)."""

    error: Detail
    retry: bool
    #: The leader's client address as this node knows it ("" when none).
    leader: Address
    number: int
    members: Annotated[list[MemberInfo], msgspec.Meta(max_length=MEMBERS_LISTED_MAX)]
    removed: Annotated[list[NodeIdText], msgspec.Meta(max_length=REMOVED_LISTED_MAX)] = []


# --- maintenance: planned leadership transfer (``raftseq leader transfer``) ----------------
# A node of 0.2 does not know these tags: it answers ``Rejected(bad_frame)`` and closes.


class LeaderTransfer(Frame, tag="transfer?"):
    """Asks the leader to hand leadership over: to the node with id `to`, or ("") to its most
    caught-up follower. The leader holds its proposals, waits until the target holds its
    whole log, then has it stand for election at once (Raft's TimeoutNow)."""

    to: Address = ""


class LeaderTransferred(Frame, tag="transfer"):
    """The answer to ``LeaderTransfer``: `ok` with the new leader's client address, or the
    reason it did not happen (`detail`: not the leader, unknown node, target not caught up in
    time, no new leader in time: the old one then leads on). `held_ms`: how long the old
    leader held its proposals (submits waited that long)."""

    ok: bool
    leader: Address
    detail: Detail
    held_ms: Count = 0


class Drain(Frame, tag="drain?"):
    """Asks a node to stop taking clients (``raftseq node drain``): it refuses new
    subscriptions, closes its subscribers (they resume on another node), answers submits
    with ``NotLeader``, and, if it leads, hands leadership over (as ``LeaderTransfer``)."""


class Drained(Frame, tag="drained"):
    """The answer to ``Drain``: `ok` once the node takes no clients and does not lead;
    `leader`: the leader's client address as the node knows it; else why not (`detail`)."""

    ok: bool
    leader: Address
    detail: Detail


#: Every frame a client sends.
ClientFrame = Union[Hello, Submit, SubmitBatch, Subscribe, StatusRequest, Heartbeat, SnapshotQuery, MemberRequest, LeaderTransfer, Drain]
#: Every frame a node sends.
NodeFrame = Union[
    Welcome,
    Ack,
    AckRange,
    Busy,
    NotLeader,
    OutcomeUnknown,
    Rejected,
    Delivered,
    Status,
    Heartbeat,
    SnapshotList,
    Truncated,
    MemberReply,
    LeaderTransferred,
    Drained,
]
