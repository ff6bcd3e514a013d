"""Journal catch-up: fill the holes a Raft snapshot leaves in this node's journal.

When pysyncobj installs a snapshot instead of sending log entries, the machine state jumps
ahead of the journal (``SequencerCore.replace_machine`` records the gap as a hole). This task
fetches the missing records from a peer over the ordinary subscribe protocol, checks each
record's checksum and number, and stores the bytes exactly as received (``Journal.fill``).
Subscribers are served only up to the first hole until it is filled.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from raftseq.sequencer import protocol
from raftseq.sequencer.journal import JournalRecordError

if TYPE_CHECKING:
    from raftseq.cluster.node import Node

log = logging.getLogger("raftseq.catchup")

FILL_RECORDS_MAX = 2000
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 5.0
RETRY_DELAY_S = 0.5


class CatchUpError(Exception):
    """A peer could not (or did not correctly) serve the missing range."""


class CatchUp:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.records_fetched = 0
        self._peer_index = 0

    async def run(self) -> None:
        node = self.node
        peers = node.config.peers
        while True:
            if not node.journal.holes or not peers:
                await asyncio.sleep(0.2)
                continue
            peer = peers[self._peer_index % len(peers)]
            self._peer_index += 1
            first, last = node.journal.holes[0]
            log.info("journal lacks %d..%d; fetching from %s (%s)", first, last, peer.id, peer.client_address)
            try:
                await self._fetch(peer.client_address)
            except (OSError, TimeoutError, CatchUpError) as exc:
                log.warning("catch-up from %s stopped: %s", peer.id, exc)
                await asyncio.sleep(RETRY_DELAY_S)

    async def _fetch(self, address: str) -> None:
        node = self.node
        journal = node.journal
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_S)
        try:
            hello = protocol.Hello(f"catchup.{node.config.id}", node.config.client_token, protocol.PROTOCOL_VERSION)
            writer.write(protocol.encode_frame(hello))
            start = journal.fill_next_seq
            hole_last = journal.holes[0][1]
            writer.write(protocol.encode_frame(protocol.Subscribe(start)))
            await writer.drain()
            framer = protocol.FrameReader("node", keep_raw=True)
            expected = start
            batch: list[bytes] = []
            batch_first = expected
            while expected <= hole_last:
                data = await asyncio.wait_for(reader.read(256 * 1024), READ_TIMEOUT_S)
                if not data:
                    raise CatchUpError("peer closed the connection")
                for item in framer.feed(data):
                    if isinstance(item, protocol.FrameError):
                        raise CatchUpError(f"bad frame from peer: {item.detail}")
                    frame, raw = item
                    if isinstance(frame, protocol.Rejected):
                        raise CatchUpError(f"peer refused: {frame.reason.value} {frame.detail}")
                    if not isinstance(frame, protocol.Delivered) or expected > hole_last:
                        continue
                    if frame.seq != expected:
                        node.metrics.verify_failures["catchup"] += 1
                        raise CatchUpError(f"peer sent seq {frame.seq}, expected {expected}")
                    batch.append(raw)
                    expected += 1
                    if len(batch) >= FILL_RECORDS_MAX or expected > hole_last:
                        self._store(batch, batch_first, expected - 1)
                        batch = []
                        batch_first = expected
            log.info("journal hole filled up to %d", hole_last)
        finally:
            writer.close()

    def _store(self, records: list[bytes], first: int, last: int) -> None:
        node = self.node
        with node.replica.apply_lock:
            try:
                node.journal.fill(b"".join(records), first, last)
            except JournalRecordError as exc:  # a record from the peer fails its checksum or numbering
                node.metrics.verify_failures["catchup"] += 1
                raise CatchUpError(f"records {first}..{last} from the peer fail verification: {exc}") from None
        self.records_fetched += last - first + 1
        node.wake_subscribers()
