"""A gateway's reads and writes off its connections' tasks.

What connections queue is written once per connection: by the loop's next turn, or sooner by
``Gateway.flush_queued`` (a leader's Raft tick calls it right after applying committed batches,
before it sends its next AppendEntries round). What a client sends is handled as the transport
hands it over (``TakingStream``) when the connection's task waits for it with nothing buffered,
never ahead of bytes buffered before it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from raftseq.cluster.gateway import Connection, Gateway, TakingStream
from raftseq.cluster.local import free_base_port, local_configs
from raftseq.cluster.metrics import NodeMetrics
from raftseq.sequencer import protocol
from test_batcher import FakeRaft, drain, make_batcher

WAIT_S = 10.0


def recorded_connection(gateway: Gateway, reader: asyncio.StreamReader | None = None) -> tuple[Connection, list[bytes]]:
    written: list[bytes] = []
    transport = SimpleNamespace(write_buffer_bytes=0)
    transport.get_write_buffer_size = lambda: transport.write_buffer_bytes
    drained = asyncio.Event()
    drained.set()
    writer = SimpleNamespace(
        get_extra_info=lambda name: ("127.0.0.1", 1), write=written.append, transport=transport, drained=drained, drain=drained.wait
    )
    conn = Connection(gateway, reader, writer)
    conn.session = "s"
    return conn, written


async def next_turn() -> None:
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


def test_queued_acks_go_out_in_one_write_per_connection_at_once_or_on_the_next_turn(tmp_path) -> None:
    config = local_configs(str(tmp_path), free_base_port(), insecure=True)[0]

    async def story() -> None:
        gateway = Gateway(config, None, batcher=None, journal=None, publication=None, metrics=NodeMetrics())
        a, a_written = recorded_connection(gateway)
        b, b_written = recorded_connection(gateway)
        a.ack(1, 10)
        a.ack(2, 11)
        b.ack(1, 12)
        assert a_written == b_written == [], "written before the apply step ended"
        gateway.flush_queued()
        assert a_written == [protocol.encode_frame(protocol.AckRange(1, 10, 2))], a_written
        assert b_written == [protocol.encode_frame(protocol.Ack(1, 12))], b_written
        await next_turn()
        assert len(a_written) == 1 and len(b_written) == 1, "written twice"
        # Without an apply step (a follower's subscribers, a refusal): on the loop's next turn.
        a.ack(3, 13)
        b.send(protocol.Heartbeat())
        await next_turn()
        assert a_written[1:] == [protocol.encode_frame(protocol.Ack(3, 13))], a_written
        assert b_written[1:] == [protocol.encode_frame(protocol.Heartbeat())], b_written
        gateway.flush_queued()
        await next_turn()
        assert len(a_written) == 2 and len(b_written) == 2, "written twice"

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


class RecordingNode:
    """What the gateway asks of its node for a status or membership request, recorded."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def status(self) -> protocol.Frame:
        self.asked.append("status")
        return protocol.Heartbeat(len(self.asked))

    def member_request(self, request: protocol.MemberRequest, answer) -> None:
        self.asked.append("member")


def test_a_read_is_handled_as_it_arrives_but_never_ahead_of_bytes_buffered_before_it(tmp_path) -> None:
    """An idle connection's request is handled inside the transport's callback (not on the
    loop's next turn: at 10k msg/s send -> ack p50 2.09 -> 1.47 ms). Bytes the gateway could not
    take at once (answers piling up unread) are buffered for the connection's task, and what
    arrives after them waits its turn behind them."""
    config = local_configs(str(tmp_path), free_base_port(), insecure=True)[0]
    status = protocol.encode_frame(protocol.StatusRequest())
    member = protocol.encode_frame(protocol.MemberRequest("list"))

    async def story() -> None:
        node = RecordingNode()
        gateway = Gateway(config, node, batcher=None, journal=None, publication=None, metrics=NodeMetrics())
        reader = TakingStream(loop=asyncio.get_running_loop())
        conn, written = recorded_connection(gateway, reader)
        reading = asyncio.create_task(read_frames(gateway, conn))
        try:
            await next_turn()
            assert conn.reading
            reader.feed_data(status)
            assert node.asked == ["status"], "handled on a later turn, not as it arrived"
            # Answers pile up unread: the next bytes wait for the task, and so do those after them.
            conn.writer.transport.write_buffer_bytes = 2 * config.gateway.subscriber_buffer_bytes_max
            conn.writer.drained.clear()
            reader.feed_data(status)
            reader.feed_data(member)
            assert node.asked == ["status"], node.asked
            await asyncio.wait_for(wait_asked(node, 3), WAIT_S)
            assert node.asked == ["status", "status", "member"], "handled out of order"
            # The task now waits for the client to read its answers: nothing is taken meanwhile.
            await next_turn()
            assert not conn.reading and reader.unread_bytes == 0
            conn.writer.transport.write_buffer_bytes = 0
            reader.feed_data(status)
            assert node.asked == ["status", "status", "member"], "taken while the task waited for the client to read"
            conn.writer.drained.set()
            await asyncio.wait_for(wait_asked(node, 4), WAIT_S)
            await next_turn()
            assert conn.reading and reader.unread_bytes == 0
            reader.feed_data(member)
            assert node.asked == ["status", "status", "member", "status", "member"], node.asked
        finally:
            reading.cancel()

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


