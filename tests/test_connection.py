"""The one client connection (``clients.connection``) against a scripted node on loopback:
the handshake and its refusals, frames that arrive with the welcome, a damaged stream,
requests, checked and raw subscriptions, raw bytes, and the heartbeats a reader that never
writes must send."""

from __future__ import annotations

import asyncio
import time

import pytest
from scripted_node import SCENARIO_TIMEOUT_S, ScriptedConnection, ScriptedNode

from raftseq.clients.connection import Connection, Rejected, open_connection
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason, Role


def delivered(seq: int) -> protocol.Delivered:
    return protocol.Delivered(seq, 1_000 + seq, "w", seq, b"m%d" % seq)


def welcome(interval_ms: int = 500) -> protocol.Welcome:
    return protocol.Welcome("n1", protocol.PROTOCOL_VERSION, Role.FOLLOWER, "127.0.0.1:1", 7, interval_ms)


def run(scripts: list, client) -> tuple[object, ScriptedNode]:
    """Run `client(address)` against a node following `scripts`; the client's result and the
    node (its errors checked)."""

    async def scenario():
        node = ScriptedNode(scripts)
        address = await node.start()
        try:
            return await asyncio.wait_for(client(address), SCENARIO_TIMEOUT_S), node
        finally:
            await node.stop()

    result, node = asyncio.run(scenario())
    assert not node.errors, node.errors
    return result, node


async def connect(address: str, **options) -> Connection:
    return await open_connection(address, session="s1", token="t", timeout_s=SCENARIO_TIMEOUT_S, **options)


def test_the_handshake_says_hello_and_keeps_the_frames_that_came_with_the_welcome():
    async def node(conn: ScriptedConnection) -> None:
        hello = await conn.next_frame()
        assert hello == protocol.Hello("s1", "t", protocol.PROTOCOL_VERSION, 3)
        conn.send(welcome(), delivered(1))
        await conn.hold_until_stopped()

    async def client(address: str) -> tuple:
        connection = await connect(address, last_acked=3)
        try:
            return connection.welcome, await connection.receive(1.0)
        finally:
            connection.close()

    (got_welcome, first), _ = run([node], client)
    assert got_welcome == welcome()
    assert first == [delivered(1)]


@pytest.mark.parametrize(
    "answer, error",
    [
        (protocol.Rejected(RejectReason.AUTH_FAILED, "token"), Rejected),
        (protocol.Delivered(1, 1, "w", 1, b""), None),  # no welcome, then closed
    ],
    ids=["rejected", "closed-before-welcome"],
)
def test_a_refused_or_cut_handshake_raises(answer, error):
    async def node(conn: ScriptedConnection) -> None:
        await conn.next_frame()
        conn.send(answer)
        await conn.writer.drain()

    async def client(address: str) -> BaseException:
        with pytest.raises(Exception) as caught:
            await connect(address)
        return caught.value

    raised, _ = run([node], client)
    if error is Rejected:
        assert isinstance(raised, Rejected) and raised.reason is RejectReason.AUTH_FAILED
    else:
        assert isinstance(raised, ConnectionError) and "handshake" in str(raised)


def test_good_frames_before_a_damaged_one_are_returned_then_the_stream_fails():
    async def node(conn: ScriptedConnection) -> None:
        await conn.welcome()
        bad = bytearray(protocol.encode_frame(delivered(2)))
        bad[-1] ^= 0xFF  # the body no longer matches its checksum
        conn.writer.write(protocol.encode_frame(delivered(1)) + bytes(bad))
        await conn.hold_until_stopped()

    async def client(address: str) -> tuple:
        connection = await connect(address)
        try:
            first = await connection.receive(5.0)
            with pytest.raises(ConnectionError, match="checksum"):
                await connection.receive(5.0)
            return first
        finally:
            connection.close()

    first, _ = run([node], client)
    assert first == [delivered(1)]


