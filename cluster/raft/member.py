"""``RaftMember``: the one layer that overrides pysyncobj, and the only code reaching into it.

Everything raftseq changes in a pysyncobj member is here, one override per pysyncobj method:
the corrections of its log replication (below), and, for a member driven by the node's asyncio
loop (``loop=``), the ticking on that loop (``raft.loop_poller``), applying a long committed log
in slices, and letting the next batch carry the commit index to the followers. Every private
pysyncobj name this module uses is listed in ``raft.private_names`` (tested to exist on the
pinned version). ``SequencerReplica`` builds on the public methods of this class only.

pysyncobj 0.3.17 can lose acknowledged entries under load (see DESIGN.md section 5):

1. **A follower truncates entries that match.** When an AppendEntries whose ``prevLogIdx``
   matches arrives and the follower holds more entries than ``prevLogIdx``, the follower deletes
   everything after ``prevLogIdx`` and appends what the message carries, conflicting or not.
   A stale AppendEntries (one the leader sent before a later one the follower already
   accepted) therefore shrinks the follower's log below entries it has acknowledged.
2. **The leader moves ``nextIndex`` backwards on success.** With several appends in flight, a
   success reply for an early one sets ``nextIndex`` back to just after that one, so the
   leader re-sends entries the follower already holds: the stale AppendEntries of (1).

Raft's rules, which ``RaftMember`` enforces around pysyncobj's own handler:

* A follower deletes entries only from the first one whose term conflicts with an entry the
  leader sends; entries it already holds with the same index and term are kept, and the
  message is handed to pysyncobj without them. Entries beyond what the message proves to match
  are not truncated, and do not become committed on the strength of this message: the commit
  index rises only to the last entry known to match the leader's log.
* On a success reply the leader only ever moves a follower's ``nextIndex`` forwards.
* A follower whose tick spent more than half the minimum election timeout applying entries
  gets a fresh election timeout before it may stand for election: pysyncobj checks the
  deadline before it reads the leader's heartbeats that arrived meanwhile, so a node replaying
  its log after a restart deposed a healthy leader (seen by the stream benchmark).
* Pre-vote (Raft thesis 9.6): a node whose election timeout passes first asks the others
  whether they would vote for it in the next term, raising no term; only a majority of yeses
  starts the election. A node answers no while it hears from a leader (or is one). pysyncobj
  has no pre-vote: a node back from a partition, or losing one direction of a link, raised
  its term and forced an election on a healthy cluster (seen by the chaos suite).
* A node answers an AppendEntries of an older term with its own term, and a leader that hears
  of a newer term steps down to it (Raft's rule; pysyncobj ignores the message without an
  answer). Pre-vote made this necessary: a node whose term had got ahead anyway (its pre-vote
  granted while a slow leader went unheard, its vote requests then lost) could neither win a
  pre-vote (the others hear their leader) nor accept that leader's messages (an older term),
  and stayed a candidate for good (seen by the chaos soak).
* A piece of an InstallSnapshot (pysyncobj sends it as an AppendEntries without
  ``prevLogIdx``) does not raise the commit index over the log the follower holds: that log
  is unverified, and may end in entries a deposed leader wrote that no majority holds.
  (Found by the chaos suite: an isolated leader, healed while the new leader was sending it a
  snapshot, committed and journaled its own uncommitted batch at a number the majority had
  given to another.)

With our Raft log storage in power mode (``raft.log_store``, ``durability = "power"``), an
entry counts toward commit on a node only once it is on that node's disk:

* A follower's success reply (``next_node_idx``) is held until its log is durable up to the
  index it acknowledges, then sent; a held reply is dropped if the log is cut below it or the
  term changes meanwhile (the leader's next AppendEntries asks again).
* The leader counts itself toward a commit only up to its own durable index: right after
  pysyncobj's tick raised the commit index (counting the leader's whole log), and before any
  entry is applied, the commit index is lowered to the last entry a majority holds on disk
  (the leader's entries counted only up to its durable index).

AppendEntries that carry one oversized entry in chunks (``transmission``) bypass the correction;
the node never sends them, because every batch stays below ``appendEntriesBatchSizeBytes``
(``NodeConfig.problems`` enforces it).

The corrections are pinned to the exact pysyncobj version whose private names they use:
importing this module with any other version fails loudly (``raft.private_names``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import struct
import threading
import time

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj import pickle as syncobj_pickle

from raftseq.cluster.config import RAFT_LEADER_SILENCE_ELECTION_TIMEOUTS
from raftseq.cluster.raft import patches, safe_pickle
from raftseq.cluster.raft.link_guard import DEFAULT_GUARD, LINK_COUNTERS, LinkGuard, LinkLimits
from raftseq.cluster.raft.log_store import RaftLogStore
from raftseq.cluster.raft.loop_poller import LoopPoller
from raftseq.cluster.raft.private_names import CANDIDATE as _CANDIDATE
from raftseq.cluster.raft.private_names import FOLLOWER as _FOLLOWER
from raftseq.cluster.raft.private_names import (
    LEADER,
    MEMBERSHIP_COMMAND,
    PIPE_NOTIFIER_ATTRIBUTES,
    SYNCOBJ_LOGGER,
    SYNCOBJ_TRUNCATION_CRITICAL,
)
from raftseq.cluster.raft.private_names import now as _now
from raftseq.sequencer import limits
from raftseq.sequencer.protocol import Role

log = logging.getLogger("raftseq.replica")

#: A member replaying a long log (a restart) applies it in slices of about this many seconds,
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
#: A refused truncation of applied entries is logged at most this often (counted every time):
#: under load a follower sees one or two a second, each harmless.
TRUNCATION_REFUSED_LOG_INTERVAL_S = 10.0

_original_on_message = SyncObj._SyncObj__onMessageReceived
_original_delete_from = SyncObj._SyncObj__deleteEntriesFrom
_original_apply_log_entries = SyncObj._SyncObj__applyLogEntries
_original_on_tick = SyncObj._onTick
_original_send_next_node_idx = SyncObj._SyncObj__sendNextNodeIdx
_original_do_change_cluster = SyncObj._SyncObj__doChangeCluster
#: The kinds of a membership entry: pysyncobj's two, and ours (a learner gets its vote; the
#: member set is unchanged, so pysyncobj has nothing to do).
MEMBERSHIP_ADD = "add"
MEMBERSHIP_REMOVE = "rem"
MEMBERSHIP_PROMOTE = "raftseq_promote"
#: The fields of pysyncobj's messages (and ours) that hold terms, log indexes and request ids:
#: integers in ``0..limits.RAFT_NUMBER_MAX``; the first two may be None (a snapshot piece).
RAFT_NUMBER_FIELDS = (
    "prevLogIdx",
    "prevLogTerm",
    "term",
    "commit_index",
    "last_log_index",
    "last_log_term",
    "next_node_idx",
    "request_id",
    "log_idx",
    "log_term",
)
_NULLABLE_NUMBER_FIELDS = RAFT_NUMBER_FIELDS[:2]
PRE_VOTE = "raftseq_pre_vote"
PRE_VOTE_RESPONSE = "raftseq_pre_vote_response"
NEWER_TERM = "raftseq_newer_term"

#: What a member counts (``RaftMember.counters()``), by the name of its attribute: how often
#: each correction kicked in, and the exceptions out of pysyncobj on the loop; then its link
#: guard's counters (``LINK_COUNTERS``, prefixed ``link_``) and the pickles refused.
RAFT_COUNTERS = (
    "raftseq_matching_entries_kept",
    "raftseq_truncations_refused",
    "raftseq_next_index_rewinds_refused",
    "raftseq_snapshot_commits_refused",
    "raftseq_elections_deferred",
    "raftseq_pre_votes_lost",
    "raftseq_newer_terms_told",
    "raftseq_newer_terms_heard",
    "raftseq_peer_messages_refused",
    "raftseq_acks_held_for_fsync",
    "raftseq_commits_held_for_fsync",
    "raftseq_appends_dropped",
    "ticks_failed",
    *(f"link_{name}" for name in LINK_COUNTERS),
    "link_pickles_refused",
)

#: Set, on the thread handling an AppendEntries, while pysyncobj's truncation (if it comes to
#: one) will be refused by ``RaftMember``.
_truncation_refused = threading.local()


class _RefusedTruncationFilter(logging.Filter):
    """Drops pysyncobj's CRITICAL "truncating already-applied log entries ... state machine may
    have diverged" when the truncation it announces is refused (nothing is truncated, nothing
    diverged); ``RaftMember`` logs what happened instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_truncation_refused, "pending", False) and str(record.msg).startswith(SYNCOBJ_TRUNCATION_CRITICAL))


