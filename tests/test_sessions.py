"""Sessions on a real cluster: two clients that share one session name, the reserved
``@snap/`` prefix. (The machine's rules are unit-tested in ``tests/test_machine.py``.)"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from cluster_harness import ClusterHarness, RawConnection, pipeline, running_cluster  # noqa: F401

from raftseq.clients import Busy, Rejected, SequencerClient, SequencerError, SessionTakenOver
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason

#: Submits each of the two clients makes.
SUBMITS = 300
#: Seconds the two clients get to finish.
RUN_TIMEOUT_S = 60.0


async def _submit_all(client: SequencerClient, name: bytes) -> tuple[dict[int, bytes], list[Exception]]:
    """Submit SUBMITS payloads as fast as the window allows; (seq -> payload acked, errors)."""
    acked: dict[int, bytes] = {}
    errors: list[Exception] = []
    futures = []
    for i in range(SUBMITS):
        payload = b"%s-%d" % (name, i)
        try:
            await client.wait_for_room()
            futures.append((payload, client.submit_nowait(payload)))
        except SequencerError as exc:
            errors.append(exc)
            break
        await asyncio.sleep(0)  # let the other client interleave
    for payload, future in futures:
        try:
            acked[await future] = payload
        except SequencerError as exc:
            errors.append(exc)
    return acked, errors


def test_two_clients_on_one_session_never_get_an_ack_for_the_other_clients_payload(running_cluster):
    """Defect: the second client's submits were acknowledged as duplicates of the first's
    (same client_seq, other payload): acknowledged, yet its payload is in no journal."""
    h: ClusterHarness = running_cluster

    async def run() -> tuple[dict, dict, list, list]:
        a = SequencerClient(h.endpoints, session="x", token=h.token, in_flight_max=16)
        b = SequencerClient(h.endpoints, session="x", token=h.token, in_flight_max=16)
        await a.connect()
        await b.connect()
        try:
            (acked_a, errors_a), (acked_b, errors_b) = await asyncio.wait_for(
                asyncio.gather(_submit_all(a, b"a"), _submit_all(b, b"b")), RUN_TIMEOUT_S
            )
        finally:
            await a.close()
            await b.close()
        return acked_a, acked_b, errors_a, errors_b

    acked_a, acked_b, errors_a, errors_b = asyncio.run(run())
    h.wait_converged(at_least=max([*acked_a, *acked_b]), timeout_s=30)
    h.stop()
    journal = {r.seq: r.payload for r in h.read_journal(h.node_ids[0]).records}
    print(
        f"a: {len(acked_a)} acked, errors {Counter(map(repr, errors_a))}; b: {len(acked_b)} acked, errors {Counter(map(repr, errors_b))}; journal {len(journal)}"
    )
    for who, acked in (("a", acked_a), ("b", acked_b)):
        wrong = {seq: (payload, journal.get(seq)) for seq, payload in acked.items() if journal.get(seq) != payload}
        assert not wrong, f"client {who} was acknowledged for {len(wrong)} payloads the journal does not hold: {list(wrong.items())[:3]}"
    for error in errors_a + errors_b:
        assert isinstance(error, Rejected) and error.reason.value in ("session_conflict", "session_taken_over"), repr(error)


def test_reserved_sessions_and_the_reasons_an_older_client_is_sent(running_cluster):
    """``@snap/`` sessions are refused to clients that do not publish snapshots (typed
    ``reserved_session``); a client without an owner (older than fencing) is sent reasons it
    knows (``bad_frame``, the new reason in the detail), also for a session conflict."""
    h: ClusterHarness = running_cluster
    leader = h.wait_for_leader()
    address = h.endpoint(leader["id"])

    async def sdk() -> None:
        ordinary = SequencerClient(h.endpoints, session="@snap/kv/r1", token=h.token)
        with pytest.raises(Rejected) as refused:
            await ordinary.connect()
        assert refused.value.reason is RejectReason.RESERVED_SESSION
        await ordinary.close()
        async with SequencerClient(h.endpoints, session="@snap/kv/r1", token=h.token, snapshot_publisher=True) as publisher:
            assert await publisher.submit(b"not a chunk") >= 1

    asyncio.run(sdk())
    with RawConnection(address) as old:
        answer = old.hello("@snap/kv/r2", h.token)
        assert isinstance(answer, protocol.Rejected) and answer.reason is RejectReason.BAD_FRAME
        assert answer.detail.startswith("reserved_session")
    # Two old clients (no owner: not fenced) on one session, other payloads under number 1.
    with RawConnection(address) as first, RawConnection(address) as second:
        assert isinstance(first.hello("old", h.token), protocol.Welcome)
        assert isinstance(second.hello("old", h.token), protocol.Welcome)
        first.send_frame(protocol.Submit(1, b"first"))
        acked = first.next_frame(timeout_s=10)
        assert isinstance(acked, protocol.Ack) and not acked.duplicate
        second.send_frame(protocol.Submit(1, b"second"))
        conflict = second.next_frame(timeout_s=10)
        assert isinstance(conflict, protocol.Rejected) and conflict.reason is RejectReason.BAD_FRAME, conflict
        assert conflict.detail.startswith("session_conflict") and conflict.client_seq == 1
        second.send_frame(protocol.Submit(1, b"first"))  # a true retry is still a duplicate
        retry = second.next_frame(timeout_s=10)
        assert isinstance(retry, protocol.Ack) and retry.duplicate and retry.seq == acked.seq
    with RawConnection(address) as wrong:
        assert isinstance(wrong.hello("digests", h.token), protocol.Welcome)
        wrong.send_frame(protocol.SubmitBatch(1, [b"a", b"b"], [protocol.payload_digest(b"a")]))
        refused = wrong.next_frame(timeout_s=10)
        assert isinstance(refused, protocol.Rejected) and refused.reason is RejectReason.BAD_FRAME, refused
        assert wrong.next_frame(timeout_s=10) is None  # and closed


def test_a_submit_batch_numbered_past_the_last_client_seq_is_refused_and_spoils_no_batch(running_cluster):
    """Defect: a ``SubmitBatch`` whose first_client_seq is valid but whose last is not (above
    2**63 - 1) went into a Raft batch that no node could decode: every submit in that batch,
    other sessions' too, was answered outcome-unknown and every node logged it not applied."""
    h: ClusterHarness = running_cluster
    leader = h.wait_for_leader()
    with RawConnection(h.endpoint(leader["id"])) as raw:
        assert isinstance(raw.hello("numbered-past-the-end", h.token), protocol.Welcome)
        raw.send_frame(protocol.SubmitBatch(protocol.CLIENT_SEQ_MAX, [b"last", b"past the last"]))
        refused = raw.next_frame(timeout_s=10)
        assert isinstance(refused, protocol.Rejected) and refused.reason is RejectReason.BAD_FRAME, refused
        assert raw.next_frame(timeout_s=10) is None  # and closed

    async def honest() -> int:
        async with SequencerClient(h.endpoints, session="honest", token=h.token) as client:
            return await client.submit(b"after")

    assert asyncio.run(honest()) >= 1
    assert "not applied" not in h.log_text(leader["id"])