def test_a_request_returns_the_first_answer_of_its_type():
    status = protocol.Status("n1", Role.LEADER, "", 3, 40, 39, 1, pid=12)

    async def node(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.next_frame() == protocol.StatusRequest()
        conn.send(protocol.Heartbeat(39), status)
        assert await conn.next_frame() == protocol.SnapshotQuery("book")
        conn.send(protocol.Rejected(RejectReason.BAD_FRAME, "unknown tag"))
        await conn.hold_until_stopped()

    async def client(address: str) -> protocol.Status:
        connection = await connect(address)
        try:
            got = await connection.status(5.0)
            with pytest.raises(ConnectionError, match="bad_frame"):
                await connection.request(protocol.SnapshotQuery("book"), protocol.SnapshotList, 5.0)
            return got
        finally:
            connection.close()

    got, _ = run([node], client)
    assert got == status


def test_a_checked_subscription_stops_at_a_wrong_number_and_raw_mode_yields_it():
    async def node(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.next_frame() == protocol.Subscribe(5)
        conn.send(delivered(5), delivered(6), delivered(8), delivered(8))
        await conn.hold_until_stopped()

    async def read(address: str, checked: bool) -> tuple[list[int], BaseException | None]:
        connection = await connect(address)
        seqs: list[int] = []
        try:
            async for frames in connection.subscribe(5, silence_s=5.0, checked=checked):
                seqs += [f.seq for f in frames]
                if len(seqs) == 4:
                    break
        except ConnectionError as exc:
            return seqs, exc
        finally:
            connection.close()
        return seqs, None

    (seqs, error), _ = run([node], lambda a: read(a, True))
    assert seqs == [5, 6] and "sent seq 8, expected 7" in str(error)
    (seqs, error), _ = run([node], lambda a: read(a, False))
    assert seqs == [5, 6, 8, 8] and error is None


def test_keep_raw_gives_each_record_with_its_bytes_and_raw_bytes_are_undecoded():
    async def node(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.next_frame() == protocol.Subscribe(1)
        conn.send(delivered(1), delivered(2))
        await conn.hold_until_stopped()

    async def records(address: str) -> list:
        connection = await connect(address, keep_raw=True)
        try:
            async for items in connection.subscribe(1, silence_s=5.0):
                return items
        finally:
            connection.close()

    async def raw_bytes(address: str) -> bytes:
        connection = await connect(address)
        try:
            connection.send(protocol.Subscribe(1))
            data = b""
            want = len(protocol.encode_frame(delivered(1)) + protocol.encode_frame(delivered(2)))
            while len(data) < want:
                data += await connection.receive_bytes(5.0)
            return data
        finally:
            connection.close()

    items, _ = run([node], records)
    assert items == [(delivered(1), protocol.encode_frame(delivered(1))), (delivered(2), protocol.encode_frame(delivered(2)))]
    data, _ = run([node], raw_bytes)
    assert data == protocol.encode_frame(delivered(1)) + protocol.encode_frame(delivered(2))


def test_a_reader_that_never_writes_answers_with_a_heartbeat_per_interval():
    """The node closes a connection silent for its idle timeout. A subscriber reading a long
    stream sends nothing of its own: the connection says Heartbeat once per interval the node
    gave in its welcome, however busy the stream keeps it."""
    interval_ms = 100
    stream_s = 1.0
    beats: list[float] = []

    async def node(conn: ScriptedConnection) -> None:
        await conn.next_frame()
        conn.send(welcome(interval_ms))
        assert await conn.next_frame() == protocol.Subscribe(1)

        async def count_heartbeats() -> None:
            framer = protocol.FrameReader("client")
            while True:
                data = await conn.reader.read(65536)
                if not data:
                    return
                beats.extend(time.monotonic() for f in framer.feed(data) if isinstance(f, protocol.Heartbeat))

        counter = asyncio.create_task(count_heartbeats())
        seq = 1
        started = time.monotonic()
        while time.monotonic() - started < stream_s:
            conn.send(*(delivered(s) for s in range(seq, seq + 50)))
            seq += 50
            await conn.writer.drain()
            await asyncio.sleep(0.005)
        counter.cancel()

    async def client(address: str) -> int:
        connection = await connect(address)
        count = 0
        try:
            async for frames in connection.subscribe(1, silence_s=5.0):
                count += len(frames)
        except ConnectionError:
            pass
        finally:
            connection.close()
        return count

    count, _ = run([node], client)
    expected = stream_s * 1000 / interval_ms
    assert count > 1000
    assert expected - 3 <= len(beats) <= expected + 1, f"{len(beats)} heartbeats in {stream_s} s at one per {interval_ms} ms"