async def read_frames(gateway: Gateway, conn: Connection) -> None:
    async with asyncio.timeout(None) as deadline:
        await gateway._read_frames(conn, protocol.FrameReader("client"), deadline)


async def wait_asked(node: RecordingNode, count: int) -> None:
    while len(node.asked) < count:
        await next_turn()


def answers(written: list[bytes]) -> list[tuple[str, int]]:
    """The answers to submits in what a connection wrote, but acks: (frame type, client_seq)."""
    frames = protocol.FrameReader("node").feed(b"".join(written))
    return [(type(f).__name__, f.client_seq) for f in frames if not isinstance(f, (protocol.Ack, protocol.AckRange))]


class LeadingNode:
    """A node that leads, with room on its disk and in its Raft log."""

    disk_low = False

    def is_leader(self) -> bool:
        return True

    def raft_log_backlogged(self) -> bool:
        return False

    def leader_client_address(self) -> str:
        return ""


def test_after_a_busy_only_the_refused_submit_is_answered_until_the_client_sends_it_again(tmp_path) -> None:
    """A session's submits are sequenced in client_seq order, so after ``Busy`` for one the client
    sends it and all after it again. What it sent behind it meanwhile is refused unanswered:
    each of those answers made the client send its whole window again, and those taken reached
    Raft only to be refused there (sequence gap). A bulk credential over its quota of 100k msg/s
    fell to 7k msg/s at 114 us of leader CPU per message (``bench_priority
    --bulk-messages-per-s 100000``)."""
    overrides = {"gateway": {"in_flight_per_session_max": 5}}
    config = local_configs(str(tmp_path), free_base_port(), insecure=True, overrides=overrides)[0]

    def batch(first: int, count: int) -> protocol.SubmitBatch:
        return protocol.SubmitBatch(first, [b"p%d" % i for i in range(first, first + count)])

    async def story() -> None:
        raft = FakeRaft()
        batcher = make_batcher(raft)
        gateway = Gateway(config, LeadingNode(), batcher=batcher, journal=None, publication=None, metrics=NodeMetrics())
        conn, written = recorded_connection(gateway)
        conn.grant = gateway.access.shared
        gateway._dispatch(conn, batch(1, 8))  # 1..5 taken, 6 refused (and 7, 8 behind it)
        gateway._dispatch(conn, batch(9, 4))  # sent before the client heard of the Busy
        gateway.flush_queued()
        assert answers(written) == [("Busy", 6)]
        assert [key for p in raft.proposals for key in p.keys] == [("s", i) for i in range(1, 6)]
        raft.commit_all_new(raft.proposals[0])
        await drain()
        written.clear()
        gateway._dispatch(conn, batch(6, 7))  # the client sends 6 and everything after it again
        gateway.flush_queued()
        assert answers(written) == [("Busy", 11)]
        assert [key for p in raft.proposals[1:] for key in p.keys] == [("s", i) for i in range(6, 11)]
        assert gateway.metrics.refusals["busy"] == 3 + 4 + 2

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


def test_a_read_completing_a_frame_begun_earlier_is_taken_only_if_the_whole_frame_fits(tmp_path) -> None:
    """A SubmitBatch of 1 KiB payloads spans several reads. Each read was checked against the
    connection's byte bound alone, so the read completing a frame that did not fit was taken,
    and the submits past the bound were answered Busy: the client resent everything behind
    them (67,388 resubmits in a run of 200,000 1 KiB messages). The frame must wait for room."""
    config = local_configs(str(tmp_path), free_base_port(), insecure=True)[0]
    bound = config.gateway.in_flight_bytes_per_connection_max
    frame = protocol.encode_frame(protocol.SubmitBatch(2, [bytes(1024)] * 60))

    async def story() -> None:
        raft = FakeRaft()
        gateway = Gateway(config, LeadingNode(), batcher=make_batcher(raft), journal=None, publication=None, metrics=NodeMetrics())
        reader = TakingStream(loop=asyncio.get_running_loop())
        conn, written = recorded_connection(gateway, reader)
        conn.grant = gateway.access.shared
        # One submit in flight, and room for less than the frame's 60 KiB but more than half of it.
        conn.in_flight, conn.in_flight_bytes = 1, bound - 40 * 1024
        reading = asyncio.create_task(read_frames(gateway, conn))
        try:
            await next_turn()
            half = len(frame) // 2
            reader.feed_data(frame[:half])
            reader.feed_data(frame[half:])
            await next_turn()
            await next_turn()
            assert answers(written) == [], "a frame that did not fit was taken and refused"
            assert raft.proposals == [], "submits past the byte bound were proposed"
            conn.in_flight_bytes = 0  # the submit in flight was answered
            gateway.room_freed.set()
            await asyncio.wait_for(wait_proposed(raft, 60), WAIT_S)
            assert [key for p in raft.proposals for key in p.keys] == [("s", i) for i in range(2, 62)]
        finally:
            reading.cancel()

    asyncio.run(asyncio.wait_for(story(), WAIT_S))


async def wait_proposed(raft: FakeRaft, entries: int) -> None:
    """Until `entries` were proposed, committing each batch (a batch holds at most 64 KiB)."""
    while sum(len(p.batch.entries) for p in raft.proposals) < entries:
        for proposal in raft.proposals:
            if not proposal.answered:
                raft.commit_all_new(proposal)
        await next_turn()
