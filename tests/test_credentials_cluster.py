"""Credentials on a real three-node cluster (``cluster.credentials``): a credential over its
message rate, or its byte rate, gets ``Busy`` while another is unaffected; refusals are typed
and sequence nothing; a revoked credential's connection is closed with ``Rejected``; a client of the previous
release uses a credential as its token unchanged.

One cluster for the module (``cluster``), its nodes naming a credentials file made first.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from cluster_harness import ClusterHarness, RawConnection, run_seed
from test_credentials import make_file
from upgrade_harness import PREVIOUS_RELEASE, PREVIOUS_RELEASE_COMMIT, materialise

from raftseq.clients import SequencerClient, subscribe
from raftseq.clients.errors import Rejected, TokenRejected
from raftseq.cluster.cli.command import main
from raftseq.cluster.config import CREDENTIAL_BURST_S, METRICS_PAGE_REUSE_S, QUOTA_RETRY_REFILL
from raftseq.cluster.credentials import Quotas
from raftseq.cluster.local import LEADER_TIMEOUT_S, free_base_port
from raftseq.cluster.metrics import page_samples
from raftseq.cluster.quotas import LIMIT_BYTES, LIMIT_MESSAGES
from raftseq.cluster.relay_local import wait_relay_serving
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import RejectReason

#: The rate of the limited credential, in messages a second (its burst: one second of it).
SLOW_RATE_PER_S = 20
#: Submits each credential sends in one SubmitBatch.
BATCH = 3 * SLOW_RATE_PER_S
#: A credential limited well below what the cluster takes, and a client whose window is a
#: second of that rate, sending four seconds of it.
BULK_RATE_PER_S = 2_000
BULK_WINDOW = BULK_RATE_PER_S
BULK_MESSAGES = 4 * BULK_RATE_PER_S
#: A credential limited in bytes a second (its burst: one second of it, above the largest
#: payload), and the size of its submits: its burst holds ``BYTES_BURST_SUBMITS`` of them.
BYTES_RATE_PER_S = 40_000
BYTES_PAYLOAD = 4_000
BYTES_BURST_SUBMITS = int(BYTES_RATE_PER_S * CREDENTIAL_BURST_S) // BYTES_PAYLOAD
#: Bound on every wait for the nodes; revocation is seen within ``CREDENTIALS_POLL_INTERVAL_S``.
WAIT_S = 20.0
SCRAPE_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cred")
    path = root / "credentials.json"
    tokens = make_file(
        path,
        ("slow", ["submit"], ["slow-"], {"quotas": Quotas(messages_per_s=SLOW_RATE_PER_S)}),
        ("bulk", ["submit"], ["bulk-"], {"quotas": Quotas(messages_per_s=BULK_RATE_PER_S)}),
        ("bytes", ["submit"], ["bytes-"], {"quotas": Quotas(bytes_per_s=BYTES_RATE_PER_S)}),
        ("fast", ["submit"], ["fast-"], {}),
        ("reader", ["subscribe"], ["reader-"], {}),
        ("writer", ["submit"], [], {}),
        ("temp", ["submit", "subscribe"], [], {}),
        ("previous", ["submit"], ["previous-release-"], {}),
        ("previous-reader", ["subscribe"], [], {}),
    )
    seed = run_seed()
    harness = ClusterHarness(str(root / "c"), free_base_port(random.Random(seed)), seed=seed, overrides={"credentials_file": str(path)})
    try:
        harness.start(leader_timeout_s=LEADER_TIMEOUT_S)
        print(harness.describe(), flush=True)
        yield harness, str(path), tokens
    finally:
        harness.stop()
        print(harness.log_tails(), flush=True)


def leader_endpoint(h: ClusterHarness) -> str:
    return h.wait_for_leader()["address"]


def credential_refusals(h: ClusterHarness) -> dict[tuple[str, str], float]:
    """``raftseq_credential_refusals_total`` summed over the nodes, by (credential, limit)."""
    found: dict[tuple[str, str], float] = {}
    for node in h.nodes:
        with urllib.request.urlopen(f"http://{node.config.metrics_address}/metrics", timeout=SCRAPE_TIMEOUT_S) as page:
            for line in page.read().decode().splitlines():
                if line.startswith("raftseq_credential_refusals_total{"):
                    labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
                    key = (labels["credential"].strip('"'), labels["limit"].strip('"'))
                    found[key] = found.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return found


def counted(h: ClusterHarness, enough) -> dict[tuple[str, str], float]:
    """``credential_refusals`` once `enough` says it holds what the test did (a node serves
    one page for ``METRICS_PAGE_REUSE_S``): polled, for at most ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while not enough(found := credential_refusals(h)) and time.monotonic() < deadline:
        time.sleep(METRICS_PAGE_REUSE_S)
    return found


