"""The conformance kit: prove that a second implementation of a state machine matches the
reference, message by message.

    raftseq sm record --machine examples.refdata.machine:ReferenceData --out day.smc [--from N] [--to M]
    raftseq sm verify day.smc --machine theirteam.refdata:RefData
    raftseq sm show day.smc                  # the header and a count, as JSON

Modules: ``recording`` (the file), ``replay`` (what recording and verifying share),
``record``, ``verify``, ``command`` (what the commands print; their options are
``cluster.cli.sm``'s).

**record** applies a slice ``N..M`` of the stream to the reference implementation, through the
SDK's own runner (``StateMachineRunner``: the same routing, upcasting, behaviour activations and
errors as in production), and writes each message of the slice with the full digest
(``clients.sm.full_digest``) of the reference's state after it. Where the slice starts:

* ``--from 1`` (the default): from a fresh machine.
* ``--from N`` with N > 1: the reference first reaches the state after N - 1 — from the newest
  snapshot in the cluster that covers at most N - 1 and that it can read (digest checked; none
  with ``--no-snapshot``: then by replaying from 1) plus a replay of the rest — and the file
  carries that state (the SDK's snapshot wrapper, ``clients.sm.capture``) as its start. An
  implementation under test must therefore read the reference's snapshot format too, as any
  late joiner of that type must.

By default the file keeps the messages that can change the machine: those of its namespace,
and any message after which the digest changed (an ``Activate`` of its type, a behaviour
version taking effect). ``--all-messages`` keeps every message of the slice. Messages left out
are replayed by ``verify`` as empty payloads under their own sequence numbers, so numbering and
activation points are exactly those of the stream.

**verify** replays the file through the implementation under test (again through the runner),
compares its full digest with the recorded one after every recorded message, and reports the
first mismatch: sequence number, expected and actual digest, the message's type, version,
session and client_seq (exit 1). A message the implementation cannot read (an unknown type, a
version it has no upcaster for), an ``apply`` that raises, or a starting snapshot it cannot
restore is reported with the SDK's error, naming type, version and sequence number (exit 1).
Exit 0 when every digest matches; 2 when the file is unreadable (truncated, garbled, another
format) or the machine cannot be loaded.

The digest is part of the protocol: two implementations match only when their states have equal
digests, i.e. (with the default ``StateMachine.digest``) equal snapshot bytes. A second team
reproduces the reference's snapshot encoding, or the reference's ``digest``.

**The file**: see ``recording``.
"""

from raftseq.clients.sm.conformance.command import run_record, run_show, run_verify
from raftseq.clients.sm.conformance.record import IDLE_TIMEOUT_S, RecordError, RecordResult, last_seq_of, record
from raftseq.clients.sm.conformance.recording import (
    FORMAT,
    MAGIC,
    ConformanceFileError,
    Entry,
    FileSummary,
    Footer,
    Header,
    SnapshotPart,
    frames,
    open_recording,
    scan_file,
)
from raftseq.clients.sm.conformance.replay import MachineLoadError, load_machine_class
from raftseq.clients.sm.conformance.verify import Mismatch, VerifyResult, verify

__all__ = [
    "ConformanceFileError",
    "Entry",
    "FORMAT",
    "FileSummary",
    "Footer",
    "Header",
    "IDLE_TIMEOUT_S",
    "MAGIC",
    "MachineLoadError",
    "Mismatch",
    "RecordError",
    "RecordResult",
    "SnapshotPart",
    "VerifyResult",
    "frames",
    "last_seq_of",
    "load_machine_class",
    "open_recording",
    "record",
    "run_record",
    "run_show",
    "run_verify",
    "scan_file",
    "verify",
]
