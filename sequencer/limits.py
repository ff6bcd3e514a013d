"""Every bound of the sequencer core, each with a name, a unit and this one home.

Limits that change what ``machine.apply`` decides (sessions, dedup window, idle expiry) live in
``MachineConfig``: they are part of the replicated state, travel inside every snapshot and must
be equal on every replica. The others bound what a node accepts from outside and may differ
per node.
"""

from __future__ import annotations

import msgspec

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# --- wire ---------------------------------------------------------------------------------
#: Largest frame body a decoder accepts, in bytes. Checked on the length prefix, before the
#: body is buffered.
FRAME_BYTES_MAX = 64 * KIB
#: Largest application payload of one submit, in bytes.
PAYLOAD_BYTES_MAX = 32 * KIB
#: Longest session name, in UTF-8 bytes.
SESSION_BYTES_MAX = 128
#: Longest shared-secret token in a hello, in UTF-8 bytes.
TOKEN_BYTES_MAX = 256
#: Most payloads in one ``SubmitBatch`` frame (the frame size limit bounds it too).
SUBMIT_BATCH_ENTRIES_MAX = 1024
#: Bits of a client instance's random ``owner`` id (``Hello.owner``, a non-negative int64).
OWNER_BITS = 63
#: Longest free-text detail in a rejected frame, in characters.
DETAIL_CHARS_MAX = 512

# --- raft log entries (batches) -----------------------------------------------------------
#: Most entries ``apply`` accepts in one batch. The leader's batcher uses a lower bound that
#: keeps a batch below pysyncobj's append-entries chunk size.
BATCH_ENTRIES_MAX = 4096
#: Largest encoded batch ``apply`` accepts, in bytes.
BATCH_BYTES_MAX = 4 * MIB

# --- journal ------------------------------------------------------------------------------
#: A segment is closed and a new one started once it holds at least this many bytes.
SEGMENT_BYTES_MAX_DEFAULT = 64 * MIB
#: Smallest segment size a journal may be configured with (tests use small segments).
SEGMENT_BYTES_MIN = 4 * KIB
#: One sparse index point every this many records.
INDEX_INTERVAL_RECORDS = 256
#: Bytes a journal reader asks the operating system for at a time.
READ_CHUNK_BYTES = 1 * MIB
#: Sealed segments read back in full when a journal opens, newest first, up to this many bytes
#: (the rest is left to the background scrub, so that a large journal still opens quickly).
JOURNAL_VERIFY_ON_OPEN_BYTES_DEFAULT = 64 * MIB
#: Bytes the background scrub reads per step: the longest it holds the node's loop for.
SCRUB_STEP_BYTES = 64 * KIB


#: What the session table counts for each remembered submit of a session's dedup window, in
#: bytes: its sequence number and its payload digest, one u64 each (``sequencer.machine``).
SESSION_WINDOW_ENTRY_BYTES = 16
#: What the session table counts for one session besides its name and window, in bytes: the
#: session object, its two arrays and its slot in the table (measured: ~400 B on CPython 3.11).
SESSION_FIXED_BYTES = 512
#: Size of the payload digest kept per remembered submit (BLAKE2b), in bytes: a retry whose
#: payload differs from the applied one is told apart with a 2**-64 chance of a miss.
SESSION_DIGEST_BYTES = 8


class MachineConfig(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=False):
    """Limits that shape the replicated state. Identical on every replica, kept in snapshots.

    Fields are only ever added at the end (a snapshot of an older format decodes with the
    defaults)."""

    #: Most sessions in the session table; a new session beyond it evicts an evictable one
    #: (``session_evict_idle_ns``) or is rejected (``too_many_sessions``).
    sessions_max: int = 100_000
    #: How many recent ``client_seq -> seq`` pairs each session remembers to answer retries.
    dedup_window: int = 4096
    #: A session with no applied submit for this long, in log time, is forgotten.
    session_idle_ns: int = 24 * 3600 * 1_000_000_000
    #: Bytes the session table may count (``session_bytes``: each session is counted with a
    #: full window from its first submit, so a table under the bound stays under it). A new
    #: session that would exceed it evicts an evictable one or is rejected. 1 GiB: ~16,000
    #: sessions with the default window.
    session_table_bytes_max: int = 1024 * MIB
    #: A full table evicts its least recently active session once that one has been idle for
    #: this long, in log time (10 minutes), to admit a new session. (Above ``session_idle_ns``
    #: it never acts: expiry forgets such sessions first.)
    session_evict_idle_ns: int = 600 * 1_000_000_000

    def session_bytes(self, name: str) -> int:
        """What the table counts for session `name`: fixed part, name and a full window."""
        return SESSION_FIXED_BYTES + len(name) + self.dedup_window * SESSION_WINDOW_ENTRY_BYTES

    def problems(self) -> list[str]:
        """What is wrong with this configuration, as sentences; empty when it is usable."""
        found = []
        if not 1 <= self.sessions_max <= 10_000_000:
            found.append(f"sessions_max must be 1..10000000, got {self.sessions_max}")
        if not 1 <= self.dedup_window <= 1_000_000:
            found.append(f"dedup_window must be 1..1000000, got {self.dedup_window}")
        if self.session_idle_ns < 1_000_000_000:
            found.append(f"session_idle_ns must be at least one second, got {self.session_idle_ns}")
        one_session = self.session_bytes("s" * SESSION_BYTES_MAX)
        if not one_session <= self.session_table_bytes_max <= 2**50:
            found.append(
                f"session_table_bytes_max must hold one session with a full dedup window ({one_session} bytes) and be at most 2**50, got {self.session_table_bytes_max}"
            )
        if not 1_000_000_000 <= self.session_evict_idle_ns < 2**63:
            found.append(f"session_evict_idle_ns must be at least one second, got {self.session_evict_idle_ns}")
        return found


