"""Node configuration: one TOML file per node, checked before anything starts.

Every timing and bound of a running node has its home here, with the measurement behind it.
"""

from __future__ import annotations

import os
import tomllib
from typing import Annotated

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.journal import FsyncPolicy
from raftseq.sequencer.journal.retention import RetentionPolicy
from raftseq.sequencer.limits import MachineConfig

Address = Annotated[str, msgspec.Meta(pattern=r"^[^\s:]+:\d{1,5}$")]
NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,32}$")]


#: The node's role watcher reads the Raft member's role and leader this often, in seconds: a
#: new leader's batcher starts (and a deposed one's stops) within it.
ROLE_WATCH_INTERVAL_S = 0.01
#: ``NodeConfig.durability``: what an acknowledged message survives. "crash": a kill of every
#: node's process (the Raft log is written, never fsynced); "power": a power cut of every node
#: (an entry counts toward commit on a node only once fsynced there; ``cluster.raft.log_store``).
DURABILITY_MODES = ("crash", "power")
#: A Raft log segment ends before it would pass this (a record never spans two segments).
#: Compaction deletes whole segments, so the disk holds at most one segment more than the log
#: needs; opening reads one segment at a time into memory.
RAFT_LOG_SEGMENT_BYTES_MAX = 64 * limits.MIB
#: A Raft log record's body is at most this; a longer length on disk is damage. Every entry the
#: node writes is below ``raft.append_entries_batch_bytes`` (64 KiB), far under it.
RAFT_LOG_RECORD_BYTES_MAX = 16 * limits.MIB
#: Bytes queued for the Raft log's writer thread (power mode) beyond which the node takes no
#: new entries (the loop never waits for the writer): the leader answers submits with
#: ``Busy("raft_log_backlog")``, a follower drops AppendEntries that carry entries. The
#: batcher's window (``batcher.in_flight_max`` x ``batcher.bytes_max``) keeps a healthy leader
#: far below; only a disk stalled for seconds reaches it.
RAFT_LOG_WRITE_QUEUE_BYTES_MAX = 64 * limits.MIB
#: How long closing the Raft log waits for its writer thread to write what is queued.
RAFT_LOG_CLOSE_WAIT_S = 10.0
#: Free disk (``journal.disk_free_bytes_min``) is checked this often, in seconds.
DISK_CHECK_INTERVAL_S = 1.0
#: The stage probe (``cluster.stage_probe``, benchmarks only): the environment variables that
#: switch it on (a directory) and restrict it to sessions starting with a prefix, the rows a
#: process writes at most, and how often (seconds) it appends what it holds to its file.
STAGE_PROBE_DIR_ENV = "RAFTSEQ_STAGE_PROBE_DIR"
STAGE_PROBE_SESSIONS_ENV = "RAFTSEQ_STAGE_PROBE_SESSIONS"
STAGE_PROBE_ROWS_MAX = 2_000_000
STAGE_PROBE_WRITE_INTERVAL_S = 0.5

#: ``Busy.retry_after_ms`` of the gateway's refusals, in milliseconds: when a table is full
#: (connections, subscribers) or the disk is low, when a session has too many submits in
#: flight, and when the leader's batcher queue is full.
BUSY_RETRY_AFTER_FULL_MS = 1000
BUSY_RETRY_AFTER_IN_FLIGHT_MS = 20
BUSY_RETRY_AFTER_LEADER_QUEUE_MS = 50
#: Credentials (``cluster.credentials``, docs/operating.md "Credentials and quotas"). A node
#: reads its ``credentials_file`` again when the file's inode, size or mtime changed, checked
#: this often, in seconds: a revoked credential's connections are closed within it.
CREDENTIALS_POLL_INTERVAL_S = 1.0
#: TLS on client ports (``cluster.tls``, docs/operating.md "TLS"): a node or relay checks its
#: certificate, key and CA files this often, in seconds, and serves new connections with them
#: once their inode, size or mtime changed (connections already open keep the old certificate).
TLS_POLL_INTERVAL_S = 1.0
#: The file is read whole: at most this many bytes, this many credentials, this many session
#: prefixes per credential.
CREDENTIALS_FILE_BYTES_MAX = 4 * limits.MIB
CREDENTIALS_MAX = 10_000
CREDENTIAL_PREFIXES_MAX = 64
#: scrypt cost of a stored secret (n, r, p: 128 * r * n = 2 MiB of memory per check).
#: ``raftseq cred add`` generates secrets of ``CREDENTIAL_SECRET_BYTES`` random bytes, so the
#: hash need not make guessing slow (nobody guesses 256 bits); it keeps a stolen file from
#: being a list of secrets. Measured ~5 ms idle, ~25 ms on this loaded 2-core box, on the
#: node's loop: a node checks each credential's secret once and then compares a keyed digest
#: (``cluster.credentials``), so a reconnect storm costs one scrypt per credential.
CREDENTIAL_SCRYPT_N = 2**11
#: scrypt checks a node runs per second (a token bucket holding one second's worth): a flood of
#: hellos with wrong secrets costs the loop at most this many checks a second; beyond it a hello
#: whose secret is not yet verified gets ``Busy`` (limit ``credential_checks``) and the client
#: connects again. Verified secrets are compared without scrypt and never wait for it.
CREDENTIAL_CHECKS_PER_S = 20
CREDENTIAL_SCRYPT_R = 8
CREDENTIAL_SCRYPT_P = 1
CREDENTIAL_SECRET_BYTES = 32
#: A credential's token buckets hold this many seconds of its rate (a burst).
CREDENTIAL_BURST_S = 1.0
#: Credential names with a metrics label of their own; refusals of any further ones are
#: counted under ``OTHER_CREDENTIALS_LABEL`` (labels stay bounded however many exist).
CREDENTIAL_LABELS_MAX = 50
OTHER_CREDENTIALS_LABEL = "other"
#: ``Busy.retry_after_ms`` of a submit over its credential's rate, in milliseconds, at least
#: (the time until the bucket holds the submit, if longer).
BUSY_RETRY_AFTER_QUOTA_MS_MIN = 10
#: A submit over its credential's rate is told to retry once the bucket holds this fraction of
#: its burst again (or the submit, if more): the client sends its whole window again after a
#: ``Busy``, and a retry as soon as one token was back let about one submit in per window sent
#: (8,000 messages through a 2,000 msg/s quota with a window of 2,000: 211,756 resubmits).
QUOTA_RETRY_REFILL = 0.25
#: ``Busy.retry_after_ms`` while the Raft log's writer is behind ``RAFT_LOG_WRITE_QUEUE_BYTES_MAX``
#: (a stalled disk: a retry sooner than a disk's usual recovery would only be refused again).
BUSY_RETRY_AFTER_RAFT_LOG_BACKLOG_MS = 500
#: Seconds a stopping gateway waits for its listening socket to close.
GATEWAY_STOP_WAIT_S = 2.0

