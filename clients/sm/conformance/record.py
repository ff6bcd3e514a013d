"""``record``: apply a slice of the stream to the reference implementation, through the SDK's
runner, and write each message with the full digest of the reference's state after it."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from raftseq.clients.client import Message, Rejected, subscribe
from raftseq.clients.connection import open_connection
from raftseq.clients.sm.conformance.recording import (
    SNAPSHOT_BYTES_MAX,
    SNAPSHOT_PART_BYTES,
    FORMAT,
    Entry,
    FileWriter,
    Footer,
    Header,
    SnapshotPart,
)
from raftseq.clients.sm.conformance import replay
from raftseq.clients.sm.errors import SnapshotVerifyError, StateMachineError
from raftseq.clients.sm.machine import StateMachine, capture, full_digest, load
from raftseq.clients.sm.runner import StateMachineRunner
from raftseq.clients.sm.snapshots import fetch_snapshot, query_snapshots
from raftseq.clients.tls import ClientTls, TlsError

#: ``record`` gives up when no message arrived for this long (the cluster is gone, or ``--to``
#: is beyond the end of the stream).
IDLE_TIMEOUT_S = 30.0


@dataclass
class RecordResult:
    path: str
    header: Header
    entries: int
    final_digest: str
    seconds: float


class RecordError(Exception):
    """The reference could not record the slice (a ``StateMachineError``, the stream stopped)."""


async def last_seq_of(endpoints: Sequence[str], *, token: str, timeout_s: float = 5.0, tls: ClientTls = None) -> int:
    """The last sequence number the first node that answers has (``Status.last_seq``). Raises
    ``Rejected`` and ``TlsError`` (no other node would answer otherwise), ``ConnectionError``."""
    problems = []
    for address in endpoints:
        try:
            link = await open_connection(address, session="sm-conformance", token=token, timeout_s=timeout_s, tls=tls)
        except (Rejected, TlsError):
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            problems.append(f"{address}: {exc or type(exc).__name__}")
            continue
        try:
            return (await link.status(timeout_s)).last_seq
        except (OSError, ConnectionError, TimeoutError) as exc:
            problems.append(f"{address}: {exc or type(exc).__name__}")
        finally:
            link.close()
    raise ConnectionError(f"no node answered a status request: {'; '.join(problems)}")


async def start_from_cluster_snapshot(
    cls: type[StateMachine],
    endpoints: Sequence[str],
    *,
    token: str,
    before_seq: int,
    warn: Callable[[str], None],
    tls: ClientTls = None,
) -> tuple[replay.StartState, str] | None:
    """The newest cluster snapshot of `cls` covering at most `before_seq` that loads (digest
    checked), and a description of it; or None."""
    try:
        infos = await query_snapshots(endpoints, cls.TYPE, token=token, session="sm-conformance.query", tls=tls)
    except ConnectionError as exc:
        warn(f"no snapshot used: {exc}")
        return None
    readable = cls.snapshot_versions_readable()
    for info in infos:
        if info.schema_version not in readable or not 1 <= info.covered_seq <= before_seq:
            continue
        where = f"published by {info.session}, chunks {info.first_seq}..{info.last_seq}"
        try:
            data = await fetch_snapshot(
                endpoints, info, token=token, session="sm-conformance.fetch", subscribe_fn=functools.partial(subscribe, tls=tls)
            )
            load(cls(), data, digest=info.digest, covered_seq=info.covered_seq, schema_version=info.schema_version, where=where)
        except (SnapshotVerifyError, ConnectionError, TimeoutError) as exc:
            warn(f"snapshot covering seq {info.covered_seq} not used: {exc}")
            continue
        start = replay.StartState(data, info.digest, info.covered_seq, info.schema_version)
        return start, f"cluster snapshot covering seq {info.covered_seq} ({where})"
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
    tls: ClientTls = None,
) -> RecordResult:
    """Record the slice ``from_seq..to_seq`` (0: the last number a node has now) as the
    reference `machine_spec` applies it, into `out` (written to ``out.tmp``, renamed when
    complete); `tls` reaches TLS ports (``clients.tls``). Raises ``MachineLoadError``,
    ``ConnectionError``, ``Rejected``, ``TlsError``, ``RecordError``, ``OSError``, ``ValueError``."""
    started = time.monotonic()
    if from_seq < 1:
        raise ValueError("--from must be >= 1")
    cls = replay.load_machine_class(machine_spec)
    machine = replay.new_machine(cls, machine_spec)
    if not to_seq:
        to_seq = await last_seq_of(endpoints, token=token, tls=tls)
        if to_seq < from_seq:
            raise RecordError(f"nothing to record: --from {from_seq} is after the last sequence number, {to_seq}")
    elif to_seq < from_seq:
        raise RecordError(f"nothing to record: the slice {from_seq}..{to_seq} is empty")

    def warn(text: str) -> None:
        print(f"record: {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="sm-conformance-") as state_dir:
        found = None
        if from_seq > 1 and use_snapshots:
            found = await start_from_cluster_snapshot(cls, endpoints, token=token, before_seq=from_seq - 1, warn=warn, tls=tls)
        start = None
        if found is not None:
            start, start_from = found
            if start.covered_seq < from_seq - 1:
                start_from += f", then replayed {start.covered_seq + 1}..{from_seq - 1}"
        else:
            start_from = "fresh machine" if from_seq == 1 else f"replayed 1..{from_seq - 1}"
        recorder = Recorder(machine, machine_spec, from_seq=from_seq, to_seq=to_seq, all_messages=all_messages, start_from=start_from)
        runner = replay.sm_runner(
            machine, endpoints=endpoints, token=token, state_dir=state_dir, start=start,
            subscribe_fn=functools.partial(recorder.subscribe, tls=tls), tls=tls,
        )  # fmt: skip
        await runner.bootstrap()
        if runner.snapshot_errors:
            raise RecordError(f"the reference could not restore its starting snapshot: {runner.snapshot_errors[0]}")
        tmp_path = f"{out}.tmp"
        with open(tmp_path, "wb") as f:
            try:
                await recorder.run(runner, FileWriter(f), idle_timeout_s=idle_timeout_s, progress=progress)
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


@dataclass
class Recorder:
    """Writes the slice as the runner applies it: the header (and starting snapshot) once the
    machine holds the state after ``from_seq - 1``, then one ``Entry`` per kept message."""

    machine: StateMachine
    machine_spec: str
    _: KW_ONLY
    from_seq: int
    to_seq: int
    all_messages: bool
    start_from: str
    header: Header | None = field(default=None, init=False)
    entries: int = field(default=0, init=False)
    last_message: Message | None = field(default=None, init=False)
    last_arrival: float = field(default_factory=time.monotonic, init=False)
    #: Set by ``run``.
    tracker: replay.DigestTracker = field(init=False)
    writer: FileWriter = field(init=False)
    progress: replay.Progress = field(init=False)

    @property
    def cls(self) -> type[StateMachine]:
        return type(self.machine)

    async def subscribe(self, *args: Any, **kwargs: Any):
        """The runner's subscription: ``clients.subscribe``, noting each message for ``after``."""
        async for message in subscribe(*args, **kwargs):
            self.last_message = message
            self.last_arrival = time.monotonic()
            yield message

    async def run(self, runner: StateMachineRunner, writer: FileWriter, *, idle_timeout_s: float, progress: bool) -> None:
        self.writer = writer
        self.tracker = replay.DigestTracker(runner, self.machine)
        self.progress = replay.Progress("record", runner.last_seq + 1, self.to_seq, enabled=progress)
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
        envelope = replay.envelope_of(message.payload)
        if self.all_messages or changed or (envelope is not None and self.cls.MESSAGES.owns(envelope.type)):
            self.writer.write(
                Entry(
                    seq,
                    message.timestamp_ns,
                    message.session,
                    message.client_seq,
                    message.payload,
                    envelope.type if envelope else "",
                    envelope.version if envelope else 0,
                    self.tracker.digest,
                )  # fmt: skip
            )
            self.entries += 1
        return seq >= self.to_seq
