"""The pysyncobj adapter: one replicated entry point taking ``bytes``.

pysyncobj sees a single replicated method, ``apply_entry(batch: bytes)``; the batch format's
version travels inside the bytes (``sequencer.protocol.Batch``). Snapshots of the machine state
go through our own msgspec serializer; pysyncobj's own log entries and messages are pickled by
pysyncobj with protocol 5 (bytes stored raw). ``apply_entry`` never raises: a broken invariant
is logged and the process exits, so that the node restarts and recovers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import struct
import sys
import threading
import time
from collections.abc import Callable

import msgspec
import pysyncobj.pickle
from pysyncobj import FAIL_REASON, SyncObjConf, replicated
from pysyncobj.node import TCPNode

from raftseq.cluster import link_cipher
from raftseq.cluster.config import NodeConfig
from raftseq.cluster.raft_loop import LoopPoller
from raftseq.cluster.raft_fix import LEADER, CorrectedSyncObj
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.machine import ApplyResult, SequencerMachine, SnapshotError

log = logging.getLogger("raftseq.replica")

# pysyncobj pickles with protocol 2 by default, which stores bytes as latin-1 text (1.5x in the
# log). Protocol 5 stores them raw and is read back by the same loader.
setattr(pysyncobj.pickle, "__protocol", 5)
# The Raft links: AES-256-GCM keyed from the password instead of Fernet (cluster/link_cipher).
link_cipher.install()

EXIT_INVARIANT = 70  # a broken invariant: the process stops so that the node restarts clean
#: A node replaying a long log (a restart) applies it in slices of about this many seconds,
#: with the loop serving clients, subscribers and Raft messages between. Measured with a
#: follower restarted on 2M messages (4,000 batches to re-apply, 2.9 s of work), time until it
#: answered a status request: all in one go 3.23 s; slices of 32 batches 0.74 s; of 2 ms 0.43 s;
#: of 0.5 ms 0.37 s (pysyncobj's own tick thread: 0.35 s). Throughput did not change.
APPLY_SLICE_S = 0.0005
#: Committed entries applied per Raft tick at most (the slice is sized from the last one's
#: cost per entry, between 1 and this).
APPLY_ENTRIES_PER_TICK = 1024
#: A failing tick is logged at most this often (it is counted every time).
TICK_FAILURE_LOG_INTERVAL_S = 1.0


class RaftSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """Our snapshot file: the machine state plus what pysyncobj needs of its log around it."""

    format_version: int
    machine: bytes
    last_applied: tuple[bytes, int, int]  # pysyncobj log entry (command, index, term)
    previous: tuple[bytes, int, int]
    cluster: list[str]


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(RaftSnapshot)

ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}


def fail_stop(message: str, *args: object) -> None:
    """Log a broken invariant and end the process at once (no cleanup that could hang)."""
    log.critical("broken invariant, stopping the node: " + message, *args)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
    sys.stderr.flush()
    os._exit(EXIT_INVARIANT)


class SequencerReplica(CorrectedSyncObj):
    """A Raft member whose replicated state is a ``SequencedStream``, driven by ``loop``
    (``cluster.raft_loop``): construct it, use it and destroy it on the loop's thread.

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
        on_role_changed: Callable[[str], None] | None = None,
        on_restored: Callable[[], None] | None = None,
        votes_blocked_s: float = 0.0,
    ) -> None:
        if votes_blocked_s:
            # Set before pysyncobj starts answering messages.
            self.raftseq_votes_blocked_until = time.monotonic() + votes_blocked_s
        self.node_config = config
        self.core = core
        self._on_applied = on_applied
        self._on_role_changed = on_role_changed
        self._on_restored = on_restored
        self.apply_lock = threading.Lock()  # apply vs. snapshot restore and journal fsync
        self._loop = loop
        self._poller = LoopPoller(loop)
        self._ticking = False
        self._tick_scheduled = False
        self._tick_timer: asyncio.TimerHandle | None = None
        self._destroyed = False
        self.ticks_failed = 0
        self._tick_failure_logged_at = float("-inf")
        self._apply_slice = 1  # entries per tick; sized to APPLY_SLICE_S as applies are timed
        self._commit_notify: asyncio.TimerHandle | None = None
        self._commit_index_sent = 0
        os.makedirs(config.raft_dir, exist_ok=True)
        r = config.raft
        conf = SyncObjConf(
            password=None if config.insecure and not config.raft_password else config.raft_password,
            bindAddress=config.raft_address,
            journalFile=os.path.join(config.raft_dir, "raft.log"),
            fullDumpFile=os.path.join(config.raft_dir, "snapshot.bin"),
            serializer=self._write_snapshot,
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
            pollerType=self._poller,
            # One attempt: a Raft address that cannot be bound fails the start (pysyncobj's
            # default retries forever, in a busy loop when it does not tick on a thread).
            maxBindRetries=1,
            autoTickPeriod=r.tick_period_s,
            dynamicMembershipChange=False,
            onStateChanged=self._state_changed,
            useFork=False,
        )
        self._handover_requested = False
        super().__init__(config.raft_address, [p.raft_address for p in config.peers], conf)
        self.addOnTickCallback(self._hand_over_if_asked)
        self._poller.after_event = self._tick_now
        self._poller.on_error = self.tick_failed
        self._tick_timer = loop.call_soon(self._timer_tick)

    # --- driving pysyncobj from the loop (cluster.raft_loop) -------------------------------

    def _tick_now(self) -> None:
        """One pysyncobj tick: commit index, apply, AppendEntries, queued proposals."""
        if self._destroyed:
            return
        assert not self._ticking, "a Raft tick started inside another"
        self._ticking = True
        try:
            self._onTick(0.0)
        except Exception:  # noqa: BLE001 - as pysyncobj's own tick thread: log and go on
            self.tick_failed()
        finally:
            self._ticking = False

    def tick_failed(self) -> None:
        """Count an exception out of pysyncobj (a tick, or its handling of a socket event) and
        log it, at most once per ``TICK_FAILURE_LOG_INTERVAL_S``."""
        self.ticks_failed += 1
        now = time.monotonic()
        if now - self._tick_failure_logged_at >= TICK_FAILURE_LOG_INTERVAL_S:
            self._tick_failure_logged_at = now
            log.exception("Raft tick failed (%d failures so far)", self.ticks_failed)

    def _tick_soon(self) -> None:
        if not self._tick_scheduled:
            self._tick_scheduled = True
            self._loop.call_soon(self._scheduled_tick)

    def _scheduled_tick(self) -> None:
        self._tick_scheduled = False
        self._tick_now()

    def _timer_tick(self) -> None:
        try:
            self._tick_now()
        finally:
            if not self._destroyed:
                self._tick_timer = self._loop.call_later(self.node_config.raft.tick_period_s, self._timer_tick)

    def _applyCommand(self, command, callback, commandType=None):  # noqa: N802,N803 (pysyncobj's names)
        """pysyncobj's, without its pipe wake-up: a tick on the loop takes the command."""
        if commandType is not None:
            command = struct.pack("B", commandType) + command
        try:
            self._SyncObj__commandsQueue.put_nowait((command, callback))
        except queue.Full:
            # Reported on the loop's next turn, never from inside the caller's propose call.
            self._loop.call_soon(self._SyncObj__callErrCallback, FAIL_REASON.QUEUE_FULL, callback)
            return
        self._tick_soon()

    def destroy(self) -> None:
        """Close pysyncobj's sockets and stop ticking (on the loop's thread)."""
        self._destroyed = True
        for handle in (self._tick_timer, self._commit_notify):
            if handle is not None:
                handle.cancel()
        self._tick_timer = self._commit_notify = None
        super().destroy()
        self._poller.close()
        # pysyncobj's pipe wake-up, built in its constructor, is unused here (``_applyCommand``).
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        for name in ("_PipeNotifier__pipeR", "_PipeNotifier__pipeW"):
            descr = getattr(notifier, name, None)
            if descr is not None:
                os.close(descr)
                setattr(notifier, name, None)

    # --- applying in slices ---------------------------------------------------------------

    def _raftseq_apply_committed(self):
        """pysyncobj applies every committed entry in one go: after a restart, thousands of
        batches with the loop blocked (no status answers, no subscribers, no heartbeats read).
        Here a tick applies a slice of about ``APPLY_SLICE_S`` (sized from the cost per entry
        of the slice before); the next tick, right after the loop's other work, takes the next."""
        commit = self._SyncObj__raftCommitIndex
        first = self._SyncObj__raftLastApplied
        if commit <= first:
            return super()._SyncObj__applyLogEntries()
        limit = first + self._apply_slice
        started = time.perf_counter()
        if commit <= limit:
            need_send = super()._SyncObj__applyLogEntries()
        else:
            self._SyncObj__raftCommitIndex = limit  # what pysyncobj's apply reads; restored below
            try:
                need_send = super()._SyncObj__applyLogEntries()
            finally:
                self._SyncObj__raftCommitIndex = commit
            self._tick_soon()
        applied = self._SyncObj__raftLastApplied - first
        if applied > 0:
            per_entry_s = (time.perf_counter() - started) / applied
            self._apply_slice = max(1, min(APPLY_ENTRIES_PER_TICK, int(APPLY_SLICE_S / max(per_entry_s, 1e-7))))
        return need_send

    # --- telling the followers what committed ---------------------------------------------

    def _SyncObj__applyLogEntries(self):  # noqa: N802 (pysyncobj's name)
        """pysyncobj's leader sends an AppendEntries right after every apply, only to carry the
        new commit index: a second round trip per batch, on every node's CPU. Here the leader
        waits ``commit_notify_delay_s`` first: a batch proposed meanwhile (at any steady rate,
        the next one) carries the commit index, and the extra round is sent only when none came."""
        need_send = self._raftseq_apply_committed()
        delay = self.node_config.raft.commit_notify_delay_s
        if need_send and delay and self._SyncObj__raftState == LEADER:
            if self._commit_notify is None:
                self._commit_notify = self._loop.call_later(delay, self._notify_commit)
            return False
        return need_send

    def _SyncObj__sendAppendEntries(self):  # noqa: N802 (pysyncobj's name)
        self._commit_index_sent = self._SyncObj__raftCommitIndex
        return super()._SyncObj__sendAppendEntries()

    def _notify_commit(self) -> None:
        self._commit_notify = None
        if self._SyncObj__raftState == LEADER and self._commit_index_sent < self._SyncObj__raftCommitIndex:
            self._SyncObj__sendAppendEntries()

    # --- handing leadership over ------------------------------------------------------------

    def request_handover(self) -> None:
        """Ask (from any thread) that this node, if it leads, hand leadership to its most
        caught-up follower (Raft's TimeoutNow). Done on pysyncobj's thread; best effort: a
        follower that is not fully caught up is refused, so the caller asks again later."""
        self._handover_requested = True

    def _hand_over_if_asked(self) -> None:
        if not self._handover_requested:
            return
        self._handover_requested = False
        if self._isLeader():
            self.transferLeadership(callback=self._handover_sent)

    @staticmethod
    def _handover_sent(result: object, error: int) -> None:
        if error:
            log.warning("leadership handover not started (pysyncobj reason %s); will ask again", error)
        else:
            log.warning("leadership handover started")

    # --- the replicated entry point -----------------------------------------------------

    @replicated
    def apply_entry(self, batch):
        """Apply one committed batch on every node. Never raises."""
        try:
            with self.apply_lock:
                result = self.core.apply(batch)
        except AssertionError as exc:
            fail_stop("apply: %s", exc)
        except Exception as exc:  # noqa: BLE001 - apply must not raise into pysyncobj
            fail_stop("apply failed: %r", exc)
        if result.error:
            # Every replica decodes the same bytes the same way: a batch this version cannot
            # read changes nothing anywhere, but it means a leader wrote a format we lack.
            log.error("raft entry not applied: %s", result.error)
        try:
            self._on_applied(result)
        except Exception as exc:  # noqa: BLE001
            fail_stop("after apply: %r", exc)
        return result

    # --- snapshots ------------------------------------------------------------------------

    def _write_snapshot(self, filename: str, raft_data: tuple) -> None:
        last_applied, previous, cluster = raft_data
        with self.apply_lock:
            machine = self.core.machine.snapshot()
            # Everything below the snapshot must be on disk before pysyncobj drops the log.
            self.core.journal.sync()
        data = _snapshot_encoder.encode(
            RaftSnapshot(
                1,
                machine,
                (bytes(last_applied[0]), last_applied[1], last_applied[2]),
                (bytes(previous[0]), previous[1], previous[2]),
                sorted(node.id for node in cluster),
            )
        )
        with open(filename, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _read_snapshot(self, filename: str) -> tuple:
        try:
            with open(filename, "rb") as f:
                snapshot = _snapshot_decoder.decode(f.read())
            machine = SequencerMachine.restore(snapshot.machine)
        except (OSError, msgspec.MsgspecError, UnicodeDecodeError, SnapshotError) as exc:
            fail_stop("cannot load the Raft snapshot %s: %s", filename, exc)
        with self.apply_lock:
            self.core.replace_machine(machine)
        log.info("machine state restored from snapshot at seq %d", machine.last_seq)
        if self._on_restored is not None:
            self._on_restored()
        cluster = {TCPNode(address) for address in snapshot.cluster}
        return tuple(snapshot.last_applied), tuple(snapshot.previous), cluster

    # --- state ----------------------------------------------------------------------------

    def _state_changed(self, old: int, new: int) -> None:
        if self._on_role_changed is not None:
            self._on_role_changed(ROLE_NAMES.get(new, "unknown"))

    def role(self) -> str:
        return "leader" if self._isLeader() else ("follower" if self._getLeader() is not None else "candidate")

    def leader_raft_address(self) -> str:
        leader = self._getLeader()
        return leader.id if leader is not None else ""

    def leader_client_address(self) -> str:
        leader = self.leader_raft_address()
        return self.node_config.peer_client_address(leader) if leader else ""

    def term(self) -> int:
        return self._getTerm()
