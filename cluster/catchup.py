"""Journal catch-up: fill the holes a Raft snapshot leaves in this node's journal, and repair
its damaged sealed segments.

When pysyncobj installs a snapshot instead of sending log entries, the machine state jumps
ahead of the journal (``SequencedStream.replace_machine`` records the gap as a hole). This task
fetches the missing records from a peer over the ordinary subscribe protocol, checks each
record's checksum and number, and stores the bytes exactly as received (``Journal.fill``).
Subscribers are served only up to the first hole until it is filled; one that asks for a
number inside a hole is refused (``from_seq_unavailable``: another node serves it).

A sealed segment found damaged (on open, by the scrub, by a reader) is fetched whole the same
way once no hole is left, and renamed over the damaged file (``Journal.repair``); readers are
refused over the damage meanwhile. When every peer that answers lacks the range too
(``repair_attempts_max`` fetches in a row that brought none of it), the node cannot go on:
``NodeCannotRun(JOURNAL_DAMAGED)``. So for a hole no peer can fill (the first segment file
removed on every node, say): a peer refuses a subscription that starts in its own hole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableMapping, Sequence
from typing import NamedTuple, Protocol

from raftseq.clients.connection import Connection, Rejected, open_connection
from raftseq.clients.errors import Truncated
from raftseq.clients.tls import ClientTls, TlsError
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.sequencer.journal import DamageMap, JournalRecordError
from raftseq.sequencer.protocol.frames import RejectReason

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

    #: Damaged ranges of sealed segments.
    damage: DamageMap

    @property
    def repair_range(self) -> tuple[int, int] | None: ...

    @property
    def repair_next_seq(self) -> int: ...

    def repair(self, records: bytes, first_seq: int, last_seq: int) -> None: ...

    @property
    def first_seq(self) -> int: ...

    def start_at(self, seq: int) -> None: ...


class Peer(Protocol):
    """A peer to fetch from or to ask what it needs (``cluster.config.PeerConfig``)."""

    @property
    def id(self) -> str: ...

    @property
    def client_address(self) -> str: ...


class CatchUpError(Exception):
    """A peer could not (or did not correctly) serve the missing range."""


class PeerTruncated(CatchUpError):
    """The peer's retention removed the start of the range: it holds the stream from `first_seq`."""

    def __init__(self, first_seq: int) -> None:
        super().__init__(f"the peer holds the stream only from seq {first_seq} (retention)")
        self.first_seq = first_seq


#: How a peer that answers says it lacks the range: ``clients.connection.refusal`` turns its
#: ``Rejected(from_seq_unavailable)`` into a ``ConnectionError`` whose text starts so.
LACKS_RANGE_PREFIX = f"{RejectReason.FROM_SEQ_UNAVAILABLE.value}:"


def _lacks_range(exc: Exception) -> bool:
    """Whether a subscription ended because the peer refused it (it lacks the range), not
    because the peer went away."""
    return isinstance(exc, Rejected) or str(exc).startswith(LACKS_RANGE_PREFIX)