def test_a_client_taken_over_stops_and_does_not_take_the_session_back(running_cluster):
    h: ClusterHarness = running_cluster

    async def run() -> None:
        async with SequencerClient(h.endpoints, session="desk", token=h.token) as older:
            first = await older.submit(b"older 1")
            async with SequencerClient(h.endpoints, session="desk", token=h.token) as newer:
                assert await newer.submit(b"newer 2") == first + 1
                with pytest.raises(SessionTakenOver):
                    await older.submit(b"older 3")
                with pytest.raises(SessionTakenOver):
                    older.submit_nowait(b"older 4")  # refused for good, at once
                assert not older.connected and older.reconnects <= 1
                assert await newer.submit(b"newer 3") == first + 2

    asyncio.run(run())


# --- a client window wider than the node's dedup window -----------------------------------

#: Far below the default window, so that one failover leaves resends outside it.
SMALL_DEDUP_WINDOW = 32


@pytest.mark.parametrize("running_cluster", [{"machine": {"dedup_window": SMALL_DEDUP_WINDOW}}], indirect=True)
def test_a_client_window_wider_than_the_dedup_window_survives_a_leader_kill(running_cluster):
    """A client may hold ``in_flight_max`` submits unacknowledged; after a failover it resends
    them all. The node recognises a resend only inside its dedup window, so a resend older than
    that was refused as ``stale_client_seq`` although it had been sequenced: the client failed.
    The node's welcome now says its window, and the client never holds more than that."""
    h = running_cluster
    leader = h.wait_for_leader()
    payloads = [b"wide-window-%d" % n for n in range(1, 1201)]

    async def scenario() -> list[int]:
        async with SequencerClient(h.endpoints, token=h.token, session="wide", in_flight_max=1000) as client:
            acked = 0
            killed = asyncio.Event()

            def on_ack(_future: asyncio.Future) -> None:
                nonlocal acked
                acked += 1
                if acked == 300 and not killed.is_set():
                    killed.set()
                    h.kill(leader["id"])

            seqs = await pipeline(client, payloads, timeout_s=120, on_ack=on_ack)
            assert client.in_flight_max == SMALL_DEDUP_WINDOW, "the client holds more than the node can recognise"
            after = [client.submit_nowait(b"after-%d" % n) for n in range(SMALL_DEDUP_WINDOW)]
            with pytest.raises(Busy):
                client.submit_nowait(b"one too many")
            # Acknowledged before the client closes (closing fails what is not: ClientClosed).
            await asyncio.wait_for(asyncio.gather(*after), timeout=60)
            return seqs

    seqs = asyncio.run(scenario())
    assert len(set(seqs)) == len(payloads)
    h.restart(leader["id"])
    h.wait_converged(len(payloads) + SMALL_DEDUP_WINDOW, timeout_s=60)
    h.stop()
    journal = h.read_journal(h.node_ids[0])
    assert {r.payload for r in journal.records} >= set(payloads)
    assert len(journal.records) == len(payloads) + SMALL_DEDUP_WINDOW
