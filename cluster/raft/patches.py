"""The process-wide changes raftseq makes to pysyncobj, applied by ``install()`` only.

Importing the raft package changes nothing in pysyncobj: a process that imports raftseq (a
tool, a test, a benchmark's plain pysyncobj peer) keeps plain pysyncobj. A node calls
``install()`` when it starts, before it builds its Raft member; calling it again does nothing.

What ``install()`` changes, for every ``SyncObj`` of the process:

* **Pickle protocol 5.** pysyncobj pickles its log entries and messages with protocol 2, which
  stores ``bytes`` as latin-1 text (1.5x in the log, ~2.6x on the wire). Protocol 5 stores them
  raw and is read back by the same loader.
* **The Raft links' cipher.** pysyncobj builds its encryptor from the password with
  ``getEncryptor`` (Fernet); here it builds a ``LinkCipher`` (AES-256-GCM, ``raft.link_cipher``).
* **No zlib on the links.** pysyncobj compresses every message; batches are compact msgpack
  already, and compression cost more CPU than it saved bytes (``raft.link_cipher``).
* **The loop's poller.** pysyncobj builds its poller from ``SyncObjConf.pollerType``; a
  ``LoopPoller`` passed there is used as it is (any other value keeps pysyncobj's own choice).
* **Guarded links.** pysyncobj's transport builds ``GuardedConnection`` and ``GuardedServer``
  (``raft.link_guard``): frames bounded at their length prefix, unauthenticated links bounded
  in count and time, a listener that backs off on accept errors instead of closing.
* **Our Raft log storage.** pysyncobj builds its log with ``createJournal(journalFile)``; a
  ``RaftLogStore`` (``raft.log_store``) passed as ``SyncObjConf.journalFile`` is used as it is
  (a file name or None keeps pysyncobj's own ``FileJournal`` or memory journal).
* **Snapshots written off the loop.** pysyncobj builds its snapshot writer with
  ``Serializer(...)``; when ``SyncObjConf.serializer`` is a ``SnapshotWriter`` it builds a
  ``BackgroundSerializer`` (``raft.snapshot_files``): log compaction writes and fsyncs the
  snapshot on a thread, not inside a tick (any other serializer keeps pysyncobj's own).
* **Allow-list pickles.** pysyncobj loads link messages, log entries' commands and its log
  file's metadata with ``raft.safe_pickle``: no name outside a short allow-list is resolved,
  so no code runs from a peer's bytes, even a peer holding the password.
"""

from __future__ import annotations

import pysyncobj.journal
import pysyncobj.pickle
import pysyncobj.syncobj
import pysyncobj.tcp_connection
import pysyncobj.transport
from pysyncobj.poller import Poller

from raftseq.cluster.raft import safe_pickle
from raftseq.cluster.raft.link_cipher import LinkCipher, Uncompressed
from raftseq.cluster.raft.link_guard import GuardedConnection, GuardedServer, incoming_message
from raftseq.cluster.raft.log_store import RaftLogStore
from raftseq.cluster.raft.loop_poller import LoopPoller
from raftseq.cluster.raft.snapshot_files import BackgroundSerializer, SnapshotWriter

#: The pickle protocol pysyncobj writes with once installed (pysyncobj's own is 2).
PICKLE_PROTOCOL = 5

_original_create_poller = pysyncobj.syncobj.createPoller
_original_create_journal = pysyncobj.syncobj.createJournal
_original_serializer = pysyncobj.syncobj.Serializer


def _create_poller(poller_type: object) -> Poller:
    if isinstance(poller_type, LoopPoller):
        return poller_type
    return _original_create_poller(poller_type)


def _create_journal(journal_file: object):
    if isinstance(journal_file, RaftLogStore):
        return journal_file
    return _original_create_journal(journal_file)


def _create_serializer(file_name, transmission_batch_size, try_use_fork, serializer, deserializer, serialize_checker):
    if isinstance(serializer, SnapshotWriter):
        return BackgroundSerializer(file_name, transmission_batch_size, serializer, deserializer)
    return _original_serializer(file_name, transmission_batch_size, try_use_fork, serializer, deserializer, serialize_checker)


def install() -> None:
    """Apply the changes above to pysyncobj, in this process. Idempotent."""
    assert hasattr(pysyncobj.syncobj, "getEncryptor"), "pysyncobj no longer builds its encryptor through getEncryptor"
    assert pysyncobj.tcp_connection.zlib.__name__ in ("zlib", Uncompressed.__name__), "pysyncobj's links no longer use zlib"
    setattr(pysyncobj.pickle, "__protocol", PICKLE_PROTOCOL)
    pysyncobj.syncobj.getEncryptor = LinkCipher
    pysyncobj.tcp_connection.zlib = Uncompressed
    pysyncobj.syncobj.createPoller = _create_poller
    pysyncobj.syncobj.createJournal = _create_journal
    pysyncobj.syncobj.Serializer = _create_serializer
    pysyncobj.transport.TcpConnection = GuardedConnection
    pysyncobj.transport.TcpServer = GuardedServer
    pysyncobj.transport.TCPTransport._onIncomingMessageReceived = incoming_message
    pysyncobj.pickle.loads = safe_pickle.loads
    pysyncobj.pickle.load = safe_pickle.load
    pysyncobj.journal.loads = safe_pickle.loads


def installed() -> bool:
    """Whether ``install()`` ran in this process (every change is in place)."""
    return (
        getattr(pysyncobj.pickle, "__protocol") == PICKLE_PROTOCOL
        and pysyncobj.syncobj.getEncryptor is LinkCipher
        and pysyncobj.tcp_connection.zlib is Uncompressed
        and pysyncobj.syncobj.createPoller is _create_poller
        and pysyncobj.syncobj.createJournal is _create_journal
        and pysyncobj.syncobj.Serializer is _create_serializer
        and pysyncobj.transport.TcpConnection is GuardedConnection
        and pysyncobj.transport.TcpServer is GuardedServer
        and pysyncobj.transport.TCPTransport._onIncomingMessageReceived is incoming_message
        and pysyncobj.pickle.loads is safe_pickle.loads
        and pysyncobj.pickle.load is safe_pickle.load
        and pysyncobj.journal.loads is safe_pickle.loads
    )