class _Target(NamedTuple):
    """What to fetch next: a hole, or the segment of the first damage."""

    what: str  # "hole" or "damaged segment"
    next_seq: int
    last_seq: int
    store: Callable[[bytes, int, int], None]


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
        tls: ClientTls = None,
        verify_failures: MutableMapping[str, int],
        on_filled: Callable[[], None],
        repair_attempts_max: int = 6,
        members: Callable[[], Sequence[Peer]] | None = None,
    ) -> None:
        """`peers`: the config's; `members`, when given, the current other members (they
        change with ``raftseq member``: a removed peer is not asked any more, and does not
        keep a journal that joined behind the cluster's retention waiting for its answer)."""
        self.journal = journal
        self._config_peers = list(peers)
        self._members = members
        self.session = f"catchup.{node_id}"
        self.token = token
        self.tls = tls
        self.verify_failures = verify_failures
        self.on_filled = on_filled
        self.records_fetched = 0
        self.repair_attempts_max = repair_attempts_max
        self._peer_index = 0
        #: Fetches in a row for the current target that stored nothing.
        self._misses = 0
        #: Whether a peer answered and lacked the range during those fetches.
        self._refused = False
        #: Peer id -> the first number it holds, for peers whose retention removed the start
        #: of the hole this journal starts with (``_truncated_everywhere``).
        self._truncated: dict[str, int] = {}

    @property
    def peers(self) -> list[Peer]:
        return list(self._members()) if self._members is not None else self._config_peers

    def _target(self) -> _Target | None:
        journal = self.journal
        if journal.holes:
            return _Target("hole", journal.fill_next_seq, journal.holes[0][1], journal.fill)
        damaged = journal.repair_range
        if damaged is not None:
            return _Target("damaged segment", journal.repair_next_seq, damaged[1], journal.repair)
        return None

    async def run(self) -> None:
        while True:
            peers = self.peers
            target = self._target()
            if target is None or not peers:
                self._misses, self._refused = 0, False
                await asyncio.sleep(0.2)
                continue
            peer = peers[self._peer_index % len(peers)]
            self._peer_index += 1
            log.info(
                "journal lacks %d..%d (%s); fetching from %s (%s)",
                target.next_seq,
                target.last_seq,
                target.what,
                peer.id,
                peer.client_address,
            )
            stored_before = self.records_fetched
            try:
                await self._fetch(peer.client_address, target)
            except PeerTruncated as exc:
                log.warning("catch-up from %s: %s", peer.id, exc)
                if not self._truncated_everywhere(peer.id, target, exc.first_seq):
                    self._missed(target, stored_before, exc)
                    await asyncio.sleep(RETRY_DELAY_S)
            except (OSError, TimeoutError, CatchUpError) as exc:
                log.warning("catch-up from %s stopped: %s", peer.id, exc)
                self._missed(target, stored_before, exc)
                await asyncio.sleep(RETRY_DELAY_S)
            else:
                self._truncated.clear()

    def _truncated_everywhere(self, peer_id: str, target: _Target, first_seq: int) -> bool:
        """A peer no longer holds the start of the hole this journal starts with. Once every
        peer said so, the journal starts where the peer holding most begins (a node that joins,
        or rejoins empty, behind the cluster's retention): returns True."""
        journal = self.journal
        if target.what != "hole" or not journal.holes or journal.holes[0][0] != journal.first_seq:
            return False
        self._truncated[peer_id] = first_seq
        members = {p.id for p in self.peers}
        for gone in set(self._truncated) - members:
            del self._truncated[gone]
        if not members or set(self._truncated) != members:
            return False
        start = min(min(self._truncated.values()), journal.holes[0][1] + 1)
        self._truncated.clear()
        log.warning("every peer's retention removed the stream before seq %d: this journal now starts there", start)
        journal.start_at(start)
        self._misses, self._refused = 0, False
        self.on_filled()
        return True

    def _missed(self, target: _Target, stored_before: int, exc: Exception) -> None:
        """A fetch ended early: count it if it stored nothing, and give up after
        ``repair_attempts_max`` such fetches in a row of which at least one reached a peer that
        lacked the range (peers that are only unreachable may still have it)."""
        if self.records_fetched > stored_before:
            self._misses, self._refused = 0, False
            return
        self._misses += 1
        self._refused |= isinstance(exc, CatchUpError)
        if self._misses < self.repair_attempts_max or not self._refused:
            return
        damage = self.journal.damage.covering(target.next_seq) or self.journal.damage.next_from(target.next_seq)
        if target.what == "hole":
            where = f"seq {target.next_seq}..{target.last_seq} (missing here)"
        else:
            where = damage.describe() if damage is not None else f"seq {target.next_seq}..{target.last_seq}"
        raise NodeCannotRun(
            NodeExit.JOURNAL_DAMAGED,
            f"journal damaged at {where}; no peer could repair it after {self._misses} attempts "
            f"(last: {exc}). Restore this node's journal directory from a backup, or remove it to rejoin empty",
        )

    async def _fetch(self, address: str, target: _Target) -> None:
        try:
            connection = await open_connection(
                address, session=self.session, token=self.token, timeout_s=CONNECT_TIMEOUT_S, keep_raw=True, tls=self.tls
            )
        except (Rejected, TlsError) as exc:
            raise CatchUpError(f"peer refused: {exc}") from None
        try:
            await copy_records(
                connection,
                target.next_seq,
                lambda records, first, last: self._store(target, records, first, last),
                last_seq=target.last_seq,
                verify_failures=self.verify_failures,
            )
            log.info("journal %s filled up to %d", target.what, target.last_seq)
        finally:
            connection.close()

    def _store(self, target: _Target, records: list[bytes], first: int, last: int) -> None:
        try:
            target.store(b"".join(records), first, last)
        except JournalRecordError as exc:  # a record from the peer fails its checksum or numbering
            self.verify_failures["catchup"] += 1
            raise CatchUpError(f"records {first}..{last} from the peer fail verification: {exc}") from None
        self.records_fetched += last - first + 1
        self.on_filled()


async def copy_records(
    connection: Connection,
    from_seq: int,
    store: Callable[[list[bytes], int, int], None],
    *,
    last_seq: int = 0,
    verify_failures: MutableMapping[str, int],
) -> None:
    """Read the stream from `from_seq` on `connection` (opened with ``keep_raw``) and hand its
    records, exactly as received, to ``store(records, first, last)``: up to
    ``FILL_RECORDS_MAX`` at a time, and whatever one read brought when there is no `last_seq`
    (0: follow the stream for as long as the peer sends it; a relay). Returns once `last_seq`
    is stored. A record out of order counts in ``verify_failures["catchup"]``; it, and a peer
    that refuses (it lacks the range) raise ``CatchUpError`` once what arrived in order before is
    stored; a peer that goes away raises its ``ConnectionError`` (it may still hold the range).
    ``store`` raises ``CatchUpError`` for records that fail their checks; a peer whose retention
    removed `from_seq` raises ``PeerTruncated``. Catch-up and relays both read a peer this way."""
    expected = from_seq
    batch: list[bytes] = []
    batch_first = expected
    # Unchecked: a wrong number is a verification failure, counted here.
    stream = connection.subscribe(from_seq, silence_s=READ_TIMEOUT_S, checked=False, truncated_known=True)
    try:
        async for records in stream:
            for frame, raw in records:
                if frame.seq != expected:
                    verify_failures["catchup"] += 1
                    if batch:  # the records before it are in order: keep them
                        store(batch, batch_first, expected - 1)
                    raise CatchUpError(f"peer sent seq {frame.seq}, expected {expected}")
                batch.append(raw)
                expected += 1
                if len(batch) >= FILL_RECORDS_MAX or expected - 1 == last_seq:
                    store(batch, batch_first, expected - 1)
                    batch = []
                    batch_first = expected
                if expected - 1 == last_seq:
                    return
            if batch and not last_seq:
                store(batch, batch_first, expected - 1)
                batch = []
                batch_first = expected
    except Truncated as exc:
        raise PeerTruncated(exc.first_seq) from None
    except (ConnectionError, Rejected) as exc:
        if batch:  # keep what arrived intact before the peer stopped
            store(batch, batch_first, expected - 1)
        if not _lacks_range(exc):
            raise  # the peer went away (died, lost its power) or is busy: it may still have the range
        raise CatchUpError(f"{exc}") from None
    finally:
        await stream.aclose()
