"""The state-machine SDK: deterministic state machines fed by the sequenced stream.

    from raftseq.clients.sm import MessageTypes, SmMessage, StateMachine, StateMachineRunner

    runner = StateMachineRunner(endpoints, [RefData()], token=token, replica="oms-1",
                                checkpoint_every=10_000, from_snapshot=True)
    await runner.run()

Modules: ``messages`` (typed, versioned messages and upcasters), ``machine`` (the base class and
the SDK's snapshot wrapper), ``runner`` (one subscription, several machines, exactly once,
behaviour versions, checkpoints and divergence), ``snapshots`` (publish, find and fetch
snapshots in the cluster), ``errors``; ``conformance`` (a package: record a slice of the stream
with the reference's digest after each message, verify another implementation against it:
``raftseq sm record|verify|show``; not imported here). Imports ``sequencer.protocol`` and
``clients`` only.
"""

from raftseq.clients.sm.errors import (
    ApplyError,
    DivergenceError,
    MessageDecodeError,
    SnapshotPublishError,
    SnapshotVerifyError,
    StateMachineError,
    StreamError,
    UnknownMessageType,
    UnsupportedBehaviourVersion,
    UnsupportedMessageVersion,
)
from raftseq.clients.sm.machine import SmSnapshot, StateMachine, capture, full_digest, load
from raftseq.clients.sm.messages import MessageTypes, SmMessage, activate, encode_message
from raftseq.clients.sm.runner import StateMachineRunner
from raftseq.clients.sm.snapshots import CapturedSnapshot, fetch_snapshot, query_snapshots, snapshot_session, upload_snapshot, wait_indexed

__all__ = [
    "ApplyError",
    "CapturedSnapshot",
    "DivergenceError",
    "MessageDecodeError",
    "MessageTypes",
    "SmMessage",
    "SmSnapshot",
    "SnapshotPublishError",
    "SnapshotVerifyError",
    "StateMachine",
    "StateMachineError",
    "StateMachineRunner",
    "StreamError",
    "UnknownMessageType",
    "UnsupportedBehaviourVersion",
    "UnsupportedMessageVersion",
    "activate",
    "capture",
    "encode_message",
    "fetch_snapshot",
    "full_digest",
    "load",
    "query_snapshots",
    "snapshot_session",
    "upload_snapshot",
    "wait_indexed",
]