def acked_and_busy(conn: RawConnection, count: int, first_client_seq: int = 1) -> tuple[int, list[protocol.Busy]]:
    """Read answers to `count` submits (from `first_client_seq` on) until all are acknowledged,
    or until one is answered ``Busy`` and every one before it acknowledged (those behind a Busy
    go unanswered: the client sends them again after it): how many were acknowledged, the Busys."""
    acked, busy = 0, []
    while acked < count and not (busy and acked >= busy[0].client_seq - first_client_seq):
        more, others = conn.answers(1, timeout_s=WAIT_S)
        acked += more
        busy += others
    assert all(isinstance(frame, protocol.Busy) for frame in busy), busy
    return acked, busy


def test_a_credential_over_its_message_rate_gets_busy_while_another_is_unaffected(cluster):
    h, _, tokens = cluster
    leader = leader_endpoint(h)
    before = credential_refusals(h)
    with RawConnection(leader) as slow, RawConnection(leader) as fast:
        assert isinstance(slow.hello("slow-1", tokens["slow"]), protocol.Welcome)
        assert isinstance(fast.hello("fast-1", tokens["fast"]), protocol.Welcome)
        payloads = [b"p%03d" % i for i in range(BATCH)]
        slow.send_frame(protocol.SubmitBatch(1, payloads))
        fast.send_frame(protocol.SubmitBatch(1, payloads))
        slow_acked, slow_busy = acked_and_busy(slow, BATCH)
        fast_acked, fast_busy = acked_and_busy(fast, BATCH)
    print(f"slow: {slow_acked} acked, {len(slow_busy)} busy; fast: {fast_acked} acked, {len(fast_busy)} busy")
    assert fast_acked == BATCH and not fast_busy, "the credential without a quota was held back"
    # The burst (one second of the rate), and what the bucket refilled while the frame was read.
    assert SLOW_RATE_PER_S <= slow_acked < BATCH
    # Only the first one over is answered: the client sends it and everything after it again.
    assert [b.client_seq for b in slow_busy] == [slow_acked + 1], "refused from the first one over"
    assert all(b.limit == LIMIT_MESSAGES and b.retry_after_ms > 0 for b in slow_busy)
    key = ("slow", LIMIT_MESSAGES)
    refused = BATCH - slow_acked
    after = counted(h, lambda found: found.get(key, 0) - before.get(key, 0) >= refused)
    assert after[key] - before.get(key, 0) == refused
    assert all(count == before.get(key, 0) for key, count in after.items() if key[0] == "fast")


