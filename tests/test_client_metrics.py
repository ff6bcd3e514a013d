"""The opt-in client-side metrics collector (``clients.metrics``).

Unit tests scrape a real ``prometheus_client.CollectorRegistry`` with ``generate_latest`` and
parse the text back: names, types, label sets, histogram buckets, aggregation over clients and
``client`` labels. The client's own counting is driven through its real code paths: frames
handed to it, deadlines passed, and a scripted node on loopback that drops a connection mid-
stream. One integration test kills the leader of a real three-node cluster under pipelined
submits and checks what the collector shows against the clients' own counters.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from cluster_harness import ClusterHarness, pipeline, running_cluster  # noqa: F401
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scripted_node import SCENARIO_TIMEOUT_S, ScriptedConnection, ScriptedNode, scripted_client

from raftseq.clients import Message, OutcomeUnknown, Rejected, SequencerClient, subscribe
from raftseq.clients.client import FAILOVER_BUCKETS_S, DurationHistogram
from raftseq.clients.metrics import CLIENT_LABELS_MAX, METRICS, ClientMetricsCollector
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason

UNREACHABLE = ["127.0.0.1:9"]  # never dialled: these clients are not connected


# --- helpers --------------------------------------------------------------------------------


def registry_with(collector: ClientMetricsCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def scrape(registry: CollectorRegistry) -> dict:
    """The families of one scrape, parsed back from the text format, by family name."""
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    assert sample is not None, f"no sample {name}{labels} in\n{generate_latest(registry).decode()}"
    return sample


def family_name(name: str, kind: str) -> str:
    """The family name the text parser gives a spec's name (counters lose ``_total``)."""
    return name.removesuffix("_total") if kind == "counter" else name


def client(metrics=None, *, session: str = "s", **options) -> SequencerClient:
    return SequencerClient(UNREACHABLE, session=session, metrics=metrics, **options)


def count_into(c: SequencerClient, *, reconnects=0, resubmits=0, failovers=(), silent_left=0, acked=0, unknown=0, rejected=None) -> None:
    """Set a client's counters as its connection loop would have."""
    c.reconnects += reconnects
    c.silent_leaders_left += silent_left
    c.resubmits += resubmits
    for seconds in failovers:
        c.failovers += 1
        c.failover_durations.observe(seconds)
    c.submits_acked += acked
    c.submits_outcome_unknown += unknown
    for reason, n in (rejected or {}).items():
        c.submits_rejected[reason] += n


# --- names, types, labels ------------------------------------------------------------------


def test_a_scrape_yields_exactly_the_listed_families_with_their_types_and_labels():
    collector = ClientMetricsCollector()
    registry = registry_with(collector)
    c = client(collector, session="oms-secret-session-7")
    count_into(c, reconnects=1, failovers=[0.2], rejected={RejectReason.STALE_CLIENT_SEQ: 1})
    families = scrape(registry)

    assert set(families) == {family_name(s.name, s.type) for s in METRICS}
    for spec in METRICS:
        assert spec.name.startswith("raftseq_client_")
        if spec.type == "counter":
            assert spec.name.endswith("_total"), spec.name
        if spec.type == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
        family = families[family_name(spec.name, spec.type)]
        assert family.type == spec.type, spec.name
        assert family.documentation == spec.help
        assert family.samples, f"{spec.name} has no sample"
        for sample in family.samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == set(spec.labels) | extra, (sample.name, sample.labels)
    reasons = {s.labels["reason"] for s in families["raftseq_client_submits_rejected"].samples}
    assert reasons == {r.value for r in RejectReason}, "every reason, zero or not, and nothing else"
    assert "oms-secret-session-7" not in generate_latest(registry).decode(), "a session name leaked into the metrics"


