"""A rolling upgrade under load from the previous release (``upgrade_harness.PREVIOUS_RELEASE``,
taken from git history) to this checkout, node by node, and a downgrade of one node back.

Three nodes of the previous release, on configs that release wrote, take a paced pipelined load
from this checkout's client and, in a process of its own, from the previous release's client. Each node in turn (followers first, the leader last) is stopped
(SIGTERM), started with this checkout's code on the same config and data directory, and waited
for until it holds what the leader held. Then: every acknowledged message is in every node's
stream at the number it was acknowledged with, no message is there twice, the journals are
identical byte for byte, and the longest pause between two acknowledgements is reported per
step, inside the node's downtime (stop to start; for the leader that includes the election)
and outside it (from its start until the next step), the latter asserted <= ``ACK_STALL_MAX_S``,
the former <= ``FOLLOWER_DOWN_STALL_MAX_S`` or ``LEADER_DOWN_STALL_MAX_S``.

The downgrade: one upgraded follower is started with the previous release's code again. It is
either refused (a non-zero exit with one line saying why, no traceback) when the data directory
holds a format that release cannot read, or it runs and is harmless (it catches up and its
journal stays identical); which one is decided by the data directory (docs/upgrades.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time

import pytest
from cluster_harness import run_seed
from upgrade_harness import PREVIOUS_RELEASE, PREVIOUS_RELEASE_COMMIT, MixedCluster, Step, materialise

from raftseq.clients import SequencerClient, subscribe
from raftseq.cluster.local import LEADER_TIMEOUT_S, free_base_port
from raftseq.cluster.processes import kill_process

#: The load: submits per second (paced), at most this many in flight, and a bound on the count.
LOAD_RATE_PER_S = 400
IN_FLIGHT_MAX = 256
LOAD_TIME_MAX_S = 60.0
LOAD_COUNT_MAX = int(LOAD_RATE_PER_S * LOAD_TIME_MAX_S)
#: The previous release's client beside it (its own process), submits per second.
PREVIOUS_CLIENT_RATE_PER_S = 100
#: Acknowledgements before the first node is replaced, and load kept up after the last one.
WARMUP_ACKS = 400
AFTER_LAST_STEP_S = 2.0
#: For a restarted node to hold what the leader held, and for outstanding acks at the end.
CATCH_UP_TIMEOUT_S = 20.0
OUTCOME_TIMEOUT_S = 30.0
#: The longest pause between two acknowledgements outside a restarted node's own downtime.
ACK_STALL_MAX_S = 1.0
#: The longest pause while a follower is down (it is not needed for a majority) and while the
#: leader is: an election (node config: 0.2-0.4 s election timeout) and the client finding the
#: new leader; measured 0.23-0.38 s here, the bound leaves room for a loaded machine.
FOLLOWER_DOWN_STALL_MAX_S = 1.0
LEADER_DOWN_STALL_MAX_S = 2.0
#: How long a refused downgrade may take to exit.
DOWNGRADE_EXIT_TIMEOUT_S = 20.0
#: Reading each node's whole stream back, and the whole test (about 10 s on two cores).
READ_BACK_TIMEOUT_S = 30.0
TEST_TIMEOUT_S = 120


def payload(index: int) -> bytes:
    return b"upgrade-%08d" % index


async def paced_load(client: SequencerClient, stop: asyncio.Event, acks: list[tuple[float, int]]) -> list[int]:
    """Submit ``payload(0..)`` at ``LOAD_RATE_PER_S`` until `stop` (or ``LOAD_COUNT_MAX``);
    each acknowledgement's time and number go to `acks`. The sequence numbers, by index."""
    futures = []
    began = time.monotonic()

    def acked(future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            acks.append((time.monotonic(), future.result()))

    while not stop.is_set() and len(futures) < LOAD_COUNT_MAX:
        await asyncio.wait_for(client.wait_for_room(), OUTCOME_TIMEOUT_S)
        future = client.submit_nowait(payload(len(futures)))
        future.add_done_callback(acked)
        futures.append(future)
        ahead_s = len(futures) / LOAD_RATE_PER_S - (time.monotonic() - began)
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)
    return list(await asyncio.wait_for(asyncio.gather(*futures), OUTCOME_TIMEOUT_S))


