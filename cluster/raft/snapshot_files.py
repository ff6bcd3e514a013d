"""Raft snapshots written on a thread of their own, so that log compaction stays off the loop.

pysyncobj compacts its log from a tick: it asks its ``Serializer`` to write a snapshot
(``serialize``), then asks on every later tick how that went (``checkSerializing``) and drops
the entries the snapshot covers once it succeeded. With a custom serializer its own
``Serializer`` does the whole write inside the tick: on the node's loop, fsyncs included
(4-6 ms with the journal's fsync, the loop's longest stall).

``BackgroundSerializer`` takes its place (``raft.patches.install()`` builds it when
``SyncObjConf.serializer`` is a ``SnapshotWriter``) and splits the work:

* **On the loop** (``serialize``): ``SnapshotWriter.prepare`` takes what the snapshot holds
  (the machine state as bytes, the Raft entries around it) and returns the function that
  writes it.
* **On the snapshot thread**: that function writes ``<snapshot>.writing`` and fsyncs it (and
  whatever must be on disk before the log drops the entries, the journal's tail).
* **On the loop again** (``checkSerializing``, on a tick after the thread ended): the file is
  renamed over the snapshot and pysyncobj is told it succeeded; it then drops the entries.

The snapshot file, its format and the order of events on disk are those of the synchronous
write: the snapshot is whole on disk before its name replaces the old one, and the log drops
the entries only after that (in power mode the Raft log syncs the directory before its record
dropping them, ``raft.log_store``). A write cut short leaves ``<snapshot>.writing`` behind and
the old snapshot and the whole log in place.

While the thread writes, pysyncobj starts no other snapshot, and a leader sends no snapshot
to a follower (``getTransmissionData`` has none yet; pysyncobj tries again on a later tick). A
snapshot received from the leader meanwhile (``setTransmissionData``) replaced the log: the one
being written is older, so it is thrown away (``FAILED``) instead of renamed over it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.serializer import Serializer

log = logging.getLogger("raftseq.raft_snapshot")

#: The name a snapshot is written under (beside the snapshot) until it is whole on disk.
WRITING_SUFFIX = ".writing"


class SnapshotWriter:
    """``SyncObjConf.serializer`` for snapshots written on a thread (see the module doc).

    ``prepare(raft_data)`` runs on the loop and returns ``write(path)``, which runs on the
    snapshot thread: it writes the whole snapshot at `path` and fsyncs it. Called as pysyncobj's
    plain serializer (``(file name, raft_data)``, a process without ``raft.install()``), it
    does both at once."""

    def __init__(self, prepare: Callable[[tuple], Callable[[str], None]]) -> None:
        self.prepare = prepare

    def __call__(self, filename: str, raft_data: tuple) -> None:
        self.prepare(raft_data)(filename)


class BackgroundSerializer(Serializer):
    """pysyncobj's ``Serializer`` whose snapshot writes run on a thread (see the module doc).
    Snapshots received from a leader, and the reading of snapshots, are pysyncobj's."""

    def __init__(self, file_name: str, transmission_batch_size: int, writer: SnapshotWriter, deserializer: Callable) -> None:
        super().__init__(file_name, transmission_batch_size, False, writer, deserializer, None)
        self.file_name = file_name
        self.writing_path = file_name + WRITING_SUFFIX
        self._writer = writer
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._id = None
        #: Snapshots received from the leader so far, and when the write in progress began.
        self._installs = 0
        self._installs_at_start = 0
        #: Snapshots written and renamed into place (read by tests and the node's status).
        self.written = 0
        try:
            os.unlink(self.writing_path)  # a write cut short by the last stop
        except FileNotFoundError:
            pass

    @property
    def writing(self) -> bool:
        return self._thread is not None

    def serialize(self, data, id) -> None:  # noqa: A002 (pysyncobj's name)
        if self._thread is not None:
            return
        write = self._writer.prepare(data[1:])
        self._id = id
        self._error = None
        self._done.clear()
        self._installs_at_start = self._installs
        self._thread = threading.Thread(target=self._write, args=(write,), name="raft-snapshot-writer", daemon=True)
        self._thread.start()

    def _write(self, write: Callable[[str], None]) -> None:
        try:
            write(self.writing_path)
        except BaseException as exc:  # noqa: BLE001 - told to the loop, which fails the compaction
            self._error = exc
        finally:
            self._done.set()

    def checkSerializing(self):  # noqa: N802 (pysyncobj's name)
        if self._thread is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not self._done.is_set():
            return SERIALIZER_STATE.SERIALIZING, self._id
        self._thread.join()
        self._thread = None
        problem = repr(self._error) if self._error is not None else ""
        if not problem and self._installs != self._installs_at_start:
            problem = "a snapshot from the leader replaced the log meanwhile"
        if not problem:
            try:
                os.replace(self.writing_path, self.file_name)
            except OSError as exc:
                problem = f"cannot rename it into place: {exc}"
        if problem:
            log.warning("Raft snapshot not written (%s); the log keeps its entries until the next compaction", problem)
            try:
                os.unlink(self.writing_path)
            except OSError:
                pass
            return SERIALIZER_STATE.FAILED, self._id
        self.written += 1
        return SERIALIZER_STATE.SUCCESS, self._id

    def getTransmissionData(self, transmissionID):  # noqa: N802,N803 (pysyncobj's names)
        if self._thread is not None:
            return None
        return super().getTransmissionData(transmissionID)

    def setTransmissionData(self, data) -> bool:  # noqa: N802 (pysyncobj's name)
        installed = super().setTransmissionData(data)
        if installed:
            self._installs += 1
        return installed

    def wait(self, timeout_s: float) -> bool:
        """Wait for the write in progress to end (tests, and a node stopping). True when none is left."""
        return self._done.wait(timeout_s) if self._thread is not None else True
