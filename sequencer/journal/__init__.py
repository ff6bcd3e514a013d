"""The journal: the permanent, replayable record of the sequenced stream.

On disk a journal is a directory of segment files ``<first_seq:020d>.seg``. A segment is a run
of records; a record is a ``Delivered`` wire frame (see ``protocol``): length, CRC-32, msgpack
body holding sequence number, log time, session, client_seq and payload. Numbers are gapless
from the first segment's first number to the last record, but for recorded holes.

The modules, one job each (this package is the only place in ``sequencer`` doing file I/O):

- ``segments``: segment files, their names, walking their records, low-level writes;
- ``index``: the sparse index of a sealed segment (``<first_seq>.idx``);
- ``holes``: ranges the journal lacks after a Raft snapshot, and filling them from a peer;
- ``records``: checks of records handed to the journal (``JournalRecordError``);
- ``recovery``: opening a directory, cutting a torn tail (``RecoveryReport``), finding damaged
  sealed segments;
- ``damage``: damaged ranges of sealed segments, refused to readers until repaired (``DamageMap``);
- ``scrub``: reading sealed segments back a bounded step at a time (``Scrubber``);
- ``store``: the ``Journal`` itself (append, seal, fsync, holes, cursors);
- ``cursor``: reading records from any number (``JournalCursor``);
- ``verify``: checking a whole journal offline (``verify_journal``);
- ``errors``: what the journal raises.
"""

from raftseq.sequencer.journal.cursor import JournalCursor
from raftseq.sequencer.journal.damage import Damage, DamageMap
from raftseq.sequencer.journal.errors import JournalCorruptError, JournalError, JournalRecordError
from raftseq.sequencer.journal.holes import HOLES_FILE
from raftseq.sequencer.journal.recovery import RecoveryReport
from raftseq.sequencer.journal.scrub import Scrubber
from raftseq.sequencer.journal.segments import (
    FILL_SUFFIX,
    HEADER,
    HEADER_BYTES,
    INDEX_SUFFIX,
    SEGMENT_SUFFIX,
    ScanResult,
    Segment,
    list_segment_files,
    scan_segment,
    segment_name,
)
from raftseq.sequencer.journal.store import FsyncPolicy, Journal
from raftseq.sequencer.journal.verify import VerifyDamage, VerifyReport, verify_journal

__all__ = [
    "Damage",
    "DamageMap",
    "FILL_SUFFIX",
    "FsyncPolicy",
    "HEADER",
    "HEADER_BYTES",
    "HOLES_FILE",
    "INDEX_SUFFIX",
    "Journal",
    "JournalCorruptError",
    "JournalCursor",
    "JournalError",
    "JournalRecordError",
    "RecoveryReport",
    "SEGMENT_SUFFIX",
    "ScanResult",
    "Scrubber",
    "Segment",
    "VerifyDamage",
    "VerifyReport",
    "list_segment_files",
    "scan_segment",
    "segment_name",
    "verify_journal",
]
