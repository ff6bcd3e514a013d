"""``verify``: replay a recording through the implementation under test (through the SDK's
runner) and compare its full digest with the recorded one after every recorded message."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

from raftseq.clients.client import Message
from raftseq.clients.sm import formats
from raftseq.clients.sm.conformance.recording import Entry, Header, frames, open_recording, read_snapshot, scan_file
from raftseq.clients.sm.conformance.replay import (
    DigestTracker,
    MachineLoadError,
    Progress,
    StartState,
    envelope_of,
    load_machine_class,
    new_machine,
    sm_runner,
)
from raftseq.clients.sm.errors import StateMachineError
from raftseq.clients.sm.machine import StateMachine
from raftseq.sequencer import protocol


@dataclass
class Mismatch:
    """The first message after which the implementation's digest is not the reference's (seq
    ``from_seq - 1``: the starting state already differs)."""

    seq: int
    expected: str
    actual: str
    type: str = ""
    version: int = 0
    session: str = ""
    client_seq: int = 0
    #: The message as the implementation decodes it (repr), when it does.
    message: str = ""
    #: The last sequence number whose digest matched (``from_seq - 1``: none).
    last_matching_seq: int = 0

    def describe(self) -> str:
        what = f"after seq {self.seq}" if self.type or self.session else f"in the starting state (after seq {self.seq}, before the slice)"
        msg = f" ({self.type!r} version {self.version}, session {self.session!r} client_seq {self.client_seq})" if self.type else ""
        return f"MISMATCH {what}{msg}: expected digest {self.expected}, this implementation has {self.actual}"


@dataclass
class VerifyResult:
    path: str
    machine: str
    header: Header
    #: Messages compared (recorded ones) and the last sequence number replayed.
    checked: int = 0
    last_seq: int = 0
    mismatch: Mismatch | None = None
    #: The SDK's error (unreadable message, apply raised, snapshot not restorable), as text.
    error: str = ""
    error_seq: int = 0
    #: The last sequence number whose digest matched (``from_seq - 1``: none yet).
    last_matching_seq: int = 0
    #: The recorded digest after the slice.
    final_digest: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.mismatch is None and not self.error


async def verify(path: str, machine_spec: str, *, progress: bool = False) -> VerifyResult:
    """Replay the recording `path` through the implementation `machine_spec`. Raises
    ``ConformanceFileError`` and ``MachineLoadError`` (before replaying anything); everything
    the implementation gets wrong is in the result."""
    started = time.monotonic()
    cls = load_machine_class(machine_spec)
    summary = scan_file(path)
    header = summary.header
    if cls.TYPE != header.sm_type:
        raise MachineLoadError(f"--machine {machine_spec!r}: its TYPE is {cls.TYPE!r}, {path} records {header.sm_type!r}")
    machine = new_machine(cls, machine_spec)
    result = VerifyResult(
        path,
        machine_spec,
        header,
        last_seq=header.from_seq - 1,
        last_matching_seq=header.from_seq - 1,
        final_digest=summary.footer.final_digest,
    )
    with tempfile.TemporaryDirectory(prefix="sm-conformance-") as state_dir:
        start = None
        if header.start_snapshot_bytes:
            start = StartState(read_snapshot(path), header.start_digest, header.from_seq - 1, header.start_snapshot_version)
        current: list[Entry | None] = [None]

        async def from_file(endpoints: Any, *, from_seq: int, **_: Any):
            if from_seq != header.from_seq:
                raise StateMachineError(f"the runner asked for seq {from_seq}, the recording starts at {header.from_seq}")
            with open_recording(path) as f:
                seq = from_seq
                log_time = 0
                for _, _, item in frames(f, path):
                    if not isinstance(item, Entry):
                        continue
                    while seq < item.seq:  # a message the recording left out: it changed nothing
                        current[0] = None
                        yield Message(seq, log_time, "", 0, b"")
                        seq += 1
                    current[0] = item
                    log_time = item.log_time_ns
                    yield Message(item.seq, item.log_time_ns, item.session, item.client_seq, item.payload)
                    seq += 1
                current[0] = None
                while seq <= header.to_seq:
                    yield Message(seq, log_time, "", 0, b"")
                    seq += 1

        try:
            runner = sm_runner(machine, endpoints=["recording"], state_dir=state_dir, start=start, subscribe_fn=from_file)
        except (ValueError, TypeError) as exc:
            raise MachineLoadError(f"--machine {machine_spec!r}: {exc}") from None
        try:
            await runner.bootstrap()
        except StateMachineError as exc:
            result.error = str(exc)
            return result
        except Exception as exc:  # noqa: BLE001 - the implementation's own code (snapshot, restore)
            result.error = f"the implementation failed while loading the starting state: {exc!r}"
            return result
        if runner.snapshot_errors:
            result.error = (
                f"the starting state (after seq {header.from_seq - 1}) does not load into this implementation: {runner.snapshot_errors[0]}"
            )
            result.error_seq = header.from_seq - 1
            return result
        try:
            tracker = DigestTracker(runner, machine)
        except Exception as exc:  # noqa: BLE001
            result.error = f"the implementation's digest raised {exc!r}"
            return result
        if tracker.digest != header.start_digest:
            result.mismatch = Mismatch(header.from_seq - 1, header.start_digest, tracker.digest, last_matching_seq=header.from_seq - 1)
            return result
        report = Progress("verify", header.from_seq, header.to_seq, enabled=progress)

        def after(seq: int) -> bool:
            report.tick(seq)
            result.last_seq = seq
            tracker.after_message()
            entry = current[0]
            if entry is not None:
                result.checked += 1
                if tracker.digest != entry.digest:
                    result.mismatch = mismatch_of(entry, tracker.digest, machine, result.last_matching_seq)
                    return True
                result.last_matching_seq = seq
            return seq >= header.to_seq

        try:
            if header.to_seq > runner.last_seq:
                await runner.run(stop_when=after)
        except StateMachineError as exc:
            result.error = str(exc)
            result.error_seq = getattr(exc, "seq", 0) or result.last_seq + 1
        except Exception as exc:  # noqa: BLE001 - the implementation's digest or snapshot
            result.error = f"after seq {result.last_seq}: the implementation raised {exc!r}"
            result.error_seq = result.last_seq + 1
    result.seconds = time.monotonic() - started
    return result


def mismatch_of(entry: Entry, actual: str, machine: StateMachine, last_match: int) -> Mismatch:
    shown = ""
    envelope = envelope_of(entry.payload)
    if envelope is not None and type(machine).MESSAGES.owns(envelope.type):
        try:
            shown = repr(type(machine).MESSAGES.decode(envelope, entry.seq))
        except StateMachineError:
            shown = ""
    elif envelope is not None and envelope.type == formats.ACTIVATE_TYPE:
        try:
            shown = repr(formats.decode_activate(envelope))
        except protocol.SmFormatError:
            shown = ""
    return Mismatch(entry.seq, entry.digest, actual, entry.type, entry.version, entry.session, entry.client_seq, shown, last_match)
