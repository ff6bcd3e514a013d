"""The priority lane on a real three-node cluster (``cluster.batcher``): under bulk load that
keeps the leader's queue full, an admin submit is sequenced ahead of the queued bulk submits,
and only a bounded number of bulk entries (what Raft already carried) get numbers between its
invoke and its own number. A figure of order, not of time: the machine's load does not blur it.
And at the gateway: a priority connection's ack is written from the tick that committed it.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from types import SimpleNamespace

from cluster_harness import ClusterHarness, run_seed
from test_credentials import make_file
from test_gateway_io import recorded_connection

from raftseq.clients import SequencerClient
from raftseq.cluster.gateway import Connection
from raftseq.cluster.local import LEADER_TIMEOUT_S, free_base_port
from raftseq.sequencer import protocol
from raftseq.sequencer.machine import EntryResult, Outcome

#: Bulk clients in this process, their windows and SubmitBatch sizes: together they keep far
#: more submits outstanding than the pipeline carries, so that most wait in the leader's queue.
BULK_CLIENTS = 3
BULK_WINDOW = 4000
BULK_BATCH = 100
#: The pipeline (batches of up to ENTRIES_MAX, IN_FLIGHT_MAX of them) and the bound on bulk
#: entries in flight while priority traffic is recent.
ENTRIES_MAX = 200
IN_FLIGHT_MAX = 8
BULK_IN_FLIGHT_MAX = 100
#: Bulk submits acknowledged before the admin submits start (the load is established).
WARM_UP_ACKS = 10_000
ADMIN_SUBMITS = 20
#: Bound on every wait.
WAIT_S = 60.0


async def bulk_load(client: SequencerClient, highest: list[int], warm: asyncio.Event, stop: asyncio.Event) -> int:
    """Submit batches as fast as the window allows until `stop`; keep ``highest[0]`` at the
    highest sequence number acknowledged to any bulk client (`warm` set from
    ``WARM_UP_ACKS`` on). Returns how many were acked."""
    payloads = [b"b%06d" % i for i in range(BULK_BATCH)]

    def seen(future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            highest[0] = max(highest[0], max(future.result()))
            if highest[0] >= WARM_UP_ACKS:
                warm.set()

    futures = []
    while not stop.is_set():
        await asyncio.wait_for(client.wait_for_room(BULK_BATCH), WAIT_S)
        future = client.submit_batch_nowait(payloads)
        future.add_done_callback(seen)
        futures.append(future)
    done = await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
    return sum(len(seqs) for seqs in done)


async def admin_behind_bulk(endpoints: list[str], tokens: dict[str, str]) -> tuple[list[int], list[int]]:
    """Under bulk load: per admin submit, the bulk entries numbered between its invoke (the
    highest bulk number acknowledged then) and its own number, and the bulk submits
    outstanding at its invoke."""
    highest = [0]
    warm, stop = asyncio.Event(), asyncio.Event()
    bulk = [SequencerClient(endpoints, session=f"bulk-{k}", token=tokens["bulk"], in_flight_max=BULK_WINDOW) for k in range(BULK_CLIENTS)]
    admin = SequencerClient(endpoints, session="admin-1", token=tokens["admin"])
    for client in [*bulk, admin]:
        await asyncio.wait_for(client.connect(), LEADER_TIMEOUT_S)
    loads = [asyncio.create_task(bulk_load(client, highest, warm, stop)) for client in bulk]
    ahead, outstanding = [], []
    try:
        await asyncio.wait_for(warm.wait(), WAIT_S)
        for _ in range(ADMIN_SUBMITS):
            before = highest[0]
            waiting = sum(client.in_flight for client in bulk)
            seq = await asyncio.wait_for(admin.submit(b"reference data"), WAIT_S)
            ahead.append(seq - before - 1)
            outstanding.append(waiting)
    finally:
        stop.set()
        acked = await asyncio.wait_for(asyncio.gather(*loads, return_exceptions=True), WAIT_S)
        for client in [*bulk, admin]:
            await client.close()
    assert all(isinstance(count, int) and count > 0 for count in acked), acked
    return ahead, outstanding


def test_an_admin_submit_is_sequenced_ahead_of_queued_bulk(tmp_path):
    path = tmp_path / "credentials.json"
    tokens = make_file(path, ("bulk", ["submit"], ["bulk-"], {}), ("admin", ["admin"], ["admin-"], {"priority": True}))
    seed = run_seed()
    overrides = {
        "credentials_file": str(path),
        "batcher": {"entries_max": ENTRIES_MAX, "in_flight_max": IN_FLIGHT_MAX, "priority_bulk_in_flight_entries_max": BULK_IN_FLIGHT_MAX},
    }
    harness = ClusterHarness(str(tmp_path / "c"), free_base_port(random.Random(seed)), seed=seed, overrides=overrides)
    try:
        harness.start(leader_timeout_s=LEADER_TIMEOUT_S)
        print(harness.describe(), flush=True)
        ahead, outstanding = asyncio.run(admin_behind_bulk(harness.endpoints, tokens))
    finally:
        harness.stop()
        print(harness.log_tails(), flush=True)
    print(f"bulk entries numbered between an admin submit's invoke and its number: {ahead}; bulk outstanding: {outstanding}")
    # The bulk load kept many more submits outstanding than Raft carries: most were queued.
    assert statistics.median(outstanding) > 4 * IN_FLIGHT_MAX * ENTRIES_MAX
    # The first admin submit finds the pipeline full of bulk (nothing held it back before): up
    # to IN_FLIGHT_MAX x ENTRIES_MAX (1,600) ahead, and the old lane let every one find that.
    # The others find at most BULK_IN_FLIGHT_MAX bulk entries in Raft; the count adds what
    # committed while the bulk acks were on their way to this process, and up to a SubmitBatch
    # per bulk client (``highest`` moves once all of a batch's acks are in): ~300 seen, ~3,000
    # with the old lane.
    later = ahead[1:]
    assert statistics.median(later) <= 6 * BULK_IN_FLIGHT_MAX, ahead
    assert sum(1 for count in later if count <= 8 * BULK_IN_FLIGHT_MAX) >= 0.75 * len(later), ahead


def fake_connection(gateway: SimpleNamespace, *, priority: bool) -> tuple[Connection, list[bytes]]:
    """A gateway connection whose writes are recorded, of a credential with `priority` or not."""
    conn, written = recorded_connection(gateway)
    conn.grant = SimpleNamespace(priority=priority)
    conn.session = "admin-1" if priority else "bulk-1"
    conn.in_flight, conn.in_flight_bytes = 3, 300
    return conn, written


def test_a_priority_connections_ack_is_written_from_the_tick_that_committed_it():
    async def story() -> None:
        loop = asyncio.get_running_loop()
        gateway = SimpleNamespace(
            waiting_for_room=0, room_freed=asyncio.Event(), metrics=SimpleNamespace(), flush_later=lambda conn: loop.call_soon(conn.flush)
        )
        bulk, bulk_written = fake_connection(gateway, priority=False)
        admin, admin_written = fake_connection(gateway, priority=True)
        # One tick answers a bulk run, then the admin's submits (a run, and a fenced one).
        bulk.sequenced(1, 10, 1, 100)
        admin.sequenced(1, 11, 1, 100)
        assert admin_written == [protocol.encode_frame(protocol.Ack(1, 11))], "the ack waited for the loop's next turn"
        admin.reply(2, EntryResult("admin-1", 2, Outcome.SEQUENCED, 12), 100)
        assert admin_written[1:] == [protocol.encode_frame(protocol.Ack(2, 12))]
        assert bulk_written == [], "bulk acks go out on the loop's next turn, as before"
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(done.set_result, None)
        await done
        assert bulk_written == [protocol.encode_frame(protocol.Ack(1, 10))]
        assert len(admin_written) == 2, "written twice"

    asyncio.run(asyncio.wait_for(story(), WAIT_S))