#: The metrics port (``cluster.metrics_http``): open connections (a new one beyond it closes
#: the oldest; Prometheus holds one per node), seconds and bytes a request head may take, and
#: seconds a page is reused (scrapers come every second or more; four tight ones raised submit
#: p99 from 1 to 9 ms when each got a fresh page).
METRICS_CONNECTIONS_MAX = 16
METRICS_REQUEST_TIMEOUT_S = 5.0
METRICS_REQUEST_HEAD_BYTES_MAX = 8 * limits.KIB
METRICS_PAGE_REUSE_S = 0.25

#: The node log (``cluster.node_log``): lines of one kind (logger, level, message template)
#: passed per interval before the rest are dropped and counted, and the kinds remembered (the
#: templates are the code's, so a few dozen occur). Failed hellos once wrote 2.4 MiB/s.
LOG_REPEAT_LINES_MAX = 10
LOG_REPEAT_INTERVAL_S = 10.0
LOG_REPEAT_KINDS_MAX = 1024
#: A node log file is rotated at this size; this many older files are kept (node.log.1 ...).
NODE_LOG_BYTES_MAX = 64 * limits.MIB
NODE_LOG_FILES_KEPT = 5

# The Raft links (``cluster/raft/link_guard.py``). An abuse probe stalled a follower for ~20 s
# with one unauthenticated length prefix of 2^31-1 and 96 MiB behind it (pysyncobj buffered the
# body before authenticating it, copying the buffer on every read).
#: Largest link frame, in multiples of ``raft.append_entries_batch_bytes``: pysyncobj fills an
#: AppendEntries up to that many bytes plus one entry below it (< 2x), and sends snapshot and
#: large-entry pieces of that size; the rest is pickle and cipher overhead.
RAFT_LINK_FRAME_BATCHES_MAX = 4
#: Largest frame before a link has authenticated (its first frame: a 32-byte random key,
#: pickled and encrypted, under 100 bytes), in bytes.
RAFT_LINK_HANDSHAKE_FRAME_BYTES_MAX = 1024
#: Incoming links that have not yet sent one authenticated frame: at most this many at once
#: (a new one evicts the oldest), each for at most this many seconds. A real peer sends its
#: first frame right after connecting.
RAFT_LINK_STRANGERS_MAX = 16
RAFT_LINK_STRANGER_DEADLINE_S = 2.0
#: After a failed accept (EMFILE, ENFILE, ENOBUFS...) the Raft listener pauses this long,
#: doubling on each failure in a row up to the maximum, then accepts again (pysyncobj closed
#: it for good on the first one).
RAFT_ACCEPT_BACKOFF_MIN_S = 0.05
RAFT_ACCEPT_BACKOFF_MAX_S = 2.0
#: A follower that has heard no leader for this many times ``raft.election_timeout_max_s``
#: reports no leader (role candidate) instead of following one it may have lost: a healthy
#: leader is heard every ``append_entries_period_s``, and an election would have replaced a
#: dead one within the timeout. What it serves subscribers is then at most this old.
RAFT_LEADER_SILENCE_ELECTION_TIMEOUTS = 2

