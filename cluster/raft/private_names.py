"""Every private name of pysyncobj that raftseq uses, in one list, pinned to one version.

raftseq corrects and drives pysyncobj through names it does not publish: name-mangled
attributes and methods of ``SyncObj`` (``_SyncObj__*``), its protected methods, and module-level
names that ``raft.patches.install()`` replaces. A new pysyncobj version may rename or change any
of them, so the package refuses to import with any version but ``PINNED_VERSION``, and
``tests/test_raft_private_names.py`` checks that each name below exists on that version and that
the raft package's source uses no private pysyncobj name missing from this list.
"""

from __future__ import annotations

import pysyncobj.syncobj
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

#: The one pysyncobj version whose private names (below) the raft package uses.
PINNED_VERSION = "0.3.17"

if PYSYNCOBJ_VERSION != PINNED_VERSION:
    raise ImportError(
        f"raftseq corrects pysyncobj {PINNED_VERSION} only; found {PYSYNCOBJ_VERSION}. "
        "Re-check the names in cluster/raft/private_names.py and the corrections in "
        "cluster/raft/member.py against the new version."
    )

#: pysyncobj's ``_RAFT_STATE`` values (a member's ``_SyncObj__raftState``).
FOLLOWER = 0
CANDIDATE = 1
LEADER = 2

assert (
    pysyncobj.syncobj._RAFT_STATE.FOLLOWER,
    pysyncobj.syncobj._RAFT_STATE.CANDIDATE,
    pysyncobj.syncobj._RAFT_STATE.LEADER,
) == (FOLLOWER, CANDIDATE, LEADER)

#: pysyncobj's ``_COMMAND_TYPE.MEMBERSHIP``: the first byte of a membership entry in the log.
MEMBERSHIP_COMMAND = 2
assert pysyncobj.syncobj._COMMAND_TYPE.MEMBERSHIP == MEMBERSHIP_COMMAND

#: Attributes a ``SyncObj`` sets in its constructor, read or written by ``RaftMember``.
SYNCOBJ_ATTRIBUTES = (
    "_SyncObj__commandsQueue",
    "_SyncObj__conf",
    "_SyncObj__otherNodes",
    "_SyncObj__pipeNotifier",
    "_SyncObj__raftCommitIndex",
    "_SyncObj__raftCurrentTerm",
    "_SyncObj__raftElectionDeadline",
    "_SyncObj__raftLastApplied",
    "_SyncObj__raftLeader",
    "_SyncObj__raftLog",
    "_SyncObj__raftMatchIndex",
    "_SyncObj__raftNextIndex",
    "_SyncObj__raftState",
    "_SyncObj__selfNode",
    "_SyncObj__transferInProgress",
    "_SyncObj__transport",
    "_SyncObj__noopIDx",
    "_SyncObj__lastResponseTime",
    "_SyncObj__votesCount",
)

#: Methods of ``SyncObj`` that ``RaftMember`` calls or overrides (mangled, and protected).
SYNCOBJ_METHODS = (
    "_SyncObj__applyLogEntries",
    "_SyncObj__callErrCallback",
    "_SyncObj__changeCluster",
    "_SyncObj__connectedToAnyone",
    "_SyncObj__doChangeCluster",
    "_SyncObj__deleteEntriesFrom",
    "_SyncObj__generateRaftTimeout",
    "_SyncObj__onBecomeLeader",
    "_SyncObj__getCurrentLogIndex",
    "_SyncObj__getCurrentLogTerm",
    "_SyncObj__getEntries",
    "_SyncObj__onMessageReceived",
    "_SyncObj__sendAppendEntries",
    "_SyncObj__sendNextNodeIdx",
    "_SyncObj__setCurrentTerm",
    "_SyncObj__setState",
    "_addNodeToCluster",
    "_applyCommand",
    "_getLeader",
    "_getTerm",
    "_isLeader",
    "_onTick",
    "_removeNodeFromCluster",
)

#: Attributes of pysyncobj's ``PipeNotifier`` (the pipe a ``SyncObj`` builds to wake its tick
#: thread; the loop-driven member closes it).
PIPE_NOTIFIER_ATTRIBUTES = ("_PipeNotifier__pipeR", "_PipeNotifier__pipeW")

#: Attributes of pysyncobj's ``FastQueue`` (a ``SyncObj``'s queue of proposals not yet in its log,
#: whose length the replica reads: ``SequencerReplica.unsynced_entries``).
FAST_QUEUE_ATTRIBUTES = ("_FastQueue__queue",)

#: Attributes and methods of pysyncobj's ``TcpConnection`` that ``raft.link_guard`` reads,
#: writes or overrides.
TCP_CONNECTION_NAMES = (
    "_TcpConnection__processParseMessage",
    "_TcpConnection__processRead",
    "_TcpConnection__readBuffer",
    "_TcpConnection__recvBufferSize",
    "_TcpConnection__socket",
    "_TcpConnection__trySendBuffer",
    "_TcpConnection__writeBuffer",
)

#: Attributes and methods of pysyncobj's ``TcpServer`` that ``raft.link_guard`` reads or
#: overrides.
TCP_SERVER_NAMES = (
    "_TcpServer__connectionTimeout",
    "_TcpServer__fileno",
    "_TcpServer__keepalive",
    "_TcpServer__onNewConnection",
    "_TcpServer__onNewConnectionCallback",
    "_TcpServer__poller",
    "_TcpServer__recvBufferSize",
    "_TcpServer__sendBufferSize",
    "_TcpServer__socket",
    "_TcpServer__state",
)

#: Attributes and methods of pysyncobj's ``TCPTransport`` that ``raft.link_guard`` reads, calls
#: or replaces (who an incoming link says it is).
TCP_TRANSPORT_NAMES = (
    "_connections",
    "_nodeAddrToNode",
    "_onIncomingMessageReceived",
    "_shouldConnect",
    "_syncObj",
    "_unknownConnections",
)

#: The logger pysyncobj's ``SyncObj`` logs through, and the start of its false CRITICAL line
#: (``raft.member`` replaces it with its own).
SYNCOBJ_LOGGER = "pysyncobj.syncobj"
SYNCOBJ_TRUNCATION_CRITICAL = "truncating already-applied log entries from index"

#: Module-level names of pysyncobj: ``(module, name)``. The first eleven are what
#: ``raft.patches.install()`` replaces; the others are read.
MODULE_NAMES = (
    ("pysyncobj.pickle", "__protocol"),
    ("pysyncobj.syncobj", "getEncryptor"),
    ("pysyncobj.syncobj", "createPoller"),
    ("pysyncobj.syncobj", "createJournal"),
    ("pysyncobj.tcp_connection", "zlib"),
    ("pysyncobj.transport", "TcpConnection"),
    ("pysyncobj.transport", "TcpServer"),
    ("pysyncobj.pickle", "loads"),
    ("pysyncobj.pickle", "load"),
    ("pysyncobj.journal", "loads"),
    ("pysyncobj.syncobj", "Serializer"),
    ("pysyncobj.syncobj", "_RAFT_STATE"),
    ("pysyncobj.syncobj", "monotonicTime"),
)


def now() -> float:
    """pysyncobj's own clock, which its deadlines (election, fallback) use."""
    return pysyncobj.syncobj.monotonicTime()