# --- wire: addresses and reads (named here from literals in protocol and journal) ----------
#: Longest ``host:port`` a frame carries (``Welcome.leader``, ``Status`` addresses), in
#: characters: a DNS name (253) and a port fit.
ADDRESS_CHARS_MAX = 256
#: Largest term, log index or request id a node takes from a Raft peer's message. Terms and
#: indexes reach clients as ``Count`` (at most 2**63 - 1 on the wire); a term taken from a peer
#: must leave room for every election after it, and no cluster runs 2**62 elections.
RAFT_NUMBER_MAX = 2**62
#: Largest ``frame_bytes_max`` a ``FrameReader`` may be given, in bytes: the length prefix is
#: a u32, and a reader never buffers more than one frame.
FRAME_READER_BYTES_MAX = 2**31
#: Records ``Journal.records`` decodes per read, a bound on the frames it holds at once.
JOURNAL_RECORDS_PER_READ = 4096

# --- state-machine snapshots (the SDK's uploads, indexed by the machine) ---------------------
# Bounds of the snapshot index shape the replicated state, so they are constants of the code
# (equal on every replica of one version), not per-node settings.
#: Longest state-machine type name (``SmType``), in characters (ASCII only).
SM_TYPE_CHARS_MAX = 64
#: Longest digest (lowercase hex) a snapshot or checkpoint may carry, in characters.
SM_DIGEST_CHARS_MAX = 128
#: Most chunks one snapshot may have: with ``SNAPSHOT_CHUNK_DATA_BYTES_MAX`` a bound of ~2 GiB.
SNAPSHOT_CHUNKS_MAX = 65_536
#: Room for a chunk's header (type, digests, counts, tag) within one payload, in bytes.
SNAPSHOT_CHUNK_HEADER_BYTES_MAX = 1 * KIB
#: Bytes of snapshot data per chunk: the payload limit less room for the chunk's header.
SNAPSHOT_CHUNK_DATA_BYTES_MAX = PAYLOAD_BYTES_MAX - SNAPSHOT_CHUNK_HEADER_BYTES_MAX
#: Most index entries one ``SnapshotList`` carries (newest first).
SNAPSHOT_LIST_MAX = 32
#: Complete snapshots kept per (state-machine type, schema version), newest ``covered_seq`` first.
SM_SNAPSHOTS_PER_KIND = 3
#: Most (type, schema version) kinds in the index; a new kind beyond it evicts the kind whose
#: newest snapshot was completed earliest.
SM_SNAPSHOT_KINDS_MAX = 32
#: Most unfinished uploads (one per snapshot session); beyond it the least recently extended goes.
SM_SNAPSHOT_UPLOADS_MAX = 16

# --- node sockets (cluster/gateway) -------------------------------------------------------
#: Bytes a node's gateway reads from a client socket at a time (one frame at most, so a read
#: holds at least one whole frame).
SOCKET_READ_BYTES = FRAME_BYTES_MAX
#: Bytes of journal records a subscription reads and writes at a time.
SUBSCRIBER_BLOCK_BYTES = 256 * KIB
#: Connections waiting to be accepted by a node's gateway (the listen backlog).
LISTEN_BACKLOG = 256

# --- clients (the library's own buffers; the node's bounds above apply to what it sends) -------
#: Room kept for framing when a client packs payloads into one SubmitBatch, in bytes.
SUBMIT_BATCH_FRAMING_BYTES = 4 * KIB
#: What one payload adds to a SubmitBatch besides its bytes: a msgpack bin header (up to 5
#: bytes; 8 counted, as before) and its digest (a msgpack uint64: 9), in bytes.
SUBMIT_BATCH_ENTRY_OVERHEAD_BYTES = 8 + 9
#: Bytes a client lets pile up in its socket's write buffer before it waits for the drain.
CLIENT_WRITE_BUFFER_BYTES_MAX = 4 * MIB
#: Seconds a client waits for a node to read what it wrote before it takes the node for dead.
#: A node does not read a connection whose submits hold ``in_flight_bytes_per_connection_max``
#: until commits (or, at the latest, the batcher's commit timeout) make room.
CLIENT_WRITE_DRAIN_TIMEOUT_S = 30.0
#: Bytes a client asks of the socket per read: large enough that a subscriber catching up reads
#: many records per loop iteration, small enough to bound what one read hands to the framer.
CLIENT_READ_BYTES = 256 * KIB
#: Largest metrics page an operator tool reads from a node (a node's page is a few KiB).
METRICS_PAGE_BYTES_MAX = 1 * MIB
#: Largest frame body of a conformance recording (snapshot parts are the large ones).
RECORDING_FRAME_BODY_BYTES_MAX = 4 * MIB
#: Bytes of the starting snapshot per part of a conformance recording.
RECORDING_SNAPSHOT_PART_BYTES = 1 * MIB
