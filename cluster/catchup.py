"""Journal catch-up: fill the holes a Raft snapshot leaves in this node's journal.

When pysyncobj installs a snapshot instead of sending log entries, the machine state jumps
ahead of the journal (``SequencedStream.replace_machine`` records the gap as a hole). This task
fetches the missing records from a peer over the ordinary subscribe protocol, checks each
record's checksum and number, and stores the bytes exactly as received (``Journal.fill``).
Subscribers are served only up to the first hole until it is filled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableMapping, Sequence
from typing import Protocol

from raftseq.clients.connection import Rejected, open_connection
from raftseq.sequencer.journal import JournalRecordError

log = logging.getLogger("raftseq.catchup")

FILL_RECORDS_MAX = 2000
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 5.0
RETRY_DELAY_S = 0.5


class HoleJournal(Protocol):
    """What catch-up needs of the journal (``sequencer.journal.Journal``)."""

    #: Missing ranges ``(first, last)``, in order.
    holes: list[tuple[int, int]]

    @property
    def fill_next_seq(self) -> int: ...

    def fill(self, records: bytes, first_seq: int, last_seq: int) -> None: ...


class Peer(Protocol):
    """A peer to fetch from (``cluster.config.PeerConfig``)."""

    @property
    def id(self) -> str: ...

    @property
    def client_address(self) -> str: ...


class CatchUpError(Exception):
    """A peer could not (or did not correctly) serve the missing range."""


class CatchUp:
    """Fills `journal`'s holes from `peers` (in turn), as session ``catchup.<node_id>`` with the
    client `token`. A record that fails verification counts in ``verify_failures["catchup"]``;
    ``on_filled`` runs after each store (new records readable).

    Runs on the node's event loop, like Raft's apply: a store is one call with no await
    inside, so nothing else touches the journal while it runs.
    """

    def __init__(
        self,
        journal: HoleJournal,
        peers: Sequence[Peer],
        *,
        node_id: str,
        token: str,
        verify_failures: MutableMapping[str, int],
        on_filled: Callable[[], None],
    ) -> None:
        self.journal = journal
        self.peers = peers
        self.session = f"catchup.{node_id}"
        self.token = token
        self.verify_failures = verify_failures
        self.on_filled = on_filled
        self.records_fetched = 0
        self._peer_index = 0

    async def run(self) -> None:
        peers = self.peers
        journal = self.journal
        while True:
            if not journal.holes or not peers:
                await asyncio.sleep(0.2)
                continue
            peer = peers[self._peer_index % len(peers)]
            self._peer_index += 1
            first, last = journal.holes[0]
            log.info("journal lacks %d..%d; fetching from %s (%s)", first, last, peer.id, peer.client_address)
            try:
                await self._fetch(peer.client_address)
            except (OSError, TimeoutError, CatchUpError) as exc:
                log.warning("catch-up from %s stopped: %s", peer.id, exc)
                await asyncio.sleep(RETRY_DELAY_S)

    async def _fetch(self, address: str) -> None:
        journal = self.journal
        try:
            connection = await open_connection(address, session=self.session, token=self.token, timeout_s=CONNECT_TIMEOUT_S, keep_raw=True)
        except Rejected as exc:
            raise CatchUpError(f"peer refused: {exc}") from None
        try:
            start = journal.fill_next_seq
            hole_last = journal.holes[0][1]
            expected = start
            batch: list[bytes] = []
            batch_first = expected
            # Unchecked: a wrong number is a verification failure, counted here.
            stream = connection.subscribe(start, silence_s=READ_TIMEOUT_S, checked=False)
            try:
                async for records in stream:
                    for frame, raw in records:
                        if frame.seq != expected:
                            self.verify_failures["catchup"] += 1
                            raise CatchUpError(f"peer sent seq {frame.seq}, expected {expected}")
                        batch.append(raw)
                        expected += 1
                        if len(batch) >= FILL_RECORDS_MAX or expected > hole_last:
                            self._store(batch, batch_first, expected - 1)
                            batch = []
                            batch_first = expected
                        if expected > hole_last:
                            log.info("journal hole filled up to %d", hole_last)
                            return
            except (ConnectionError, Rejected) as exc:
                raise CatchUpError(f"{exc}") from None
            finally:
                await stream.aclose()
        finally:
            connection.close()

    def _store(self, records: list[bytes], first: int, last: int) -> None:
        try:
            self.journal.fill(b"".join(records), first, last)
        except JournalRecordError as exc:  # a record from the peer fails its checksum or numbering
            self.verify_failures["catchup"] += 1
            raise CatchUpError(f"records {first}..{last} from the peer fail verification: {exc}") from None
        self.records_fetched += last - first + 1
        self.on_filled()