def longest_gap(times: list[float], start: float, end: float, *, overlapping: bool) -> float:
    """The longest pause between consecutive acknowledgement `times` (sorted) that overlaps
    [start, end] (`overlapping`) or lies inside it: 0 when none does."""
    gaps = [b - a for a, b in zip(times, times[1:]) if (a < end and b > start if overlapping else a >= start and b <= end)]
    return max(gaps, default=0.0)


def replace_node(h: MixedCluster, node_id: str) -> Step:
    """Stop `node_id`, start it with this checkout's code, wait until it caught up."""
    leader = h.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)
    step = Step(node_id, leader["id"] == node_id, time.monotonic())
    h.kill(node_id, signal.SIGTERM)
    if step.was_leader:
        # The two others elect a leader before the old one comes back on the new code.
        h.wait_for_leader(timeout_s=LEADER_TIMEOUT_S, among=[i for i in h.node_ids if i != node_id])
    h.use_release(node_id, previous=False)
    step.started_at = time.monotonic()
    h.restart(node_id)
    h.wait_caught_up(node_id, timeout_s=CATCH_UP_TIMEOUT_S)
    step.caught_up_at = time.monotonic()
    return step


def upgrade_all(h: MixedCluster) -> list[Step]:
    leader = h.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)["id"]
    order = [i for i in h.node_ids if i != leader] + [leader]
    return [replace_node(h, node_id) for node_id in order]


