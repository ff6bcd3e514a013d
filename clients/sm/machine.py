"""The deterministic state machine an application writes, and what the SDK keeps around it.

A state machine is a function of the stream: replicas that apply the same messages in the
same order hold the same state. So ``apply`` may read only its arguments and its own state —
the message, its sequence number and its log time (the leader's clock when the message was
sequenced, the only clock there is) — never the wall clock, random numbers, the environment,
files, the network, or iteration order that depends on hashing of ``str`` across processes
(``PYTHONHASHSEED``; iterate sorted keys or insertion-ordered dicts). ``apply`` should not
raise for bad business input either: record the refusal in the state (every replica refuses
the same message); an exception stops the runner (``ApplyError``).

Besides the application's state the SDK keeps, per state machine, the behaviour version in
effect and the activations still to come (``Activate`` messages): they are part of the state,
of every snapshot and of every digest.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import msgspec

from raftseq.clients.sm.errors import SnapshotVerifyError
from raftseq.clients.sm.messages import MessageTypes

#: Format of ``SmSnapshot`` (the SDK's wrapper around a machine's own snapshot bytes).
SM_SNAPSHOT_FORMAT = 1


class StateMachine:
    """Base of an application state machine. Subclasses set the class attributes and implement
    ``apply``, ``snapshot`` and ``restore``; ``digest`` defaults to SHA-256 of ``snapshot()``.

    * ``TYPE`` — the state machine's name (snapshots, checkpoints and activations name it);
      every process that runs this state machine uses the same name.
    * ``MESSAGES`` — the ``MessageTypes`` it reads; it sees only messages of those types.
    * ``SNAPSHOT_VERSION`` — schema version of the bytes ``snapshot()`` writes;
      ``SNAPSHOT_VERSIONS_READABLE`` — the versions ``restore`` reads (default: that one).
      A late joiner loads only snapshots of a version it reads.
    * ``BEHAVIOUR_VERSIONS`` — behaviour versions this build can run. Version 1 is in effect
      until an ``Activate`` message switches to another; ``self.active_version`` says which.
    """

    TYPE: ClassVar[str] = ""
    MESSAGES: ClassVar[MessageTypes]
    SNAPSHOT_VERSION: ClassVar[int] = 1
    SNAPSHOT_VERSIONS_READABLE: ClassVar[tuple[int, ...]] = ()
    BEHAVIOUR_VERSIONS: ClassVar[tuple[int, ...]] = (1,)

    #: Behaviour version in effect. Set by the runner, never by the machine itself.
    active_version: int = 1
    #: Activations still to come, ``(at_seq, version, seq of the Activate message)`` sorted.
    #: Set by the runner.
    pending_activations: tuple[tuple[int, int, int], ...] = ()

    def apply(self, message: Any, seq: int, log_time_ns: int) -> None:
        """Apply one message of a type in ``MESSAGES`` (always its current version)."""
        raise NotImplementedError

    def snapshot(self) -> bytes:
        """The whole state as bytes; equal states must give equal bytes."""
        raise NotImplementedError

    def restore(self, data: bytes) -> None:
        """Replace the whole state with the one `data` (from ``snapshot``) describes."""
        raise NotImplementedError

    def digest(self) -> str:
        """Lowercase hex digest of the state: equal exactly when states are equal."""
        return hashlib.sha256(self.snapshot()).hexdigest()

    @classmethod
    def snapshot_versions_readable(cls) -> tuple[int, ...]:
        return cls.SNAPSHOT_VERSIONS_READABLE or (cls.SNAPSHOT_VERSION,)


class SmSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """A snapshot as published to the cluster (and saved locally): the SDK's part of the state
    around the machine's own bytes."""

    format: int
    sm_type: str
    schema_version: int
    covered_seq: int
    active_version: int
    pending_activations: list[tuple[int, int, int]]
    state: bytes


_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(SmSnapshot)


def full_digest(machine: StateMachine) -> str:
    """The digest checkpoints and snapshots carry: the machine's own digest together with the
    SDK's part of its state (type, behaviour version, pending activations)."""
    sdk = _encoder.encode((type(machine).TYPE, machine.active_version, list(machine.pending_activations), machine.digest()))
    return hashlib.sha256(sdk).hexdigest()


def capture(machine: StateMachine, covered_seq: int) -> tuple[bytes, str]:
    """``(snapshot bytes, full digest)`` of `machine` as it is, covering 1..`covered_seq`."""
    cls = type(machine)
    data = _encoder.encode(
        SmSnapshot(
            SM_SNAPSHOT_FORMAT,
            cls.TYPE,
            cls.SNAPSHOT_VERSION,
            covered_seq,
            machine.active_version,
            [tuple(p) for p in machine.pending_activations],
            machine.snapshot(),
        )
    )
    return data, full_digest(machine)


def load(machine: StateMachine, data: bytes, *, digest: str, covered_seq: int, schema_version: int, where: str = "") -> None:
    """Restore `machine` from `data` (``capture``'s bytes) and check that it now has `digest`.

    Raises ``SnapshotVerifyError`` naming the type, the covered number and what is wrong; the
    machine may then hold anything (the caller restores something else into it).
    """
    cls = type(machine)
    try:
        snap = _snapshot_decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise SnapshotVerifyError(cls.TYPE, covered_seq, f"undecodable: {exc}", where=where) from None
    if snap.format != SM_SNAPSHOT_FORMAT:
        raise SnapshotVerifyError(
            cls.TYPE, covered_seq, f"snapshot wrapper format {snap.format}, this SDK reads {SM_SNAPSHOT_FORMAT}", where=where
        )
    header = (snap.sm_type, snap.schema_version, snap.covered_seq)
    if header != (cls.TYPE, schema_version, covered_seq):
        raise SnapshotVerifyError(
            cls.TYPE, covered_seq, f"holds {header}, its header says {(cls.TYPE, schema_version, covered_seq)}", where=where
        )
    if snap.schema_version not in cls.snapshot_versions_readable():
        raise SnapshotVerifyError(cls.TYPE, covered_seq, f"schema version {snap.schema_version} is not readable here", where=where)
    pending = tuple(sorted(tuple(p) for p in snap.pending_activations))
    try:
        machine.restore(snap.state)
    except Exception as exc:  # noqa: BLE001 - the machine's own code, on bytes from outside
        raise SnapshotVerifyError(cls.TYPE, covered_seq, f"restore raised {exc!r}", where=where) from None
    machine.active_version = snap.active_version
    machine.pending_activations = pending
    got = full_digest(machine)
    if got != digest:
        raise SnapshotVerifyError(cls.TYPE, covered_seq, f"digest after restore is {got}, the snapshot promised {digest}", where=where)


__all__ = ["SmSnapshot", "StateMachine", "capture", "full_digest", "load"]
