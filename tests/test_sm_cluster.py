"""State machines on a real three-node cluster: the runner through a node kill, snapshots
published to the cluster and served by followers, a late joiner that verifies them, and
divergence caught by checkpoints and by ``raftseq sm check``.

The state machines are those of ``test_sm_runner`` (a key-value store and a counter).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from cluster_harness import ClusterHarness, pipeline, running_cluster  # noqa: F401
from test_sm_runner import KvStore, Put

from raftseq.clients import SequencerClient
from raftseq.clients.sm import (
    CapturedSnapshot,
    SnapshotVerifyError,
    StateMachineRunner,
    encode_message,
    query_snapshots,
    snapshot_session,
    upload_snapshot,
)
from raftseq.cluster.cli import sm as sm_command
from raftseq.sequencer import protocol

STEP_TIMEOUT_S = 60


def puts(prefix: str, count: int, *, keys: int = 50) -> list[bytes]:
    return [encode_message(Put(f"{prefix}{i % keys}", i)) for i in range(count)]


def applied_seqs(machine: KvStore) -> list[int]:
    return [seq for seq, _ in machine.applied]


async def submit_all(h: ClusterHarness, session: str, payloads: list[bytes]) -> list[int]:
    async with SequencerClient(h.endpoints, session=session, token=h.token, in_flight_max=2000) as client:
        return await pipeline(client, payloads, timeout_s=STEP_TIMEOUT_S)


def leader_and_followers(h: ClusterHarness) -> tuple[str, list[str]]:
    leader = h.wait_for_leader()
    return leader["id"], [n for n in h.node_ids if n != leader["id"]]


async def wait_listed(endpoints: list[str], token: str, *, count: int, timeout_s: float = 10.0) -> None:
    """Return once every endpoint lists `count` snapshots of "kv"."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = [len(await query_snapshots([e], "kv", token=token)) for e in endpoints]
        if all(n == count for n in listed):
            return
        assert time.monotonic() < deadline, f"nodes list {listed} snapshots, expected {count}"
        await asyncio.sleep(0.02)


