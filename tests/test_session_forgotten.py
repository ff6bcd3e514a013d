"""A client whose session the cluster no longer holds (``clients.errors.SessionForgotten``),
and one whose submits a node refuses for a while (``Busy``), as a failing disk makes it.

After a power cut of every node of a cluster in the ``crash`` durability, the cluster restarts
on what was fsynced: numbering restarts lower and a session's acknowledged submits may be gone,
so it answers the session's next submit with ``sequence_gap`` and an expected client_seq the
client already had acknowledged (an idle session forgotten, or evicted, looks the same). A
resend meets the same gap every time: the client must stop with a typed error, not go on
failing each submit with a bare ``sequence_gap``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from scripted_node import SCENARIO_TIMEOUT_S, ScriptedConnection, scripted_client

from raftseq.clients import Rejected, SessionForgotten
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason


def test_a_sequence_gap_below_what_was_acknowledged_stops_the_client_with_session_forgotten():
    async def before_the_cut(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.submits(3) == [1, 2, 3]
        conn.send(protocol.AckRange(1, 101, 3))
        assert await conn.submits(1) == [4]
        await conn.writer.drain()  # then every node loses power: 4 is never answered

    async def after_the_cut(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.submits(1) == [4], "the unacknowledged submit, again"
        # The restarted cluster holds nothing of the session: it expects client_seq 1.
        conn.send(protocol.Rejected(RejectReason.SEQUENCE_GAP, "gap", client_seq=4, expected_client_seq=1))
        await conn.hold_until_stopped()

    async def scenario() -> None:
        async with scripted_client([before_the_cut, after_the_cut], session="orders", heartbeat_timeout_s=30) as (node, c):
            await c.connect()
            acked = await asyncio.wait_for(asyncio.gather(*(c.submit_nowait(b"m%d" % i) for i in range(1, 4))), SCENARIO_TIMEOUT_S)
            assert acked == [101, 102, 103]
            fourth = c.submit_nowait(b"m4")
            with pytest.raises(SessionForgotten) as forgotten:
                await asyncio.wait_for(fourth, SCENARIO_TIMEOUT_S)
            error = forgotten.value
            assert isinstance(error, Rejected) and error.reason is RejectReason.SEQUENCE_GAP
            assert (error.session, error.expected_client_seq, error.last_acked) == ("orders", 1, 3)
            assert "make a new client" in str(error)
            # Every later call fails at once with the same error: nothing more is sent.
            with pytest.raises(SessionForgotten):
                await asyncio.wait_for(c.submit(b"m5"), SCENARIO_TIMEOUT_S)
            with pytest.raises(SessionForgotten):
                c.submit_nowait(b"m6")
        assert node.connections == 2, "the client stopped: it did not reconnect to try again"

    asyncio.run(scenario())


def test_a_sequence_gap_above_what_was_acknowledged_is_still_a_resend():
    """The usual gap (an earlier submit refused Busy): the refused one and those after it go again."""

    async def leader(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.submits(3) == [1, 2, 3]
        conn.send(protocol.Ack(1, 101), protocol.Busy(2, 1, "leader_queue"))
        conn.send(protocol.Rejected(RejectReason.SEQUENCE_GAP, "gap", client_seq=3, expected_client_seq=2))
        assert await conn.submits(2) == [2, 3]
        conn.send(protocol.AckRange(2, 102, 2))
        await conn.hold_until_stopped()

    async def scenario() -> None:
        async with scripted_client([leader], session="orders", heartbeat_timeout_s=30) as (_, c):
            await c.connect()
            seqs = await asyncio.wait_for(asyncio.gather(*(c.submit_nowait(b"m%d" % i) for i in range(1, 4))), SCENARIO_TIMEOUT_S)
            assert seqs == [101, 102, 103]

    asyncio.run(scenario())


def test_a_busy_submit_is_sent_again_after_the_wait_the_node_asked_for():
    """A node refusing for a stalled disk says ``retry_after_ms=500``: resending every 20 ms
    only has it refuse again (400,000 refusals in 8 s were seen in the stalled-disk test)."""
    resent_after = []

    async def leader(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.submits(1) == [1]
        refused_at = time.monotonic()
        conn.send(protocol.Busy(1, 300, "raft_log_backlog"))
        assert await conn.submits(1) == [1]
        resent_after.append(time.monotonic() - refused_at)
        conn.send(protocol.Busy(1, 20, "leader_queue"))  # the next wait is the shorter one again
        refused_at = time.monotonic()
        assert await conn.submits(1) == [1]
        resent_after.append(time.monotonic() - refused_at)
        conn.send(protocol.Ack(1, 7))
        await conn.hold_until_stopped()

    async def scenario() -> None:
        async with scripted_client([leader], session="orders", heartbeat_timeout_s=30) as (_, c):
            assert await asyncio.wait_for(c.submit(b"m"), SCENARIO_TIMEOUT_S) == 7

    asyncio.run(scenario())
    assert resent_after[0] >= 0.29, f"resent {resent_after[0] * 1000:.0f} ms after a Busy asking for 300 ms"
    assert resent_after[1] < 0.25, f"resent {resent_after[1] * 1000:.0f} ms after a Busy asking for 20 ms"