def test_a_credential_over_its_byte_rate_gets_busy_with_a_retry_hint_while_another_is_unaffected(cluster):
    h, _, tokens = cluster
    leader = leader_endpoint(h)
    before = credential_refusals(h)
    over = 5
    payloads = [b"%c" % (65 + i) * BYTES_PAYLOAD for i in range(BYTES_BURST_SUBMITS + over)]
    with RawConnection(leader) as limited, RawConnection(leader) as fast:
        assert isinstance(limited.hello("bytes-1", tokens["bytes"]), protocol.Welcome)
        assert isinstance(fast.hello("fast-bytes", tokens["fast"]), protocol.Welcome)
        limited.send_frame(protocol.SubmitBatch(1, payloads))
        fast.send_frame(protocol.SubmitBatch(1, payloads))
        acked, busy = acked_and_busy(limited, len(payloads))
        fast_acked, fast_busy = acked_and_busy(fast, len(payloads))
        assert fast_acked == len(payloads) and not fast_busy, "the credential without a quota was held back"
        # Its bucket was full: exactly its burst passes (one frame's submits are weighed at one time).
        assert acked == BYTES_BURST_SUBMITS
        assert [(b.client_seq, b.limit) for b in busy] == [(BYTES_BURST_SUBMITS + 1, LIMIT_BYTES)]
        # Told to come back once a quarter of its burst is back: 10,000 bytes at 40,000 B/s.
        assert busy[0].retry_after_ms == math.ceil(QUOTA_RETRY_REFILL * CREDENTIAL_BURST_S * 1000)
        time.sleep(busy[0].retry_after_ms / 1000)  # what the client is told to do, not a synchronisation
        limited.send_frame(protocol.SubmitBatch(BYTES_BURST_SUBMITS + 1, payloads[BYTES_BURST_SUBMITS:]))
        resent, busy_again = acked_and_busy(limited, over, BYTES_BURST_SUBMITS + 1)
    print(f"bytes: {acked} acked, then {resent} of {over} after {busy[0].retry_after_ms} ms")
    assert resent >= 1, "nothing passed after the wait the node asked for"
    assert all(b.limit == LIMIT_BYTES for b in busy_again), busy_again
    key = ("bytes", LIMIT_BYTES)
    refused = over + (over - resent)
    after = counted(h, lambda found: found.get(key, 0) - before.get(key, 0) >= refused)
    assert after[key] - before.get(key, 0) == refused
    assert all(count == before.get(k, 0) for k, count in after.items() if k[0] == "fast")


def test_a_limited_client_gets_everything_sequenced_once_at_its_rate(cluster):
    h, _, tokens = cluster

    async def story() -> tuple[list[int], float]:
        async with SequencerClient(h.endpoints, session="slow-client", token=tokens["slow"]) as client:
            started = time.monotonic()
            seqs = await asyncio.wait_for(asyncio.gather(*(client.submit(b"m%d" % i) for i in range(BATCH))), WAIT_S)
            return seqs, time.monotonic() - started

    seqs, elapsed_s = asyncio.run(story())
    print(f"{BATCH} submits at {SLOW_RATE_PER_S}/s took {elapsed_s:.2f} s")
    assert len(set(seqs)) == BATCH
    # A burst of one second's worth, then the rate: at least (BATCH - burst) / rate seconds.
    assert elapsed_s >= (BATCH - 2 * SLOW_RATE_PER_S) / SLOW_RATE_PER_S


def entries_proposed(h: ClusterHarness) -> float:
    """``raftseq_entries_proposed_total`` summed over the nodes (only a leader proposes)."""
    total = 0.0
    for node in h.nodes:
        with urllib.request.urlopen(f"http://{node.config.metrics_address}/metrics", timeout=SCRAPE_TIMEOUT_S) as page:
            total += page_samples(page.read().decode())["raftseq_entries_proposed_total"]
    return total


def test_a_client_over_its_quota_with_a_full_window_sends_nothing_to_raft_that_is_refused_there(cluster):
    """A client whose window holds more than its quota lets through gets ``Busy`` for the first
    submit over, and sends it and everything after it again. What it sent behind it meanwhile
    used to be taken whenever the bucket had refilled, reach Raft and be refused there (sequence
    gap), every refusal making the client send its window again: 14,631 Raft entries and
    413,466 resubmits for 8,000 messages at 2,000 msg/s (6.3 s); four bulk processes at a quota
    of 100k msg/s fell to 7k msg/s. Now each message is proposed once, and the client, told to
    retry once a quarter of its bucket is back, resends in chunks of what the node took of its
    last sending, one chunk per retry-after: sending its whole window again each time cost
    11,794 resubmits for these 8,000 messages (2,918 paced)."""
    h, _, tokens = cluster
    time.sleep(METRICS_PAGE_REUSE_S)  # a page of its own, not one another test read
    before = entries_proposed(h)

    async def story() -> tuple[list[int], int]:
        async with SequencerClient(h.endpoints, session="bulk-window", token=tokens["bulk"], in_flight_max=BULK_WINDOW) as client:
            batches = []
            for first in range(0, BULK_MESSAGES, 100):
                await asyncio.wait_for(client.wait_for_room(100), WAIT_S)
                batches.append(client.submit_batch_nowait([b"m%d" % i for i in range(first, first + 100)]))
            groups = await asyncio.wait_for(asyncio.gather(*batches), 3 * WAIT_S)
            return [seq for group in groups for seq in group], client.resubmits

    seqs, resubmits = asyncio.run(story())
    time.sleep(METRICS_PAGE_REUSE_S)
    proposed = entries_proposed(h) - before
    print(f"{BULK_MESSAGES} messages at a quota of {BULK_RATE_PER_S}/s: {proposed:.0f} Raft entries proposed, {resubmits} resubmits")
    assert len(set(seqs)) == BULK_MESSAGES
    assert proposed <= 1.05 * BULK_MESSAGES, f"{proposed:.0f} entries proposed for {BULK_MESSAGES} messages"
    # Told to retry once a quarter of the burst is back, not one token (211,756 resubmits), and
    # resending in chunks the quota lets in, not the whole window (11,794).
    assert resubmits <= 0.6 * BULK_MESSAGES, f"{resubmits} resubmits for {BULK_MESSAGES} messages"


