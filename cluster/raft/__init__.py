"""The Raft adapter: the only package that names pysyncobj or its private names.

* ``SequencerReplica`` (``replica``): the node's Raft member, one replicated entry point.
* ``RaftMember`` (``member``): the one layer overriding pysyncobj (its corrections, and its
  driving by the node's asyncio loop through ``loop_poller.LoopPoller``).
* ``install()`` (``patches``): the process-wide changes to pysyncobj (pickle protocol, link
  cipher without zlib, the loop's poller, guarded links, allow-list pickles). Called by the node when it starts; importing this
  package changes nothing.
* ``private_names``: every private pysyncobj name used, pinned to one pysyncobj version.
* ``link_cipher``: the Raft links' AES-256-GCM.
* ``link_guard``: the Raft links' bounds (frame size at the length prefix, unauthenticated
  links in count and time) and a listener that backs off on accept errors.
* ``safe_pickle``: the allow-list unpickler pysyncobj loads every pickle with.
* ``log_store``: the Raft log on disk (``RaftLogStore``: segments, checksums, torn tails,
  term and vote, the power-safe writer), in place of pysyncobj's ``FileJournal``.
* ``proposals``: what a proposal's callback is told (``PROPOSAL_OK``, ``proposal_error_name``).
"""

from __future__ import annotations

from pysyncobj import FAIL_REASON, SyncObjException

from raftseq.cluster.raft.log_store import DURABILITY_MODES, RaftLogDamaged
from raftseq.cluster.raft.member import RAFT_COUNTERS, RaftMember
from raftseq.cluster.raft.patches import install, installed
from raftseq.cluster.raft.proposals import PROPOSAL_OK, proposal_error_name
from raftseq.cluster.raft.replica import SequencerReplica


def is_bind_error(exc: BaseException) -> bool:
    """Whether a failed member construction means its Raft address could not be bound."""
    return isinstance(exc, SyncObjException) and exc.args == ("BindError",)


__all__ = [
    "DURABILITY_MODES",
    "FAIL_REASON",
    "PROPOSAL_OK",
    "RAFT_COUNTERS",
    "RaftLogDamaged",
    "RaftMember",
    "SequencerReplica",
    "install",
    "installed",
    "is_bind_error",
    "proposal_error_name",
]
