"""The pysyncobj adapter: one replicated entry point taking ``bytes``.

pysyncobj sees a single replicated method, ``apply_entry(batch: bytes)``; the batch format's
version travels inside the bytes (``sequencer.protocol.Batch``). Snapshots of the machine state
go through our own msgspec serializer; pysyncobj's own log entries and messages are pickled by
pysyncobj with protocol 5 (bytes stored raw). ``apply_entry`` never raises: a broken invariant
is logged and the process exits, so that the node restarts and recovers.

The Raft log is ours (``raft.log_store.RaftLogStore``, durability from the node config); the
snapshot file is written on a thread of its own (``raft.snapshot_files``: log compaction takes
the machine state as bytes on the loop, the write and its fsyncs happen off it). In power mode a
snapshot received from the leader is fsynced, with the directory, before pysyncobj clears the
log for it; one written here is fsynced before it is renamed into place, and the store syncs the
directory before the record that drops the entries it covers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import msgspec
from pysyncobj import SyncObjConf, replicated
from pysyncobj.node import TCPNode

from raftseq.cluster import invariant
from raftseq.cluster.config import NodeConfig
from raftseq.cluster.raft.link_cipher import link_password
from raftseq.cluster.raft.log_store import RaftLogStore, disk_failed, sync_directory
from raftseq.cluster.raft.member import RaftMember
from raftseq.cluster.raft.private_names import SYNCOBJ_LOGGER
from raftseq.cluster.raft.snapshot_files import SnapshotWriter
from raftseq.sequencer.journal import list_segment_files
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.machine import ApplyResult, SequencerMachine, SnapshotError

log = logging.getLogger("raftseq.replica")


class RaftSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """Our snapshot file: the machine state plus what pysyncobj needs of its log around it."""

    format_version: int
    machine: bytes
    last_applied: tuple[bytes, int, int]  # pysyncobj log entry (command, index, term)
    previous: tuple[bytes, int, int]
    cluster: list[str]


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(RaftSnapshot)


class _NoBindTraceback(logging.Filter):
    """pysyncobj logs a traceback when it cannot bind the Raft address; the node says why in
    one line instead (``NodeExit.ADDRESS_UNAVAILABLE``), so that traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "failed to perform initialization"