def test_the_failover_histogram_counts_each_duration_in_its_le_bucket():
    collector = ClientMetricsCollector()
    registry = registry_with(collector)
    c = client(collector)
    count_into(c, failovers=[0.01, 0.3, 0.3, 2.5, 61.0])  # on a bound, inside, on the last-but-n, above all

    family = scrape(registry)["raftseq_client_failover_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    expected_bounds = [str(float(b)) for b in FAILOVER_BUCKETS_S] + ["+Inf"]
    assert list(buckets) == expected_bounds
    assert buckets["0.01"] == 1  # le: a duration equal to a bound counts in that bucket
    assert buckets["0.025"] == 1
    assert buckets["0.25"] == 1
    assert buckets["0.5"] == 3
    assert buckets["2.5"] == 4
    assert buckets["60.0"] == 4
    assert buckets["+Inf"] == 5
    assert list(buckets.values()) == sorted(buckets.values()), "buckets are cumulative"
    assert value(registry, "raftseq_client_failover_duration_seconds_count") == 5
    assert value(registry, "raftseq_client_failover_duration_seconds_sum") == pytest.approx(0.01 + 0.3 + 0.3 + 2.5 + 61.0)
    assert value(registry, "raftseq_client_failovers_total") == 5


def test_duration_histogram_wants_increasing_bounds():
    for bad in ((), (1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError):
            DurationHistogram(bad)
    h = DurationHistogram((1.0, 2.0))
    for seconds in (0.5, 1.0, 1.5, 3.0):
        h.observe(seconds)
    assert (h.counts, h.count, h.sum_s) == ([2, 1, 1], 4, 6.0)


# --- aggregation ---------------------------------------------------------------------------


def test_two_clients_add_up_and_a_closed_client_keeps_its_counts():
    collector = ClientMetricsCollector()
    registry = registry_with(collector)
    a, b = client(collector, session="a"), client(collector, session="b")
    count_into(
        a,
        reconnects=2,
        resubmits=10,
        failovers=[0.2, 0.7],
        silent_left=1,
        acked=100,
        unknown=1,
        rejected={RejectReason.STALE_CLIENT_SEQ: 2},
    )
    count_into(
        b,
        reconnects=1,
        resubmits=5,
        failovers=[1.5],
        silent_left=2,
        acked=50,
        rejected={RejectReason.STALE_CLIENT_SEQ: 1, RejectReason.INTERNAL: 4},
    )

    def totals() -> dict[str, float]:
        return {
            "reconnects": value(registry, "raftseq_client_reconnects_total"),
            "resubmits": value(registry, "raftseq_client_resubmits_total"),
            "failovers": value(registry, "raftseq_client_failovers_total"),
            "silent_left": value(registry, "raftseq_client_silent_leaders_left_total"),
            "failover_count": value(registry, "raftseq_client_failover_duration_seconds_count"),
            "failover_sum": round(value(registry, "raftseq_client_failover_duration_seconds_sum"), 9),
            "le_1": value(registry, "raftseq_client_failover_duration_seconds_bucket", le="1.0"),
            "acked": value(registry, "raftseq_client_submits_acked_total"),
            "unknown": value(registry, "raftseq_client_submits_outcome_unknown_total"),
            "stale": value(registry, "raftseq_client_submits_rejected_total", reason="stale_client_seq"),
            "internal": value(registry, "raftseq_client_submits_rejected_total", reason="internal"),
        }

    expected = {
        "reconnects": 3, "resubmits": 15, "failovers": 3, "silent_left": 3, "failover_count": 3, "failover_sum": 2.4,
        "le_1": 2, "acked": 150, "unknown": 1, "stale": 3, "internal": 4,
    }  # fmt: skip
    assert totals() == expected
    assert value(registry, "raftseq_client_sessions") == 2

    asyncio.run(a.close())
    assert totals() == expected, "closing a client must not take its counts away (counters never go down)"
    assert value(registry, "raftseq_client_sessions") == 1
    asyncio.run(a.close())
    assert totals() == expected, "closing twice must not count twice"

    count_into(b, reconnects=1)
    asyncio.run(b.close())
    assert totals()["reconnects"] == 4
    assert value(registry, "raftseq_client_sessions") == 0


def test_client_labels_are_declared_up_front_and_bounded():
    collector = ClientMetricsCollector(client_labels=("oms", "router"))
    registry = registry_with(collector)
    count_into(client(collector.labelled("oms"), session="o1"), reconnects=1)
    count_into(client(collector.labelled("oms"), session="o2"), reconnects=2)
    count_into(client(collector.labelled("router"), session="r1"), reconnects=5)

    families = scrape(registry)
    for spec in METRICS:
        for sample in families[family_name(spec.name, spec.type)].samples:
            assert sample.labels["client"] in ("oms", "router"), (sample.name, sample.labels)
    assert value(registry, "raftseq_client_reconnects_total", client="oms") == 3
    assert value(registry, "raftseq_client_reconnects_total", client="router") == 5
    assert value(registry, "raftseq_client_sessions", client="oms") == 2
    assert value(registry, "raftseq_client_failover_duration_seconds_bucket", client="router", le="+Inf") == 0

    # The collector itself still works as a sink: those clients carry client="" (no label).
    count_into(client(collector, session="bare"), reconnects=7)
    assert value(registry, "raftseq_client_reconnects_total", client="") == 7
    assert value(registry, "raftseq_client_reconnects_total", client="oms") == 3

    with pytest.raises(ValueError, match="not declared"):
        collector.labelled("oms-1")  # e.g. a session name: refused
    with pytest.raises(ValueError, match="not declared"):
        ClientMetricsCollector().labelled("oms")
    for bad in (("",), ("a", "a"), ("x" * 65,), ("new\nline",), tuple(f"c{i}" for i in range(CLIENT_LABELS_MAX + 1))):
        with pytest.raises(ValueError):
            ClientMetricsCollector(client_labels=bad)
    with pytest.raises(TypeError):
        ClientMetricsCollector(client_labels="oms")


def test_a_registry_refuses_the_same_collector_twice():
    collector = ClientMetricsCollector()
    registry = registry_with(collector)
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(collector)


# --- the client counts through its real code paths -----------------------------------------


def test_acks_rejections_and_unknown_outcomes_are_counted_by_the_client():
    collector = ClientMetricsCollector()
    registry = registry_with(collector)

    async def silent_leader(conn: ScriptedConnection) -> None:
        await conn.welcome()  # then answers nothing: the test hands the client its frames
        await conn.hold_until_stopped()

    async def scenario() -> SequencerClient:
        node = ScriptedNode([silent_leader])
        c = SequencerClient([await node.start()], session="s", metrics=collector, outcome_deadline_s=0.05, heartbeat_timeout_s=30)
        try:
            await c.connect()  # submit_nowait needs a first connection
            return await counted(c)
        finally:
            await node.stop()

    async def counted(c: SequencerClient) -> SequencerClient:
        futures = [c.submit_nowait(b"p%d" % i) for i in range(1, 8)]  # client_seq 1..7, never answered by the node
        c._handle(protocol.Ack(1, 101))
        c._handle(protocol.Ack(1, 101, duplicate=True))  # an ack for a submit already resolved
        c._handle(protocol.AckRange(2, 102, 3))  # 2, 3, 4
        c._handle(protocol.AckRange(3, 103, 2))  # 3, 4 again: nothing new
        c._handle(protocol.Rejected(RejectReason.STALE_CLIENT_SEQ, "old", client_seq=5))
        c._handle(protocol.Rejected(RejectReason.SEQUENCE_GAP, "gap", client_seq=7, expected_client_seq=6))  # a resend, not a rejection
        assert [f.result() for f in futures[:4]] == [101, 102, 103, 104]
        with pytest.raises(Rejected):
            futures[4].result()
        with pytest.raises(OutcomeUnknown):
            await c.submit(b"p8")  # client_seq 8: no node answers within the deadline
        with pytest.raises(OutcomeUnknown):
            await c.submit_batch([b"p9", b"p10", b"p11"])
        assert c.in_flight == 6  # 6, 7, 8, 9, 10, 11
        with pytest.raises(ConnectionError):
            c._handle(protocol.Rejected(RejectReason.AUTH_FAILED, "token"))  # fails all six for good
        for f in futures[5:]:
            with pytest.raises(Rejected):
                f.result()
        await c.close()
        return c

    c = asyncio.run(scenario())
    assert (c.submits_acked, c.submits_outcome_unknown) == (4, 4)
    assert {r: n for r, n in c.submits_rejected.items() if n} == {RejectReason.STALE_CLIENT_SEQ: 1, RejectReason.AUTH_FAILED: 6}
    assert value(registry, "raftseq_client_submits_acked_total") == 4
    assert value(registry, "raftseq_client_submits_outcome_unknown_total") == 4
    assert value(registry, "raftseq_client_submits_rejected_total", reason="stale_client_seq") == 1
    assert value(registry, "raftseq_client_submits_rejected_total", reason="auth_failed") == 6
    assert value(registry, "raftseq_client_submits_rejected_total", reason="sequence_gap") == 0
    assert value(registry, "raftseq_client_in_flight_submits") == 0


def test_a_dropped_leader_connection_counts_a_reconnect_a_failover_and_the_resubmits():
    collector = ClientMetricsCollector()
    registry = registry_with(collector)

    async def first(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.submits(3) == [1, 2, 3]
        conn.send(protocol.Ack(1, 11))
        await conn.writer.drain()
        # Then the "leader" dies with 2 and 3 unacknowledged: the connection closes.

    async def second(conn: ScriptedConnection) -> None:
        await conn.welcome()
        assert await conn.submits(2) == [2, 3], "the unacknowledged submits, again, in order"
        conn.send(protocol.AckRange(2, 12, 2))
        await conn.hold_until_stopped()

    async def scenario() -> SequencerClient:
        async with scripted_client([first, second], session="s", metrics=collector, heartbeat_timeout_s=30) as (node, c):
            await c.connect()
            seqs = await asyncio.wait_for(asyncio.gather(*(c.submit_nowait(b"x%d" % i) for i in range(3))), SCENARIO_TIMEOUT_S)
            assert seqs == [11, 12, 13]
            assert c.connected
            assert value(registry, "raftseq_client_sessions_connected") == 1
        assert node.connections == 2
        return c

    c = asyncio.run(scenario())
    assert (c.reconnects, c.failovers, c.resubmits, c.submits_acked) == (1, 1, 2, 3)
    assert value(registry, "raftseq_client_reconnects_total") == 1
    assert value(registry, "raftseq_client_failovers_total") == 1
    assert value(registry, "raftseq_client_resubmits_total") == 2
    assert value(registry, "raftseq_client_submits_acked_total") == 3
    assert value(registry, "raftseq_client_failover_duration_seconds_count") == 1
    assert value(registry, "raftseq_client_failover_duration_seconds_sum") == pytest.approx(c.last_failover_s)
    assert c.last_failover_s > 0
    assert value(registry, "raftseq_client_sessions") == 0, "closed clients are no longer open sessions"


@pytest.mark.parametrize("label", [None, "feed"])
def test_a_subscription_that_resumes_on_a_new_connection_counts_one_resume(label):
    collector = ClientMetricsCollector(client_labels=(label,) if label else ())
    registry = registry_with(collector)
    sink = collector.labelled(label) if label else collector

    def delivered(seq: int) -> protocol.Delivered:
        return protocol.Delivered(seq, 1_000 + seq, "w", seq, b"m%d" % seq)

    async def first(conn: ScriptedConnection) -> None:
        await conn.welcome()
        subscribe_frame = await conn.next_frame()
        assert subscribe_frame == protocol.Subscribe(1, truncated_known=True), subscribe_frame
        conn.send(delivered(1), delivered(2))
        await conn.writer.drain()  # then the node dies

    async def second(conn: ScriptedConnection) -> None:
        await conn.welcome()
        subscribe_frame = await conn.next_frame()
        assert subscribe_frame == protocol.Subscribe(3, truncated_known=True), f"resumed at {subscribe_frame}, not at last + 1"
        conn.send(delivered(3))
        await conn.hold_until_stopped()

    async def scenario() -> list[Message]:
        node = ScriptedNode([first, second])
        address = await node.start()
        received: list[Message] = []
        stream = subscribe([address], from_seq=1, session="sub", heartbeat_timeout_s=30, metrics=sink)
        try:

            async def read_three() -> None:
                async for message in stream:
                    received.append(message)
                    if len(received) == 3:
                        return

            await asyncio.wait_for(read_three(), SCENARIO_TIMEOUT_S)
        finally:
            await stream.aclose()
            await node.stop()
        assert not node.errors, node.errors
        return received

    received = asyncio.run(scenario())
    assert [m.seq for m in received] == [1, 2, 3]
    labels = {"client": label} if label else {}
    assert value(registry, "raftseq_client_subscription_resumes_total", **labels) == 1


# --- a real cluster: the leader killed under pipelined submits -----------------------------


def test_a_leader_kill_shows_reconnects_failovers_and_resubmits_in_the_collector(running_cluster):
    h: ClusterHarness = running_cluster
    leader = h.wait_for_leader()
    collector = ClientMetricsCollector()
    registry = registry_with(collector)
    per_client = 3000
    burst = 20  # per client, sent just before the kill: in flight when the leader dies
    sessions = {f"m{i}": [b"m%d-%d" % (i, n) for n in range(per_client)] for i in range(2)}
    total = (per_client + burst) * len(sessions)

    async def scenario() -> tuple[list[SequencerClient], dict]:
        clients = [SequencerClient(h.endpoints, session=s, token=h.token, in_flight_max=500, metrics=collector) for s in sessions]
        for c in clients:
            await c.connect()
        acked = 0
        third = asyncio.Event()

        def on_ack(future: asyncio.Future) -> None:
            nonlocal acked
            if not future.cancelled() and future.exception() is None:
                acked += 1
                if acked >= total // 3:
                    third.set()

        # A subscription on the leader that is about to die: it must resume elsewhere.
        received: list[int] = []

        async def follow() -> None:
            stream = subscribe(
                h.endpoints, from_seq=1, token=h.token, session="metrics-sub", prefer=h.endpoint(leader["id"]), metrics=collector
            )
            try:
                async for message in stream:
                    received.append(message.seq)
                    if message.seq == total:
                        return
            finally:
                await stream.aclose()

        follower = asyncio.create_task(follow())
        try:

            async def kill_at_a_third() -> list[asyncio.Future]:
                await asyncio.wait_for(third.wait(), SCENARIO_TIMEOUT_S)
                for c in clients:
                    await asyncio.wait_for(c.wait_for_room(burst), SCENARIO_TIMEOUT_S)
                # No await between these submits and the kill: the dying leader cannot have
                # answered them, so each client has at least `burst` submits to send again.
                futures = [c.submit_nowait(b"burst-%s-%d" % (c.session.encode(), n)) for c in clients for n in range(burst)]
                h.kill(leader["id"])
                return futures

            killer = asyncio.create_task(kill_at_a_third())
            await asyncio.gather(*(pipeline(c, sessions[c.session], timeout_s=SCENARIO_TIMEOUT_S, on_ack=on_ack) for c in clients))
            await asyncio.wait_for(asyncio.gather(*await killer), SCENARIO_TIMEOUT_S)
            await asyncio.wait_for(follower, SCENARIO_TIMEOUT_S)
            assert received == list(range(1, total + 1)), "the subscription lost or repeated messages"
            during = await asyncio.to_thread(scrape, registry)  # scraped from another thread, as an HTTP server would
            return clients, during
        finally:
            follower.cancel()
            for c in clients:
                await c.close()

    started = time.monotonic()
    clients, during = asyncio.run(scenario())
    print(
        f"{total} submits through a leader kill in {time.monotonic() - started:.2f} s; "
        f"reconnects {[c.reconnects for c in clients]}, failovers {[c.failovers for c in clients]}, "
        f"resubmits {[c.resubmits for c in clients]}, failover seconds {[round(c.last_failover_s, 3) for c in clients]}"
    )
    print(generate_latest(registry).decode())

    def own(attribute: str) -> int:
        return sum(getattr(c, attribute) for c in clients)

    assert value(registry, "raftseq_client_reconnects_total") == own("reconnects") >= 1
    assert value(registry, "raftseq_client_failovers_total") == own("failovers") >= 1
    assert value(registry, "raftseq_client_resubmits_total") == own("resubmits") >= 1, "nothing resubmitted after the kill?"
    assert all(c.resubmits >= burst for c in clients), "the submits in flight at the kill were not all sent again"
    assert value(registry, "raftseq_client_failover_duration_seconds_count") == own("failovers")
    assert value(registry, "raftseq_client_failover_duration_seconds_sum") > 0
    assert value(registry, "raftseq_client_failover_duration_seconds_sum") >= max(c.last_failover_s for c in clients)
    assert value(registry, "raftseq_client_submits_acked_total") == total
    assert value(registry, "raftseq_client_submits_outcome_unknown_total") == 0
    assert sum(value(registry, "raftseq_client_submits_rejected_total", reason=r.value) for r in RejectReason) == 0
    assert value(registry, "raftseq_client_subscription_resumes_total") >= 1
    assert value(registry, "raftseq_client_sessions") == 0

    # The scrape taken while the clients were open agrees with the one after they closed.
    assert during["raftseq_client_sessions"].samples[0].value == 2
    assert during["raftseq_client_sessions_connected"].samples[0].value == 2
    assert during["raftseq_client_in_flight_submits"].samples[0].value == 0
    assert during["raftseq_client_resubmits"].samples[0].value == own("resubmits")