def downgrade_one(h: MixedCluster) -> str:
    """Start one upgraded follower with the previous release's code: "refused" or "runs"."""
    leader = h.wait_for_leader(timeout_s=LEADER_TIMEOUT_S)["id"]
    node_id = next(i for i in h.node_ids if i != leader)
    h.kill(node_id, signal.SIGTERM)
    # The new code marks a data directory the previous release must not use (its Raft log
    # converted from pysyncobj's file): a directory where that release expects its file.
    refuse = os.path.isdir(os.path.join(h.raft_dir(node_id), "raft.log"))
    h.use_release(node_id, previous=True)
    h.restart(node_id)
    node = h.node(node_id)
    if refuse:
        try:
            code = node.process.wait(DOWNGRADE_EXIT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - TimeoutExpired: it runs on a directory it cannot read
            raise AssertionError(f"raftseq {PREVIOUS_RELEASE} ran on {node_id}'s upgraded data directory\n{h.log_tails()}") from exc
        output = h.log_text(node_id, since=node.log_offset)
        h.reap(node_id)
        assert code > 0, f"raftseq {PREVIOUS_RELEASE} on an upgraded data directory: exit code {code}\n{output}"
        assert "Traceback" not in output and output.strip(), f"the refusal is not one clear line:\n{output}"
        print(f"downgrade of {node_id} refused: exit {code}: {output.strip().splitlines()[-1]}", flush=True)
        outcome = "refused"
    else:
        h.wait_caught_up(node_id, timeout_s=CATCH_UP_TIMEOUT_S)
        print(f"downgrade of {node_id}: raftseq {PREVIOUS_RELEASE} runs on its data directory and caught up", flush=True)
        outcome = "runs"
    # Back to this checkout's code either way: the node must still join and hold the stream.
    if h.is_running(node_id):
        h.kill(node_id, signal.SIGTERM)
    h.use_release(node_id, previous=False)
    h.restart(node_id)
    h.wait_caught_up(node_id, timeout_s=CATCH_UP_TIMEOUT_S)
    return outcome


async def read_stream(h: MixedCluster, node_id: str, last_seq: int) -> list[tuple[int, bytes]]:
    """Every message 1..`last_seq` from `node_id` alone (no other endpoint)."""
    out: list[tuple[int, bytes]] = []

    async def read() -> None:
        async for message in subscribe([h.endpoint(node_id)], from_seq=1, token=h.token, session=f"read-{node_id}"):
            out.append((message.seq, message.payload))
            if message.seq >= last_seq:
                return

    await asyncio.wait_for(read(), READ_BACK_TIMEOUT_S)
    return out


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_rolling_upgrade_from_the_previous_release_under_load(tmp_path):
    release = materialise(PREVIOUS_RELEASE_COMMIT, PREVIOUS_RELEASE, str(tmp_path / "release"))
    seed = run_seed()
    h = MixedCluster(str(tmp_path / "c"), free_base_port(random.Random(seed)), seed=seed, release=release)
    print(f"raftseq {release.version} ({release.commit}) from {release.tree}\n{h.describe()}", flush=True)
    try:
        h.start(leader_timeout_s=LEADER_TIMEOUT_S)
        old_client = release.start_client_load(h.endpoints, token=h.token, rate_per_s=PREVIOUS_CLIENT_RATE_PER_S, count_max=LOAD_COUNT_MAX)
        try:
            asyncio.run(upgrade_and_check(h, old_client))
        finally:
            kill_process(old_client)
    finally:
        h.stop()
        print(h.log_tails(), flush=True)


async def upgrade_and_check(h: MixedCluster, old_client: subprocess.Popen) -> None:
    acks: list[tuple[float, int]] = []
    async with SequencerClient(h.endpoints, session="upgrade", token=h.token, in_flight_max=IN_FLIGHT_MAX) as client:
        stop = asyncio.Event()
        load = asyncio.create_task(paced_load(client, stop, acks))
        try:
            deadline = time.monotonic() + OUTCOME_TIMEOUT_S
            while len(acks) < WARMUP_ACKS and not load.done():
                assert time.monotonic() < deadline, f"{len(acks)} acks in {OUTCOME_TIMEOUT_S} s on raftseq {PREVIOUS_RELEASE}"
                await asyncio.sleep(0.05)
            steps = await asyncio.to_thread(upgrade_all, h)
            await asyncio.sleep(AFTER_LAST_STEP_S)
            stop.set()
            seqs = await load
        finally:
            load.cancel()  # a failed step ends the load with it (a no-op once it is done)
        print(f"{len(seqs)} messages acknowledged, {client.resubmits} resubmits, {client.failovers} failovers", flush=True)
    out, err = await asyncio.to_thread(old_client.communicate, "", OUTCOME_TIMEOUT_S)
    assert old_client.returncode == 0, f"the client of raftseq {PREVIOUS_RELEASE} failed: {err.strip()}"
    old_seqs = json.loads(out)
    print(f"{len(old_seqs)} messages acknowledged to the client of raftseq {PREVIOUS_RELEASE}", flush=True)

    times = sorted(t for t, _ in acks)
    ends = [s.stopped_at for s in steps[1:]] + [times[-1]]
    failures = []
    for step, end in zip(steps, ends):
        down = longest_gap(times, step.stopped_at, step.started_at, overlapping=True)
        outside = longest_gap(times, step.started_at, end, overlapping=False)
        print(
            f"step {step.node_id} ({'leader' if step.was_leader else 'follower'}): down {step.started_at - step.stopped_at:.2f} s, "
            f"caught up {step.caught_up_at - step.started_at:.2f} s after its start; longest ack pause while down "
            f"{down:.3f} s, outside {outside:.3f} s",
            flush=True,
        )
        down_max = LEADER_DOWN_STALL_MAX_S if step.was_leader else FOLLOWER_DOWN_STALL_MAX_S
        if down > down_max:
            failures.append(f"{step.node_id}: acks paused {down:.3f} s while it was down (> {down_max} s)")
        if outside > ACK_STALL_MAX_S:
            failures.append(f"{step.node_id}: acks paused {outside:.3f} s outside its downtime (> {ACK_STALL_MAX_S} s)")

    outcome = await asyncio.to_thread(downgrade_one, h)
    expected = {seq: payload(index) for index, seq in enumerate(seqs)}
    expected.update({seq: b"old-%08d" % index for index, seq in enumerate(old_seqs)})
    assert len(expected) == len(seqs) + len(old_seqs), "two messages acknowledged with one number"
    last_seq = await asyncio.to_thread(h.wait_converged, at_least=len(expected))

    # Every node's stream is exactly the acknowledged messages at their numbers: none lost,
    # renumbered or there twice (every submit was acknowledged).
    for node_id in h.node_ids:
        stream = dict(await read_stream(h, node_id, last_seq))
        wrong = sorted(seq for seq in expected.keys() | stream.keys() if expected.get(seq) != stream.get(seq))
        assert not wrong, (
            f"{node_id}: {len(wrong)} numbers differ from the acks, first {[(q, expected.get(q), stream.get(q)) for q in wrong[:5]]}"
        )
    h.stop()
    journals = [h.read_journal(node_id) for node_id in h.node_ids]
    for journal in journals:
        assert journal.report.ok, f"{journal.node_id}: {journal.report}"
        assert journal.segment_bytes == journals[0].segment_bytes, f"{journal.node_id}'s journal differs from n1's"
    print(f"downgrade: {outcome}; {last_seq} messages in identical journals", flush=True)
    assert not failures, "; ".join(failures)