class SequencerReplica(RaftMember):
    """A Raft member whose replicated state is a ``SequencedStream``, driven by ``loop``
    (``raft.loop_poller``): construct it, use it and destroy it on the loop's thread, after
    ``raft.install()``.

    ``on_applied(result)`` is called after every applied batch, with the journal already
    holding its records.
    """

    def __init__(
        self,
        config: NodeConfig,
        core: SequencedStream,
        *,
        loop: asyncio.AbstractEventLoop,
        on_applied: Callable[[ApplyResult], None],
        on_restored: Callable[[], None] | None = None,
        votes_blocked_s: float = 0.0,
    ) -> None:
        self.node_config = config
        self.core = core
        self._on_applied = on_applied
        self._on_restored = on_restored
        #: Called on the loop when the Raft log's durable index may have risen (power mode):
        #: the leader's batcher proposes what waited for it (``cluster.batcher``, group commit).
        self.on_durable: Callable[[], None] | None = None
        #: The first number of the journal segment that was the tail when the last snapshot was
        #: written (0: none yet): that segment and those after it are synced by the next one.
        self._journal_synced_from = 0
        os.makedirs(config.raft_dir, exist_ok=True)
        #: The Raft log (raises ``RaftLogDamaged`` on a damaged one).
        self.raft_log = RaftLogStore(config.raft_dir, durability=config.durability)
        r = config.raft
        conf = SyncObjConf(
            password=None if config.insecure and not config.raft_password else link_password(config),
            bindAddress=config.raft_address,
            journalFile=self.raft_log,
            fullDumpFile=os.path.join(config.raft_dir, "snapshot.bin"),
            serializer=SnapshotWriter(self._prepare_snapshot),
            deserializer=self._read_snapshot,
            raftMinTimeout=r.election_timeout_min_s,
            raftMaxTimeout=r.election_timeout_max_s,
            appendEntriesUseBatch=r.append_entries_use_batch,
            appendEntriesPeriod=r.append_entries_period_s,
            appendEntriesBatchSizeBytes=r.append_entries_batch_bytes,
            connectionTimeout=r.connection_timeout_s,
            connectionRetryTime=r.connection_retry_s,
            leaderFallbackTimeout=r.leader_fallback_timeout_s,
            logCompactionMinEntries=r.log_compaction_min_entries,
            logCompactionMinTime=r.log_compaction_min_time_s,
            commandsQueueSize=r.commands_queue_size,
            autoTick=False,
            # One attempt: a Raft address that cannot be bound fails the start (pysyncobj's
            # default retries forever, in a busy loop when it does not tick on a thread).
            maxBindRetries=1,
            autoTickPeriod=r.tick_period_s,
            dynamicMembershipChange=False,
            useFork=False,
        )
        pysyncobj_log = logging.getLogger(SYNCOBJ_LOGGER)
        quiet = _NoBindTraceback()
        pysyncobj_log.addFilter(quiet)
        try:
            super().__init__(
                config.raft_address,
                [p.raft_address for p in config.peers],
                conf,
                loop=loop,
                commit_notify_delay_s=r.commit_notify_delay_s,
                votes_blocked_s=votes_blocked_s,
            )
        except BaseException:
            self.raft_log.close()
            raise
        finally:
            pysyncobj_log.removeFilter(quiet)

    # --- the replicated entry point -----------------------------------------------------

    @replicated
    def apply_entry(self, batch):
        """Apply one committed batch on every node. Never raises."""
        try:
            result = self.core.apply(batch)
        except AssertionError as exc:
            invariant.fail_stop("apply: %s", exc)
        except Exception as exc:  # noqa: BLE001 - apply must not raise into pysyncobj
            invariant.fail_stop("apply failed: %r", exc)
        if result.error:
            # Every replica decodes the same bytes the same way: a batch this version cannot
            # read changes nothing anywhere, but it means a leader wrote a format we lack.
            log.error("raft entry not applied: %s", result.error)
        try:
            self._on_applied(result)
        except Exception as exc:  # noqa: BLE001
            invariant.fail_stop("after apply: %r", exc)
        return result

    # --- snapshots ------------------------------------------------------------------------

    def _prepare_snapshot(self, raft_data: tuple) -> Callable[[str], None]:
        """On the loop: what the snapshot holds, now. Returns the function that writes it and
        fsyncs it (on the snapshot thread, ``raft.snapshot_files``): the machine state is taken
        here as bytes, so the thread reads nothing the loop changes."""
        last_applied, previous, cluster = raft_data
        snapshot = RaftSnapshot(
            1,
            self.core.machine.snapshot(),
            (bytes(last_applied[0]), last_applied[1], last_applied[2]),
            (bytes(previous[0]), previous[1], previous[2]),
            sorted(node.id for node in cluster),
        )
        journal = self.core.journal
        synced_from = self._journal_synced_from
        tail = journal.segment_for(journal.last_seq)
        tail_first = tail.first_seq if tail is not None else synced_from

        def write(filename: str) -> None:
            # Everything below the snapshot must be on disk before pysyncobj drops the log: the
            # journal's segments written since the last snapshot (its tail then, and each one
            # after it; the journal does not sync a segment it seals under fsync "never").
            for first_seq, path in list_segment_files(journal.directory):
                if first_seq >= synced_from:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:
                        continue  # removed since (retention): nothing of it to keep
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            self._journal_synced_from = tail_first  # read by the next prepare, after this thread ended
            data = _snapshot_encoder.encode(snapshot)
            with open(filename, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        return write

    def _read_snapshot(self, filename: str) -> tuple:
        try:
            with open(filename, "rb") as f:
                snapshot = _snapshot_decoder.decode(f.read())
                if self.raft_log.power:
                    # A snapshot from the leader replaces the log: it is on disk first.
                    try:
                        os.fsync(f.fileno())
                        sync_directory(os.path.dirname(os.path.abspath(filename)))
                    except OSError as exc:
                        disk_failed(f"cannot sync the Raft snapshot {filename}: {exc}")
            machine = SequencerMachine.restore(snapshot.machine)
        except (OSError, msgspec.MsgspecError, UnicodeDecodeError, SnapshotError) as exc:
            invariant.fail_stop("cannot load the Raft snapshot %s: %s", filename, exc)
        self.core.replace_machine(machine)
        log.info("machine state restored from snapshot at seq %d", machine.last_seq)
        if self._on_restored is not None:
            self._on_restored()
        cluster = {TCPNode(address) for address in snapshot.cluster}
        # A compaction cut short after its snapshot: pysyncobj would clear the whole log.
        self.raft_log.align_to_snapshot(tuple(snapshot.previous), tuple(snapshot.last_applied))
        return tuple(snapshot.last_applied), tuple(snapshot.previous), cluster

    # --- group commit (power durability) ---------------------------------------------------

    def unsynced_entries(self) -> int:
        """Raft entries proposed here and not yet on this node's disk: waiting in pysyncobj's
        queue for the next tick, or in the log above its durable index (0 in crash mode)."""
        if not self.raft_log.power:
            return 0
        log_store = self.raft_log
        last = log_store[-1][1] if len(log_store) else 0
        return len(self._SyncObj__commandsQueue._FastQueue__queue) + max(0, last - log_store.durable_index())

    def raftseq_durable_advanced(self) -> None:
        super().raftseq_durable_advanced()
        if self.on_durable is not None and not self._destroyed:
            self.on_durable()

    # --- state ----------------------------------------------------------------------------

    def getStatus(self) -> dict:  # noqa: N802 (pysyncobj's name)
        """pysyncobj's status, with ``durable_idx``: the last index on this node's disk."""
        status = super().getStatus()
        status["durable_idx"] = self.raft_log.durable_index()
        return status

    def leader_client_address(self) -> str:
        leader = self.leader_raft_address()
        return self.node_config.peer_client_address(leader) if leader else ""
