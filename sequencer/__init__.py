"""What a sequencer is: wire protocol and limits, the deterministic state machine, the journal.

Pure of I/O but for the journal's files: no sockets, threads, asyncio or clocks (a clock is
passed in where one is needed), no pysyncobj, no metrics.
"""

from raftseq.sequencer.journal import (
    FsyncPolicy,
    Journal,
    JournalCorruptError,
    JournalCursor,
    JournalError,
    JournalRecordError,
    RecoveryReport,
)
from raftseq.sequencer.limits import MachineConfig
from raftseq.sequencer.machine import ApplyResult, EntryResult, Outcome, SequencerMachine, SnapshotError
from raftseq.sequencer.stream import JournalBehindError, JournalDivergenceError, SequencedStream
from raftseq.sequencer.version import __version__

__all__ = [
    "__version__",
    "ApplyResult",
    "EntryResult",
    "FsyncPolicy",
    "Journal",
    "JournalBehindError",
    "JournalCorruptError",
    "JournalCursor",
    "JournalDivergenceError",
    "JournalError",
    "JournalRecordError",
    "MachineConfig",
    "Outcome",
    "RecoveryReport",
    "SequencedStream",
    "SequencerMachine",
    "SnapshotError",
]
