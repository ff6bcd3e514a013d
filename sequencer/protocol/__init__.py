"""The wire protocol between clients and nodes, and the Raft log entry format.

- ``fields``: the field types and their bounds;
- ``frames``: the frames clients and nodes exchange (``Hello``, ``Submit``, ``Delivered``, …);
- ``framing``: length, checksum and body on the wire and in the journal; ``FrameReader``;
- ``batch``: the Raft log entry (``Batch`` of ``Entry``);
- ``snapshot_chunks``: state-machine snapshot chunks, the one payload format the machine reads.

Import from here (``from raftseq.sequencer import protocol; protocol.Hello``): this package
states the protocol's public names. The state-machine SDK's own payload formats live in
``clients.sm.formats``.
"""

from raftseq.sequencer import limits
from raftseq.sequencer.protocol import batch, fields, frames, framing, snapshot_chunks
from raftseq.sequencer.protocol.batch import *  # noqa: F403
from raftseq.sequencer.protocol.fields import *  # noqa: F403
from raftseq.sequencer.protocol.frames import *  # noqa: F403
from raftseq.sequencer.protocol.framing import *  # noqa: F403
from raftseq.sequencer.protocol.snapshot_chunks import *  # noqa: F403

#: The protocol's public names: each module's ``__all__``, and ``limits`` (the bounds the
#: field types carry).
__all__ = ["limits", *fields.__all__, *frames.__all__, *framing.__all__, *batch.__all__, *snapshot_chunks.__all__]