def sm_check(h: ClusterHarness, *extra: str) -> tuple[int, dict]:
    """``raftseq sm check --json`` as a separate process (the command's own entry point)."""
    done = subprocess.run(
        [sys.executable, "-m", "raftseq.cluster.cli", "sm", "check", "--json", "--endpoints", ",".join(h.endpoints), "--token", h.token, *extra],
        capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_runner_snapshots_and_a_late_joiner_through_a_node_kill(running_cluster):
    h = running_cluster
    kv = KvStore()
    publisher = StateMachineRunner(h.endpoints, [kv], token=h.token, replica="r1", checkpoint_every=500)

    async def scenario():
        # 1. The runner applies the stream while a writer submits; the node serving the
        #    runner's subscription (the first endpoint) is killed half way.
        first_half = asyncio.create_task(submit_all(h, "writer-1", puts("a", 1500)))
        running = asyncio.create_task(publisher.run(stop_when=lambda seq: len(kv.applied) >= 3000))
        while len(kv.applied) < 500:
            await asyncio.sleep(0.01)
            assert not running.done(), running
        h.kill("n1")
        seqs = await first_half
        seqs += await submit_all(h, "writer-2", puts("b", 1500))
        await asyncio.wait_for(running, STEP_TIMEOUT_S)
        assert applied_seqs(kv) == sorted(seqs), "every message applied once, in order"

        # 2. Publish a snapshot; a follower lists it.
        [good] = await publisher.publish_snapshot("kv")
        assert (good.covered_seq, good.session) == (publisher.last_seq, snapshot_session("kv", "r1"))
        _, followers = await asyncio.to_thread(leader_and_followers, h)
        live = [f for f in followers if f != "n1"]
        listed = await query_snapshots([h.endpoint(live[0])], "kv", token=h.token)
        assert good in listed

        # 3. More traffic; then two snapshots a late joiner must not use: one of a schema
        #    version it cannot read, and one whose digest does not match its bytes.
        tail = await submit_all(h, "writer-3", puts("c", 300))
        await publisher.run(until_seq=tail[-1])
        captured = publisher.capture("kv")
        async with SequencerClient(h.endpoints, session=snapshot_session("kv", "evil"), token=h.token, snapshot_publisher=True) as evil:
            await upload_snapshot(evil, CapturedSnapshot("kv", 9, captured.covered_seq, captured.digest, captured.data))
            await upload_snapshot(evil, CapturedSnapshot("kv", 1, captured.covered_seq, "0" * 64, captured.data))
        final = (await submit_all(h, "writer-4", puts("d", 200)))[-1]
        await publisher.run(until_seq=final)

        # 4. The late joiner, given followers only, loads the good snapshot and replays the rest
        #    (once the followers have applied the uploads: a follower may lag by a moment).
        endpoints = [h.endpoint(f) for f in live]
        await wait_listed(endpoints, h.token, count=3)
        late = KvStore()
        joiner = StateMachineRunner(endpoints, [late], token=h.token, replica="r9", from_snapshot=True)
        started = time.monotonic()
        await asyncio.wait_for(joiner.run(until_seq=final), STEP_TIMEOUT_S)
        print(f"late joiner: {len(late.applied)} messages applied in {time.monotonic() - started:.2f} s")
        await joiner.close()
        return good, joiner, late, final

    good, joiner, late, final = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    try:
        assert joiner.joined_from["kv"] == good
        [refused] = joiner.snapshot_errors
        assert isinstance(refused, SnapshotVerifyError)
        assert "'kv'" in str(refused) and "digest after restore" in str(refused) and "@snap/kv/evil" in str(refused)
        assert min(applied_seqs(late)) > good.covered_seq and len(late.applied) == 500
        assert joiner.digest("kv") == publisher.digest("kv") and late.data == kv.data
        assert joiner.last_seq == publisher.last_seq == final

        # Every node indexes the same three snapshots (two of them useless to this reader).
        listing = asyncio.run(sm_command.list_snapshots(h.endpoints[1:], "kv", token=h.token))
        assert sorted(i.schema_version for i in listing.snapshots) == [1, 1, 9]
        # One replica's checkpoints: nothing to disagree with.
        code, report = sm_check(h)
        assert code == 0 and report["ok"] and report["types"]["kv"]["replicas"] == ["r1"]
    finally:
        asyncio.run(publisher.close())


class WallClockKvStore(KvStore):
    """A copy made nondeterministic on purpose: one message's value comes from the wall clock."""

    def apply(self, message, seq, log_time_ns):
        super().apply(message, seq, log_time_ns)
        if type(message) is Put and message.key == "poison":
            self.data["poison"] = message.value + 1 + time.time_ns() % 997


def test_a_nondeterministic_copy_is_caught_by_checkpoints_and_by_sm_check(running_cluster):
    h = running_cluster
    every = 200
    machines = {"r1": KvStore(), "r2": KvStore(), "r3": WallClockKvStore()}
    runners = {
        name: StateMachineRunner(h.endpoints, [m], token=h.token, replica=name, checkpoint_every=every, on_divergence="log")
        for name, m in machines.items()
    }
    payloads = puts("k", 1000)
    payloads[450] = encode_message(Put("poison", 1))

    async def scenario():
        seqs = await submit_all(h, "writer", payloads)
        await asyncio.gather(*(r.run(until_seq=seqs[-1]) for r in runners.values()))
        # Wait until every checkpoint is sequenced, then let every replica read them all.
        for r in runners.values():
            assert await r.flush(timeout_s=STEP_TIMEOUT_S)
        status = await asyncio.to_thread(h.status)
        last = max(n["last_seq"] for n in status["nodes"] if "last_seq" in n)
        await asyncio.gather(*(r.run(until_seq=last) for r in runners.values()))
        for r in runners.values():
            await r.close()
        return seqs

    seqs = asyncio.run(asyncio.wait_for(scenario(), 2 * STEP_TIMEOUT_S))
    poisoned_at = seqs[450]
    first_bad = (poisoned_at // every + 1) * every
    for name in ("r1", "r2", "r3"):
        found = runners[name].divergences
        # Noticed at the first disagreeing checkpoint, as soon as two copies' digests met...
        assert found and found[0].seq == first_bad and "r3" in found[0].digests, f"{name}: {found}"
        # ... and, once every copy's checkpoint is read, the whole picture: r3 is the odd one.
        d = runners[name].ledger.first_divergence()
        assert (d.sm_type, d.seq, d.last_agreed_seq) == ("kv", first_bad, first_bad - every), d
        assert [replicas for _, replicas in d.groups()] == [["r1", "r2"], ["r3"]]

    code, report = sm_check(h)
    assert code == 1 and not report["ok"]
    [d] = report["divergences"]
    assert (d["sm_type"], d["seq"], d["last_agreed_seq"]) == ("kv", first_bad, first_bad - every)
    assert d["digests"]["r1"] == d["digests"]["r2"] != d["digests"]["r3"]
    # Read only up to before the poison: every copy agrees there.
    code, report = sm_check(h, "--to", str(poisoned_at - 1))
    assert code == 0, report


def test_a_follower_answers_snapshot_queries_from_its_replicated_index(running_cluster):
    h = running_cluster
    _, followers = leader_and_followers(h)

    async def scenario():
        await submit_all(h, "writer", puts("k", 5))
        async with SequencerClient(h.endpoints, session=snapshot_session("kv", "solo"), token=h.token, snapshot_publisher=True) as client:
            first, last = await upload_snapshot(client, CapturedSnapshot("kv", 1, 5, "ab" * 32, b"s" * 70_000), chunk_bytes=30_000)
        assert (first, last) == (6, 8)
        await wait_listed([h.endpoint(f) for f in followers], h.token, count=1)
        answers = [await query_snapshots([h.endpoint(f)], "kv", token=h.token) for f in followers]
        return answers, first, last

    answers, first, last = asyncio.run(scenario())
    for answer in answers:
        [info] = answer
        assert (info.first_seq, info.last_seq, info.chunk_count, info.total_bytes, info.covered_seq) == (first, last, 3, 70_000, 5)
    assert protocol.SnapshotList  # the frame pair is in the protocol
