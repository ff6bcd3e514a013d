"""How a node ends: one exit code per reason, and the error that carries one.

An operator (or ``raftseq cluster up``) reads the code to know what to do: a code from 3 to 10
names something only a person can fix, so restarting the node unchanged cannot help; 1 is a
bug; 70 is a broken invariant, after which a restart recovers from the node's files.
"""

from __future__ import annotations

import enum


class NodeExit(enum.IntEnum):
    #: Stopped on request (SIGTERM, SIGINT).
    STOPPED = 0
    #: An unexpected error (a bug: the log holds its traceback).
    UNEXPECTED = 1
    #: Bad command line or configuration file.
    USAGE = 2
    #: The Raft log cannot be opened (``raftseq node --discard-raft-log`` rejoins from the leader).
    RAFT_LOG_UNREADABLE = 3
    #: A port the node must listen on (client, Raft or metrics) is in use or not allowed.
    ADDRESS_UNAVAILABLE = 4
    #: The configuration is valid TOML but cannot be used (for example, inconsistent peers).
    INVALID_CONFIG = 5
    #: The data directory cannot be created, written or read.
    DATA_DIR_UNUSABLE = 6
    #: The journal is damaged and no peer could repair it.
    JOURNAL_DAMAGED = 7
    #: Another process holds the data directory's lock.
    DATA_DIR_IN_USE = 8
    #: The Raft log is damaged other than at its tail (the log line names file and offset;
    #: ``raftseq node --discard-raft-log`` rejoins from the leader).
    RAFT_LOG_DAMAGED = 9
    #: The disk refused a write or an fsync of the Raft log: what it held is not taken as
    #: written (the node stops at once; check the disk, then restart).
    DISK_FAILED = 10
    #: This node was removed from its cluster (``raftseq member remove``); it is refused, and
    #: refuses to run, until its data directory is cleared and it is added anew under a new id.
    REMOVED = 11
    #: A broken internal invariant stopped the node at once; a restart recovers from its files.
    INVARIANT = 70

    @property
    def needs_operator(self) -> bool:
        """True when restarting the node unchanged cannot help."""
        return self in _NEEDS_OPERATOR


_NEEDS_OPERATOR = frozenset(
    {
        NodeExit.USAGE,
        NodeExit.RAFT_LOG_UNREADABLE,
        NodeExit.ADDRESS_UNAVAILABLE,
        NodeExit.INVALID_CONFIG,
        NodeExit.DATA_DIR_UNUSABLE,
        NodeExit.JOURNAL_DAMAGED,
        NodeExit.DATA_DIR_IN_USE,
        NodeExit.RAFT_LOG_DAMAGED,
        NodeExit.DISK_FAILED,
        NodeExit.REMOVED,
    }
)


class NodeCannotRun(Exception):
    """A reason the node cannot start or go on that an operator must fix.

    ``run_node`` logs ``str(exc)`` as one line (no traceback) and exits with ``exc.code``.
    """

    def __init__(self, code: NodeExit, message: str) -> None:
        super().__init__(message)
        self.code = code