def refusal_of(conn: RawConnection) -> protocol.Rejected:
    frames = conn.frames_until_closed(timeout_s=WAIT_S)
    rejected = [f for f in frames if isinstance(f, protocol.Rejected)]
    assert rejected and rejected[-1].reason is RejectReason.AUTH_FAILED, frames
    return rejected[-1]


def test_bad_credentials_are_refused_with_typed_errors_and_sequence_nothing(cluster):
    h, _, tokens = cluster
    leader = leader_endpoint(h)
    with RawConnection(leader) as conn:
        assert "wrong token" in conn.hello("fast-1", "fast:not-its-secret").detail
    with RawConnection(leader) as conn:
        assert "wrong token" in conn.hello("fast-1", "nobody:secret").detail
    with RawConnection(leader) as conn:
        answer = conn.hello("slow-1", tokens["fast"])
        assert answer.reason is RejectReason.AUTH_FAILED and "may not use session 'slow-1'" in answer.detail
    with RawConnection(leader) as conn:
        assert isinstance(conn.hello("reader-1", tokens["reader"]), protocol.Welcome)
        conn.send_frame(protocol.Submit(1, b"must not be sequenced"))
        assert "no submit role" in refusal_of(conn).detail
    with RawConnection(leader) as conn:
        assert isinstance(conn.hello("writer-1", tokens["writer"]), protocol.Welcome)
        conn.send_frame(protocol.Subscribe(1))
        assert "no subscribe role" in refusal_of(conn).detail

    async def clients() -> list[str]:
        seen = []
        for session, token in (("slow-2", "slow:wrong"), ("other-1", tokens["slow"])):
            with pytest.raises(TokenRejected) as caught:
                async with SequencerClient(h.endpoints, session=session, token=token) as client:
                    await client.submit(b"x")
            seen.append(caught.value.detail)
        async with SequencerClient(h.endpoints, session="reader-2", token=tokens["reader"]) as client:
            with pytest.raises(Rejected) as caught:
                await asyncio.wait_for(client.submit(b"must not be sequenced"), WAIT_S)
            seen.append(caught.value.detail)
        return seen

    details = asyncio.run(clients())
    assert "wrong token" in details[0] and "may not use session" in details[1] and "no submit role" in details[2]

    # Nothing of the refused sessions is in the stream (read with the shared token).
    last = h.converged_seq() or 0

    async def stream() -> set[str]:
        sessions = set()
        if last:
            async for message in subscribe(h.endpoints, from_seq=1, token=h.token):
                sessions.add(message.session)
                if message.seq >= last:
                    break
        return sessions

    assert not {"reader-1", "reader-2", "other-1", "slow-2"} & asyncio.run(asyncio.wait_for(stream(), WAIT_S))


def test_a_revoked_credential_has_its_connections_closed_with_rejected(cluster):
    h, path, tokens = cluster
    leader = leader_endpoint(h)
    follower = next(h.endpoint(i) for i in h.node_ids if h.endpoint(i) != leader)
    with RawConnection(leader) as submitter, RawConnection(follower) as subscriber:
        assert isinstance(submitter.hello("temp-1", tokens["temp"]), protocol.Welcome)
        submitter.send_frame(protocol.Submit(1, b"before revocation"))
        assert isinstance(submitter.next_frame(timeout_s=WAIT_S), protocol.Ack)
        assert isinstance(subscriber.hello("temp-sub", tokens["temp"]), protocol.Welcome)
        subscriber.send_frame(protocol.Subscribe(1))
        assert main(["cred", "revoke", path, "temp"]) == 0
        started = time.monotonic()
        for conn in (submitter, subscriber):
            assert "revoked" in refusal_of(conn).detail
        print(f"both connections closed {time.monotonic() - started:.2f} s after the revocation")
    with RawConnection(leader) as conn:
        answer = conn.hello("temp-2", tokens["temp"])
        assert answer.reason is RejectReason.AUTH_FAILED and "revoked" in answer.detail


