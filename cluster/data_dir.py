"""A data directory that one process owns: made private, checked usable, and locked.

Before a node opens anything in its data directory it calls ``claim_data_dir``: the process
umask becomes 077 (every file the node, pysyncobj or the journal creates is 0600, every
directory 0700), the directory and its ``journal``/``raft`` subdirectories are created 0700 and
checked writable, and an exclusive ``fcntl.flock`` is taken on ``node.lock`` inside it, which
then holds the holder's pid. A second process on the same directory gets ``NodeCannotRun``
with ``NodeExit.DATA_DIR_IN_USE`` and the holder's pid; a directory that cannot be created,
written or read gets ``NodeExit.DATA_DIR_UNUSABLE``. The kernel drops the lock when the holder
exits, however it exits (``kill -9`` included), so a stale lock file never blocks a restart.

``raftseq cluster up`` takes the same kind of lock (``cluster.lock``) on the cluster's data
directory, so that two of them never rewrite one cluster's configs and logs.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence

from raftseq.cluster.node_exit import NodeCannotRun, NodeExit

#: The lock file a node holds in its own data directory.
NODE_LOCK_NAME = "node.lock"
#: The lock file ``raftseq cluster up`` holds in the cluster's data directory.
CLUSTER_LOCK_NAME = "cluster.lock"
#: Files holding payloads, secrets or logs: owner read and write only.
PRIVATE_FILE_MODE = 0o600
#: Directories holding them: owner only.
PRIVATE_DIR_MODE = 0o700
#: The process umask of a node: group and others get nothing on what it creates.
PRIVATE_UMASK = 0o077
#: Bytes read from a lock file to learn its holder's pid (a pid and a newline).
LOCK_PID_BYTES_MAX = 32


class DataDirLock:
    """An exclusive lock on a data directory, held until ``release`` or the process ends."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_private_dirs(path: str) -> None:
    """Create `path` (and missing parents) with mode 0700. An existing directory keeps its
    mode: the operator chose it."""
    os.makedirs(path, mode=PRIVATE_DIR_MODE, exist_ok=True)


def open_private(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """``os.open`` of a file created 0600 whatever the umask (an existing file is not widened)."""
    return os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE_MODE)


def write_private(path: str, text: str) -> None:
    """Write `text` to `path`, a file that is 0600 from the moment it exists."""
    fd = open_private(path)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, PRIVATE_FILE_MODE)  # an existing file made by an older version


def claim_data_dir(data_dir: str, subdirs: Sequence[str] = ()) -> DataDirLock:
    """What a node does first: umask 077, the lock of `data_dir` (created 0700 when missing),
    then `subdirs` (paths) created 0700 and checked usable. Raises ``NodeCannotRun``."""
    os.umask(PRIVATE_UMASK)
    lock = lock_data_dir(data_dir, NODE_LOCK_NAME)
    try:
        for path in subdirs:
            _check_usable(path)
    except NodeCannotRun:
        lock.release()
        raise
    return lock


def lock_data_dir(data_dir: str, lock_name: str) -> DataDirLock:
    """Take the exclusive lock `lock_name` in `data_dir` (created 0700 when missing) and write
    this process's pid into it. Raises ``NodeCannotRun`` (DATA_DIR_IN_USE with the holder's
    pid, or DATA_DIR_UNUSABLE)."""
    _check_usable(data_dir)
    path = os.path.join(data_dir, lock_name)
    try:
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise _unusable(data_dir, f"cannot open its lock file {path}", exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _unusable(data_dir, f"cannot lock {path}", exc) from None
        who = f"process {holder}" if holder else "another process"
        raise NodeCannotRun(
            NodeExit.DATA_DIR_IN_USE,
            f"data directory {data_dir} is in use by {who} (it holds {path}); stop that process or choose another data directory",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same; a second process cannot name the holder
    return DataDirLock(path, fd)


def _holder_pid(fd: int) -> int:
    """The pid a lock file names (0 when it names none yet: its holder is still writing it)."""
    try:
        text = os.pread(fd, LOCK_PID_BYTES_MAX, 0).decode("ascii", "replace").strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _check_usable(path: str) -> None:
    """`path` exists as a directory (created 0700 when missing) that this process can list,
    enter and write in."""
    try:
        make_private_dirs(path)
    except OSError as exc:
        raise _unusable(path, "cannot create it", exc) from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise NodeCannotRun(
            NodeExit.DATA_DIR_UNUSABLE,
            f"data directory {path} is not readable and writable by this user (uid {os.getuid()}); fix its owner or mode",
        )


def _unusable(path: str, what: str, exc: OSError) -> NodeCannotRun:
    reason = exc.strerror or str(exc)
    return NodeCannotRun(NodeExit.DATA_DIR_UNUSABLE, f"data directory {path} is unusable: {what}: {reason}")
