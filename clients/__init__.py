"""What applications use to talk to a raftseq cluster. Imports ``sequencer.protocol`` only.

from raftseq.clients import SequencerClient
async with SequencerClient(["127.0.0.1:7101", "127.0.0.1:7102"], session="oms-1", token="...") as client:
    seq = await client.submit(b"payload")
    async for m in client.subscribe(from_seq=1):
        ...
"""

from raftseq.clients.blocking import BlockingSequencerClient
from raftseq.sequencer.version import __version__
from raftseq.clients.client import Busy, Message, NotConnected, OutcomeUnknown, Rejected, SequencerClient, SequencerError, subscribe
from raftseq.clients.connection import Connection, open_connection

__all__ = [
    "__version__",
    "BlockingSequencerClient",
    "Busy",
    "Connection",
    "Message",
    "NotConnected",
    "OutcomeUnknown",
    "Rejected",
    "SequencerClient",
    "SequencerError",
    "open_connection",
    "subscribe",
]