#: ``raftseq cluster up``'s restarts (``cluster.restarts``): the delay before the first restart
#: of a node that failed, in seconds; it doubles up to the maximum; a node that ran the healthy
#: time before it failed starts from the first delay again.
RESTART_DELAY_FIRST_S = 1.0
RESTART_DELAY_MAX_S = 30.0
RESTART_HEALTHY_AFTER_S = 60.0

#: Messages one Raft link sends under its own key before it reconnects with new ones: AES-GCM
#: with random 96-bit nonces stays safe for 2**32 messages under one key.
RAFT_LINK_MESSAGES_MAX = 2**30

#: Bytes of the per-cluster salt ``cluster up`` generates, and the fewest a node accepts.
RAFT_SALT_BYTES_MIN = 16

#: Bytes of an Ed25519 public key (a node's identity on the Raft links), and of its private seed.
RAFT_NODE_KEY_BYTES = 32
#: The first line of a node key file (``raft_key_file``): its format and version.
NODE_KEY_FILE_HEADER = "raftseq node key 1"

#: Shortest raft_password a node accepts: one captured link message lets anyone try passwords
#: offline, so a short or word-like one falls quickly (``cluster up`` generates 32 characters).
RAFT_PASSWORD_CHARS_MIN = 16


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the field."""


class ConfigUnreadable(ConfigError):
    """The configuration file cannot be read, or is not TOML."""


class PeerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: NodeId
    raft_address: Address
    client_address: Address
    #: The peer's node identity on the Raft links: its Ed25519 public key, hex (see
    #: ``NodeConfig.raft_key_file``).
    raft_public_key: str = ""


class RaftConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """pysyncobj timings (see DESIGN.md section 5 and the README's failover figures).

    * ``append_entries_use_batch = false``: with batching on, the leader sends only every
      ``append_entries_period_s`` (~100 ms median latency at 200 msg/s); off, 0.5 ms median.
    * ``connection_timeout_s``: the default 3.5 s drops the idle follower-follower link, so the
      first vote request after a leader death is lost (1.3-2.5 s failovers). Raised, keepalives
      hold the link: 0.56 s failover at default election timeouts.
    * ``election_timeout_min_s/max_s``: 0.15/0.3 s gave 0.16 s failovers but needless elections
      under a 20k in-flight window on this 2-core machine; the batcher bounds the window.
    * ``leader_fallback_timeout_s``: a leader that heard no reply from a majority for this long
      steps down (Raft's check-quorum; pysyncobj's default is 30 s). Twice the longest
      election timeout: by then the majority has elected another leader, and a cut-off or
      paused leader no longer answers as leader (3 s cost 3 s per isolated leader in the chaos
      soak). At one election timeout (0.4 s) a leader stepped down 14 times in 4 minutes of
      steady load without a fault on this 2-core machine at load average 45 (a stalled loop
      reads the replies late); at 0.8 s once. Only routing trusts "I lead"; commits prove it.
    """

    election_timeout_min_s: float = 0.2
    election_timeout_max_s: float = 0.4
    append_entries_use_batch: bool = False
    append_entries_period_s: float = 0.05
    connection_timeout_s: float = 60.0
    connection_retry_s: float = 0.2
    leader_fallback_timeout_s: float = 0.8
    #: pysyncobj sends an entry at or above this many bytes through a broken chunked path.
    append_entries_batch_bytes: int = 64 * limits.KIB
    #: Compact the Raft log (snapshot of the machine state) after this many entries or seconds.
    log_compaction_min_entries: int = 5000
    log_compaction_min_time_s: float = 300.0
    commands_queue_size: int = 1000
    tick_period_s: float = 0.005
    #: After a commit the leader waits this long for a new batch to carry the commit index to
    #: the followers before it sends an AppendEntries for the commit alone (0: at once). The
    #: wait delays only the followers' apply (their subscribers), never an acknowledgement.
    commit_notify_delay_s: float = 0.001


class BatcherConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A batch closes when the previous one committed, or at these limits."""

    entries_max: int = 1000
    #: Encoded batch size limit; kept below ``RaftConfig.append_entries_batch_bytes`` with room
    #: for pysyncobj's own framing of the entry.
    bytes_max: int = 60 * limits.KIB
    #: Batches proposed to Raft and not yet committed (pipelining depth). Measured with one
    #: pipelined client on this 2-core machine: 2 -> 86k msg/s, 8 -> 115k, 16 -> 82k.
    in_flight_max: int = 8
    #: Power durability: Raft entries the leader holds not yet on its own disk (proposed, or in
    #: its log above the durable index) below which a batch that is not full is proposed at
    #: once, while others are in flight, rather than after the next commit: one fsync then
    #: covers several batches. 0 (the default): wait for the commit, as in crash durability.
    #: Off by default because measured on this 2-core box (load 3-10, 3 A/B rounds) 8 cost
    #: 15-19% more CPU per acknowledged message and raised p50 at 2,000 msg/s (10-16 ms
    #: against 7-8 ms): the batcher already groups the messages that arrive during a commit
    #: (~5.5 messages per fsync at 2,000 msg/s with 1.0 entries per fsync).
    unsynced_entries_max: int = 0
    #: Submits queued at the leader, waiting for a batch; beyond it submits get ``Busy``.
    queue_entries_max: int = 50_000
    #: Bytes of submits the leader holds (queued and proposed, not yet answered), counted as
    #: their encoded entries; beyond it submits get ``Busy``. Counting entries alone let three
    #: connections of 32 KiB payloads hold 1.2-1.8 GB (20,000 in flight each) and starve the
    #: Raft heartbeats; 64 MiB is ~2,000 such payloads, far more than the ``in_flight_max``
    #: batches Raft carries at once.
    held_bytes_max: int = 64 * limits.MIB
    #: Seconds a proposed batch may wait for its commit before its submits are answered as
    #: unknown (the client resubmits under the same client_seq).
    commit_timeout_s: float = 5.0
    #: The priority lane (submits of credentials with ``priority``): its own queue, drained
    #: into each batch before the bulk queue, and its own byte bound, so that it never waits
    #: behind a full bulk queue. Small: control traffic is rare and each submit is urgent.
    priority_queue_entries_max: int = 1000
    priority_held_bytes_max: int = 4 * limits.MIB
    #: Seconds after a priority submit during which priority traffic counts as recent: bulk
    #: is then held to the two bounds below, so that the next priority submit finds little
    #: ahead of it in the Raft log (what it cannot skip) and short loop turns at the leader.
    priority_recent_s: float = 1.0
    #: While priority traffic is recent: bulk entries proposed and not yet committed. A
    #: priority submit commits after them; ~1,000 is a few ms of this box's throughput.
    priority_bulk_in_flight_entries_max: int = 1024


class GatewayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Authenticated connections (a hello was welcomed); beyond it a hello gets ``Busy``.
    connections_max: int = 1000
    #: Connections that have not said hello yet, counted apart from ``connections_max`` so that
    #: they can never keep authenticated clients out (1,100 silent sockets once did). When full,
    #: a new connection pushes out the oldest one still waiting for its hello.
    preauth_connections_max: int = 64
    subscribers_max: int = 200
    #: Submits of one session sent and not yet answered; beyond it the answer is ``Busy``.
    in_flight_per_session_max: int = 20_000
    #: Payload bytes of one connection's submits sent and not yet answered. A connection
    #: that may pass it with its next frame is not read until answers make room (its submits
    #: wait in its socket), and a submit beyond it gets ``Busy``. Everything the leader holds
    #: waits in one queue, so a client's latency is what the others hold over the throughput:
    #: 1 MiB is twice what Raft carries at once (``batcher.in_flight_max`` batches of
    #: ``bytes_max``), so one connection still fills the pipeline, and 10,000 submits of
    #: 100 bytes.
    in_flight_bytes_per_connection_max: int = 1 * limits.MIB
    heartbeat_interval_ms: int = 500
    #: A connection silent for this long (no frame, no heartbeat) is closed.
    idle_timeout_ms: int = 3000
    #: ... unless writes to it are pending: its client answers heartbeats after it reads, and
    #: a subscriber that reads slowly (a busy process) is not gone. One that reads nothing
    #: for this long is closed (on a relay the lag bound usually cuts it first).
    pending_writes_idle_timeout_ms: int = 30_000
    #: Bytes written to a subscriber and not yet drained by the socket before the node stops
    #: reading the journal for it (flow control).
    subscriber_buffer_bytes_max: int = 1 * limits.MIB
    #: A connection that has not said hello this long after connecting is closed. A client
    #: sends its hello at once; the deadline only frees the slot of one that never will.
    hello_timeout_ms: int = 2000

    def problems(self) -> list[str]:
        """What is wrong with these settings (a node's, or a relay's: ``cluster.relay_config``)."""
        found = []
        if not 100 <= self.heartbeat_interval_ms < self.idle_timeout_ms:
            found.append("gateway.heartbeat_interval_ms must be >= 100 and below idle_timeout_ms")
        if self.pending_writes_idle_timeout_ms < self.idle_timeout_ms:
            found.append("gateway.pending_writes_idle_timeout_ms must be at least idle_timeout_ms")
        if self.in_flight_bytes_per_connection_max < limits.PAYLOAD_BYTES_MAX:
            found.append(f"gateway.in_flight_bytes_per_connection_max must be at least {limits.PAYLOAD_BYTES_MAX} (one payload)")
        if self.subscriber_buffer_bytes_max < limits.FRAME_BYTES_MAX:
            found.append(f"gateway.subscriber_buffer_bytes_max must be at least {limits.FRAME_BYTES_MAX}")
        return found


class TlsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[tls]`` of a node's or relay's config: TLS 1.3 on its client port (``cluster.tls``).
    No ``cert_file``: the port speaks plaintext. The Raft links are not covered (they have
    their own cipher)."""

    #: PEM certificate chain the port presents, and its private key.
    cert_file: str = ""
    key_file: str = ""
    #: PEM CA certificates a client certificate must chain to: mutual TLS (a connection without
    #: one fails its handshake). A verified certificate's subject CN names a credential
    #: (``cluster.credentials``) for a hello without a token. "": no client certificates.
    client_ca_file: str = ""
    #: PEM CA certificates this node trusts when it connects to other nodes' client ports as a
    #: client (catch-up, a relay's upstream). "": the system's CAs. With ``client_ca_file`` the
    #: node presents its own ``cert_file`` there.
    ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def problems(self) -> list[str]:
        """What is wrong with these settings: each file named must be readable."""
        if not self.cert_file and (self.key_file or self.client_ca_file):
            return ["tls.cert_file is required when tls.key_file or tls.client_ca_file is set"]
        found = []
        if self.cert_file and not self.key_file:
            found.append("tls.key_file is required with tls.cert_file")
        for name in ("cert_file", "key_file", "client_ca_file", "ca_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                found.append(f"tls.{name} {path}: " + ("cannot be read" if os.path.exists(path) else "no such file"))
        return found


class JournalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    segment_bytes_max: int = limits.SEGMENT_BYTES_MAX_DEFAULT
    #: ``never``, ``batch`` or ``interval_ms=N``.
    fsync: str = "never"
    #: Refuse to append (and stop the node) when less than this many bytes are free.
    disk_free_bytes_min: int = 256 * limits.MIB
    #: Sealed segments read back in full when the node starts, newest first, up to this many
    #: bytes (64 MiB: one default segment, well under a second); the rest is left to the scrub.
    verify_on_open_bytes: int = limits.JOURNAL_VERIFY_ON_OPEN_BYTES_DEFAULT
    #: The background scrub reads sealed segments back at this rate, in bytes per second (4 MiB/s:
    #: a 1 GiB journal every ~4 minutes; measured ~0.3 ms of the node's loop per 64 KiB step, ~20 ms
    #: per second in all). 0: no scrub.
    scrub_bytes_per_s: int = 4 * limits.MIB
    #: A damaged range is given up (the node stops with exit code 7, ``journal_damaged``) after
    #: this many fetches in a row that reached a peer and brought none of it: every peer lacks it.
    repair_attempts_max: int = 6


class RetentionConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Journal retention (``cluster.retention``; docs/operating.md, "Retention"). Every bound 0:
    the journal keeps everything (as before 0.3). Whatever the bounds, nothing at or above the
    retention floor leaves the journal."""

    #: Keep at most this many bytes of journal segments (0: no bound). At least two segments.
    journal_bytes_max: int = 0
    #: Keep sealed segments whose newest record is at most this old in log time (0: no bound).
    log_age_s_max: int = 0
    #: Keep at most this many records (0: no bound).
    records_max: int = 0
    #: Move removed segments (with their index) into this directory instead of deleting them;
    #: ``raftseq journal verify`` reads it. "": delete (or ``archive_command``).
    archive_dir: str = ""
    #: Run this command (an argv list) with a removed segment's path appended; exit 0 means
    #: archived and the segment is deleted, anything else keeps it and is retried. []: none.
    archive_command: list[str] = []
    #: An archive command still running after this long is killed and counts as failed.
    archive_command_timeout_s: float = 300.0
    #: How often retention looks at the journal and asks peers what they still need.
    check_interval_s: float = 10.0

    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(self.journal_bytes_max, self.log_age_s_max, self.records_max)

    def problems(self, *, segment_bytes_max: int, compaction_entries_min: int) -> list[str]:
        found = []
        for name in ("journal_bytes_max", "log_age_s_max", "records_max"):
            if getattr(self, name) < 0:
                found.append(f"retention.{name} must be >= 0 (0: no bound)")
        if 0 < self.journal_bytes_max < 2 * segment_bytes_max:
            found.append(
                f"retention.journal_bytes_max must be 0 (no bound) or at least 2 x journal.segment_bytes_max "
                f"({2 * segment_bytes_max}): a sealed segment and the tail"
            )
        if 0 < self.records_max < compaction_entries_min:
            found.append(
                f"retention.records_max {self.records_max} is below the snapshot floor: a Raft snapshot may be "
                f"raft.log_compaction_min_entries ({compaction_entries_min}) entries behind, and a restart replays them "
                "from it; use 0 or at least that"
            )
        if self.archive_dir and self.archive_command:
            found.append("retention: set archive_dir or archive_command, not both")
        if self.archive_dir and not os.path.isabs(self.archive_dir):
            found.append(f"retention.archive_dir must be an absolute path, got {self.archive_dir!r}")
        if not 0 < self.archive_command_timeout_s <= 86400:
            found.append("retention.archive_command_timeout_s must be above 0 and at most 86400")
        if not 0.01 <= self.check_interval_s <= 3600:
            found.append("retention.check_interval_s must be 0.01..3600")
        return found


class MachineSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sessions_max: int = MachineConfig().sessions_max
    dedup_window: int = MachineConfig().dedup_window
    session_idle_s: int = MachineConfig().session_idle_ns // 1_000_000_000
    #: Bytes the session table may count (docs/sessions.md).
    session_table_bytes_max: int = MachineConfig().session_table_bytes_max
    #: A full session table evicts a session idle this long (log time) for a new one.
    session_evict_idle_s: int = MachineConfig().session_evict_idle_ns // 1_000_000_000

    def machine_config(self) -> MachineConfig:
        return MachineConfig(
            self.sessions_max,
            self.dedup_window,
            self.session_idle_s * 1_000_000_000,
            self.session_table_bytes_max,
            self.session_evict_idle_s * 1_000_000_000,
        )


def _is_public_key(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == RAFT_NODE_KEY_BYTES
    except ValueError:
        return False


def node_key_text(seed: bytes, public_key: bytes) -> str:
    """The text of a node key file: a header line, the Ed25519 private seed and the public key
    in hex, a line each (the public key lets a config check the file without a crypto library)."""
    assert len(seed) == len(public_key) == RAFT_NODE_KEY_BYTES
    return f"{NODE_KEY_FILE_HEADER}\n{seed.hex()}\n{public_key.hex()}\n"


def read_node_key(path: str) -> tuple[bytes, bytes]:
    """(seed, public key) of the node key file at `path`, which only its owner may read.
    Raises ``ConfigError`` naming what is wrong, in one line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"raft_key_file {path}: cannot read it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        text = f.read(4096)
    if mode & 0o077:
        raise ConfigError(f"raft_key_file {path}: mode {mode:04o} lets others read the node's private key; chmod 600 it")
    lines = text.decode("ascii", errors="replace").split("\n")
    try:
        header, seed, public_key = lines[0], bytes.fromhex(lines[1]), bytes.fromhex(lines[2])
    except (IndexError, ValueError):
        header, seed, public_key = "", b"", b""
    if header != NODE_KEY_FILE_HEADER or RAFT_NODE_KEY_BYTES != len(seed) or RAFT_NODE_KEY_BYTES != len(public_key):
        raise ConfigError(f"raft_key_file {path}: not a node key file ('{NODE_KEY_FILE_HEADER}', then the key in hex)")
    return seed, public_key


def _is_salt(text: str) -> bool:
    try:
        return RAFT_SALT_BYTES_MIN <= len(bytes.fromhex(text)) <= 64
    except ValueError:
        return False


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: NodeId
    data_dir: str
    raft_address: Address
    client_address: Address
    peers: list[PeerConfig]
    metrics_address: str = ""
    #: Shared secret of the Raft links (pysyncobj encryption). Required unless ``insecure``.
    raft_password: str = ""
    #: This cluster's salt of the Raft link key, hex (``cluster up`` generates 16 random bytes;
    #: every node of a cluster has the same). Empty: one constant salt, as before 0.2.
    raft_salt: str = ""
    #: This node's identity on the Raft links: the file of its Ed25519 private key (0600, made by
    #: ``cluster up`` in the node's data directory), and its public key in hex, which every
    #: other node's config names as this peer's ``raft_public_key``. With them (on every node,
    #: or none) a link proves which member it is; without, any holder of the password could
    #: pose as any member (docs/operating.md, "Raft links").
    raft_key_file: str = ""
    raft_public_key: str = ""
    #: Shared secret clients present in their hello. Empty: authentication off (insecure only).
    client_token: str = ""
    #: Named credentials with roles, session prefixes, quotas and a priority, besides the
    #: shared ``client_token`` (``raftseq cred``; read again when it changes). Empty: none.
    credentials_file: str = ""
    insecure: bool = False
    #: One of ``DURABILITY_MODES``. A data directory may switch between them at a restart.
    durability: str = "crash"
    #: This node joins a running cluster (``raftseq member add``): ``peers`` name members to
    #: reach, and the node waits, without a vote, until the cluster adds it as a learner; it
    #: becomes a voter once caught up. Ignored once the node holds a membership of its own
    #: (``membership.json`` in its data directory, which every node keeps after a change).
    join: bool = False
    raft: RaftConfig = RaftConfig()
    batcher: BatcherConfig = BatcherConfig()
    gateway: GatewayConfig = GatewayConfig()
    journal: JournalConfig = JournalConfig()
    machine: MachineSection = MachineSection()
    retention: RetentionConfig = RetentionConfig()
    tls: TlsConfig = TlsConfig()

    @property
    def journal_dir(self) -> str:
        return os.path.join(self.data_dir, "journal")

    @property
    def raft_dir(self) -> str:
        return os.path.join(self.data_dir, "raft")

    def peer_client_address(self, raft_address: str) -> str:
        for peer in self.peers:
            if peer.raft_address == raft_address:
                return peer.client_address
        if raft_address == self.raft_address:
            return self.client_address
        return ""

    def has_identity(self) -> bool:
        """Whether this node and its peers have node keys (``raft_key_file``)."""
        return bool(self.raft_key_file)

    def _identity_problems(self) -> list[str]:
        keys = [("raft_public_key", self.raft_public_key)] + [(f"peers[{p.id}].raft_public_key", p.raft_public_key) for p in self.peers]
        if not self.raft_key_file and not any(key for _, key in keys):
            return []
        missing = ([] if self.raft_key_file else ["raft_key_file"]) + [name for name, key in keys if not key]
        if missing:
            return [
                f"node identity needs raft_key_file, raft_public_key and every peer's raft_public_key, or none of them; missing {', '.join(missing)}"
            ]
        found = [f"{name} must be {RAFT_NODE_KEY_BYTES} bytes in hex, got {key[:20]!r}" for name, key in keys if not _is_public_key(key)]
        if len({key.lower() for _, key in keys}) != len(keys):
            found.append("every node needs a raft_public_key of its own; some nodes share one")
        if not self.raft_password:
            found.append("node identity needs raft_password too (the links are encrypted with it)")
        return found

    def problems(self) -> list[str]:
        found = []
        if not self.insecure and not self.raft_password:
            found.append("raft_password is required (or insecure = true for local development)")
        elif self.raft_password and len(self.raft_password) < RAFT_PASSWORD_CHARS_MIN:
            found.append(
                f"raft_password must be at least {RAFT_PASSWORD_CHARS_MIN} characters, got {len(self.raft_password)}: one captured "
                "Raft link message lets anyone guess it offline (cluster up generates one of 32)"
            )
        if self.raft_salt and not _is_salt(self.raft_salt):
            found.append(f"raft_salt must be {RAFT_SALT_BYTES_MIN} to 64 bytes in hex, got {self.raft_salt[:20]!r}")
        found.extend(self._identity_problems())
        if not self.insecure and not self.client_token:
            found.append("client_token is required (or insecure = true for local development)")
        ids = [self.id] + [p.id for p in self.peers]
        if len(set(ids)) != len(ids):
            found.append(f"node ids must be unique, got {ids}")
        addresses = [self.raft_address, self.client_address] + [a for p in self.peers for a in (p.raft_address, p.client_address)]
        if len(set(addresses)) != len(addresses):
            found.append("every raft_address and client_address must be unique")
        if not self.join and len(self.peers) not in (0, 2, 4, 6):
            found.append(f"a cluster has 1, 3, 5 or 7 nodes; this one has {len(self.peers) + 1}")
        addresses_named = [("raft_address", self.raft_address), ("client_address", self.client_address)]
        addresses_named += [(f"peers[{p.id}].raft_address", p.raft_address) for p in self.peers]
        addresses_named += [(f"peers[{p.id}].client_address", p.client_address) for p in self.peers]
        if self.metrics_address:
            addresses_named.append(("metrics_address", self.metrics_address))
        for name, address in addresses_named:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                found.append(f"{name} must be HOST:PORT with a port in 1..65535, got {address!r}")
        r = self.raft
        positive = [
            ("raft.append_entries_period_s", r.append_entries_period_s),
            ("raft.connection_timeout_s", r.connection_timeout_s),
            ("raft.connection_retry_s", r.connection_retry_s),
            ("raft.leader_fallback_timeout_s", r.leader_fallback_timeout_s),
            ("raft.log_compaction_min_entries", r.log_compaction_min_entries),
            ("raft.log_compaction_min_time_s", r.log_compaction_min_time_s),
            ("raft.commands_queue_size", r.commands_queue_size),
            ("raft.tick_period_s", r.tick_period_s),
            ("batcher.commit_timeout_s", self.batcher.commit_timeout_s),
            ("gateway.connections_max", self.gateway.connections_max),
            ("gateway.subscribers_max", self.gateway.subscribers_max),
            ("gateway.in_flight_per_session_max", self.gateway.in_flight_per_session_max),
            ("gateway.hello_timeout_ms", self.gateway.hello_timeout_ms),
            ("gateway.preauth_connections_max", self.gateway.preauth_connections_max),
            ("gateway.in_flight_bytes_per_connection_max", self.gateway.in_flight_bytes_per_connection_max),
            ("batcher.held_bytes_max", self.batcher.held_bytes_max),
            ("journal.disk_free_bytes_min", self.journal.disk_free_bytes_min + 1),
        ]
        found.extend(f"{name} must be > 0, got {value}" for name, value in positive if not value > 0)
        if not 0.05 <= r.election_timeout_min_s < r.election_timeout_max_s <= 60:
            found.append("raft election timeouts must satisfy 0.05 <= min < max <= 60")
        if not r.election_timeout_min_s > 3 * r.append_entries_period_s:
            found.append("raft.election_timeout_min_s must be above 3 x raft.append_entries_period_s (several heartbeats per timeout)")
        if not r.leader_fallback_timeout_s > 3 * r.append_entries_period_s:
            found.append("raft.leader_fallback_timeout_s must be above 3 x raft.append_entries_period_s (several replies per timeout)")
        if not 0 <= r.commit_notify_delay_s <= r.append_entries_period_s:
            found.append("raft.commit_notify_delay_s must be 0..raft.append_entries_period_s")
        if r.append_entries_batch_bytes < 16 * limits.KIB:
            found.append("raft.append_entries_batch_bytes must be at least 16384")
        b = self.batcher
        if not 1 <= b.entries_max <= limits.BATCH_ENTRIES_MAX:
            found.append(f"batcher.entries_max must be 1..{limits.BATCH_ENTRIES_MAX}")
        smallest = limits.PAYLOAD_BYTES_MAX + limits.KIB
        if not smallest <= b.bytes_max <= r.append_entries_batch_bytes - limits.KIB:
            found.append(
                f"batcher.bytes_max must be {smallest}..{r.append_entries_batch_bytes - limits.KIB} "
                "(a submit of the largest payload must fit; below raft.append_entries_batch_bytes "
                "with 1 KiB for pysyncobj's framing)"
            )
        if not 1 <= b.in_flight_max <= 64:
            found.append("batcher.in_flight_max must be 1..64")
        if not 0 <= b.unsynced_entries_max <= 64:
            found.append("batcher.unsynced_entries_max must be 0..64")
        if not 1 <= b.queue_entries_max <= 10_000_000:
            found.append("batcher.queue_entries_max must be 1..10000000")
        found.extend(self.gateway.problems())
        found.extend(self.tls.problems())
        if b.held_bytes_max < b.bytes_max:
            found.append("batcher.held_bytes_max must be at least batcher.bytes_max (one full batch)")
        if not 1 <= b.priority_bulk_in_flight_entries_max <= limits.BATCH_ENTRIES_MAX:
            found.append(f"batcher.priority_bulk_in_flight_entries_max must be 1..{limits.BATCH_ENTRIES_MAX}")
        if not 0 <= b.priority_recent_s <= 3600:
            found.append("batcher.priority_recent_s must be 0..3600 (0: bulk is never held back)")
        if self.durability not in DURABILITY_MODES:
            found.append(f"durability must be one of {', '.join(DURABILITY_MODES)}, got {self.durability!r}")
        try:
            FsyncPolicy.parse(self.journal.fsync)
        except ValueError as exc:
            found.append(f"journal.fsync: {exc}")
        if self.journal.verify_on_open_bytes < 0:
            found.append("journal.verify_on_open_bytes must be >= 0 (0: no read-back on open)")
        if self.journal.scrub_bytes_per_s and not limits.SCRUB_STEP_BYTES <= self.journal.scrub_bytes_per_s <= limits.GIB:
            found.append(f"journal.scrub_bytes_per_s must be 0 (off) or {limits.SCRUB_STEP_BYTES}..{limits.GIB}")
        if not 1 <= self.journal.repair_attempts_max <= 1000:
            found.append("journal.repair_attempts_max must be 1..1000")
        if self.journal.segment_bytes_max < limits.SEGMENT_BYTES_MIN:
            found.append(f"journal.segment_bytes_max must be at least {limits.SEGMENT_BYTES_MIN}")
        if self.join and not self.peers:
            found.append("a joining node (join = true) needs the members to reach as peers")
        found.extend(f"machine: {p}" for p in self.machine.machine_config().problems())
        found.extend(
            self.retention.problems(segment_bytes_max=self.journal.segment_bytes_max, compaction_entries_min=r.log_compaction_min_entries)
        )
        return found


def read_toml(path: str) -> dict:
    """The TOML file at `path`; raises ``ConfigUnreadable`` (one line)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigUnreadable(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigUnreadable(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str, *, insecure: bool = False) -> NodeConfig:
    """Read and check a node's TOML file. Raises ``ConfigError`` naming what is wrong.

    ``insecure`` (the ``--insecure`` flag, never a file setting) lets the node run without
    ``raft_password`` and ``client_token``.
    """
    raw = read_toml(path)
    if "insecure" in raw:
        raise ConfigError(f"{path}: insecure is not a config setting; start the node with --insecure")
    config = parse_config({**raw, "insecure": insecure}, source=path)
    if config.has_identity():
        try:
            _, public_key = read_node_key(config.raft_key_file)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if public_key.hex() != config.raft_public_key.lower():
            raise ConfigError(
                f"{path}: raft_key_file {config.raft_key_file} holds the key of public key {public_key.hex()[:16]}..., "
                f"not this node's raft_public_key {config.raft_public_key[:16]}..."
            )
    return config


def parse_config(raw: dict, *, source: str = "config") -> NodeConfig:
    try:
        config = msgspec.convert(raw, NodeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    problems = config.problems()
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


def to_toml(config: NodeConfig) -> str:
    """The TOML text of a configuration (what ``raftseq cluster up`` writes)."""
    data = msgspec.to_builtins(config)
    data.pop("insecure", None)  # a command-line flag, never a file setting
    if not config.tls.enabled and not config.tls.ca_file:
        data.pop("tls")  # unused: left out, so that the release before (no [tls]) reads the file too
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    arrays: list[tuple[str, list]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    for key, items in arrays:
        for item in items:
            lines.append(f"\n[[{key}]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


#: First port of the kernel's ephemeral range when /proc does not say (Linux's default): the local
#: cluster picks its ports below it, where no outgoing connection can take one first.
EPHEMERAL_PORTS_FIRST_DEFAULT = 32768
#: One past the highest TCP port.
PORTS_END = 65536
