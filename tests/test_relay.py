"""Relays (``raftseq relay``) beside a real three-node cluster: they follow the cluster through a
leader kill, chain, serve subscribers and the state-machine runner like a node, send submits on
to the leader, disconnect a subscriber that stops reading, and refuse upstreams that are
themselves or hold other records.

Each test starts its own cluster (``running_cluster``) and relays as processes
(``cluster.relay_local``), stopped at teardown whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from cluster_harness import ClusterHarness, StreamRecorder, pipeline, running_cluster  # noqa: F401
from scripted_node import ScriptedNode

from raftseq.clients import SequencerClient, subscribe
from raftseq.clients.connection import open_connection
from raftseq.cluster.local import LocalCluster
from raftseq.cluster.node_exit import NodeExit
from raftseq.cluster.status import node_status
from raftseq.cluster.relay import Relay, UpstreamDiverged
from raftseq.cluster.relay_config import relay_config
from raftseq.cluster.relay_local import wait_relay_serving
from raftseq.cluster.retention import RetentionState
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import Journal, list_segment_files

STEP_TIMEOUT_S = 60
#: Seconds a stopped relay (in this process) has to return from ``Relay.run``.
RELAY_STOP_TIMEOUT_S = 5


@pytest.fixture
def relays(running_cluster):
    """Starts relays of the running cluster (``LocalCluster.start_relays``; ``upstream``: the
    nodes, or a relay's address for a chain); they stop with the cluster, and their logs' tails
    are printed at teardown."""
    h = running_cluster
    try:
        yield h.start_relays
    finally:
        for relay in h.relays:
            relay.stop()
            print(f"--- {relay.id} log (tail) ---\n" + "\n".join(relay.log_text().splitlines()[-15:]), flush=True)


async def submit_all(h: ClusterHarness, session: str, payloads: list[bytes], *, endpoints: list[str] | None = None) -> list[int]:
    async with SequencerClient(endpoints or h.endpoints, session=session, token=h.token, in_flight_max=2000) as client:
        return await pipeline(client, payloads, timeout_s=STEP_TIMEOUT_S)


def payloads(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(count)]


def assert_gapless(messages, first: int, last: int) -> None:
    seqs = [m.seq for m in messages]
    assert seqs == list(range(first, last + 1)), f"got {len(seqs)} messages {seqs[:3]}..{seqs[-3:]}, expected {first}..{last}"


def test_a_relay_follows_through_a_leader_kill_and_serves_gapless_from_any_number(running_cluster, relays):
    h = running_cluster
    leader = h.wait_for_leader()
    # The relay follows a follower: the leader's death moves the cluster under it.
    [relay] = relays(1)

    async def scenario():
        recorder = StreamRecorder([relay.client_address], token=h.token, session="via-relay").start()
        first = await submit_all(h, "w1", payloads("a", 2000))
        writing = asyncio.create_task(submit_all(h, "w2", payloads("b", 20_000)))
        # The leader dies while the second writer is under way and the relay copies from it.
        await recorder.wait_until(first[-1] + 500, timeout_s=STEP_TIMEOUT_S)
        await asyncio.to_thread(h.kill, leader["id"])
        second = await writing
        last = second[-1]
        await recorder.wait_until(last, timeout_s=STEP_TIMEOUT_S)
        await recorder.stop()
        # Late subscribers from any number read the same records from the relay's journal.
        for start in (1, 777, last):
            got = []
            async for m in subscribe([relay.client_address], from_seq=start, token=h.token, session=f"from-{start}"):
                got.append(m)
                if m.seq == last:
                    break
            assert_gapless(got, start, last)
        return recorder.messages, sorted(first + second)

    messages, acked = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    assert_gapless(messages, 1, acked[-1])
    assert [m.seq for m in messages if m.session in ("w1", "w2")] == acked
    # The relay's journal is the cluster's, byte for byte.
    relay.stop()
    survivor = next(n for n in h.node_ids if h.is_running(n))
    h.stop()
    node_copy = h.read_journal(survivor)
    relay_bytes = b"".join(open(path, "rb").read() for _, path in list_segment_files(os.path.join(relay.data_dir, "journal")))
    assert node_copy.last_seq == acked[-1]
    assert relay_bytes == node_copy.segment_bytes, "the relay's journal is the cluster's, byte for byte"


async def following_a_follower(relay: Relay, token: str, *, not_of: str = "") -> str:
    """The address `relay` follows once that is a follower of the cluster (a node that says so
    in its status) other than `not_of`; AssertionError after ``STEP_TIMEOUT_S``."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while True:
        address = relay.upstream_address
        if address and address != not_of and (await node_status(address, token=token, timeout_s=1))["role"] == "follower":
            return address
        assert time.monotonic() < deadline, f"the relay follows {address!r}, not a follower other than {not_of!r}"
        await asyncio.sleep(0.1)


def test_a_relay_follows_a_follower_and_another_when_that_one_dies_with_no_gap_and_no_duplicate(running_cluster, tmp_path):
    h = running_cluster
    leader = h.wait_for_leader()["address"]
    # The leader listed first: the relay passes it over for a follower (the leader sequences).
    upstream = [leader, *(e for e in h.endpoints if e != leader)]
    relay = Relay(
        relay_config(data_dir=str(tmp_path / "relay"), upstream=upstream, listen=free_address(), relay_id="relay-t", token=h.token)
    )

    async def scenario():
        stop = asyncio.Event()
        running = asyncio.create_task(relay.run(stop))
        recorder = StreamRecorder([relay.config.client_address], token=h.token, session="via-relay").start()
        try:
            first = await submit_all(h, "w1", payloads("a", 2000))
            await recorder.wait_until(first[-1], timeout_s=STEP_TIMEOUT_S)
            followed = await following_a_follower(relay, h.token)
            # The node it follows dies while a writer is under way and the relay copies from it.
            writing = asyncio.create_task(submit_all(h, "w2", payloads("b", 20_000)))
            await recorder.wait_until(first[-1] + 500, timeout_s=STEP_TIMEOUT_S)
            await asyncio.to_thread(h.kill, h.node_id_of(followed))
            second = await writing
            await recorder.wait_until(second[-1], timeout_s=STEP_TIMEOUT_S)
            then = await following_a_follower(relay, h.token, not_of=followed)
            return followed, then, recorder.messages, sorted(first + second)
        finally:
            await recorder.stop()
            stop.set()
            await asyncio.wait_for(running, STEP_TIMEOUT_S)

    followed, then, messages, acked = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    assert followed != leader and then not in (followed, leader), (leader, followed, then)
    assert_gapless(messages, 1, acked[-1])
    assert [m.seq for m in messages if m.session in ("w1", "w2")] == acked


def test_a_chain_of_two_relays_serves_the_stream_and_sends_submits_to_the_leader(running_cluster, relays):
    h = running_cluster
    [first] = relays(1)
    [second] = relays(1, upstream=[first.client_address])

    async def scenario():
        recorder = StreamRecorder([second.client_address], token=h.token, session="via-chain").start()
        # A submit to a relay is answered NotLeader with the cluster leader's client address.
        leader = (await asyncio.to_thread(h.wait_for_leader))["address"]
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while (await node_status(second.client_address, token=h.token, timeout_s=1)).get("leader") != leader:
            assert time.monotonic() < deadline, "the second relay never learned the leader"
            await asyncio.sleep(0.05)
        link = await open_connection(second.client_address, session="raw", token=h.token, timeout_s=5)
        try:
            assert link.welcome.node_id == second.id and link.welcome.leader == leader
            link.send(protocol.Submit(1, b"to-a-relay"))
            answer = await link.request(protocol.StatusRequest(), protocol.NotLeader, 5)
            assert answer == protocol.NotLeader(leader, 1)
        finally:
            link.close()
        # The client library, given only the second relay, follows that to the leader.
        acked = await submit_all(h, "via-relay", payloads("c", 3000), endpoints=[second.client_address])
        await recorder.wait_until(acked[-1], timeout_s=STEP_TIMEOUT_S)
        await recorder.stop()
        return recorder.messages, acked

    messages, acked = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    assert_gapless(messages, 1, acked[-1])
    assert [m.seq for m in messages if m.session == "via-relay"] == acked


def scrape(address: str) -> dict[str, float]:
    """The relay's metrics page as {sample name with labels: value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as page:
        text = page.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


LAG_MAX = 500


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stalled_subscriber(address: str, token: str) -> socket.socket:
    """A subscriber from seq 1 with a small receive buffer that reads its welcome and then
    nothing: what the relay writes to it piles up on the relay's side."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    host, port = address.rsplit(":", 1)
    sock.connect((host, int(port)))
    sock.sendall(
        protocol.encode_frame(protocol.Hello("stalled", token, protocol.PROTOCOL_VERSION)) + protocol.encode_frame(protocol.Subscribe(1))
    )
    return sock


def read_until_reset(sock: socket.socket) -> list:
    """Every frame still readable on `sock` until the relay's reset (or close)."""
    framer = protocol.FrameReader("node")
    frames = []
    sock.settimeout(STEP_TIMEOUT_S)
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return frames
        if not data:
            return frames
        frames += framer.feed(data)


def test_a_subscriber_that_stops_reading_is_disconnected_and_resumes_while_others_get_everything(running_cluster, relays):
    h = running_cluster
    [relay] = relays(1, subscriber_lag_max=LAG_MAX)
    payload = b"x" * 3000
    count = 8000  # 24 MB, far more than the stalled subscriber's socket buffers hold

    async def scenario():
        await submit_all(h, "w0", [b"first"])
        await asyncio.to_thread(wait_relay_serving, relay, 1, timeout_s=STEP_TIMEOUT_S)
        fast = StreamRecorder([relay.client_address], token=h.token, session="fast").start()
        stalled = stalled_subscriber(relay.client_address, h.token)
        await fast.wait_until(1, timeout_s=STEP_TIMEOUT_S)
        rss_before = rss_bytes(relay.process.pid)
        acked = await submit_all(h, "w1", [payload] * count)
        await fast.wait_until(acked[-1], timeout_s=STEP_TIMEOUT_S)
        # The fast subscriber got everything while the stalled one read nothing; the relay cut it.
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while scrape(relay.metrics_address)[f'raftseq_relay_subscriber_lag_disconnects_total{{relay="{relay.id}"}}'] < 1:
            assert time.monotonic() < deadline, "the stalled subscriber was never disconnected"
            await asyncio.sleep(0.1)
        rss_growth = rss_bytes(relay.process.pid) - rss_before
        got = await asyncio.to_thread(read_until_reset, stalled)
        stalled.close()
        seqs = [f.seq for f in got if isinstance(f, protocol.Delivered)]
        # It resumes from its next number and gets the rest.
        rest = []
        async for m in subscribe([relay.client_address], from_seq=seqs[-1] + 1, token=h.token, session="resumed"):
            rest.append(m)
            if m.seq == acked[-1]:
                break
        await fast.stop()
        # The resumed one started further behind than the bound and was not cut while it caught up.
        assert scrape(relay.metrics_address)[f'raftseq_relay_subscriber_lag_disconnects_total{{relay="{relay.id}"}}'] == 1
        return fast.messages, seqs, rest, acked, rss_growth

    fast_got, seqs, rest, acked, rss_growth = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    print(f"stalled subscriber read {len(seqs)} of {acked[-1]} records before the reset; relay RSS grew {rss_growth / 2**20:.1f} MiB")
    assert_gapless(fast_got, 1, acked[-1])
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < acked[-1] - LAG_MAX
    assert_gapless(rest, seqs[-1] + 1, acked[-1])
    assert rss_growth < 8 * 2**20, f"the relay held {rss_growth} bytes more while a subscriber did not read"


def test_the_state_machine_runner_and_a_late_joiner_work_against_a_relay(running_cluster, relays):
    from test_sm_runner import KvStore, Put

    from raftseq.clients.sm import StateMachineRunner, encode_message

    h = running_cluster
    [relay] = relays(1)
    kv = KvStore()
    publisher = StateMachineRunner([relay.client_address], [kv], token=h.token, replica="r1")

    async def scenario():
        seqs = await submit_all(h, "w", [encode_message(Put(f"k{i % 40}", i)) for i in range(2000)])
        await asyncio.wait_for(publisher.run(until_seq=seqs[-1]), STEP_TIMEOUT_S)
        # Publishing goes through the relay too (its submits are sent on to the leader).
        [snap] = await publisher.publish_snapshot("kv")
        more = await submit_all(h, "w2", [encode_message(Put(f"k{i % 40}", -i)) for i in range(500)])
        await asyncio.wait_for(publisher.run(until_seq=more[-1]), STEP_TIMEOUT_S)
        late = KvStore()
        joiner = StateMachineRunner([relay.client_address], [late], token=h.token, replica="r9", from_snapshot=True)
        await asyncio.wait_for(joiner.run(until_seq=more[-1]), STEP_TIMEOUT_S)
        await joiner.close()
        await publisher.close()
        return snap, joiner, late

    snap, joiner, late = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    assert joiner.joined_from["kv"] == snap, "the late joiner loaded the snapshot the relay listed"
    assert late.data == kv.data and joiner.digest("kv") == publisher.digest("kv")
    assert min(seq for seq, _ in late.applied) > snap.covered_seq


def test_a_relay_pointed_at_another_cluster_stops_before_serving_any_of_it(running_cluster, relays, tmp_path):
    h = running_cluster
    [relay] = relays(1)
    asyncio.run(submit_all(h, "w", payloads("ours", 100)))
    wait_relay_serving(relay, 100, timeout_s=STEP_TIMEOUT_S)
    relay.stop()
    with LocalCluster.started(str(tmp_path / "other"), insecure=False, restart=False) as other:
        asyncio.run(submit_all(other, "w", payloads("theirs", 300)))  # type: ignore[arg-type]
        relay.upstream = other.endpoints
        relay.token = other.token
        relay.start()
        code = relay.wait_exit(STEP_TIMEOUT_S)
    assert code == NodeExit.INVALID_CONFIG
    assert "holds a different record under seq 100" in relay.log_text()
    with Journal.open(os.path.join(relay.data_dir, "journal"), readonly=True) as journal:
        assert journal.last_seq == 100, "nothing of the other cluster was stored"


# --- bad upstreams, scripted (``scripted_node``): the relay in this process -----------------------


def in_process_relay(tmp_path, upstream: str, relay_id: str = "relay-t") -> Relay:
    return Relay(
        relay_config(data_dir=str(tmp_path / "relay"), upstream=[upstream], listen="127.0.0.1:1", relay_id=relay_id, insecure=True)
    )


def delivered(seq: int, payload: bytes) -> protocol.Delivered:
    return protocol.Delivered(seq, 1_000 + seq, "w", seq, payload)


def test_a_number_delivered_twice_with_other_content_is_never_stored_and_a_diverging_upstream_stops_the_relay(tmp_path):
    async def repeats_two(conn):
        await conn.welcome()
        assert await conn.next_frame() == protocol.Subscribe(1, truncated_known=True)
        conn.send(delivered(1, b"one"), delivered(2, b"two"), delivered(2, b"TWO"), delivered(3, b"three"))
        await conn.hold_until_stopped()

    async def rewrote_two(conn):
        await conn.welcome()
        # The relay asks again for its last record, to compare it (as a 0.3 reader: it knows Truncated).
        assert await conn.next_frame() == protocol.Subscribe(2, truncated_known=True)
        conn.send(delivered(2, b"TWO"), delivered(3, b"three"))
        await conn.hold_until_stopped()

    async def scenario():
        upstream = ScriptedNode([repeats_two, rewrote_two])
        address = await upstream.start()
        relay = in_process_relay(tmp_path, address)
        try:
            with pytest.raises(UpstreamDiverged, match="different record under seq 2"):
                await asyncio.wait_for(relay.follow(), STEP_TIMEOUT_S)
            return relay.journal.read_bytes(1, relay.journal.last_seq), dict(relay.metrics.verify_failures), upstream.errors
        finally:
            relay.journal.close()
            await upstream.stop()

    stored, failures, errors = asyncio.run(scenario())
    assert errors == []
    assert stored == protocol.encode_frame(delivered(1, b"one")) + protocol.encode_frame(delivered(2, b"two"))
    assert failures == {"catchup": 1, "upstream_diverged": 1}


def test_a_relay_welcomed_by_itself_stops(tmp_path):
    async def is_the_relay(conn):
        hello = await conn.next_frame()
        assert isinstance(hello, protocol.Hello)
        conn.send(protocol.Welcome("relay-t", protocol.PROTOCOL_VERSION, protocol.Role.FOLLOWER, "", 0, 500))
        await conn.hold_until_stopped()

    async def scenario():
        upstream = ScriptedNode([is_the_relay])
        address = await upstream.start()
        relay = in_process_relay(tmp_path, address)
        try:
            with pytest.raises(UpstreamDiverged, match="is this relay itself"):
                await asyncio.wait_for(relay.follow(), STEP_TIMEOUT_S)
            return relay.journal.last_seq
        finally:
            relay.journal.close()
            await upstream.stop()

    assert asyncio.run(scenario()) == 0


def test_a_relay_stops_when_the_stop_comes_as_its_upstream_connection_is_made(tmp_path, monkeypatch):
    """Stop arrives just as the TCP connection to the upstream is made, a few loop iterations
    either side. On Python 3.11 ``asyncio.wait_for`` swallowed a cancellation that arrived after
    the connection was made but before it returned: the follower carried on following and
    ``Relay.run`` waited for it forever."""

    async def holds(conn):
        await conn.welcome()
        await conn.hold_until_stopped()

    made = asyncio.open_connection

    async def scenario(iterations: int) -> bool:
        stop = asyncio.Event()

        async def made_then_stop(*args, **kwargs):
            connection = await made(*args, **kwargs)
            stop.set()
            for _ in range(iterations):  # the stop's way to the follower's cancel takes a few
                await asyncio.sleep(0)
            return connection

        upstream = ScriptedNode([holds])
        relay = Relay(
            relay_config(
                data_dir=str(tmp_path / f"relay{iterations}"), upstream=[await upstream.start()], listen=free_address(),
                relay_id="relay-t", insecure=True,
            )
        )  # fmt: skip
        monkeypatch.setattr(asyncio, "open_connection", made_then_stop)
        running = asyncio.create_task(relay.run(stop))
        try:
            done, _ = await asyncio.wait([running], timeout=RELAY_STOP_TIMEOUT_S)
            return bool(done) and running.result() is None
        finally:
            monkeypatch.setattr(asyncio, "open_connection", made)
            await upstream.stop()
            await stopped(running)

    stopped_at = {iterations: asyncio.run(scenario(iterations)) for iterations in range(6)}
    assert all(stopped_at.values()), f"Relay.run did not return within {RELAY_STOP_TIMEOUT_S} s of stop: {stopped_at}"


def raftseq_command(*args: str) -> subprocess.CompletedProcess:
    """``raftseq ARGS`` in a process of its own, its output captured."""
    return subprocess.run([sys.executable, "-m", "raftseq.cluster.cli", *args], capture_output=True, text=True, timeout=STEP_TIMEOUT_S)


def test_a_relay_listed_among_its_own_upstream_is_refused_at_the_command_line(tmp_path):
    done = raftseq_command(
        "relay",
        "--upstream",
        "127.0.0.1:7001,127.0.0.1:7002",
        "--listen",
        "127.0.0.1:7002",
        "--data-dir",
        str(tmp_path / "r"),
        "--insecure",
    )
    assert done.returncode == NodeExit.USAGE
    assert "cannot follow itself" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_relay_with_credentials_but_no_client_authentication_is_refused_at_the_command_line(tmp_path):
    done = raftseq_command(
        "relay", "--upstream", "127.0.0.1:7001", "--listen", "127.0.0.1:7009", "--data-dir", str(tmp_path / "r"), "--insecure",
        "--credentials", str(tmp_path / "credentials.json"),
    )  # fmt: skip
    assert done.returncode == NodeExit.USAGE
    assert "needs client authentication" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cluster_up_refuses_more_relays_than_a_local_cluster_has_ports_for_before_starting_anything(tmp_path):
    """``--relays 7`` once started the nodes, then failed with a traceback."""
    done = raftseq_command("cluster", "up", "--relays", "7", "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 2
    assert "--relays: expected a number <= 6, got 7" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "d").exists(), "the cluster started before the argument was refused"


def test_a_relay_exports_exactly_its_metric_families_with_its_label():
    from raftseq.cluster.metrics import RELAY_METRICS, RelayCollector, RelayMetrics

    class Relay:
        upstream_last_seq = 120
        published_seq = 100
        journal_bytes = 4096
        retention_state = RetentionState(first_retained_seq=40, bytes_removed=9000)

    metrics = RelayMetrics()
    metrics.delivered, metrics.subscriber_lag_disconnects = 5000, 2
    families = {f.name: f for f in RelayCollector("r7", metrics, Relay()).collect()}
    # prometheus_client drops "_total" from a counter family's name (its sample keeps it).
    assert set(families) == {spec.name.removesuffix("_total") for spec in RELAY_METRICS}
    assert all(sample.labels["relay"] == "r7" for family in families.values() for sample in family.samples)
    assert families["raftseq_relay_upstream_lag_records"].samples[0].value == 20
    assert families["raftseq_relay_subscriber_lag_disconnects"].samples[0].value == 2
    assert families["raftseq_relay_journal_first_retained_seq"].samples[0].value == 40
    assert families["raftseq_relay_journal_retention_removed_bytes"].samples[0].value == 9000


#: A short idle timeout, so that a subscriber's pause of a few of them takes seconds.
PAUSE_IDLE = {"idle_timeout_ms": 600, "heartbeat_interval_ms": 150}


async def _status_poll(conn) -> None:
    """A connection of the relay's status poll: never answered."""
    await conn.hold_until_stopped()


def upstream_of(*scripts) -> ScriptedNode:
    """A scripted upstream: `scripts` for the relay's stream connections, then its status polls."""
    return ScriptedNode([*scripts] + [_status_poll] * 20)


def streaming(count: int, payload: bytes):
    """An upstream script: records 1..`count` of `payload`, after the relay's subscribe."""

    async def script(conn) -> None:
        await conn.welcome()
        assert await conn.next_frame() == protocol.Subscribe(1, truncated_known=True)
        conn.send(*(delivered(seq, payload) for seq in range(1, count + 1)))
        await conn.hold_until_stopped()

    return script


def paused_subscriber(address: str, pause_s: float, count: int) -> list:
    """A subscriber from seq 1 that pauses `pause_s` after its welcome, sending nothing (a client
    answers heartbeats after it reads), then reads until it holds `count` records or is closed.
    Its small receive buffer leaves the relay's writes pending during the pause."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    host, port = address.rsplit(":", 1)
    sock.connect((host, int(port)))
    try:
        sock.sendall(
            protocol.encode_frame(protocol.Hello("paused", "", protocol.PROTOCOL_VERSION)) + protocol.encode_frame(protocol.Subscribe(1))
        )
        time.sleep(pause_s)  # the pause is the scenario, not a wait for something
        framer = protocol.FrameReader("node")
        frames: list = []
        sock.settimeout(STEP_TIMEOUT_S)
        while sum(isinstance(f, protocol.Delivered) for f in frames) < count:
            data = sock.recv(1 << 20)
            if not data:
                break
            frames += framer.feed(data)
            sock.sendall(protocol.encode_frame(protocol.Heartbeat()))
        return frames
    finally:
        sock.close()


def test_a_subscriber_whose_writes_are_pending_is_not_closed_as_idle(tmp_path):
    """The relay writes to a subscriber faster than it reads; while the writes wait for its
    socket to drain, the subscriber (which answers heartbeats only after reading) sends nothing.
    Pending writes are not silence: it is not closed by the idle timeout and gets every record."""
    count = 3000  # 12 MB: far more than the socket buffers hold
    payload = b"p" * 4000

    async def scenario():
        upstream = upstream_of(streaming(count, payload))
        address = await upstream.start()
        listen = free_address()
        relay = Relay(
            relay_config(
                data_dir=str(tmp_path / "relay"), upstream=[address], listen=listen, relay_id="relay-t", insecure=True, gateway=PAUSE_IDLE
            )
        )
        stop = asyncio.Event()
        running = asyncio.create_task(relay.run(stop))
        try:
            while relay.publication.readable_seq < count:
                assert not running.done(), running
                await relay.publication.wait_readable(count)
            idle_s = PAUSE_IDLE["idle_timeout_ms"] / 1000
            return await asyncio.to_thread(paused_subscriber, listen, 4 * idle_s, count)
        finally:
            stop.set()
            await asyncio.wait_for(running, STEP_TIMEOUT_S)
            await upstream.stop()

    frames = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    refusals = [f for f in frames if not isinstance(f, (protocol.Welcome, protocol.Delivered, protocol.Heartbeat))]
    seqs = [f.seq for f in frames if isinstance(f, protocol.Delivered)]
    assert refusals == [] and seqs == list(range(1, count + 1)), f"{len(seqs)} records of {count}, then closed; {refusals}"


def test_a_subscriber_that_reads_nothing_is_closed_after_the_pending_writes_idle_timeout(tmp_path):
    """Pending writes lengthen the idle timeout, not end it: a subscriber that never reads (and
    never sends) is closed once silent for ``pending_writes_idle_timeout_ms``, lag bound or not."""
    count = 3000
    pending_idle_s = 2.0

    async def scenario():
        upstream = upstream_of(streaming(count, b"p" * 4000))
        listen = free_address()
        gateway = {**PAUSE_IDLE, "pending_writes_idle_timeout_ms": int(pending_idle_s * 1000)}
        relay = Relay(
            relay_config(
                data_dir=str(tmp_path / "relay"), upstream=[await upstream.start()], listen=listen, relay_id="relay-t",
                insecure=True, gateway=gateway, subscriber_lag_max_records=0,
            )
        )  # fmt: skip
        running = await relay_running(relay, count)
        try:
            sock = await asyncio.to_thread(stalled_subscriber, listen, "")
            started = time.monotonic()
            try:
                # It reads nothing: the relay's subscriber count says when it is closed.
                while relay.metrics.subscribers == 0 and time.monotonic() - started < STEP_TIMEOUT_S:
                    await asyncio.sleep(0.05)
                while relay.metrics.subscribers and time.monotonic() - started < STEP_TIMEOUT_S:
                    await asyncio.sleep(0.05)
                return time.monotonic() - started
            finally:
                sock.close()
        finally:
            await stopped(running)
            await upstream.stop()

    closed_after_s = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    assert pending_idle_s - 0.5 <= closed_after_s <= pending_idle_s + 5, closed_after_s


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# --- retention: the nodes' [retention] settings on a relay's journal -------------------------

#: Small segments and a bound of four of them: a few thousand records make retention act.
SMALL_SEGMENTS = {"segment_bytes_max": 64 * 1024}
FOUR_SEGMENTS = {"journal_bytes_max": 4 * 64 * 1024, "check_interval_s": 3600}  # checked by the test


def retaining_relay(tmp_path, upstream: str, listen: str) -> Relay:
    return Relay(
        relay_config(
            data_dir=str(tmp_path / "relay"), upstream=[upstream], listen=listen, relay_id="relay-t", insecure=True,
            retention=FOUR_SEGMENTS, journal=SMALL_SEGMENTS,
        )
    )  # fmt: skip


async def relay_running(relay: Relay, until_seq: int) -> asyncio.Task:
    """`relay` running (stopped by cancelling the task), once it serves `until_seq`."""
    running = asyncio.create_task(relay.run(asyncio.Event()))
    while relay.publication.readable_seq < until_seq:
        assert not running.done(), running
        await relay.publication.wait_readable(until_seq)
    return running


async def stopped(running: asyncio.Task) -> None:
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


def test_a_relay_keeps_its_journal_within_the_retention_bounds_and_answers_truncated_below_its_first_number(tmp_path):
    from raftseq.clients.errors import Truncated

    count = 3000  # ~3 MB: dozens of 64 KiB segments
    payload = b"r" * 1000

    async def scenario():
        upstream = upstream_of(streaming(count, payload))
        listen = free_address()
        relay = retaining_relay(tmp_path, await upstream.start(), listen)
        running = await relay_running(relay, count)
        try:
            bytes_before = relay.journal.size_bytes
            removed = await relay.retention.check()
            first = relay.journal.first_retained_seq
            link = await open_connection(listen, session="late", token="", timeout_s=STEP_TIMEOUT_S)
            try:
                with pytest.raises(Truncated) as truncated:
                    async for _ in link.subscribe(1, silence_s=STEP_TIMEOUT_S, truncated_known=True):
                        pass
            finally:
                link.close()
            got = []
            async for m in subscribe([listen], from_seq=first, token="", session="from-first"):
                got.append(m.seq)
                if m.seq == count:
                    break
            return removed, bytes_before, relay.journal.size_bytes, first, truncated.value, got
        finally:
            await stopped(running)
            await upstream.stop()

    removed, before, after, first, truncated, got = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    print(f"relay journal {before} -> {after} bytes ({removed} segments removed); first number {first}")
    assert removed > 0 and first > 1
    assert after <= FOUR_SEGMENTS["journal_bytes_max"] + SMALL_SEGMENTS["segment_bytes_max"], "within the bound and one segment"
    assert (truncated.from_seq, truncated.first_seq) == (1, first)
    assert got == list(range(first, count + 1)), "from its first number on, gapless"


def test_an_empty_relay_of_a_cluster_whose_retention_removed_the_start_begins_at_its_first_number(tmp_path):
    async def truncated_at_500(conn):
        await conn.welcome()
        assert await conn.next_frame() == protocol.Subscribe(1, truncated_known=True)
        conn.send(protocol.Truncated(1, 500))
        await conn.hold_until_stopped()

    async def from_500(conn):
        await conn.welcome()
        assert await conn.next_frame() == protocol.Subscribe(500, truncated_known=True)
        conn.send(*(delivered(seq, b"x") for seq in range(500, 601)))
        await conn.hold_until_stopped()

    async def scenario():
        upstream = upstream_of(truncated_at_500, from_500)
        relay = retaining_relay(tmp_path, await upstream.start(), free_address())
        running = await relay_running(relay, 600)
        try:
            return relay.journal.first_retained_seq, relay.journal.read_bytes(500, 600), upstream.errors
        finally:
            await stopped(running)
            await upstream.stop()

    first, stored, errors = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    assert errors == [] and first == 500
    assert stored == b"".join(protocol.encode_frame(delivered(seq, b"x")) for seq in range(500, 601))


def test_a_relays_retention_floor_keeps_the_newest_snapshot_its_clients_asked_about(tmp_path, monkeypatch):
    """The relay lists a snapshot only while it holds its chunks, and its retention floor is the
    first chunk of the newest snapshot it listed (per state-machine type)."""
    from raftseq.cluster import relay as relay_module

    def info(first_seq: int, last_seq: int) -> protocol.SnapshotInfo:
        return protocol.SnapshotInfo("kv", 1, last_seq, "d", "0" * 64, 10, 1, "@snap/kv", first_seq, last_seq, 1)

    listed = [info(900, 905), info(400, 402), info(100, 101)]  # newest first

    async def upstream_lists(*args, **kwargs):
        return listed

    monkeypatch.setattr(relay_module, "query_snapshots", upstream_lists)
    relay = retaining_relay(tmp_path, "127.0.0.1:1", "127.0.0.1:2")
    try:
        relay.journal.skip_to(300)
        relay.journal.start_at(300)  # the relay's journal starts at 300: the oldest snapshot is gone
        relay.journal.append(b"".join(protocol.encode_frame(delivered(seq, b"c")) for seq in range(300, 1001)), 300, 1000)
        relay.publication.wake()
        answer = asyncio.run(relay._snapshots_from_upstream("kv"))
        floor = relay.retention.plan()
    finally:
        relay.journal.close()
    assert [s.first_seq for s in answer.snapshots] == [900, 400]
    assert relay._snapshot_floor_seq() == 900
    assert all(span.end_seq <= 900 for span in floor.remove)
    assert relay.retention.state.floor_seq == 900 and relay.retention.state.held_by == "the newest state-machine snapshot"


def test_an_upstream_behind_the_relay_is_said_and_left_for_another_follow(tmp_path, monkeypatch, caplog):
    """An upstream that holds fewer records than the relay (a node far behind, one that lost
    records, another cluster) cannot serve it: the relay waited there for its own last number,
    with nothing but an info line. It now warns after ``RELAY_UPSTREAM_BEHIND_POLLS_MAX`` status
    polls, follows again (another upstream when it has one), and exports how far behind."""
    from raftseq.cluster import relay as relay_module

    monkeypatch.setattr(relay_module, "RELAY_UPSTREAM_POLL_INTERVAL_S", 0.02)
    monkeypatch.setattr(relay_module, "RELAY_UPSTREAM_BEHIND_POLLS_MAX", 3)
    followed_again = asyncio.Event()

    async def answers_it_holds_two(conn) -> None:
        await conn.welcome()
        while True:
            assert isinstance(await conn.next_frame(), protocol.StatusRequest)
            conn.send(protocol.Status("n1", protocol.Role.FOLLOWER, "127.0.0.1:1", 3, 2, 2, 0))

    async def asked_again_for_its_last_record(conn) -> None:
        await conn.welcome()
        assert await conn.next_frame() == protocol.Subscribe(5, truncated_known=True)
        followed_again.set()
        await conn.hold_until_stopped()

    async def scenario() -> float:
        upstream = ScriptedNode([streaming(5, b"r"), answers_it_holds_two, asked_again_for_its_last_record])
        relay = Relay(
            relay_config(data_dir=str(tmp_path / "relay"), upstream=[await upstream.start()], listen=free_address(), insecure=True)
        )
        stop = asyncio.Event()
        running = asyncio.create_task(relay.run(stop))
        try:
            await asyncio.wait_for(followed_again.wait(), STEP_TIMEOUT_S)
            families = {f.name: f for f in relay.collector().collect()}
            return families["raftseq_relay_upstream_behind_records"].samples[0].value
        finally:
            stop.set()
            await asyncio.wait_for(running, STEP_TIMEOUT_S)
            await upstream.stop()

    with caplog.at_level(logging.WARNING, logger="raftseq.relay"):
        behind = asyncio.run(asyncio.wait_for(scenario(), 2 * STEP_TIMEOUT_S))
    assert behind == 3
    assert any("holds up to seq 2, below this relay's 5" in r.getMessage() for r in caplog.records), caplog.text
