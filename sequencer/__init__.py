"""What a sequencer is: wire protocol and limits, the deterministic state machine, the journal.

Pure of I/O but for the journal's files: no sockets, threads, asyncio or clocks (a clock is
passed in where one is needed), no pysyncobj, no metrics.
"""

from sequencer.core import JournalBehindError, JournalDivergenceError, SequencerCore
from sequencer.journal import FsyncPolicy, Journal, JournalCorruptError, JournalCursor, JournalError, RecoveryReport
from sequencer.limits import MachineConfig
from sequencer.machine import ApplyResult, EntryResult, Outcome, SequencerMachine, SnapshotError

__all__ = [
    "ApplyResult",
    "EntryResult",
    "FsyncPolicy",
    "Journal",
    "JournalBehindError",
    "JournalCorruptError",
    "JournalCursor",
    "JournalDivergenceError",
    "JournalError",
    "MachineConfig",
    "Outcome",
    "RecoveryReport",
    "SequencerCore",
    "SequencerMachine",
    "SnapshotError",
]
