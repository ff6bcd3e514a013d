"""Catch-up gives up on a range only when a peer that answered lacks it: a peer that goes away
in the middle of a fetch (its process died, its power was cut) is unreachable, like one that
does not answer at all, and may still have the range when it is back.

Power-cut soak, seed 20261207, round 7 (durability power): n3 was fetching a hole from n2 when
the power of n1 and n2 was cut; "n2 closed the connection" counted as a refusal, five failed
connects made six misses in 3 s, and n3 stopped for good with "no peer could repair it".
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

from raftseq.clients.errors import Truncated
from raftseq.cluster import catchup
from raftseq.cluster.node_exit import NodeCannotRun
from raftseq.sequencer.protocol.frames import RejectReason

ATTEMPTS_MAX = 3
#: Fetches the test lets run: well past ``ATTEMPTS_MAX``.
FETCHES = 4 * ATTEMPTS_MAX


class _HoleJournal:
    """A journal lacking 5..10 (``catchup.HoleJournal``)."""

    def __init__(self) -> None:
        self.holes = [(5, 10)]
        self.fill_next_seq = 5
        self.repair_range = None
        self.damage = SimpleNamespace(covering=lambda seq: None, next_from=lambda seq: None)

    def fill(self, records: bytes, first_seq: int, last_seq: int) -> None:
        raise AssertionError("nothing arrives in this test")


class _Peers:
    """Stands in for ``open_connection``: by address, a peer that accepts the subscription and
    then closes the connection, one that cannot be reached, or one that refuses (lacks the
    range). Stops the catch-up after ``FETCHES`` connects."""

    def __init__(self, behaviour: dict[str, str], stop: asyncio.Event) -> None:
        self.behaviour = behaviour
        self.stop = stop
        self.connects = 0

    async def open_connection(self, address: str, **kwargs):
        self.connects += 1
        if self.connects >= FETCHES:
            self.stop.set()
        what = self.behaviour[address]
        if what == "unreachable":
            raise ConnectionRefusedError(111, "Connect call failed")
        return _Connection(what, address)


class _Connection:
    def __init__(self, what: str, address: str) -> None:
        self.what, self.address = what, address

    def subscribe(self, start: int, **kwargs):
        return _Stream(self.what, self.address)

    def close(self) -> None:
        pass


class _Stream:
    def __init__(self, what: str, address: str) -> None:
        self.what, self.address = what, address

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.what == "closes":
            raise ConnectionError(f"{self.address} closed the connection")
        # as ``clients.connection.refusal`` raises a peer's Rejected(from_seq_unavailable)
        raise ConnectionError(f"{RejectReason.FROM_SEQ_UNAVAILABLE.value}: seq 5 is in a hole on this node")

    async def aclose(self) -> None:
        pass


def _run(behaviour: dict[str, str], monkeypatch) -> int:
    """Run a catch-up of the hole against peers behaving as given, until ``FETCHES`` connects
    or until it gives up (``NodeCannotRun``, raised here); returns the connects made."""
    monkeypatch.setattr(catchup, "RETRY_DELAY_S", 0.0)

    async def scenario() -> int:
        stop = asyncio.Event()
        peers = _Peers(behaviour, stop)
        monkeypatch.setattr(catchup, "open_connection", peers.open_connection)
        task = catchup.CatchUp(
            _HoleJournal(),
            [SimpleNamespace(id=f"n{i}", client_address=address) for i, address in enumerate(behaviour, start=2)],
            node_id="n1",
            token="",
            verify_failures=Counter(),
            on_filled=lambda: None,
            repair_attempts_max=ATTEMPTS_MAX,
        )
        runner = asyncio.create_task(task.run())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([runner, waiter], return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            waiter.cancel()
            runner.result()  # raises what stopped it
        runner.cancel()
        return peers.connects

    return asyncio.run(scenario())


def test_a_peer_that_goes_away_mid_fetch_is_unreachable_not_lacking(monkeypatch):
    connects = _run({"a:1": "closes", "b:2": "unreachable"}, monkeypatch)
    assert connects >= FETCHES


def test_peers_that_answer_and_lack_the_range_still_end_the_node(monkeypatch):
    with pytest.raises(NodeCannotRun, match="no peer could repair it"):
        _run({"a:1": "refuses", "b:2": "unreachable"}, monkeypatch)


class _StartHoleJournal(_HoleJournal):
    """A journal that joined empty: it lacks 1..10 and starts with that hole."""

    def __init__(self) -> None:
        super().__init__()
        self.holes = [(1, 10)]
        self.fill_next_seq = 1
        self.first_seq = 1
        self.started_at = 0

    def start_at(self, seq: int) -> None:
        self.started_at = seq
        self.holes = []


class _TruncatedStream(_Stream):
    async def __anext__(self):
        raise Truncated(1, 7)  # the peer's retention removed 1..6


def test_a_removed_peer_does_not_keep_a_journal_behind_retention_waiting(monkeypatch):
    """The ops soak (1 run in 2 of its short test): n4 replaced n2 and joined behind every
    peer's retention; catch-up asked the peers of n4's config, n2 among them, gone since its
    removal: "truncated everywhere" never held, and after a few attempts n4 stopped with "no
    peer could repair it". Catch-up asks the current members."""
    monkeypatch.setattr(catchup, "RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(_Connection, "subscribe", lambda self, start, **kwargs: _TruncatedStream(self.what, self.address))

    async def scenario() -> _StartHoleJournal:
        stop = asyncio.Event()
        peers = _Peers({"a:1": "truncated", "b:2": "unreachable"}, stop)
        monkeypatch.setattr(catchup, "open_connection", peers.open_connection)
        journal = _StartHoleJournal()
        configured = [SimpleNamespace(id="n3", client_address="a:1"), SimpleNamespace(id="n2", client_address="b:2")]
        task = catchup.CatchUp(
            journal,
            configured,
            node_id="n4",
            token="",
            verify_failures=Counter(),
            on_filled=stop.set,
            repair_attempts_max=ATTEMPTS_MAX,
            members=lambda: configured[:1],  # n2 was removed
        )
        runner = asyncio.create_task(task.run())
        await asyncio.wait_for(stop.wait(), 10)
        runner.cancel()
        return journal

    journal = asyncio.run(scenario())
    assert journal.started_at == 7 and journal.holes == []
