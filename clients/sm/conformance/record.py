"""The conformance kit: prove that a second implementation of a state machine matches the
reference, message by message.

    python -m clients.sm.conformance record --machine examples.refdata.machine:ReferenceData --out day.smc [--from N] [--to M]
    python -m clients.sm.conformance verify day.smc --machine theirteam.refdata:RefData
    python -m clients.sm.conformance show day.smc                  # the header and a count, as JSON

(``raftseq sm record|verify|show`` run this module.)

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

**The file** (``FORMAT``): ``MAGIC``, then frames ``<u32 length><u32 crc32><msgpack body>``
(big-endian; a body is at most ``FRAME_BODY_BYTES_MAX``). Each body is a msgpack map with a
``kind``: first a ``Header``; then the starting snapshot in ``SnapshotPart``s (only when the
slice starts after 1); then one ``Entry`` per recorded message, in sequence order; last a
``Footer`` (count, last number, final digest). A file without its footer is truncated; a frame
whose checksum fails is garbled: ``verify`` checks the whole file before it replays anything.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from raftseq.clients.client import Message, Rejected, _open_link, subscribe
from raftseq.clients.sm.errors import SnapshotVerifyError, StateMachineError
from raftseq.clients.sm.machine import StateMachine, capture, full_digest, load
from raftseq.clients.sm.runner import LOCAL_STATE_FORMAT, LocalState, StateMachineRunner
from raftseq.clients.sm.snapshots import fetch_snapshot, query_snapshots
from raftseq.sequencer import protocol

#: First bytes of a conformance file.
MAGIC = b"raftseq sm conformance\n"
#: Version of the file's layout and records (``Header.format``).
FORMAT = 1
#: Largest frame body; every record is far smaller except snapshot parts (``SNAPSHOT_PART_BYTES``).
FRAME_BODY_BYTES_MAX = 4 * 1024 * 1024
#: Bytes of the starting snapshot per ``SnapshotPart``.
SNAPSHOT_PART_BYTES = 1024 * 1024
#: Largest starting snapshot (the cluster's own bound on a published snapshot).
SNAPSHOT_BYTES_MAX = protocol.SNAPSHOT_CHUNKS_MAX * protocol.SNAPSHOT_CHUNK_DATA_BYTES_MAX
#: Seconds between progress lines on stderr.
PROGRESS_INTERVAL_S = 2.0
#: ``record`` gives up when no message arrived for this long (the cluster is gone, or ``--to``
#: is beyond the end of the stream).
IDLE_TIMEOUT_S = 30.0

_FRAME = struct.Struct(">II")
_DIGEST_CHARS = 64


# --- the records --------------------------------------------------------------------------------


class Header(msgspec.Struct, frozen=True, tag="header", tag_field="kind", kw_only=True):
    """What was recorded, from what, and by which reference."""

    format: int
    #: ``TYPE`` of the state machine; the reference as ``MODULE:CLASS``.
    sm_type: str
    machine: str
    #: The reference's message namespace, and per message type the versions it reads (the
    #: last one current).
    namespace: str
    message_versions: dict[str, list[int]]
    snapshot_version: int
    behaviour_versions: list[int]
    #: The slice: sequence numbers ``from_seq..to_seq``.
    from_seq: int
    to_seq: int
    #: True: every message of the slice is in the file; False: only those that can change the
    #: machine (the others are replayed as empty payloads).
    all_messages: bool
    #: Full digest of the reference's state after ``from_seq - 1`` (a fresh machine's when 1).
    start_digest: str
    #: The state after ``from_seq - 1`` as ``clients.sm.capture`` bytes, in ``SnapshotPart``s
    #: (0 bytes when the slice starts at 1), their SHA-256, and the snapshot schema version.
    start_snapshot_bytes: int = 0
    start_snapshot_sha256: str = ""
    start_snapshot_version: int = 0
    #: How the reference reached the start (for people: "fresh machine", "replayed 1..N-1",
    #: "cluster snapshot covering S (published by ...), then replayed S+1..N-1").
    start_from: str = ""
    #: Wall-clock time of the recording (information only).
    recorded_at_ns: int = 0


class SnapshotPart(msgspec.Struct, frozen=True, tag="snapshot", tag_field="kind"):
    index: int
    data: bytes


class Entry(msgspec.Struct, frozen=True, tag="message", tag_field="kind"):
    """One sequenced message as delivered, and the reference's full digest after it."""

    seq: int
    log_time_ns: int
    session: str
    client_seq: int
    payload: bytes
    #: Envelope type and version ("" and 0: not a state-machine message); redundant with the
    #: payload, for people reading the file.
    type: str
    version: int
    digest: str


