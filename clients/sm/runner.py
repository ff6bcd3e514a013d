"""The runner: one subscription, several state machines, each message applied exactly once.

``StateMachineRunner(endpoints, [machine, ...])`` subscribes to the stream (``clients.subscribe``,
which resumes at last + 1 on another node when one dies) from the right number, and hands each
state-machine message to the machines that read its type, in order:

* **Where it starts.** Each machine covers messages ``1..start_after`` when the runner starts:
  0 for a fresh one, more when restored from the runner's own saved state (``state_dir``) or,
  for a late joiner (``from_snapshot=True``), from the latest compatible snapshot in the
  cluster (digest verified). The subscription starts after the lowest of them; a machine
  ahead of it skips the messages it already covers.
* **Exactly once.** The runner checks that numbers arrive as last + 1 and never applies a
  number twice: not across reconnects and failovers (the subscription resumes at last + 1),
  not across ``run`` calls (the next one resumes after the last), not across restarts of the
  process (with ``state_dir``, state is saved together with the number it covers). A message
  is decoded for every machine that reads it before any of them applies it; if an ``apply``
  raises, the runner stops for good (``ApplyError``).
* **Which messages.** A machine sees only types of its ``MESSAGES``. Payloads that are not
  state-machine messages, and types outside every machine's namespace, are skipped. An unknown
  type inside a machine's namespace, an unreadable version, or a body that does not decode
  stops the runner before anything is applied (``clients.sm.errors``).
* **Behaviour versions.** ``Activate(sm_type, N, S)`` (``clients.sm.messages.activate``) switches
  the machine to behaviour version N from message S on, on every replica at the same point; a
  machine that cannot run N stops just before S (``UnsupportedBehaviourVersion``).
* **Checkpoints and divergence.** Every ``checkpoint_every`` sequence numbers the runner takes
  each machine's digest; with a ``replica`` name it also publishes it (``formats.Checkpoint``,
  a sequenced message). It compares every checkpoint it reads in the stream with its own and
  the others' (``formats.CheckpointLedger``): two copies that disagree raise
  ``DivergenceError`` (or call ``on_divergence``), naming the first disagreeing checkpoint, the
  last agreeing one and which replicas hold which digest.
* **Truncated streams.** When the cluster's retention removed the numbers the runner needs
  next (``clients.errors.Truncated``), a late joiner (``from_snapshot=True``) loads the newest
  snapshot of each machine and goes on after it; any other runner raises ``Truncated``.
* **Snapshots.** ``publish_snapshot()`` (or ``snapshot_every``) publishes each machine's state to
  the cluster (``clients.sm.snapshots``) for late joiners.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from raftseq.clients.client import Busy, NotConnected, SequencerClient, subscribe
from raftseq.clients.errors import Truncated
from raftseq.clients.tls import ClientTls
from raftseq.clients.sm import formats
from raftseq.clients.sm.errors import (
    ApplyError,
    DivergenceError,
    MessageDecodeError,
    SnapshotVerifyError,
    StateMachineError,
    StreamError,
    UnknownMessageType,
    UnsupportedBehaviourVersion,
)
from raftseq.clients.sm.machine import StateMachine, capture, full_digest, load
from raftseq.clients.sm.messages import MessageTypes
from raftseq.clients.sm.snapshots import CapturedSnapshot, fetch_snapshot, query_snapshots, snapshot_session, upload_snapshot, wait_indexed
from raftseq.sequencer import protocol

log = logging.getLogger("raftseq.sm")

#: Most activations one machine may have waiting; an ``Activate`` beyond it is ignored (on
#: every replica alike) and logged.
ACTIVATIONS_PENDING_MAX = 16
#: How long ``close`` waits for the publishing clients' submits in flight to be acknowledged.
#: (``SequencerClient.close`` racing an arriving acknowledgement can miss its own cancellation
#: under Python 3.11's ``asyncio.wait_for`` and then waits for the node to drop the connection.)
CLOSE_DRAIN_S = 2.0
#: Most divergences kept in ``StateMachineRunner.divergences`` (later ones are still reported).
DIVERGENCES_KEPT = 1000
#: Format of a locally saved state file.
LOCAL_STATE_FORMAT = 1


class LocalState(msgspec.Struct, frozen=True, array_like=True):
    """A machine's state saved by the runner (``state_dir``): ``capture``'s bytes and header."""

    format: int
    sm_type: str
    schema_version: int
    covered_seq: int
    digest: str
    data: bytes


_local_encoder = msgspec.msgpack.Encoder()
_local_decoder = msgspec.msgpack.Decoder(LocalState)


class _Slot:
    __slots__ = ("machine", "sm_type", "types", "start_after")

    def __init__(self, machine: StateMachine) -> None:
        cls = type(machine)
        if not isinstance(machine, StateMachine):
            raise TypeError(f"{machine!r} is not a clients.sm.StateMachine")
        if not isinstance(getattr(cls, "MESSAGES", None), MessageTypes):
            raise ValueError(f"{cls.__name__}.MESSAGES must be a MessageTypes")
        try:
            msgspec.msgpack.decode(msgspec.msgpack.encode(cls.TYPE), type=protocol.SmType)
        except msgspec.ValidationError:
            raise ValueError(f"{cls.__name__}.TYPE {cls.TYPE!r}: 1..{protocol.SM_TYPE_CHARS_MAX} characters of [A-Za-z0-9._-]") from None
        self.machine = machine
        self.sm_type = cls.TYPE
        self.types = cls.MESSAGES
        #: The machine's state covers messages 1..start_after (restored); it skips those.
        self.start_after = 0


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        exc = future.exception()
        if exc is not None:
            log.warning("checkpoint not published: %r", exc)


class StateMachineRunner:
    """Applies the stream to `machines` (``StateMachine`` instances of different ``TYPE``s).

    Keyword options:

    * ``token`` — the cluster's client token;
    * ``replica`` — this copy's name (``[A-Za-z0-9._:@+-]``): needed to publish checkpoints and
      snapshots, and named in divergence reports;
    * ``state_dir`` — save each machine's state there every ``save_every`` numbers and on
      ``close``, and resume from it after a restart;
    * ``from_snapshot`` — a late joiner: before the first message, load the latest compatible
      snapshot the cluster holds for each machine (digest verified; a bad one is reported in
      ``snapshot_errors`` and the next older one tried, then a full replay);
    * ``checkpoint_every`` — take (and, with ``replica`` and ``publish_checkpoints``, publish)
      a checkpoint at every multiple of this sequence number (0: never);
    * ``snapshot_every`` — publish snapshots at every multiple of this number (0: only when
      ``publish_snapshot`` is called);
    * ``on_divergence`` — ``"stop"`` (raise ``DivergenceError`` from ``run``), ``"log"``, or a
      callable taking the ``formats.Divergence``;
    * ``subscribe_fn`` — what to subscribe with (default ``clients.subscribe``; tests pass
      their own); ``client_options`` — keyword options for the ``SequencerClient``s that publish.
    * ``tls`` — reach TLS ports (``clients.tls``, as ``SequencerClient(tls=)``): for the
      subscription, snapshot queries and fetches, and the publishing clients.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        machines: Sequence[StateMachine],
        *,
        token: str = "",
        replica: str = "",
        state_dir: str | None = None,
        save_every: int = 0,
        from_snapshot: bool = False,
        checkpoint_every: int = 0,
        publish_checkpoints: bool = True,
        snapshot_every: int = 0,
        on_divergence: str | Callable[[formats.Divergence], None] = "stop",
        subscribe_fn: Callable | None = None,
        client_options: dict | None = None,
        checkpoints_kept: int = 4096,
        tls: ClientTls = None,
    ) -> None:
        if not machines:
            raise ValueError("at least one state machine is needed")
        if replica and not protocol.is_session_name(replica):
            raise ValueError(f"replica name {replica!r}: use [A-Za-z0-9._:@/+-], at most {protocol.limits.SESSION_BYTES_MAX} characters")
        if on_divergence not in ("stop", "log") and not callable(on_divergence):
            raise ValueError("on_divergence must be 'stop', 'log' or a callable")
        for name, value in (("save_every", save_every), ("checkpoint_every", checkpoint_every), ("snapshot_every", snapshot_every)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0")
        self.endpoints = list(endpoints)
        self.token = token
        self.replica = replica
        self.state_dir = state_dir
        self.save_every = save_every
        self.from_snapshot = from_snapshot
        self.checkpoint_every = checkpoint_every
        self.publish_checkpoints = publish_checkpoints
        self.snapshot_every = snapshot_every
        self.on_divergence = on_divergence
        self.tls = tls
        self._subscribe_fn = subscribe_fn or functools.partial(subscribe, tls=tls)
        self._client_options = {"tls": tls, **(client_options or {})}
        self._slots = [_Slot(m) for m in machines]
        self._by_type: dict[str, _Slot] = {}
        for slot in self._slots:
            if slot.sm_type in self._by_type:
                raise ValueError(f"two machines of type {slot.sm_type!r}")
            self._by_type[slot.sm_type] = slot
        # Message type -> the slots that read it; namespaces, to tell "unknown" from "not ours".
        self._routes: dict[str, list[_Slot]] = {}
        for slot in self._slots:
            for type_name in slot.types.type_names:
                self._routes.setdefault(type_name, []).append(slot)
        self._ignored_types: set[str] = set()
        #: Highest sequence number processed: every machine covers 1..max(last_seq, its start_after).
        self.last_seq = 0
        self._bootstrapped = False
        self._running = False
        self._failed: BaseException | None = None
        self._next_activation = math.inf
        self.ledger = formats.CheckpointLedger(seqs_per_type_max=checkpoints_kept)
        #: Every disagreement found, in the order found.
        self.divergences: list[formats.Divergence] = []
        self._reported: set[tuple[str, int]] = set()
        #: Snapshots that could not be loaded (``SnapshotVerifyError`` and others), in order.
        self.snapshot_errors: list[Exception] = []
        #: sm_type -> the cluster snapshot it was loaded from (late joiners).
        self.joined_from: dict[str, protocol.SnapshotInfo] = {}
        #: Snapshots published (``protocol.SnapshotInfo`` once indexed), and background failures.
        self.published: list[protocol.SnapshotInfo] = []
        self.publish_errors: list[Exception] = []
        self.messages_applied = 0
        self.checkpoints_published = 0
        self._checkpoint_client: SequencerClient | None = None
        self._snapshot_clients: dict[str, SequencerClient] = {}
        self._publish_task: asyncio.Task | None = None

    # --- queries ----------------------------------------------------------------------------

    @property
    def machines(self) -> list[StateMachine]:
        return [slot.machine for slot in self._slots]

    def covered_seq(self, sm_type: str) -> int:
        """The machine of `sm_type` holds the state after messages 1..this number."""
        slot = self._by_type[sm_type]
        return max(self.last_seq, slot.start_after)

    def digest(self, sm_type: str) -> str:
        """The full digest of `sm_type`'s machine (what checkpoints and snapshots carry)."""
        return full_digest(self._by_type[sm_type].machine)

    # --- starting ---------------------------------------------------------------------------

    async def bootstrap(self) -> None:
        """Restore saved state (``state_dir``) and, for a late joiner, cluster snapshots. Called
        by the first ``run`` if not called before."""
        if self._bootstrapped:
            return
        for slot in self._slots:
            if self.state_dir:
                self._load_local(slot)
            if self.from_snapshot:
                await self._join_from_cluster(slot)
        self.last_seq = min(slot.start_after for slot in self._slots)
        self._next_activation = min(
            (s.machine.pending_activations[0][0] for s in self._slots if s.machine.pending_activations), default=math.inf
        )
        self._bootstrapped = True
        log.info(
            "state machines %s start after %s; subscription from %d",
            [s.sm_type for s in self._slots], [s.start_after for s in self._slots], self.last_seq + 1,
        )  # fmt: skip

    def _state_path(self, sm_type: str) -> str:
        return os.path.join(self.state_dir, f"{sm_type}.sm")

    def _load_local(self, slot: _Slot) -> None:
        path = self._state_path(slot.sm_type)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        machine = slot.machine
        rollback = _Rollback(machine)
        try:
            state = _local_decoder.decode(raw)
            if state.format != LOCAL_STATE_FORMAT or state.sm_type != slot.sm_type:
                raise SnapshotVerifyError(slot.sm_type, state.covered_seq, f"file format {state.format} of {state.sm_type!r}", where=path)
            load(machine, state.data, digest=state.digest, covered_seq=state.covered_seq, schema_version=state.schema_version, where=path)
        except (msgspec.MsgspecError, UnicodeDecodeError, SnapshotVerifyError) as exc:
            rollback.restore()
            self.snapshot_errors.append(exc)
            log.error("saved state of %s not used (%s): %s", slot.sm_type, path, exc)
            return
        slot.start_after = state.covered_seq
        log.info("%s restored from %s at seq %d", slot.sm_type, path, state.covered_seq)

    async def _join_from_cluster(self, slot: _Slot) -> None:
        try:
            infos = await query_snapshots(self.endpoints, slot.sm_type, token=self.token, session=self._session("query"), tls=self.tls)
        except ConnectionError as exc:
            log.warning("no snapshot of %s loaded: %s", slot.sm_type, exc)
            return
        readable = type(slot.machine).snapshot_versions_readable()
        candidates = [i for i in infos if i.schema_version in readable and i.covered_seq > slot.start_after]
        if not candidates:
            log.info("%s: no compatible snapshot newer than seq %d in the cluster (%d listed)", slot.sm_type, slot.start_after, len(infos))
            return
        machine = slot.machine
        rollback = _Rollback(machine)
        for info in candidates:
            where = f"published by session {info.session}, chunks {info.first_seq}..{info.last_seq}"
            try:
                data = await fetch_snapshot(
                    self.endpoints, info, token=self.token, session=self._session("fetch"), subscribe_fn=self._subscribe_fn
                )
                load(machine, data, digest=info.digest, covered_seq=info.covered_seq, schema_version=info.schema_version, where=where)
            except (SnapshotVerifyError, ConnectionError, TimeoutError) as exc:
                rollback.restore()
                self.snapshot_errors.append(exc)
                log.error("snapshot of %s covering seq %d refused: %s", slot.sm_type, info.covered_seq, exc)
                continue
            slot.start_after = info.covered_seq
            self.joined_from[slot.sm_type] = info
            log.info("%s loaded from the cluster's snapshot covering seq %d (%s)", slot.sm_type, info.covered_seq, where)
            return

    def _session(self, role: str) -> str:
        return f"{self.replica or 'sm'}.{role}"

    # --- running ----------------------------------------------------------------------------

    async def run(self, *, until_seq: int | None = None, stop_when: Callable[[int], bool] | None = None) -> int:
        """Apply messages until `until_seq` is applied or `stop_when(seq)` is true after one
        (forever when neither is given; cancel the task to stop). Returns ``last_seq``.
        Raises a ``StateMachineError`` (and every later call raises it again) when a message
        cannot be applied exactly as every replica would."""
        if self._failed is not None:
            raise self._failed
        if self._running:
            raise RuntimeError("this runner is already running")
        self._running = True
        try:
            return await self._run(until_seq, stop_when)
        finally:
            self._running = False

    async def _run(self, until_seq: int | None, stop_when: Callable[[int], bool] | None) -> int:
        await self.bootstrap()
        if until_seq is not None and self.last_seq >= until_seq:
            return self.last_seq
        if self.checkpoint_every and self.replica and self.publish_checkpoints and self._checkpoint_client is None:
            client = SequencerClient(self.endpoints, session=self._session("checkpoints"), token=self.token, **self._client_options)
            await client.connect()
            self._checkpoint_client = client
        while True:
            try:
                await self._follow(until_seq, stop_when)
                return self.last_seq
            except Truncated as exc:
                if not self.from_snapshot:
                    raise
                await self._rejoin_after_truncation(exc)

    async def _follow(self, until_seq: int | None, stop_when: Callable[[int], bool] | None) -> None:
        stream = self._subscribe_fn(self.endpoints, from_seq=self.last_seq + 1, token=self.token, session=self._session("sub"))
        process = self._process
        try:
            async for message in stream:
                process(message)
                seq = message.seq
                if until_seq is not None and seq >= until_seq:
                    break
                if stop_when is not None and stop_when(seq):
                    break
        except StateMachineError as exc:
            self._failed = exc
            raise
        finally:
            await stream.aclose()

    async def _rejoin_after_truncation(self, truncated: Truncated) -> None:
        """The cluster no longer holds the stream after ``last_seq`` (retention): a late joiner
        loads each machine from the newest snapshot the cluster holds (retention keeps what it
        needs) and goes on after it. Raises `truncated` when no snapshot reaches the first
        number still held."""
        log.warning("%s; loading state-machine snapshots instead", truncated)
        for slot in self._slots:
            slot.start_after = max(slot.start_after, self.last_seq)
            await self._join_from_cluster(slot)
        start = min(slot.start_after for slot in self._slots)
        if start + 1 < truncated.first_seq:
            raise truncated
        self.last_seq = start
        log.info("state machines start after %s; subscription from %d", [s.start_after for s in self._slots], start + 1)

    def _process(self, message: Any) -> None:
        seq = message.seq
        if seq != self.last_seq + 1:
            raise StreamError(f"stream delivered seq {seq} after {self.last_seq}")
        if seq >= self._next_activation:
            self._run_activations(seq)
        payload = message.payload
        if payload[:4] == formats.SM_ENVELOPE_MARK:
            try:
                envelope = formats.decode_sm_envelope(payload)
            except protocol.SmFormatError as exc:
                raise MessageDecodeError("?", 0, seq, str(exc)) from None
            slots = self._routes.get(envelope.type)
            if slots is not None:
                self._apply(slots, envelope, seq, message.timestamp_ns)
            elif envelope.type.startswith(formats.SM_CONTROL_PREFIX):
                self._control(envelope, seq)
            elif envelope.type not in self._ignored_types:
                for slot in self._slots:
                    if slot.types.owns(envelope.type) and seq > slot.start_after:
                        raise UnknownMessageType(envelope.type, envelope.version, seq, namespace=slot.types.namespace)
                if len(self._ignored_types) < 10_000:
                    self._ignored_types.add(envelope.type)
        self.last_seq = seq
        if self.checkpoint_every and seq % self.checkpoint_every == 0:
            self._checkpoint(seq)
        if self.snapshot_every and seq % self.snapshot_every == 0:
            self._snapshot_due()
        if self.save_every and self.state_dir and seq % self.save_every == 0:
            self.save()

    def _apply(self, slots: list[_Slot], envelope: formats.SmEnvelope, seq: int, log_time_ns: int) -> None:
        if len(slots) == 1:
            slot = slots[0]
            if seq <= slot.start_after:
                return
            decoded = [(slot, slot.types.decode(envelope, seq))]
        else:
            # Decode for every reader before any applies: an unreadable message stops them all
            # at the same number.
            decoded = [(slot, slot.types.decode(envelope, seq)) for slot in slots if seq > slot.start_after]
        for slot, body in decoded:
            try:
                slot.machine.apply(body, seq, log_time_ns)
            except Exception as exc:  # noqa: BLE001 - the machine's own code
                raise ApplyError(slot.sm_type, envelope.type, seq, exc) from exc
            self.messages_applied += 1

    def _control(self, envelope: formats.SmEnvelope, seq: int) -> None:
        try:
            if envelope.type == formats.CHECKPOINT_TYPE:
                checkpoint = formats.decode_checkpoint(envelope)
            elif envelope.type == formats.ACTIVATE_TYPE:
                self._activation(formats.decode_activate(envelope), seq)
                return
            else:
                return  # a control type of a newer SDK that this one does not use
        except protocol.SmFormatError as exc:
            raise MessageDecodeError(envelope.type, envelope.version, seq, str(exc)) from None
        if checkpoint.sm_type in self._by_type and checkpoint.seq < seq:
            self._record(checkpoint.sm_type, checkpoint.seq, checkpoint.replica, checkpoint.digest)

    # --- behaviour versions -------------------------------------------------------------------

    def _activation(self, activate: formats.Activate, seq: int) -> None:
        slot = self._by_type.get(activate.sm_type)
        if slot is None or seq <= slot.start_after:
            return
        machine = slot.machine
        at = max(activate.at_seq, seq + 1)
        pending = [p for p in machine.pending_activations if p[0] != at]
        if len(pending) >= ACTIVATIONS_PENDING_MAX:
            log.error(
                "%s: activation of version %d at seq %d (message %d) ignored: %d already pending",
                slot.sm_type,
                activate.version,
                at,
                seq,
                len(pending),
            )
            return
        machine.pending_activations = tuple(sorted(pending + [(at, activate.version, seq)]))
        self._next_activation = min(self._next_activation, at)
        if activate.version not in type(machine).BEHAVIOUR_VERSIONS:
            log.warning(
                "%s: behaviour version %d activated from seq %d (message %d) is not supported by this build (%s): it will stop there",
                slot.sm_type, activate.version, at, seq, type(machine).BEHAVIOUR_VERSIONS,
            )  # fmt: skip

    def _run_activations(self, seq: int) -> None:
        upcoming = math.inf
        for slot in self._slots:
            machine = slot.machine
            while machine.pending_activations and machine.pending_activations[0][0] <= seq:
                at, version, by = machine.pending_activations[0]
                if version not in type(machine).BEHAVIOUR_VERSIONS:
                    raise UnsupportedBehaviourVersion(
                        slot.sm_type, version, at_seq=at, activated_by=by, supported=tuple(type(machine).BEHAVIOUR_VERSIONS)
                    )
                machine.active_version = version
                machine.pending_activations = machine.pending_activations[1:]
                log.info("%s: behaviour version %d in effect from seq %d", slot.sm_type, version, at)
            if machine.pending_activations:
                upcoming = min(upcoming, machine.pending_activations[0][0])
        self._next_activation = upcoming

    # --- checkpoints and divergence -------------------------------------------------------------

    def _checkpoint(self, seq: int) -> None:
        name = self.replica or "local"
        for slot in self._slots:
            if seq <= slot.start_after:
                continue
            digest = full_digest(slot.machine)
            client = self._checkpoint_client
            if client is not None:
                try:
                    future = client.submit_nowait(formats.encode_checkpoint(formats.Checkpoint(slot.sm_type, seq, digest, self.replica)))
                except (Busy, NotConnected) as exc:
                    log.warning("checkpoint of %s at seq %d not published: %s", slot.sm_type, seq, exc)
                else:
                    future.add_done_callback(_consume)
                    self.checkpoints_published += 1
            self._record(slot.sm_type, seq, name, digest)

    def _record(self, sm_type: str, seq: int, replica: str, digest: str) -> None:
        divergence = self.ledger.add(sm_type, seq, replica, digest)
        if divergence is None or (sm_type, seq) in self._reported:
            return
        if len(self.divergences) < DIVERGENCES_KEPT:
            self._reported.add((sm_type, seq))
            self.divergences.append(divergence)
        if self.on_divergence == "stop":
            raise DivergenceError(divergence)
        if self.on_divergence == "log":
            log.error("divergence: %s", divergence.describe())
        else:
            self.on_divergence(divergence)

    # --- snapshots ------------------------------------------------------------------------------

    def capture(self, sm_type: str) -> CapturedSnapshot:
        """A snapshot of `sm_type`'s machine as it is now (between two messages)."""
        slot = self._by_type[sm_type]
        covered = max(self.last_seq, slot.start_after)
        data, digest = capture(slot.machine, covered)
        return CapturedSnapshot(sm_type, type(slot.machine).SNAPSHOT_VERSION, covered, digest, data)

    async def publish_snapshot(self, sm_type: str | None = None, *, confirm_timeout_s: float = 10.0) -> list[protocol.SnapshotInfo]:
        """Publish the current state of `sm_type`'s machine (of every machine when None) to the
        cluster; returns the index entries once a node lists them. Needs ``replica``."""
        if sm_type is not None and sm_type not in self._by_type:
            raise KeyError(sm_type)
        captured = [self.capture(slot.sm_type) for slot in self._slots if sm_type is None or slot.sm_type == sm_type]
        return await self._publish(captured, confirm_timeout_s)

    async def _publish(self, captured: list[CapturedSnapshot], confirm_timeout_s: float) -> list[protocol.SnapshotInfo]:
        if not self.replica:
            raise ValueError("publishing snapshots needs a replica name")
        infos = []
        for snap in captured:
            client = self._snapshot_clients.get(snap.sm_type)
            if client is None:
                client = SequencerClient(
                    self.endpoints,
                    session=snapshot_session(snap.sm_type, self.replica),
                    token=self.token,
                    snapshot_publisher=True,
                    **self._client_options,
                )
                await client.connect()
                self._snapshot_clients[snap.sm_type] = client
            first, last = await upload_snapshot(client, snap)
            info = await wait_indexed(
                self.endpoints,
                snap.sm_type,
                first,
                token=self.token,
                timeout_s=confirm_timeout_s,
                session=self._session("query"),
                tls=self.tls,
            )
            log.info("published %s covering seq %d as seq %d..%d (%d bytes)", snap.sm_type, snap.covered_seq, first, last, len(snap.data))
            self.published.append(info)
            infos.append(info)
        return infos

    def _snapshot_due(self) -> None:
        if not self.replica or (self._publish_task is not None and not self._publish_task.done()):
            return
        captured = [self.capture(slot.sm_type) for slot in self._slots]
        self._publish_task = asyncio.create_task(self._publish_in_background(captured), name="sm-snapshot-publish")

    async def _publish_in_background(self, captured: list[CapturedSnapshot]) -> None:
        try:
            await self._publish(captured, 30.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, the runner carries on
            self.publish_errors.append(exc)
            log.error("snapshot publication failed: %r", exc)

    async def flush(self, timeout_s: float = CLOSE_DRAIN_S) -> bool:
        """Wait until every checkpoint and snapshot chunk this runner submitted is sequenced
        (at most `timeout_s`); True when nothing is left in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        clients = [c for c in [self._checkpoint_client, *self._snapshot_clients.values()] if c is not None]
        while any(c.in_flight and c.connected for c in clients) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return not any(c.in_flight for c in clients)

    async def wait_published(self) -> None:
        """Wait for a background publication (``snapshot_every``) in progress, if any."""
        if self._publish_task is not None:
            await asyncio.shield(self._publish_task)

    # --- saving and closing ---------------------------------------------------------------------

    def save(self) -> None:
        """Save every machine's state in ``state_dir`` (atomically, fsynced)."""
        if not self.state_dir:
            raise ValueError("no state_dir")
        os.makedirs(self.state_dir, exist_ok=True)
        for slot in self._slots:
            snap = self.capture(slot.sm_type)
            body = _local_encoder.encode(
                LocalState(LOCAL_STATE_FORMAT, snap.sm_type, snap.schema_version, snap.covered_seq, snap.digest, snap.data)
            )
            path = self._state_path(slot.sm_type)
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        try:
            fd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    async def close(self) -> None:
        """Stop publishing, close the clients, save the state (``state_dir``)."""
        if self._publish_task is not None and not self._publish_task.done():
            self._publish_task.cancel()
            try:
                await self._publish_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        # Let what is in flight be acknowledged first (bounded): nothing is lost either way, but
        # a close racing acknowledgements can stall (CLOSE_DRAIN_S).
        await self.flush()
        for client in [self._checkpoint_client, *self._snapshot_clients.values()]:
            if client is not None:
                await client.close()
        self._checkpoint_client = None
        self._snapshot_clients.clear()
        if self.state_dir and self._bootstrapped and self._failed is None:
            self.save()

    async def __aenter__(self) -> StateMachineRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Rollback:
    """A machine's state, to put back after a snapshot that failed to load."""

    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine
        self.data = machine.snapshot()
        self.active_version = machine.active_version
        self.pending = machine.pending_activations

    def restore(self) -> None:
        self.machine.restore(self.data)
        self.machine.active_version = self.active_version
        self.machine.pending_activations = self.pending


__all__ = ["LocalState", "StateMachineRunner"]
