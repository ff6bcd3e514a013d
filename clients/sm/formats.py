"""The state-machine SDK's payload formats, and the checkpoint comparison.

These are payloads of ordinary sequenced messages, not frames: the sequencer never looks inside
them. ``SmEnvelope`` wraps every typed application message; ``Checkpoint`` (a replica's digest
after a number) and ``Activate`` (a version switch at a number) are the SDK's own control
messages; ``CheckpointLedger`` compares checkpoints and reports a ``Divergence``. The SDK
(``clients.sm``) and ``raftseq sm`` read them. Snapshot chunks, the one payload the machine
reads too, live in ``sequencer.protocol``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from raftseq.sequencer.protocol import DECODE_ERRORS, Digest, Seq, Session, SmFormatError, SmType

#: Longest message type name inside an ``SmEnvelope``, in characters (ASCII only).
SM_MESSAGE_TYPE_CHARS_MAX = 128
SmMessageType = Annotated[str, msgspec.Meta(min_length=1, max_length=SM_MESSAGE_TYPE_CHARS_MAX, pattern=r"^[A-Za-z0-9._-]+\Z")]

_encode = msgspec.msgpack.Encoder().encode


class SmEnvelope(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="sm", tag_field="t"):
    """A typed, versioned application message: ``["sm", type, version, body]``.

    ``body`` is the msgpack encoding of the message Struct of that type and schema version
    (kept undecoded here: a reader decodes it with the type it registered for that version).
    """

    type: SmMessageType
    version: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    body: msgspec.Raw


#: How every encoded ``SmEnvelope`` starts (a 4-element array, then the tag): payloads that do
#: not start so are not state-machine messages and are skipped without decoding.
SM_ENVELOPE_MARK = b"\x94\xa2sm"
_sm_envelope_decoder = msgspec.msgpack.Decoder(SmEnvelope)


def encode_sm_message(type_name: str, version: int, body: bytes) -> bytes:
    """The payload of a state-machine message: `body` (msgpack) in an ``SmEnvelope``."""
    return _encode(SmEnvelope(type_name, version, msgspec.Raw(body)))


def decode_sm_envelope(payload: bytes | memoryview) -> SmEnvelope | None:
    """The envelope of `payload`; ``None`` when it is not a state-machine message at all.
    Raises ``SmFormatError`` when it starts like one but does not decode."""
    if payload[:4] != SM_ENVELOPE_MARK:
        return None
    try:
        return _sm_envelope_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise SmFormatError(f"malformed state-machine envelope: {exc}") from None


#: Envelope type of a ``Checkpoint`` (schema version 1).
CHECKPOINT_TYPE = "raftseq.checkpoint"
#: Envelope type of an ``Activate`` (schema version 1).
ACTIVATE_TYPE = "raftseq.activate"
#: Every envelope type the SDK itself reads; application types may not start with this.
SM_CONTROL_PREFIX = "raftseq."


class Checkpoint(msgspec.Struct, frozen=True, gc=False):
    """Replica `replica` held state `digest` for `sm_type` after applying messages 1..`seq`."""

    sm_type: SmType
    seq: Seq
    digest: Digest
    replica: Session


class Activate(msgspec.Struct, frozen=True, gc=False):
    """From message `at_seq` on, every replica of `sm_type` behaves as version `version`.

    Sequenced like any message, so that every replica switches at the same point of the stream;
    a replica that cannot run `version` stops there instead of applying messages differently.
    """

    sm_type: SmType
    version: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    at_seq: Seq


_checkpoint_decoder = msgspec.msgpack.Decoder(Checkpoint)
_activate_decoder = msgspec.msgpack.Decoder(Activate)
#: How every encoded checkpoint payload starts.
CHECKPOINT_MARK = SM_ENVELOPE_MARK + _encode(CHECKPOINT_TYPE)


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    return encode_sm_message(CHECKPOINT_TYPE, 1, _encode(checkpoint))


def encode_activate(activate: Activate) -> bytes:
    return encode_sm_message(ACTIVATE_TYPE, 1, _encode(activate))


def decode_checkpoint(envelope: SmEnvelope) -> Checkpoint:
    return _decode_control(envelope, CHECKPOINT_TYPE, _checkpoint_decoder)


def decode_activate(envelope: SmEnvelope) -> Activate:
    return _decode_control(envelope, ACTIVATE_TYPE, _activate_decoder)


def _decode_control(envelope: SmEnvelope, type_name: str, decoder: msgspec.msgpack.Decoder):
    if envelope.type != type_name or envelope.version != 1:
        raise SmFormatError(f"{envelope.type} version {envelope.version}: this version reads {type_name} version 1")
    try:
        return decoder.decode(envelope.body)
    except DECODE_ERRORS as exc:
        raise SmFormatError(f"malformed {type_name} body: {exc}") from None


class Divergence(msgspec.Struct, frozen=True):
    """Two or more copies of `sm_type` reported different states after the same message."""

    sm_type: str
    #: The first checkpoint at which copies disagree.
    seq: int
    #: Replica -> its digest at `seq`.
    digests: dict[str, str]
    #: The latest earlier checkpoint at which every copy that reported one agreed (0: none),
    #: so the copies diverged at a message in ``last_agreed_seq + 1 .. seq``.
    last_agreed_seq: int = 0

    def groups(self) -> list[tuple[str, list[str]]]:
        """``(digest, replicas)`` pairs, the largest group first (then by digest)."""
        by_digest: dict[str, list[str]] = {}
        for replica, digest in sorted(self.digests.items()):
            by_digest.setdefault(digest, []).append(replica)
        return sorted(by_digest.items(), key=lambda item: (-len(item[1]), item[0]))

    def describe(self) -> str:
        where = f"after seq {self.last_agreed_seq}, at or before seq {self.seq}" if self.last_agreed_seq else f"at or before seq {self.seq}"
        parts = [f"{', '.join(replicas)} hold {digest[:16]}" for digest, replicas in self.groups()]
        return f"state machine {self.sm_type!r}: copies diverged {where} (first disagreeing checkpoint: seq {self.seq}): " + "; ".join(
            parts
        )


class CheckpointLedger:
    """Checkpoints seen, per state-machine type and sequence number; says where copies disagree.

    Pure bookkeeping, shared by the SDK's runner (which adds its own digests and those it reads
    in the stream) and ``raftseq sm check``. At most `seqs_per_type_max` checkpoint numbers are
    kept per type, the oldest dropped first.
    """

    def __init__(self, *, seqs_per_type_max: int = 4096) -> None:
        if seqs_per_type_max < 1:
            raise ValueError("seqs_per_type_max must be >= 1")
        self.seqs_per_type_max = seqs_per_type_max
        self._types: dict[str, dict[int, dict[str, str]]] = {}
        self.checkpoints_seen = 0

    def add(self, sm_type: str, seq: int, replica: str, digest: str) -> Divergence | None:
        """Record one checkpoint; returns the disagreement it reveals at `seq`, if any."""
        self.checkpoints_seen += 1
        seqs = self._types.setdefault(sm_type, {})
        replicas = seqs.get(seq)
        if replicas is None:
            replicas = seqs[seq] = {}
            if len(seqs) > self.seqs_per_type_max:
                del seqs[min(seqs)]
        known = replicas.get(replica)
        if known is None:
            replicas[replica] = digest
        elif known != digest:
            # The same replica reported two states for one point (a nondeterministic copy
            # that restarted): keep both.
            n = 2
            while f"{replica}#{n}" in replicas and replicas[f"{replica}#{n}"] != digest:
                n += 1
            replicas[f"{replica}#{n}"] = digest
        if len(set(replicas.values())) > 1:
            return self._divergence(sm_type, seq)
        return None

    def _divergence(self, sm_type: str, seq: int) -> Divergence:
        seqs = self._types[sm_type]
        agreed = [s for s, r in seqs.items() if s < seq and len(r) > 1 and len(set(r.values())) == 1]
        return Divergence(sm_type, seq, dict(seqs[seq]), max(agreed, default=0))

    def divergences(self) -> list[Divergence]:
        """Every checkpoint number with disagreeing copies, lowest first (then by type)."""
        found = [self._divergence(t, s) for t, seqs in self._types.items() for s, r in seqs.items() if len(set(r.values())) > 1]
        return sorted(found, key=lambda d: (d.seq, d.sm_type))

    def first_divergence(self) -> Divergence | None:
        found = self.divergences()
        return found[0] if found else None

    def summary(self) -> dict[str, dict]:
        """Per type: checkpoint numbers seen, the replicas, and the last seq every copy agreed on."""
        out = {}
        for sm_type, seqs in sorted(self._types.items()):
            agreed = [s for s, r in seqs.items() if len(r) > 1 and len(set(r.values())) == 1]
            out[sm_type] = {
                "checkpoints": len(seqs),
                "replicas": sorted({replica for r in seqs.values() for replica in r}),
                "last_agreed_seq": max(agreed, default=0),
            }
        return out