class Footer(msgspec.Struct, frozen=True, tag="end", tag_field="kind"):
    #: Entries in the file; the last sequence number of the slice; the digest after it.
    messages: int
    last_seq: int
    final_digest: str


Record = Header | SnapshotPart | Entry | Footer

_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)
_json = msgspec.json.Encoder()


class ConformanceFileError(Exception):
    """A file that is not a complete, intact conformance recording (exit 2)."""


class MachineLoadError(Exception):
    """A ``MODULE:CLASS`` that does not name a usable state machine (exit 2)."""


# --- machines -----------------------------------------------------------------------------------


def load_machine_class(spec: str) -> type[StateMachine]:
    """The ``StateMachine`` subclass `spec` (``"package.module:Class"``) names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise MachineLoadError(f"--machine {spec!r}: expected MODULE:CLASS, e.g. examples.refdata.machine:ReferenceData")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - anything the user's module does on import
        raise MachineLoadError(f"--machine {spec!r}: cannot import {module_name!r}: {exc!r} (run from the directory that holds it, or set PYTHONPATH)") from None
    cls: Any = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise MachineLoadError(f"--machine {spec!r}: module {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, StateMachine)):
        raise MachineLoadError(f"--machine {spec!r}: {cls!r} is not a clients.sm.StateMachine subclass")
    return cls


def new_machine(cls: type[StateMachine], spec: str) -> StateMachine:
    try:
        return cls()
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        raise MachineLoadError(f"--machine {spec!r}: {cls.__name__}() raised {exc!r} (the machine must be constructible without arguments)") from None


def _envelope_of(payload: bytes) -> protocol.SmEnvelope | None:
    try:
        return protocol.decode_sm_envelope(payload)
    except protocol.SmFormatError:
        return None


class _DigestTracker:
    """The machine's full digest after each message, recomputed only when the state may have
    changed: after an ``apply`` (the runner's ``messages_applied`` moved) or when the SDK's part
    (behaviour version, pending activations) moved. A state machine changes only in ``apply``."""

    def __init__(self, runner: StateMachineRunner, machine: StateMachine) -> None:
        self.runner = runner
        self.machine = machine
        self.reset()

    def reset(self) -> None:
        self._applied = self.runner.messages_applied
        self._sdk = (self.machine.active_version, self.machine.pending_activations)
        self.digest = full_digest(self.machine)

    def after_message(self) -> bool:
        """Update ``digest``; True when it changed."""
        sdk = (self.machine.active_version, self.machine.pending_activations)
        if self.runner.messages_applied == self._applied and sdk == self._sdk:
            return False
        self._applied = self.runner.messages_applied
        self._sdk = sdk
        before, self.digest = self.digest, full_digest(self.machine)
        return before != self.digest


def _ignore_divergence(divergence: protocol.Divergence) -> None:
    """Other replicas' checkpoints in the slice disagreeing is not what is checked here."""


def _runner(machine: StateMachine, *, endpoints: Sequence[str], token: str = "", state_dir: str | None = None, subscribe_fn: Callable | None = None) -> StateMachineRunner:
    return StateMachineRunner(
        list(endpoints), [machine], token=token, state_dir=state_dir, on_divergence=_ignore_divergence, subscribe_fn=subscribe_fn
    )


def _write_start_state(directory: str, cls: type[StateMachine], *, data: bytes, digest: str, covered_seq: int, schema_version: int) -> None:
    """Put a starting state where a runner with ``state_dir=directory`` restores it (and checks
    its digest): the runner then starts right after `covered_seq`."""
    state = LocalState(LOCAL_STATE_FORMAT, cls.TYPE, schema_version, covered_seq, digest, data)
    with open(os.path.join(directory, f"{cls.TYPE}.sm"), "wb") as f:
        f.write(_encoder.encode(state))


class _Progress:
    def __init__(self, verb: str, first: int, last: int, *, enabled: bool) -> None:
        self.verb = verb
        self.first = first
        self.last = last
        self.enabled = enabled
        self.started = time.monotonic()
        self.next_at = self.started + PROGRESS_INTERVAL_S
        self.count = 0

    def tick(self, seq: int) -> None:
        self.count += 1
        if not self.enabled or self.count & 255:
            return
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + PROGRESS_INTERVAL_S
        done = seq - self.first + 1
        total = max(1, self.last - self.first + 1)
        rate = self.count / max(1e-9, now - self.started)
        print(f"{self.verb}: seq {seq} ({done} of {total}, {100 * done // total}%), {rate:,.0f} messages/s", file=sys.stderr, flush=True)


# --- record -------------------------------------------------------------------------------------


@dataclass
class RecordResult:
    path: str
    header: Header
    entries: int
    final_digest: str
    seconds: float


class RecordError(Exception):
    """The reference could not record the slice (a ``StateMachineError``, the stream stopped)."""


async def last_seq_of(endpoints: Sequence[str], *, token: str, timeout_s: float = 5.0) -> int:
    """The last sequence number the first node that answers has (``Status.last_seq``)."""
    problems = []
    for address in endpoints:
        try:
            link = await _open_link(address, session="sm-conformance", token=token, last_acked=0, timeout_s=timeout_s)
        except Rejected:
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            problems.append(f"{address}: {exc or type(exc).__name__}")
            continue
        try:
            link.writer.write(protocol.encode_frame(protocol.StatusRequest()))
            frames = list(link.early)
            deadline = time.monotonic() + timeout_s
            while True:
                for frame in frames:
                    if isinstance(frame, protocol.Status):
                        return frame.last_seq
                    if isinstance(frame, (protocol.FrameError, protocol.Rejected)):
                        raise ConnectionError(getattr(frame, "detail", "") or repr(frame))
                data = await asyncio.wait_for(link.reader.read(65536), max(0.01, deadline - time.monotonic()))
                if not data:
                    raise ConnectionError("closed by node")
                frames = link.framer.feed(data)
        except (OSError, ConnectionError, TimeoutError) as exc:
            problems.append(f"{address}: {exc or type(exc).__name__}")
        finally:
            link.close()
    raise ConnectionError(f"no node answered a status request: {'; '.join(problems)}")


async def _start_from_cluster_snapshot(
    cls: type[StateMachine], endpoints: Sequence[str], *, token: str, before_seq: int, warn: Callable[[str], None]
) -> tuple[bytes, str, int, int, str] | None:
    """The newest cluster snapshot of `cls` covering at most `before_seq` that loads (digest
    checked): ``(data, digest, covered_seq, schema_version, description)``, or None."""
    try:
        infos = await query_snapshots(endpoints, cls.TYPE, token=token, session="sm-conformance.query")
    except ConnectionError as exc:
        warn(f"no snapshot used: {exc}")
        return None
    readable = cls.snapshot_versions_readable()
    for info in infos:
        if info.schema_version not in readable or not 1 <= info.covered_seq <= before_seq:
            continue
        where = f"published by {info.session}, chunks {info.first_seq}..{info.last_seq}"
        try:
            data = await fetch_snapshot(endpoints, info, token=token, session="sm-conformance.fetch")
            load(cls(), data, digest=info.digest, covered_seq=info.covered_seq, schema_version=info.schema_version, where=where)
        except (SnapshotVerifyError, ConnectionError, TimeoutError) as exc:
            warn(f"snapshot covering seq {info.covered_seq} not used: {exc}")
            continue
        return data, info.digest, info.covered_seq, info.schema_version, f"cluster snapshot covering seq {info.covered_seq} ({where})"
    return None


async def record(
    endpoints: Sequence[str],
    machine_spec: str,
    out: str,
    *,
    token: str = "",
    from_seq: int = 1,
    to_seq: int = 0,
    all_messages: bool = False,
    use_snapshots: bool = True,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    progress: bool = False,
) -> RecordResult:
    """Record the slice ``from_seq..to_seq`` (0: the last number a node has now) as the
    reference `machine_spec` applies it, into `out` (written to ``out.tmp``, renamed when
    complete). Raises ``MachineLoadError``, ``ConnectionError``, ``Rejected``, ``RecordError``,
    ``OSError``, ``ValueError``."""
    started = time.monotonic()
    if from_seq < 1:
        raise ValueError("--from must be >= 1")
    cls = load_machine_class(machine_spec)
    machine = new_machine(cls, machine_spec)
    if not to_seq:
        to_seq = await last_seq_of(endpoints, token=token)
        if to_seq < from_seq:
            raise RecordError(f"nothing to record: --from {from_seq} is after the last sequence number, {to_seq}")
    elif to_seq < from_seq:
        raise RecordError(f"nothing to record: the slice {from_seq}..{to_seq} is empty")

    def warn(text: str) -> None:
        print(f"record: {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="sm-conformance-") as state_dir:
        start = None
        if from_seq > 1 and use_snapshots:
            start = await _start_from_cluster_snapshot(cls, endpoints, token=token, before_seq=from_seq - 1, warn=warn)
        if start is not None:
            data, digest, covered, schema_version, start_from = start
            _write_start_state(state_dir, cls, data=data, digest=digest, covered_seq=covered, schema_version=schema_version)
            if covered < from_seq - 1:
                start_from += f", then replayed {covered + 1}..{from_seq - 1}"
        else:
            start_from = "fresh machine" if from_seq == 1 else f"replayed 1..{from_seq - 1}"
        recorder = _Recorder(machine, machine_spec, from_seq=from_seq, to_seq=to_seq, all_messages=all_messages, start_from=start_from)
        runner = _runner(machine, endpoints=endpoints, token=token, state_dir=state_dir if start is not None else None, subscribe_fn=recorder.subscribe)
        await runner.bootstrap()
        if runner.snapshot_errors:
            raise RecordError(f"the reference could not restore its starting snapshot: {runner.snapshot_errors[0]}")
        tmp_path = f"{out}.tmp"
        with open(tmp_path, "wb") as f:
            try:
                await recorder.run(runner, _FileWriter(f), idle_timeout_s=idle_timeout_s, progress=progress)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                f.close()
                try:
                    os.unlink(tmp_path)
                except OSError:
                    pass
                raise
        os.replace(tmp_path, out)
    assert recorder.header is not None
    return RecordResult(out, recorder.header, recorder.entries, recorder.tracker.digest, time.monotonic() - started)


class _Recorder:
    """Writes the slice as the runner applies it: the header (and starting snapshot) once the
    machine holds the state after ``from_seq - 1``, then one ``Entry`` per kept message."""

    def __init__(self, machine: StateMachine, machine_spec: str, *, from_seq: int, to_seq: int, all_messages: bool, start_from: str) -> None:
        self.machine = machine
        self.cls = type(machine)
        self.machine_spec = machine_spec
        self.from_seq = from_seq
        self.to_seq = to_seq
        self.all_messages = all_messages
        self.start_from = start_from
        self.header: Header | None = None
        self.entries = 0
        self.last_message: Message | None = None
        self.last_arrival = time.monotonic()
        self.tracker: _DigestTracker
        self.writer: _FileWriter

    async def subscribe(self, *args: Any, **kwargs: Any):
        """The runner's subscription: ``clients.subscribe``, noting each message for ``after``."""
        async for message in subscribe(*args, **kwargs):
            self.last_message = message
            self.last_arrival = time.monotonic()
            yield message

    async def run(self, runner: StateMachineRunner, writer: _FileWriter, *, idle_timeout_s: float, progress: bool) -> None:
        self.writer = writer
        self.tracker = _DigestTracker(runner, self.machine)
        self.progress = _Progress("record", runner.last_seq + 1, self.to_seq, enabled=progress)
        if runner.last_seq >= self.from_seq - 1:  # a fresh machine, or a snapshot covering exactly from_seq - 1
            self.begin()
        task = asyncio.create_task(runner.run(stop_when=self.after))
        while not (await asyncio.wait({task}, timeout=1.0))[0]:
            if time.monotonic() - self.last_arrival > idle_timeout_s:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                raise RecordError(
                    f"no message for {idle_timeout_s:g} s after seq {runner.last_seq} (slice {self.from_seq}..{self.to_seq}): "
                    "is the cluster reachable, and --to within the stream?"
                )
        try:
            task.result()
        except StateMachineError as exc:
            raise RecordError(f"the reference {self.machine_spec} stopped: {exc}") from None
        writer.write(Footer(self.entries, self.to_seq, self.tracker.digest))

    def begin(self) -> None:
        cls, machine = self.cls, self.machine
        if self.from_seq > 1:
            snapshot, digest = capture(machine, self.from_seq - 1)
            if len(snapshot) > SNAPSHOT_BYTES_MAX:
                raise RecordError(f"the starting snapshot has {len(snapshot)} bytes, more than {SNAPSHOT_BYTES_MAX}")
        else:
            snapshot, digest = b"", full_digest(machine)
        self.tracker.reset()
        self.header = Header(
            format=FORMAT, sm_type=cls.TYPE, machine=self.machine_spec, namespace=cls.MESSAGES.namespace,
            message_versions={t: list(cls.MESSAGES.readable_versions(t)) for t in sorted(cls.MESSAGES.type_names)},
            snapshot_version=cls.SNAPSHOT_VERSION, behaviour_versions=list(cls.BEHAVIOUR_VERSIONS),
            from_seq=self.from_seq, to_seq=self.to_seq, all_messages=self.all_messages, start_digest=digest,
            start_snapshot_bytes=len(snapshot), start_snapshot_sha256=hashlib.sha256(snapshot).hexdigest() if snapshot else "",
            start_snapshot_version=cls.SNAPSHOT_VERSION if snapshot else 0, start_from=self.start_from, recorded_at_ns=time.time_ns(),
        )  # fmt: skip
        self.writer.write(self.header)
        for index, offset in enumerate(range(0, len(snapshot), SNAPSHOT_PART_BYTES)):
            self.writer.write(SnapshotPart(index, snapshot[offset : offset + SNAPSHOT_PART_BYTES]))

    def after(self, seq: int) -> bool:
        """The runner's ``stop_when``: called after each message is processed."""
        self.progress.tick(seq)
        if seq < self.from_seq - 1:
            return False
        if seq == self.from_seq - 1:
            self.begin()
            return False
        message = self.last_message
        assert message is not None and message.seq == seq
        changed = self.tracker.after_message()
        envelope = _envelope_of(message.payload)
        if self.all_messages or changed or (envelope is not None and self.cls.MESSAGES.owns(envelope.type)):
            self.writer.write(
                Entry(
                    seq, message.timestamp_ns, message.session, message.client_seq, message.payload,
                    envelope.type if envelope else "", envelope.version if envelope else 0, self.tracker.digest,
                )  # fmt: skip
            )
            self.entries += 1
        return seq >= self.to_seq


class _FileWriter:
    def __init__(self, f) -> None:
        self.f = f
        f.write(MAGIC)

    def write(self, record: Header | SnapshotPart | Entry | Footer) -> None:
        body = _encoder.encode(record)
        if len(body) > FRAME_BODY_BYTES_MAX:
            raise ValueError(f"a {type(record).__name__} of {len(body)} bytes is more than a frame holds ({FRAME_BODY_BYTES_MAX})")
        self.f.write(_FRAME.pack(len(body), zlib.crc32(body)) + body)


# --- reading ------------------------------------------------------------------------------------


@dataclass
class FileSummary:
    """A conformance file checked end to end."""

    path: str
    header: Header
    entries: int
    footer: Footer
    first_entry_seq: int = 0


def _frames(f, path: str) -> Iterator[tuple[int, int, Any]]:
    """``(byte offset, frame index, record)`` of every frame after the magic."""
    offset = len(MAGIC)
    index = 0
    while True:
        head = f.read(_FRAME.size)
        if not head:
            return
        if len(head) < _FRAME.size:
            raise ConformanceFileError(f"{path}: truncated: frame {index} at byte {offset} is cut short")
        length, crc = _FRAME.unpack(head)
        if length > FRAME_BODY_BYTES_MAX:
            raise ConformanceFileError(f"{path}: garbled: frame {index} at byte {offset} claims {length} bytes (at most {FRAME_BODY_BYTES_MAX})")
        body = f.read(length)
        if len(body) < length:
            raise ConformanceFileError(f"{path}: truncated: frame {index} at byte {offset} has {len(body)} of its {length} bytes")
        if zlib.crc32(body) != crc:
            raise ConformanceFileError(f"{path}: garbled: frame {index} at byte {offset} fails its checksum")
        try:
            item = _record_decoder.decode(body)
        except protocol.DECODE_ERRORS as exc:
            raise ConformanceFileError(f"{path}: frame {index} at byte {offset} does not decode ({exc}): a newer format, or garbled") from None
        yield offset, index, item
        offset += _FRAME.size + length
        index += 1


def _open(path: str):
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ConformanceFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        f.close()
        what = "empty" if not magic else "truncated before its first frame" if MAGIC.startswith(magic) else "not a conformance recording (no magic)"
        raise ConformanceFileError(f"{path}: {what}")
    return f


def _is_digest(text: str) -> bool:
    return len(text) == _DIGEST_CHARS and all(c in "0123456789abcdef" for c in text)


def scan_file(path: str) -> FileSummary:
    """Read `path` end to end and check it is one complete, intact recording: magic, header
    first (format ``FORMAT``), the starting snapshot whole, entries in increasing order inside
    the slice, a footer that agrees, nothing after it. Raises ``ConformanceFileError``."""
    with _open(path) as f:
        header: Header | None = None
        footer: Footer | None = None
        parts = 0
        snapshot_bytes = 0
        snapshot_sha = hashlib.sha256()
        entries = 0
        first_entry = 0
        last_seq = 0
        last_digest = ""
        for offset, index, item in _frames(f, path):
            where = f"{path}: frame {index} at byte {offset}"
            if footer is not None:
                raise ConformanceFileError(f"{where}: data after the footer")
            if index == 0:
                if not isinstance(item, Header):
                    raise ConformanceFileError(f"{where}: the first frame is a {type(item).__name__}, not the header")
                if item.format != FORMAT:
                    raise ConformanceFileError(f"{path}: format {item.format}; this SDK reads format {FORMAT}")
                if not 1 <= item.from_seq <= item.to_seq or not _is_digest(item.start_digest):
                    raise ConformanceFileError(f"{where}: header holds slice {item.from_seq}..{item.to_seq}, start digest {item.start_digest!r}")
                if (item.from_seq > 1) != (item.start_snapshot_bytes > 0) or item.start_snapshot_bytes > SNAPSHOT_BYTES_MAX:
                    raise ConformanceFileError(f"{where}: a slice from seq {item.from_seq} with a starting snapshot of {item.start_snapshot_bytes} bytes")
                header = item
                last_seq = item.from_seq - 1
                last_digest = item.start_digest
                continue
            assert header is not None
            if isinstance(item, SnapshotPart):
                if entries or item.index != parts:
                    raise ConformanceFileError(f"{where}: snapshot part {item.index} out of place (expected part {parts}, before any message)")
                parts += 1
                snapshot_bytes += len(item.data)
                snapshot_sha.update(item.data)
                if snapshot_bytes > header.start_snapshot_bytes:
                    raise ConformanceFileError(f"{where}: the starting snapshot holds more than the {header.start_snapshot_bytes} bytes the header says")
            elif isinstance(item, Entry):
                if not entries and snapshot_bytes != header.start_snapshot_bytes:
                    raise ConformanceFileError(f"{where}: the starting snapshot has {snapshot_bytes} of its {header.start_snapshot_bytes} bytes")
                if not last_seq < item.seq <= header.to_seq or (header.all_messages and item.seq != last_seq + 1):
                    raise ConformanceFileError(f"{where}: message seq {item.seq} after seq {last_seq} in slice {header.from_seq}..{header.to_seq}")
                if not _is_digest(item.digest):
                    raise ConformanceFileError(f"{where}: seq {item.seq} has digest {item.digest!r}")
                entries += 1
                first_entry = first_entry or item.seq
                last_seq = item.seq
                last_digest = item.digest
            elif isinstance(item, Footer):
                footer = item
                if (item.messages, item.last_seq, item.final_digest) != (entries, header.to_seq, last_digest):
                    raise ConformanceFileError(
                        f"{where}: the footer says {item.messages} messages up to seq {item.last_seq} ending with digest "
                        f"{item.final_digest[:16]}; the file holds {entries} up to {header.to_seq} ending with {last_digest[:16]}"
                    )
                if header.all_messages and last_seq != header.to_seq:
                    raise ConformanceFileError(f"{where}: messages end at seq {last_seq}, the slice at {header.to_seq}")
            else:
                raise ConformanceFileError(f"{where}: a second header")
        if header is None:
            raise ConformanceFileError(f"{path}: truncated: no header")
        if snapshot_bytes != header.start_snapshot_bytes:
            raise ConformanceFileError(f"{path}: truncated: the starting snapshot has {snapshot_bytes} of its {header.start_snapshot_bytes} bytes")
        if header.start_snapshot_bytes and snapshot_sha.hexdigest() != header.start_snapshot_sha256:
            raise ConformanceFileError(f"{path}: garbled: the starting snapshot's SHA-256 is not the one the header says")
        if footer is None:
            seen = f"up to seq {last_seq}" if entries else "no message"
            raise ConformanceFileError(f"{path}: truncated: no footer ({entries} messages, {seen}; the slice is {header.from_seq}..{header.to_seq})")
        return FileSummary(path, header, entries, footer, first_entry)


def _read_snapshot(path: str) -> bytes:
    with _open(path) as f:
        return b"".join(item.data for _, _, item in _frames(f, path) if isinstance(item, SnapshotPart))


# --- verify -------------------------------------------------------------------------------------


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
        path, machine_spec, header, last_seq=header.from_seq - 1, last_matching_seq=header.from_seq - 1, final_digest=summary.footer.final_digest
    )
    with tempfile.TemporaryDirectory(prefix="sm-conformance-") as state_dir:
        if header.start_snapshot_bytes:
            _write_start_state(
                state_dir, cls, data=_read_snapshot(path), digest=header.start_digest, covered_seq=header.from_seq - 1,
                schema_version=header.start_snapshot_version,
            )  # fmt: skip
        current: list[Entry | None] = [None]

        async def from_file(endpoints: Any, *, from_seq: int, **_: Any):
            if from_seq != header.from_seq:
                raise StateMachineError(f"the runner asked for seq {from_seq}, the recording starts at {header.from_seq}")
            with _open(path) as f:
                seq = from_seq
                log_time = 0
                for _, _, item in _frames(f, path):
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
            runner = _runner(machine, endpoints=["recording"], state_dir=state_dir if header.start_snapshot_bytes else None, subscribe_fn=from_file)
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
            result.error = f"the starting state (after seq {header.from_seq - 1}) does not load into this implementation: {runner.snapshot_errors[0]}"
            result.error_seq = header.from_seq - 1
            return result
        try:
            tracker = _DigestTracker(runner, machine)
        except Exception as exc:  # noqa: BLE001
            result.error = f"the implementation's digest raised {exc!r}"
            return result
        if tracker.digest != header.start_digest:
            result.mismatch = Mismatch(header.from_seq - 1, header.start_digest, tracker.digest, last_matching_seq=header.from_seq - 1)
            return result
        report = _Progress("verify", header.from_seq, header.to_seq, enabled=progress)

        def after(seq: int) -> bool:
            report.tick(seq)
            result.last_seq = seq
            tracker.after_message()
            entry = current[0]
            if entry is not None:
                result.checked += 1
                if tracker.digest != entry.digest:
                    result.mismatch = _mismatch(entry, tracker.digest, machine, result.last_matching_seq)
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


def _mismatch(entry: Entry, actual: str, machine: StateMachine, last_match: int) -> Mismatch:
    shown = ""
    envelope = _envelope_of(entry.payload)
    if envelope is not None and type(machine).MESSAGES.owns(envelope.type):
        try:
            shown = repr(type(machine).MESSAGES.decode(envelope, entry.seq))
        except StateMachineError:
            shown = ""
    elif envelope is not None and envelope.type == protocol.ACTIVATE_TYPE:
        try:
            shown = repr(protocol.decode_activate(envelope))
        except protocol.SmFormatError:
            shown = ""
    return Mismatch(entry.seq, entry.digest, actual, entry.type, entry.version, entry.session, entry.client_seq, shown, last_match)


# --- the command --------------------------------------------------------------------------------


def build_parser(prog: str = "python -m clients.sm.conformance") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Record a slice of the stream with the reference state machine's digest after each message; "
        "verify another implementation against the recording."
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_arguments(sub, endpoints_default=os.environ.get("RAFTSEQ_ENDPOINTS", "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"), token_default=os.environ.get("RAFTSEQ_TOKEN", ""))
    return parser


def _whole(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


def add_arguments(sub, *, endpoints_default: str, token_default: str) -> None:
    """The ``record``, ``verify`` and ``show`` subcommands (``cluster.sm_cli`` offers the same
    options under ``raftseq sm``: keep them in step)."""
    rec = sub.add_parser(
        "record",
        help="record a slice of the stream with the reference's digest after each message",
        description="Apply the slice --from..--to of the stream to the reference state machine and write each message "
        "with the digest after it. A slice from N > 1 starts from the state after N-1 (from the newest cluster "
        "snapshot at or before it, else replayed from 1), which the file carries.",
    )
    rec.add_argument("--machine", required=True, metavar="MODULE:CLASS", help="the reference implementation, e.g. examples.refdata.machine:ReferenceData")
    rec.add_argument("--out", required=True, metavar="FILE", help="the recording to write")
    rec.add_argument("--from", dest="from_seq", type=_whole(1), default=1, metavar="N", help="first sequence number of the slice (default 1)")
    rec.add_argument("--to", dest="to_seq", type=_whole(0), default=0, metavar="M", help="last one (default 0: the last a node has now)")
    rec.add_argument("--all-messages", action="store_true", help="keep every message of the slice, not only those that can change the machine")
    rec.add_argument("--no-snapshot", action="store_true", help="with --from N > 1: replay from 1 instead of starting from a cluster snapshot")
    rec.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S, metavar="S", help=f"give up after S seconds without a message (default {IDLE_TIMEOUT_S:g})")
    rec.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    rec.add_argument("--endpoints", default=endpoints_default, help="comma-separated client endpoints (default $RAFTSEQ_ENDPOINTS)")
    rec.add_argument("--token", default=token_default, help="client token (default $RAFTSEQ_TOKEN)")
    ver = sub.add_parser(
        "verify",
        help="replay a recording through an implementation; report the first digest mismatch",
        description="Replay the recording FILE through the state machine MODULE:CLASS and compare its digest with the "
        "recorded one after every message. Exit 0 when all match; 1 with the first mismatch (or the message the "
        "implementation cannot read); 2 when the file is unreadable or the machine cannot be loaded.",
    )
    ver.add_argument("file", metavar="FILE", help="a recording made by record")
    ver.add_argument("--machine", required=True, metavar="MODULE:CLASS", help="the implementation under test")
    ver.add_argument("--json", action="store_true", help="print one JSON object")
    ver.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    show = sub.add_parser("show", help="check a recording and print its header as JSON", description="Check FILE end to end and print its header and counts as one JSON object.")
    show.add_argument("file", metavar="FILE", help="a recording made by record")


def _endpoints(text: str) -> list[str]:
    found = [v.strip() for v in text.split(",") if v.strip()]
    for endpoint in found:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    return found


def _cmd_record(args: argparse.Namespace, prog: str) -> int:
    try:
        result = asyncio.run(
            record(
                _endpoints(args.endpoints), args.machine, args.out, token=args.token, from_seq=args.from_seq, to_seq=args.to_seq,
                all_messages=args.all_messages, use_snapshots=not args.no_snapshot, idle_timeout_s=args.idle_timeout, progress=not args.quiet,
            )
        )  # fmt: skip
    except (MachineLoadError, ConnectionError, Rejected, OSError, ValueError) as exc:
        print(f"{prog} record: {exc}", file=sys.stderr)
        return 2
    except RecordError as exc:
        print(f"{prog} record: {exc}", file=sys.stderr)
        return 1
    h = result.header
    print(
        f"recorded {h.sm_type!r} seq {h.from_seq}..{h.to_seq}: {result.entries} messages with digests in {result.path} "
        f"({os.path.getsize(result.path)} bytes, {result.seconds:.1f} s); start: {h.start_from}; final digest {result.final_digest}"
    )
    return 0


def _cmd_verify(args: argparse.Namespace, prog: str) -> int:
    try:
        result = asyncio.run(verify(args.file, args.machine, progress=not args.quiet))
    except (ConformanceFileError, MachineLoadError) as exc:
        if args.json:
            print(_json.encode({"ok": False, "file": args.file, "unusable": str(exc)}).decode())
        print(f"{prog} verify: {exc}", file=sys.stderr)
        return 2
    h = result.header
    if args.json:
        report = {
            "ok": result.ok, "file": result.path, "machine": result.machine, "reference": h.machine, "sm_type": h.sm_type,
            "from_seq": h.from_seq, "to_seq": h.to_seq, "checked": result.checked, "last_seq": result.last_seq,
            "mismatch": None if result.mismatch is None else result.mismatch.__dict__, "error": result.error or None,
            "error_seq": result.error_seq or None, "seconds": round(result.seconds, 3),
        }  # fmt: skip
        print(json.dumps(report))
    elif result.mismatch is not None:
        m = result.mismatch
        print(m.describe())
        if m.message:
            print(f"  message: {m.message}")
        print(f"  last matching seq: {m.last_matching_seq if m.last_matching_seq >= h.from_seq else 'none'} ({result.checked} recorded messages compared; slice {h.from_seq}..{h.to_seq})")
    elif result.error:
        print(f"FAILED: {result.error}")
        print(f"  {result.checked} recorded messages matched before it (slice {h.from_seq}..{h.to_seq})")
    else:
        print(
            f"OK: {args.machine} matches {h.machine} on {result.checked} messages of {h.sm_type!r}, seq {h.from_seq}..{h.to_seq} "
            f"({result.seconds:.1f} s); final digest {result.final_digest}"
        )
    return 0 if result.ok else 1


def _cmd_show(args: argparse.Namespace, prog: str) -> int:
    try:
        summary = scan_file(args.file)
    except ConformanceFileError as exc:
        print(f"{prog} show: {exc}", file=sys.stderr)
        return 2
    report = {
        "header": msgspec.to_builtins(summary.header),
        "messages": summary.entries,
        "first_message_seq": summary.first_entry_seq,
        "final_digest": summary.footer.final_digest,
    }
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None, *, prog: str = "") -> int:
    # ``raftseq sm record|verify|show`` run this module and name themselves in its messages.
    prog = prog or os.environ.get("RAFTSEQ_CONFORMANCE_PROG", "") or "python -m clients.sm.conformance"
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"record": _cmd_record, "verify": _cmd_verify, "show": _cmd_show}[args.command](args, prog)
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = [
    "ConformanceFileError",
    "Entry",
    "FileSummary",
    "Footer",
    "Header",
    "MachineLoadError",
    "Mismatch",
    "RecordError",
    "RecordResult",
    "SnapshotPart",
    "VerifyResult",
    "load_machine_class",
    "main",
    "record",
    "scan_file",
    "verify",
]


if __name__ == "__main__":
    sys.exit(main())
