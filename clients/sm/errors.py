"""What stops a state-machine runner, each naming what and where.

A state machine must never hold a silently wrong state: every input the SDK cannot apply
exactly as every other replica would — a message type or version it does not know, a body it
cannot decode, a behaviour version it cannot run, a snapshot whose digest does not match, two
copies that disagree — raises one of these, and the runner stops before applying it.
"""

from __future__ import annotations

from raftseq.clients.sm import formats


class StateMachineError(Exception):
    """Base of the state-machine SDK's errors. The keyword arguments name what and where
    (``seq``, ``sm_type``, …) and are kept as attributes of the same names."""

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message)
        for name, value in details.items():
            setattr(self, name, value)


class MessageError(StateMachineError):
    """A message this reader cannot apply: `type_name` at schema `version`, sequenced at `seq`."""

    type_name: str
    version: int
    seq: int

    def __init__(self, type_name: str, version: int, seq: int, why: str) -> None:
        super().__init__(f"seq {seq}: message type {type_name!r} version {version} {why}", type_name=type_name, version=version, seq=seq)


class UnknownMessageType(MessageError):
    """A message in a state machine's namespace whose type this reader does not know."""

    def __init__(self, type_name: str, version: int, seq: int, *, namespace: str) -> None:
        super().__init__(
            type_name,
            version,
            seq,
            f"is in namespace {namespace!r} but this reader does not know it (a newer writer? upgrade this reader before "
            f"replaying past seq {seq - 1})",
        )


class UnsupportedMessageVersion(MessageError):
    """A known message type at a schema version this reader cannot read (or upcast)."""

    def __init__(self, type_name: str, version: int, seq: int, *, readable: tuple[int, ...], detail: str = "") -> None:
        why = detail or f"this reader reads versions {', '.join(map(str, readable))}"
        super().__init__(type_name, version, seq, f"cannot be read: {why}")


class MessageDecodeError(MessageError):
    """A message whose envelope or body does not decode as its type and version say."""

    def __init__(self, type_name: str, version: int, seq: int, detail: str) -> None:
        super().__init__(type_name, version, seq, f"does not decode: {detail}")


class UnsupportedBehaviourVersion(StateMachineError):
    """The stream activated a behaviour version this state machine cannot run."""

    sm_type: str
    version: int
    at_seq: int
    activated_by: int

    def __init__(self, sm_type: str, version: int, *, at_seq: int, activated_by: int, supported: tuple[int, ...]) -> None:
        super().__init__(
            f"state machine {sm_type!r}: behaviour version {version}, activated from seq {at_seq} by the message at seq "
            f"{activated_by}, is not supported by this build (it runs {', '.join(map(str, supported))}); stopped before seq {at_seq}",
            sm_type=sm_type, version=version, at_seq=at_seq, activated_by=activated_by,
        )  # fmt: skip


class ApplyError(StateMachineError):
    """``StateMachine.apply`` raised: the state may be half changed, so the runner stops."""

    sm_type: str
    type_name: str
    seq: int

    def __init__(self, sm_type: str, type_name: str, seq: int, cause: BaseException) -> None:
        super().__init__(
            f"state machine {sm_type!r}: apply of {type_name!r} at seq {seq} raised {cause!r}",
            sm_type=sm_type,
            type_name=type_name,
            seq=seq,
        )


class SnapshotVerifyError(StateMachineError):
    """A snapshot that does not hold what its header says (bytes or digest)."""

    sm_type: str
    covered_seq: int

    def __init__(self, sm_type: str, covered_seq: int, detail: str, *, where: str = "") -> None:
        place = f" ({where})" if where else ""
        super().__init__(f"snapshot of {sm_type!r} covering seq {covered_seq}{place}: {detail}", sm_type=sm_type, covered_seq=covered_seq)


class SnapshotPublishError(StateMachineError):
    """A snapshot that was sequenced but did not appear in the cluster's index."""


class DivergenceError(StateMachineError):
    """Two copies of a state machine reported different states after the same message."""

    divergence: formats.Divergence

    def __init__(self, divergence: formats.Divergence) -> None:
        super().__init__(divergence.describe(), divergence=divergence)


class StreamError(StateMachineError):
    """The stream did not arrive as promised (a gap or a repeat): a bug, never applied."""
