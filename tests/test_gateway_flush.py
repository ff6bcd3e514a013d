"""What a gateway's connections queue is written once per connection: by the loop's next turn,
or sooner by ``Gateway.flush_queued`` (a leader's Raft tick calls it right after applying
committed batches, before it sends its next AppendEntries round)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from raftseq.cluster.gateway import Connection, Gateway
from raftseq.cluster.local import free_base_port, local_configs
from raftseq.cluster.metrics import NodeMetrics
from raftseq.sequencer import protocol

WAIT_S = 10.0


def recorded_connection(gateway: Gateway) -> tuple[Connection, list[bytes]]:
    written: list[bytes] = []
    writer = SimpleNamespace(get_extra_info=lambda name: ("127.0.0.1", 1), write=written.append)
    conn = Connection(gateway, None, writer)
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
