"""What applications use to talk to a raftseq cluster. Imports ``sequencer.protocol`` only.

    from clients import SequencerClient
    async with SequencerClient(["127.0.0.1:7101", "127.0.0.1:7102"], session="oms-1", token="...") as client:
        seq = await client.submit(b"payload")
        async for m in client.subscribe(from_seq=1):
            ...
"""

from clients.blocking import BlockingSequencerClient
from clients.client import Busy, Message, NotConnected, OutcomeUnknown, Rejected, SequencerClient, SequencerError, subscribe

__all__ = [
    "BlockingSequencerClient",
    "Busy",
    "Message",
    "NotConnected",
    "OutcomeUnknown",
    "Rejected",
    "SequencerClient",
    "SequencerError",
    "subscribe",
]