_REFUSED_TRUNCATION_FILTER = _RefusedTruncationFilter()


def _raft_number_ok(value: object, *, nullable: bool = False) -> bool:
    """An integer (not a bool) in ``0..limits.RAFT_NUMBER_MAX``, or None where `nullable`."""
    if value is None:
        return nullable
    return type(value) is int and 0 <= value <= limits.RAFT_NUMBER_MAX


class RaftMember(SyncObj):
    """``SyncObj`` with Raft's rules restored (see module doc); with ``loop``, driven by it.

    A member given a ``loop`` is constructed, used and destroyed on the loop's thread, and
    needs ``raft.patches.install()`` first (its poller is the loop's). Without one it is ticked
    by hand (``autoTick=False``) or by pysyncobj's thread, as a plain ``SyncObj``.
    """

    #: While pysyncobj handles an AppendEntries, the entries it still has to append (after the
    #: ones already held were removed); None outside that handler.
    _raftseq_pending_entries: list | None = None
    #: How often each correction kicked in (read by tests and metrics).
    raftseq_matching_entries_kept = 0
    raftseq_truncations_refused = 0
    raftseq_next_index_rewinds_refused = 0
    raftseq_snapshot_commits_refused = 0
    raftseq_elections_deferred = 0
    raftseq_pre_votes_lost = 0
    raftseq_newer_terms_told = 0
    raftseq_newer_terms_heard = 0
    #: Raft messages refused: from a connection that is not a member, or malformed.
    raftseq_peer_messages_refused = 0
    _peer_refusal_logged_at = float("-inf")
    #: When this node last heard from a leader of its current term (pysyncobj's clock).
    _raftseq_leader_contact = float("-inf")
    #: The term a pre-vote is running for, the nodes that granted it, and the term it was won for.
    _raftseq_pre_vote_term: int | None = None
    _raftseq_pre_vote_grants: frozenset = frozenset()
    _raftseq_pre_vote_won_for: int | None = None

    #: ``time.monotonic()`` before which this node casts no vote (after its Raft log, and with
    #: it the vote it gave in the current term, was discarded).
    raftseq_votes_blocked_until = 0.0
    #: Exceptions out of pysyncobj (a tick, or its handling of a socket event) on the loop.
    ticks_failed = 0
    #: Power mode: success replies held until the log was durable; ticks in which the leader's
    #: commit index was held back to what a majority had on disk.
    raftseq_acks_held_for_fsync = 0
    raftseq_commits_held_for_fsync = 0
    #: AppendEntries carrying entries dropped while the Raft log refused new entries.
    raftseq_appends_dropped = 0
    #: Our Raft log store when its durability is "power" (None otherwise).
    _raftseq_power_log: RaftLogStore | None = None
    #: Our Raft log store, whatever its durability (None: pysyncobj's own journal, in tests).
    _raftseq_log: RaftLogStore | None = None
    #: Held success replies: node -> [(log cuts, term, next index)].
    _raftseq_held_acks: dict
    #: The commit index as last checked against the leader's durable index.
    _raftseq_commit_checked = 0
    _truncation_refused_logged_at = float("-inf")

    #: Raft addresses of the members without a vote (learners catching up), this one included
    #: when it is one; set by ``set_learners`` from the membership the node holds.
    _raftseq_learners: frozenset = frozenset()
    #: ``(kind, raft address, change bytes, reverse) -> str``: told of every membership entry
    #: this node appends, applies or undoes, before pysyncobj changes its member set; returns
    #: the Raft address this node knows that member by (behind a proxy, not the leader's).
    on_membership_entry = None
    #: ``(kind, raft address, change bytes) -> str``: on the leader, why a proposed membership
    #: entry is refused ("" to take it), as it is taken from the command queue.
    membership_refusal = None

    #: ``() -> None``: called inside a tick right after it applied committed entries, before
    #: the tick sends its AppendEntries (the node writes the acks those entries answered).
    after_applying = None
    #: ``() -> None``: called at the start of every tick driven by the loop (the node reads
    #: its priority connections there, ``cluster.priority_reads``).
    before_tick = None

    _loop: asyncio.AbstractEventLoop | None = None
    _commit_notify_delay_s = 0.0
    _commit_notify: asyncio.TimerHandle | None = None
    _commit_index_sent = 0
    #: When (loop time) the leader last applied a commit that no AppendEntries carried yet.
    _commit_uncarried_at = 0.0
    _handover_requested = False

    def __init__(
        self,
        self_address: str,
        partners: list[str],
        conf: SyncObjConf,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        commit_notify_delay_s: float = 0.0,
        votes_blocked_s: float = 0.0,
    ) -> None:
        if votes_blocked_s:
            # Set before pysyncobj starts answering messages.
            self.raftseq_votes_blocked_until = time.monotonic() + votes_blocked_s
        if loop is not None:
            if not patches.installed():
                raise RuntimeError("a loop-driven Raft member needs raftseq.cluster.raft.install() first")
            self._loop = loop
            self._loop_poller = LoopPoller(loop)
            self._loop_poller.link_guard = LinkGuard(
                LinkLimits.for_batch_bytes(conf.appendEntriesBatchSizeBytes), call_later=loop.call_later
            )
            conf.pollerType = self._loop_poller
            conf.autoTick = False
            self._commit_notify_delay_s = commit_notify_delay_s
            self._tick_period_s = conf.autoTickPeriod
            self._ticking = False
            self._tick_scheduled = False
            self._tick_timer: asyncio.TimerHandle | None = None
            self._destroyed = False
            self._tick_failure_logged_at = float("-inf")
            self._apply_slice = 1  # entries per tick; sized to APPLY_SLICE_S as applies are timed
        self._link_guard = self._loop_poller.link_guard if loop is not None else DEFAULT_GUARD
        syncobj_log = logging.getLogger(SYNCOBJ_LOGGER)
        if _REFUSED_TRUNCATION_FILTER not in syncobj_log.filters:
            syncobj_log.addFilter(_REFUSED_TRUNCATION_FILTER)
        self._leader_silence_s = RAFT_LEADER_SILENCE_ELECTION_TIMEOUTS * conf.raftMaxTimeout
        super().__init__(self_address, partners, conf)
        self.addOnTickCallback(self._hand_over_if_asked)
        raft_log = self._SyncObj__raftLog
        if isinstance(raft_log, RaftLogStore):
            self._raftseq_log = raft_log
        if isinstance(raft_log, RaftLogStore) and raft_log.power:
            self._raftseq_power_log = raft_log
            self._raftseq_held_acks = {}
            self._raftseq_commit_checked = self._SyncObj__raftCommitIndex
            if loop is not None:
                raft_log.on_durable = self._durable_from_writer
        if loop is not None:
            self._loop_poller.after_event = self._tick_now
            self._loop_poller.on_error = self.tick_failed
            self._tick_timer = loop.call_soon(self._timer_tick)

    # --- what the rest of raftseq reads -------------------------------------------------------

    def role(self) -> Role:
        """Leader; follower of a leader heard lately; else candidate (no leader known)."""
        if self._isLeader():
            return Role.LEADER
        return Role.FOLLOWER if self._leader_heard() is not None else Role.CANDIDATE

    def leader_raft_address(self) -> str:
        leader = self._leader_heard()
        return leader.id if leader is not None else ""

    def _leader_heard(self):
        """pysyncobj's leader, unless this node has not heard from it for ``leader_silence_s()``.

        pysyncobj keeps the last leader it knew until an election here replaces it; a node that
        cannot stand for election (its links down: its listener closed, a partition) would
        otherwise call itself that leader's follower for good, serving ever older data."""
        leader = self._getLeader()
        if leader is not None and self._SyncObj__raftState != LEADER and _now() - self._raftseq_leader_contact > self._leader_silence_s:
            return None
        return leader

    def leader_silence_s(self) -> float:
        """How long a follower goes without hearing its leader before it reports none."""
        return self._leader_silence_s

    @property
    def link_pickles_refused(self) -> int:
        """Process-wide: pysyncobj loads pickles with no member in sight (``raft.safe_pickle``)."""
        return safe_pickle.refused_count()

    def term(self) -> int:
        return self._getTerm()

    def counters(self) -> dict[str, int]:
        """``RAFT_COUNTERS`` -> count (read from the scrape thread: plain integers); the link
        guard's own counters (``LINK_COUNTERS``) under a ``link_`` prefix."""
        counts = {f"link_{name}": count for name, count in self._link_guard.counters().items()}
        return {name: counts[name] if name in counts else getattr(self, name) for name in RAFT_COUNTERS}

    # --- driving pysyncobj from the loop (raft.loop_poller) ---------------------------------

    def _tick_now(self) -> None:
        """One pysyncobj tick: commit index, apply, AppendEntries, queued proposals."""
        if self._destroyed:
            return
        assert not self._ticking, "a Raft tick started inside another"
        self._ticking = True
        try:
            if self.before_tick is not None:
                self.before_tick()
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
                self._tick_timer = self._loop.call_later(self._tick_period_s, self._timer_tick)

    def _applyCommand(self, command, callback, commandType=None):  # noqa: N802,N803 (pysyncobj's names)
        """pysyncobj's, without its pipe wake-up: a tick on the loop takes the command."""
        if self._loop is None:
            return super()._applyCommand(command, callback, commandType)
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
        """Close pysyncobj's sockets (and, loop-driven, stop ticking: on the loop's thread)."""
        if self._loop is None:
            super().destroy()
            return
        self._destroyed = True
        for handle in (self._tick_timer, self._commit_notify):
            if handle is not None:
                handle.cancel()
        self._tick_timer = self._commit_notify = None
        super().destroy()
        self._loop_poller.close()
        # pysyncobj's pipe wake-up, built in its constructor, is unused here (``_applyCommand``).
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        for name in PIPE_NOTIFIER_ATTRIBUTES:
            descr = getattr(notifier, name, None)
            if descr is not None:
                os.close(descr)
                setattr(notifier, name, None)

    # --- handing leadership over ------------------------------------------------------------

    def request_handover(self) -> None:
        """Ask that this node, if it leads, hand leadership to its most caught-up follower
        (Raft's TimeoutNow), on the next tick. Best effort: a follower that is not fully caught
        up is refused, so the caller asks again later."""
        self._handover_requested = True

    def _hand_over_if_asked(self) -> None:
        if not self._handover_requested:
            return
        self._handover_requested = False
        if self._isLeader():
            match = self._SyncObj__raftMatchIndex
            voters = [node for node in self._SyncObj__otherNodes if node.id not in self._raftseq_learners and self.isNodeConnected(node)]
            if not voters:
                self._handover_sent(None, FAIL_REASON.REQUEST_DENIED)
                return
            target = max(voters, key=lambda node: (match.get(node, 0), node.id))
            self.transferLeadership(target, callback=self._handover_sent)

    @staticmethod
    def _handover_sent(result: object, error: int) -> None:
        if error:
            log.warning("leadership handover not started (pysyncobj reason %s); will ask again", error)
        else:
            log.warning("leadership handover started")

    # --- pre-vote ------------------------------------------------------------------------

    def _onTick(self, timeToWait=0.0):  # noqa: N802,N803 (pysyncobj's names)
        """Before pysyncobj stands for election, a pre-vote (Raft thesis 9.6): ask the others
        whether they would vote for this node in the next term, without raising any term. Only
        a majority of yeses lets the election start. A node cut off from the leader (or back
        from a partition, or hearing only one direction of a link) thus no longer raises terms
        and deposes a leader the others still hear from."""
        state = self._SyncObj__raftState
        if self._raftseq_learners and state != LEADER and self.is_learner():
            # A learner has no vote and never stands for election.
            self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()
            if state == _CANDIDATE:
                self._SyncObj__setState(_FOLLOWER)
        if (
            state in (_FOLLOWER, _CANDIDATE)
            and self._SyncObj__selfNode is not None
            and self._SyncObj__raftElectionDeadline < _now()
            and self._SyncObj__connectedToAnyone()
            and not self._SyncObj__transferInProgress  # a leader's hand-over skips the pre-vote
        ):
            next_term = self._SyncObj__raftCurrentTerm + 1
            if self._raftseq_pre_vote_won_for == next_term:
                self._raftseq_pre_vote_won_for = None  # pysyncobj's election goes ahead now
            else:
                self._raftseq_start_pre_vote(next_term)
        if self._raftseq_learners and state == LEADER:
            return self._raftseq_tick_leading_learners(timeToWait)
        return _original_on_tick(self, timeToWait)

    def _raftseq_tick_leading_learners(self, time_to_wait):
        """A leader's tick with learners: pysyncobj steps its leader down when no majority of
        all members answered within ``leaderFallbackTimeout``, learners counted. Here learners
        count as answering (pysyncobj's check then never trips over them), and the check runs
        again after the tick over the voters only. (Seen: a leader of three voters, one of them
        dead, stepped down while a learner was still starting.)"""
        responded = self._SyncObj__lastResponseTime
        now = _now()
        for node in self._SyncObj__otherNodes:
            if node.id in self._raftseq_learners:
                responded[node] = now
        result = _original_on_tick(self, time_to_wait)
        if self._SyncObj__raftState == LEADER:
            deadline = _now() - self._SyncObj__conf.leaderFallbackTimeout
            voters = [node for node in self._SyncObj__otherNodes if node.id not in self._raftseq_learners]
            heard = 1 + sum(1 for node in voters if responded.get(node, 0) > deadline)
            if heard <= (len(voters) + 1) / 2:
                self._SyncObj__setState(_FOLLOWER)
                self._SyncObj__raftLeader = None
        return result

    def _raftseq_start_pre_vote(self, term: int) -> None:
        if self._raftseq_pre_vote_term == term and self._raftseq_pre_vote_grants:
            self.raftseq_pre_votes_lost += 1  # the last round for this term got no majority in time
        self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()
        self._raftseq_pre_vote_term = term
        self._raftseq_pre_vote_grants = frozenset([self._SyncObj__selfNode])
        self._raftseq_pre_vote_won_for = None
        question = {
            "type": PRE_VOTE,
            "term": term,
            "last_log_index": self._SyncObj__getCurrentLogIndex(),
            "last_log_term": self._SyncObj__getCurrentLogTerm(),
        }
        for other in self._SyncObj__otherNodes:
            self._SyncObj__transport.send(other, question)
        self._raftseq_count_pre_votes()

    def _raftseq_count_pre_votes(self) -> None:
        voters = [node for node in self._SyncObj__otherNodes if node.id not in self._raftseq_learners]
        if len(self._raftseq_pre_vote_grants) > (len(voters) + 1) / 2:
            self._raftseq_pre_vote_won_for = self._raftseq_pre_vote_term
            self._raftseq_pre_vote_term = None
            self._SyncObj__raftElectionDeadline = 0  # stand for election on the next tick

    def _raftseq_answer_pre_vote(self, node, message) -> None:
        my_term = self._SyncObj__raftCurrentTerm
        my_last_term = self._SyncObj__getCurrentLogTerm()
        log_ok = message["last_log_term"] > my_last_term or (
            message["last_log_term"] == my_last_term and message["last_log_index"] >= self._SyncObj__getCurrentLogIndex()
        )
        # A live leader's heartbeats come every appendEntriesPeriod (0.05 s here); silence for
        # half the minimum election timeout means this node no longer hears one either.
        heard_leader = self._SyncObj__raftState == LEADER or (
            _now() - self._raftseq_leader_contact < self._SyncObj__conf.raftMinTimeout / 2
        )
        votes_blocked = self.raftseq_votes_blocked_until and time.monotonic() < self.raftseq_votes_blocked_until
        granted = message["term"] > my_term and log_ok and not heard_leader and not votes_blocked and not self.is_learner()
        self._SyncObj__transport.send(node, {"type": PRE_VOTE_RESPONSE, "term": message["term"], "granted": granted})

    def _SyncObj__onMessageReceived(self, node, message):  # noqa: N802 (pysyncobj's name)
        why = self._raftseq_refusal(node, message)
        if why:
            self._raftseq_refuse(node, why)
            return None
        kind = message.get("type")
        if kind == PRE_VOTE:
            return self._raftseq_answer_pre_vote(node, message)
        if kind == PRE_VOTE_RESPONSE:
            if message.get("granted") and message.get("term") == self._raftseq_pre_vote_term:
                self._raftseq_pre_vote_grants = self._raftseq_pre_vote_grants | {node}
                self._raftseq_count_pre_votes()
            return None
        if kind == NEWER_TERM:
            return self._raftseq_hear_newer_term(message)
        if kind == "request_vote" and self.raftseq_votes_blocked_until and time.monotonic() < self.raftseq_votes_blocked_until:
            return None
        if self._raftseq_learners:
            if kind == "request_vote" and self.is_learner():
                return None  # a learner has no vote
            if kind == "response_vote" and message.get("term", -1) <= self._SyncObj__raftCurrentTerm:
                return self._raftseq_count_vote(message)
        if kind == "append_entries" and message.get("term", -1) < self._SyncObj__raftCurrentTerm:
            # A leader of an older term: tell it ours, so that it steps down (pysyncobj would
            # ignore the message and leave a node whose term got ahead a candidate for good).
            self.raftseq_newer_terms_told += 1
            self._SyncObj__transport.send(node, {"type": NEWER_TERM, "term": self._SyncObj__raftCurrentTerm})
            return None
        if kind == "append_entries" and message.get("term", -1) >= self._SyncObj__raftCurrentTerm:
            self._raftseq_leader_contact = _now()
            if "prevLogIdx" not in message:
                return self._raftseq_on_snapshot_chunk(node, message)
            if message.get("entries") and self._raftseq_log is not None and self._raftseq_log.refusing_entries():
                return self._raftseq_drop_append()
            if "transmission" not in message:
                return self._raftseq_on_append_entries(node, message)
        if kind == "next_node_idx" and self._SyncObj__raftState == LEADER:
            before = self._SyncObj__raftNextIndex.get(node)
            _original_on_message(self, node, message)
            after = self._SyncObj__raftNextIndex.get(node)
            if message.get("success") and not message.get("reset") and before is not None and after is not None and after < before:
                self._SyncObj__raftNextIndex[node] = before
                self.raftseq_next_index_rewinds_refused += 1
            return None
        return _original_on_message(self, node, message)

    def _raftseq_drop_append(self) -> None:
        """A follower whose Raft log refuses new entries (``RaftLogStore.refusing_entries``: its
        writer behind its bound on a stalled disk, or free disk below the minimum) takes none,
        so that its memory stays bounded, its loop never waits for the disk and it does not
        fill its disk to the last byte: the AppendEntries is dropped as if the network lost it
        (the leader sends the entries again once this node answers a later one), but it is
        word from the leader (no election)."""
        self.raftseq_appends_dropped += 1
        self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()

    def _raftseq_refusal(self, node, message) -> str:
        """Why `message` from `node` is refused ("" when it is taken). pysyncobj hands on every
        message of every authenticated connection, a read-only one included (raftseq runs no
        read-only nodes), and trusts its fields: one request_vote with term 2**64 made every
        node take that term and fail to encode its status from then on."""
        if node not in self._SyncObj__otherNodes:
            return "not a member of this cluster"
        if not isinstance(message, dict):
            return f"a {type(message).__name__}, not a message"
        if not isinstance(message.get("type"), str):
            return f"message type {message.get('type')!r:.40}"
        for name in RAFT_NUMBER_FIELDS:
            if name in message and not _raft_number_ok(message[name], nullable=name in _NULLABLE_NUMBER_FIELDS):
                return f"{name} {message[name]!r:.40} is not an integer in 0..{limits.RAFT_NUMBER_MAX}"
        entries = message.get("entries", ())
        if not isinstance(entries, (list, tuple)) or not all(
            isinstance(e, tuple) and len(e) == 3 and _raft_number_ok(e[1]) and _raft_number_ok(e[2]) for e in entries
        ):
            return "entries are not (command, index, term) tuples"
        return ""

    def _raftseq_refuse(self, node, why: str) -> None:
        """Count a refused message; log it at most once per ``TICK_FAILURE_LOG_INTERVAL_S``."""
        self.raftseq_peer_messages_refused += 1
        now = time.monotonic()
        if now - self._peer_refusal_logged_at >= TICK_FAILURE_LOG_INTERVAL_S:
            self._peer_refusal_logged_at = now
            log.warning("refused a Raft message from %s: %s (%d refused so far)", node, why, self.raftseq_peer_messages_refused)

    def _raftseq_hear_newer_term(self, message) -> None:
        term = message.get("term")
        if not isinstance(term, int) or term <= self._SyncObj__raftCurrentTerm:
            return
        self.raftseq_newer_terms_heard += 1
        self._SyncObj__setCurrentTerm(term, None)
        self._SyncObj__setState(_FOLLOWER)
        self._SyncObj__raftLeader = None
        self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()

    def _raftseq_on_append_entries(self, node, message):
        entries = message.get("entries") or []
        prev_idx = message["prevLogIdx"]
        prev_term = message["prevLogTerm"]
        get_entries = self._SyncObj__getEntries
        prev = get_entries(prev_idx, 1) if prev_idx is not None else []
        consistent = bool(prev) and prev[0][2] == prev_term
        if consistent and entries:
            held = get_entries(prev_idx + 1, len(entries))
            kept = 0
            for mine, theirs in zip(held, entries):
                if mine[1] != theirs[1] or mine[2] != theirs[2]:
                    break
                kept += 1
            if kept:
                last = entries[kept - 1]
                message = dict(message, prevLogIdx=last[1], prevLogTerm=last[2], entries=entries[kept:])
                entries = entries[kept:]
                self.raftseq_matching_entries_kept += kept
        # The last index this message proves to match the leader's log. Entries after it that
        # carry the leader's own term came from this leader and match too (log matching).
        verified_end = (message["prevLogIdx"] + len(entries)) if consistent else None
        commit_before = self._SyncObj__raftCommitIndex
        self._raftseq_pending_entries = list(entries)
        _truncation_refused.pending = not entries
        try:
            result = _original_on_message(self, node, message)
        finally:
            self._raftseq_pending_entries = None
            _truncation_refused.pending = False
        if verified_end is not None:
            after = get_entries(verified_end + 1, 1)
            if after and after[0][2] == message["term"]:
                verified_end = self._SyncObj__raftLog[-1][1]
            commit_after = self._SyncObj__raftCommitIndex
            if commit_after > commit_before and commit_after > verified_end:
                corrected = max(commit_before, verified_end)
                self._SyncObj__raftCommitIndex = corrected
                self._SyncObj__raftLog.setRaftCommitIndex(corrected)
        return result

    def _raftseq_on_snapshot_chunk(self, node, message):
        """A piece of a snapshot proves nothing about the log this node holds: unless it
        completes the snapshot (which replaces the log), the commit index stays where it was.
        pysyncobj raises it to ``min(leader's commit index, own last index)``, which commits
        entries a deposed leader wrote and no majority ever held."""
        commit_before = self._SyncObj__raftCommitIndex
        log_start_before = tuple(self._SyncObj__raftLog[0][1:3])
        result = _original_on_message(self, node, message)
        snapshot_installed = tuple(self._SyncObj__raftLog[0][1:3]) != log_start_before
        if not snapshot_installed and self._SyncObj__raftCommitIndex > commit_before:
            self._SyncObj__raftCommitIndex = commit_before
            self._SyncObj__raftLog.setRaftCommitIndex(commit_before)
            self.raftseq_snapshot_commits_refused += 1
        return result

    # --- applying committed entries ----------------------------------------------------------

    def _SyncObj__applyLogEntries(self):  # noqa: N802 (pysyncobj's name)
        """Apply committed entries (in slices, on a loop), then tell the followers what committed.

        ``after_applying`` runs between the two: on a loaded machine each AppendEntries sent
        may hand the CPU to the follower it wakes, and acks written after the round waited
        for that (0.3 ms at the median at 2k msg/s on 2 cores).

        pysyncobj's leader sends an AppendEntries right after every apply, only to carry the
        new commit index: a second round trip per batch, on every node's CPU. A loop-driven
        leader waits ``commit_notify_delay_s`` first: a batch proposed meanwhile (at any steady
        rate, the next one) carries the commit index, and the extra round is sent only when
        none came."""
        if self._raftseq_power_log is not None or self._raftseq_learners:
            self._raftseq_commit_only_counted()
        applied_before = self._SyncObj__raftLastApplied
        need_send = self._raftseq_apply_committed() if self._loop is not None else self._raftseq_apply_deferring_election()
        if self.after_applying is not None and self._SyncObj__raftLastApplied > applied_before:
            self.after_applying()
        delay = self._commit_notify_delay_s
        if need_send and delay and self._SyncObj__raftState == LEADER:
            self._commit_uncarried_at = self._loop.time()
            if self._commit_notify is None:
                self._commit_notify = self._loop.call_later(delay, self._notify_commit)
            return False
        return need_send

    def _raftseq_apply_committed(self):
        """pysyncobj applies every committed entry in one go: after a restart, thousands of
        batches with the loop blocked (no status answers, no subscribers, no heartbeats read).
        Here a tick applies a slice of about ``APPLY_SLICE_S`` (sized from the cost per entry
        of the slice before); the next tick, right after the loop's other work, takes the next."""
        commit = self._SyncObj__raftCommitIndex
        first = self._SyncObj__raftLastApplied
        if commit <= first:
            return self._raftseq_apply_deferring_election()
        limit = first + self._apply_slice
        started = time.perf_counter()
        if commit <= limit:
            need_send = self._raftseq_apply_deferring_election()
        else:
            self._SyncObj__raftCommitIndex = limit  # what pysyncobj's apply reads; restored below
            try:
                need_send = self._raftseq_apply_deferring_election()
            finally:
                self._SyncObj__raftCommitIndex = commit
            self._tick_soon()
        applied = self._SyncObj__raftLastApplied - first
        if applied > 0:
            per_entry_s = (time.perf_counter() - started) / applied
            self._apply_slice = max(1, min(APPLY_ENTRIES_PER_TICK, int(APPLY_SLICE_S / max(per_entry_s, 1e-7))))
        return need_send

    def _raftseq_apply_deferring_election(self):
        """After a long run of applies, a follower gets a fresh election timeout.

        pysyncobj checks the election deadline at the start of a tick, before it reads the
        messages that arrived meanwhile. A follower whose tick spent longer than half the
        minimum election timeout applying entries (a restart replaying its log, a catch-up)
        would stand for election although its leader's heartbeats are waiting in the socket:
        a needless election, and a healthy leader deposed by a node that just rejoined."""
        started = _now()
        result = _original_apply_log_entries(self)
        now = _now()
        if now - started > self._SyncObj__conf.raftMinTimeout / 2 and self._SyncObj__raftState != LEADER:
            fresh = now + self._SyncObj__generateRaftTimeout()
            if fresh > self._SyncObj__raftElectionDeadline:
                self._SyncObj__raftElectionDeadline = fresh
                self.raftseq_elections_deferred += 1
        return result

    def _SyncObj__sendAppendEntries(self):  # noqa: N802 (pysyncobj's name)
        self._commit_index_sent = self._SyncObj__raftCommitIndex
        return super()._SyncObj__sendAppendEntries()

    def _notify_commit(self) -> None:
        self._commit_notify = None
        if self._SyncObj__raftState == LEADER and self._commit_index_sent < self._SyncObj__raftCommitIndex:
            # The timer was set at the first commit left uncarried; a later one, applied since,
            # gets its own full delay for a batch to carry it (an AppendEntries for a commit
            # only a moment old was an extra round on every node, 11% of rounds at 2k msg/s).
            wait_s = self._commit_uncarried_at + self._commit_notify_delay_s - self._loop.time()
            if wait_s > 0:
                self._commit_notify = self._loop.call_later(wait_s, self._notify_commit)
                return
            self._SyncObj__sendAppendEntries()

    # --- power mode: counting only what is on disk ---------------------------------------------

    def _durable_from_writer(self) -> None:
        """The log writer's thread: a group commit ended."""
        try:
            self._loop.call_soon_threadsafe(self.raftseq_durable_advanced)
        except RuntimeError:
            pass  # the loop closed: the member is gone

    def raftseq_durable_advanced(self) -> None:
        """The log's durable index may have risen: send the replies it allows, and let the
        leader count its own entries (on a loop, by the next tick)."""
        power_log = self._raftseq_power_log
        if power_log is None or (self._loop is not None and self._destroyed):
            return
        durable = power_log.durable_index()
        generation = (power_log.cuts, self._SyncObj__raftCurrentTerm)
        for node, held in list(self._raftseq_held_acks.items()):
            live = [(g, i) for g, i in held if g == generation]
            ready = [i for _, i in live if i - 1 <= durable]
            if ready:
                _original_send_next_node_idx(self, node, False, max(ready), True)
            rest = [(g, i) for g, i in live if i - 1 > durable]
            if rest:
                self._raftseq_held_acks[node] = rest
            else:
                del self._raftseq_held_acks[node]
        if self._loop is not None and self._SyncObj__raftState == LEADER:
            self._tick_soon()

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):  # noqa: N802,N803 (pysyncobj's names)
        power_log = self._raftseq_power_log
        if power_log is None or not success:
            return _original_send_next_node_idx(self, node, reset, nextNodeIdx, success)
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        if nextNodeIdx - 1 <= power_log.durable_index():
            return _original_send_next_node_idx(self, node, reset, nextNodeIdx, success)
        self.raftseq_acks_held_for_fsync += 1
        generation = (power_log.cuts, self._SyncObj__raftCurrentTerm)
        self._raftseq_held_acks.setdefault(node, []).append((generation, nextNodeIdx))
        return None

    def _raftseq_commit_only_counted(self) -> None:
        """On a leader, the commit index counted as Raft counts it: over the voters only (a
        learner has no say; pysyncobj counts every member), and in power mode the leader's own
        entries only up to its durable index (pysyncobj counts the leader always). A commit
        index raised too far is lowered; with learners, one pysyncobj held back (its majority
        counted them) is raised."""
        commit = self._SyncObj__raftCommitIndex
        floor = max(self._raftseq_commit_checked, self._SyncObj__raftLastApplied)
        learners = self._raftseq_learners
        power_log = self._raftseq_power_log
        if self._SyncObj__raftState == LEADER and (learners or commit > floor):
            durable = power_log.durable_index() if power_log is not None else self._SyncObj__getCurrentLogIndex()
            if learners or commit > durable:
                voters = [node for node in self._SyncObj__otherNodes if node.id not in learners]
                match = self._SyncObj__raftMatchIndex
                allowed = floor
                top = self._SyncObj__getCurrentLogIndex() if learners else commit
                for idx in range(top, floor, -1):
                    count = (idx <= durable) + sum(1 for node in voters if match.get(node, 0) >= idx)
                    if count > (len(voters) + 1) / 2:
                        entry = self._SyncObj__getEntries(idx, 1)
                        if entry and entry[0][2] == self._SyncObj__raftCurrentTerm:
                            allowed = idx
                        break  # lower entries have a majority too; only one of this term commits by count
                if allowed != commit:
                    if allowed < commit and power_log is not None:
                        self.raftseq_commits_held_for_fsync += 1
                    self._SyncObj__raftCommitIndex = allowed
                    self._SyncObj__raftLog.setRaftCommitIndex(allowed)
        self._raftseq_commit_checked = self._SyncObj__raftCommitIndex

    # --- membership ----------------------------------------------------------------------------

    def set_learners(self, addresses) -> None:
        """The Raft addresses of the members that have no vote (learners)."""
        self._raftseq_learners = frozenset(addresses)

    def learner_addresses(self) -> frozenset:
        return self._raftseq_learners

    def is_learner(self) -> bool:
        return self._SyncObj__selfNode is not None and self._SyncObj__selfNode.id in self._raftseq_learners

    def propose_membership(self, kind: str, address: str, change: bytes, callback) -> None:
        """Propose one membership entry (on the leader): `kind` (``MEMBERSHIP_ADD``, ``_REMOVE``,
        ``_PROMOTE``) of the member at Raft `address`, with our own description of the change
        (`change`, opaque here) riding in pysyncobj's entry. ``callback(result, error)`` as for
        any proposal; ``membership_refusal`` may refuse it (``FAIL_REASON.REQUEST_DENIED``)."""
        command = syncobj_pickle.dumps([kind, address, address, change])
        self._applyCommand(command, callback, MEMBERSHIP_COMMAND)

    def membership_entry_pending(self) -> bool:
        """Whether a membership entry is in the log and not yet applied (one at a time)."""
        first = self._SyncObj__raftLastApplied + 1
        count = self._SyncObj__getCurrentLogIndex() - first + 1
        return count > 0 and any(entry[0][:1] == bytes((MEMBERSHIP_COMMAND,)) for entry in self._SyncObj__getEntries(first, count))

    def voter_match_indexes(self) -> dict[str, int]:
        """On a leader: each other member's match index by Raft address."""
        return {node.id: index for node, index in self._SyncObj__raftMatchIndex.items()}

    def connected_members(self) -> set[str]:
        """Raft addresses of the members this node has a link to, its own included."""
        connected = {node.id for node in self._SyncObj__otherNodes if self.isNodeConnected(node)}
        return connected | {self._SyncObj__selfNode.id}

    def commit_index(self) -> int:
        return self._SyncObj__raftCommitIndex

    def _SyncObj__changeCluster(self, request):  # noqa: N802 (pysyncobj's name)
        """The leader takes a membership entry from its queue: one at a time (pysyncobj's own
        check never fires: it never sets the index it checks), after this term's no-op, and
        only if ``membership_refusal`` has nothing against it."""
        if self._SyncObj__raftLastApplied < self._SyncObj__noopIDx or self.membership_entry_pending():
            return False
        if self.membership_refusal is not None:
            why = (
                self.membership_refusal(request[0], request[1], request[3])
                if len(request) > 3
                else "no change record (not proposed by raftseq)"
            )
            if why:
                log.warning("membership change refused: %s", why)
                return False
        return self._SyncObj__doChangeCluster(request)

    def _SyncObj__doChangeCluster(self, request, reverse=False):  # noqa: N802 (pysyncobj's name)
        """A membership entry appended (or applied after a restart, or undone with a truncation).
        Our hook hears of it first (it admits a new member's key before pysyncobj links to it).
        An undo announced while the truncation is refused (every entry the leader sent is held:
        nothing goes) is no undo: pysyncobj would take the member set back for entries that stay."""
        if reverse and getattr(_truncation_refused, "pending", False):
            return False
        kind = request[0] if request else None
        change = request[3] if len(request) > 3 else b""
        if self.on_membership_entry is not None and kind in (MEMBERSHIP_ADD, MEMBERSHIP_REMOVE, MEMBERSHIP_PROMOTE):
            address = self.on_membership_entry(kind, str(request[1]), change, reverse)
            request = [kind, address, address]
        if kind == MEMBERSHIP_PROMOTE:
            return True
        return _original_do_change_cluster(self, request, reverse)

    def _addNodeToCluster(self, args, callback):  # noqa: N802 (pysyncobj's name)
        """pysyncobj's admin request over a Raft link (``syncobj_admin -add``): refused; members
        change only through ``propose_membership`` (with our change record)."""
        self._SyncObj__callErrCallback(FAIL_REASON.REQUEST_DENIED, callback)

    def _removeNodeFromCluster(self, args, callback):  # noqa: N802 (pysyncobj's name)
        """As ``_addNodeToCluster``."""
        self._SyncObj__callErrCallback(FAIL_REASON.REQUEST_DENIED, callback)

    def _raftseq_count_vote(self, message) -> None:
        """A vote for this candidate, counted over the voters (pysyncobj counts learners too,
        so that with a voter down and a learner catching up no candidate could win)."""
        if self._SyncObj__raftState != _CANDIDATE or message.get("term") != self._SyncObj__raftCurrentTerm:
            return
        self._SyncObj__votesCount += 1
        voters = [node for node in self._SyncObj__otherNodes if node.id not in self._raftseq_learners]
        if self._SyncObj__votesCount > (len(voters) + 1) / 2:
            self._SyncObj__onBecomeLeader()

    # --- truncation ---------------------------------------------------------------------------

    def _SyncObj__deleteEntriesFrom(self, fromIDx):  # noqa: N802,N803 (pysyncobj's names)
        pending = self._raftseq_pending_entries
        if pending is None:
            return _original_delete_from(self, fromIDx)
        if not pending:
            # Everything the leader sent is held already: nothing conflicts, nothing goes.
            self.raftseq_truncations_refused += 1
            self._raftseq_log_refused_truncation(fromIDx)
            return None
        held = self._SyncObj__getEntries(fromIDx, 1)
        if held and held[0][1] == pending[0][1] and held[0][2] == pending[0][2]:
            raise AssertionError(f"entry {fromIDx} matches yet is about to be deleted")
        return _original_delete_from(self, fromIDx)

    def _raftseq_log_refused_truncation(self, from_index: int) -> None:
        """What pysyncobj's CRITICAL line (filtered out) should have said, at most once per
        ``TRUNCATION_REFUSED_LOG_INTERVAL_S``."""
        now = time.monotonic()
        if now - self._truncation_refused_logged_at < TRUNCATION_REFUSED_LOG_INTERVAL_S:
            return
        self._truncation_refused_logged_at = now
        log.info(
            "kept Raft entries from index %d on (last applied %d): a repeated AppendEntries held "
            "only entries this node has, nothing conflicted, nothing was truncated "
            "(%d such refusals so far)",
            from_index,
            self._SyncObj__raftLastApplied,
            self.raftseq_truncations_refused,
        )