def test_a_relay_of_the_cluster_lets_its_credentials_in_with_their_roles(cluster):
    """``cluster up --relays N --credentials FILE`` (``LocalCluster.start_relays``) gives its
    relays the nodes' credentials file (``raftseq relay --credentials``): a subscribe-only
    credential reads through the relay, and is refused there for a submit as on a node (not sent
    on to the cluster); a wrong secret is refused; the relay counts its refusals. Before, a
    relay knew the shared token only: every external reader needed the token that may submit
    anything under any session."""
    h, _, tokens = cluster
    (relay,) = h.start_relays(1)
    try:
        seqs = asyncio.run(submit_some(h.endpoints, tokens["fast"], "fast-relay", 3))
        wait_relay_serving(relay, seqs[-1], timeout_s=WAIT_S)

        async def read_through_the_relay() -> list[int]:
            got = []
            async for message in subscribe([relay.client_address], from_seq=seqs[0], token=tokens["reader"], session="reader-relay"):
                got.append(message.seq)
                if message.seq >= seqs[-1]:
                    return got
            return got

        assert asyncio.run(asyncio.wait_for(read_through_the_relay(), WAIT_S)) == seqs
        with RawConnection(relay.client_address) as conn:
            assert "wrong token" in conn.hello("reader-3", "reader:not-its-secret").detail
        with RawConnection(relay.client_address) as conn:
            assert isinstance(conn.hello("reader-3", tokens["reader"]), protocol.Welcome)
            conn.send_frame(protocol.Submit(1, b"must not be sequenced"))
            assert "no submit role" in refusal_of(conn).detail
        time.sleep(METRICS_PAGE_REUSE_S)
        with urllib.request.urlopen(f"http://{relay.metrics_address}/metrics", timeout=SCRAPE_TIMEOUT_S) as page:
            text = page.read().decode()
        refusals = {
            (s.labels["credential"], s.labels["limit"]): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "raftseq_relay_credential_refusals_total"
        }
        assert refusals.get(("reader", "role")) == 1, refusals
    finally:
        relay.stop()


async def submit_some(endpoints: list[str], token: str, session: str, count: int) -> list[int]:
    async with SequencerClient(endpoints, session=session, token=token) as client:
        return await client.submit_batch([b"m%d" % i for i in range(count)])


def test_a_client_of_the_previous_release_uses_a_credential_as_its_token(cluster, tmp_path):
    h, _, tokens = cluster
    release = materialise(PREVIOUS_RELEASE_COMMIT, PREVIOUS_RELEASE, str(tmp_path))
    load = release.start_client_load(h.endpoints, token=tokens["previous"], rate_per_s=200, count_max=50)
    # It stops by itself after count_max submits (closing its stdin would stop it at once).
    load.wait(timeout=WAIT_S * 3)
    assert load.returncode == 0, load.stderr.read()
    assert len(set(json.loads(load.stdout.read()))) == 50
    load.stdin.close()
    # A refusal of a credential reaches it as a reason it knows: it fails, it does not hang.
    code = (
        "import asyncio, sys\n"
        "from raftseq.clients import SequencerClient\n"
        "async def main():\n"
        "    async with SequencerClient(sys.argv[1].split(','), session='old-reader', token=sys.argv[2]) as c:\n"
        "        try:\n"
        "            await asyncio.wait_for(c.submit(b'x'), 20)\n"
        "        except Exception as exc:\n"
        "            print(type(exc).__name__, getattr(exc, 'reason', None))\n"
        "asyncio.run(main())\n"
    )
    printed = release.run_python(code, ",".join(h.endpoints), tokens["previous-reader"])
    assert printed.split() == ["Rejected", "RejectReason.AUTH_FAILED"], printed
