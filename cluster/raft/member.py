"""Corrections to pysyncobj 0.3.17's log replication, applied in a subclass.

pysyncobj 0.3.17 can lose acknowledged entries under load (see DESIGN.md section 5):

1. **A follower truncates entries that match.** When an AppendEntries whose ``prevLogIdx``
   matches arrives and the follower holds more entries than ``prevLogIdx``, the follower deletes
   everything after ``prevLogIdx`` and appends what the message carries, conflicting or not.
   A stale AppendEntries (one the leader sent before a later one the follower already
   accepted) therefore shrinks the follower's log below entries it has acknowledged.
2. **The leader moves ``nextIndex`` backwards on success.** With several appends in flight, a
   success reply for an early one sets ``nextIndex`` back to just after that one, so the
   leader re-sends entries the follower already holds: the stale AppendEntries of (1).

Raft's rules, which ``CorrectedSyncObj`` enforces around pysyncobj's own handler:

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

AppendEntries that carry one oversized entry in chunks (``transmission``) bypass the correction;
the node never sends them, because every batch stays below ``appendEntriesBatchSizeBytes``
(``NodeConfig.problems`` enforces it).

The corrections are pinned to the exact pysyncobj version whose private names they use:
importing this module with any other version fails loudly.
"""

from __future__ import annotations

import time

import pysyncobj
import pysyncobj.syncobj
from pysyncobj import SyncObj
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

CORRECTED_VERSION = "0.3.17"

if PYSYNCOBJ_VERSION != CORRECTED_VERSION:
    raise ImportError(
        f"raftseq corrects pysyncobj {CORRECTED_VERSION} only; found {PYSYNCOBJ_VERSION}. "
        "Re-check the log replication corrections in cluster/raft_fix.py against the new version."
    )

LEADER = 2  # pysyncobj's _RAFT_STATE.LEADER
_original_on_message = SyncObj._SyncObj__onMessageReceived
_original_delete_from = SyncObj._SyncObj__deleteEntriesFrom
_original_apply_log_entries = SyncObj._SyncObj__applyLogEntries
_original_on_tick = SyncObj._onTick
_FOLLOWER = 0  # pysyncobj's _RAFT_STATE.FOLLOWER
_CANDIDATE = 1
PRE_VOTE = "raftseq_pre_vote"
PRE_VOTE_RESPONSE = "raftseq_pre_vote_response"
NEWER_TERM = "raftseq_newer_term"

assert pysyncobj.syncobj._RAFT_STATE.LEADER == LEADER
assert (pysyncobj.syncobj._RAFT_STATE.FOLLOWER, pysyncobj.syncobj._RAFT_STATE.CANDIDATE) == (_FOLLOWER, _CANDIDATE)


def _now() -> float:
    return pysyncobj.syncobj.monotonicTime()  # pysyncobj's own clock, which its deadlines use


class CorrectedSyncObj(SyncObj):
    """``SyncObj`` with Raft's truncation and ``nextIndex`` rules restored (see module doc)."""

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
    #: When this node last heard from a leader of its current term (pysyncobj's clock).
    _raftseq_leader_contact = float("-inf")
    #: The term a pre-vote is running for, the nodes that granted it, and the term it was won for.
    _raftseq_pre_vote_term: int | None = None
    _raftseq_pre_vote_grants: frozenset = frozenset()
    _raftseq_pre_vote_won_for: int | None = None

    #: ``time.monotonic()`` before which this node casts no vote (after its Raft log, and with
    #: it the vote it gave in the current term, was discarded).
    raftseq_votes_blocked_until = 0.0

    # --- pre-vote ------------------------------------------------------------------------

    def _onTick(self, timeToWait=0.0):  # noqa: N802,N803 (pysyncobj's names)
        """Before pysyncobj stands for election, a pre-vote (Raft thesis 9.6): ask the others
        whether they would vote for this node in the next term, without raising any term. Only
        a majority of yeses lets the election start. A node cut off from the leader (or back
        from a partition, or hearing only one direction of a link) thus no longer raises terms
        and deposes a leader the others still hear from."""
        state = self._SyncObj__raftState
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
        return _original_on_tick(self, timeToWait)

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
        if len(self._raftseq_pre_vote_grants) > (len(self._SyncObj__otherNodes) + 1) / 2:
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
        granted = message["term"] > my_term and log_ok and not heard_leader and not votes_blocked
        self._SyncObj__transport.send(node, {"type": PRE_VOTE_RESPONSE, "term": message["term"], "granted": granted})

    def _SyncObj__onMessageReceived(self, node, message):  # noqa: N802 (pysyncobj's name)
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
        try:
            result = _original_on_message(self, node, message)
        finally:
            self._raftseq_pending_entries = None
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

    def _SyncObj__applyLogEntries(self):  # noqa: N802 (pysyncobj's name)
        """After a long run of applies, a follower gets a fresh election timeout.

        pysyncobj checks the election deadline at the start of a tick, before it reads the
        messages that arrived meanwhile. A follower whose tick spent longer than half the
        minimum election timeout applying entries (a restart replaying its log, a catch-up)
        would stand for election although its leader's heartbeats are waiting in the socket:
        a needless election, and a healthy leader deposed by a node that just rejoined."""
        started = pysyncobj.syncobj.monotonicTime()
        result = _original_apply_log_entries(self)
        now = pysyncobj.syncobj.monotonicTime()
        if now - started > self._SyncObj__conf.raftMinTimeout / 2 and self._SyncObj__raftState != LEADER:
            fresh = now + self._SyncObj__generateRaftTimeout()
            if fresh > self._SyncObj__raftElectionDeadline:
                self._SyncObj__raftElectionDeadline = fresh
                self.raftseq_elections_deferred += 1
        return result

    def _SyncObj__deleteEntriesFrom(self, fromIDx):  # noqa: N802,N803 (pysyncobj's names)
        pending = self._raftseq_pending_entries
        if pending is None:
            return _original_delete_from(self, fromIDx)
        if not pending:
            # Everything the leader sent is held already: nothing conflicts, nothing goes.
            self.raftseq_truncations_refused += 1
            return None
        held = self._SyncObj__getEntries(fromIDx, 1)
        if held and held[0][1] == pending[0][1] and held[0][2] == pending[0][2]:
            raise AssertionError(f"entry {fromIDx} matches yet is about to be deleted")
        return _original_delete_from(self, fromIDx)
