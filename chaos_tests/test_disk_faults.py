"""Failures of a node's disk, on a real three-node cluster whose data directories are on
power-loss filesystems (``chaos_tests/powerfs.py``, its fault modes): a disk whose flushes
stall, one whose fsync fails, one that is full.

What must hold (``docs/operating.md``, "Disk failures"):

* a stalled Raft log disk never blocks the node's loop: past the writer's bound the leader
  answers ``Busy``, its memory stays bounded, and when the disk comes back it goes on with
  nothing acknowledged lost;
* a failed fsync (power durability) or a full disk ends that node with one clear log line and
  an exit code that is not restarted blindly; the others carry on, nothing acknowledged is lost.

Each test prints its seed (``RAFTSEQ_CHAOS_SEED=N`` replays the ports) and its figures. They
fail, never skip, where FUSE cannot run.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import pytest


from chaos_tests import powerfs
from chaos_tests.cluster import ChaosCluster, tmpfs_supported, wait_until
from chaos_tests.test_scenarios import chaos_seed
from raftseq.clients import SequencerClient
from raftseq.cluster.config import RAFT_LOG_WRITE_QUEUE_BYTES_MAX
from raftseq.cluster.node_exit import NodeExit
from raftseq.cluster.restarts import operator_exit
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import Journal
from raftseq.sequencer.limits import SEGMENT_BYTES_MIN

#: The Raft log's segments, as paths inside a node's data directory on its powerfs.
RAFT_LOG_SEGMENTS = "/raft/log-"
#: A scrape of a node whose loop runs answers within this (the machine is shared and slow).
SCRAPE_TIMEOUT_S = 5.0
#: From the stall to the writer past its bound: the workload fills its 64 MiB in seconds.
BUSY_WITHIN_S = 90.0
#: How long the stall is held once Busy answers come, watching the node's memory.
STALL_WATCH_S = 8.0
#: Growth of the stalled leader's resident memory allowed from the stall to its end: the
#: writer's bound and what the batcher held when it was reached (``batcher.held_bytes_max``,
#: 64 MiB), the entries themselves in the Raft log, and room for the allocator.
RSS_GROWTH_MAX_BYTES = 5 * RAFT_LOG_WRITE_QUEUE_BYTES_MAX
PAYLOAD = b"d" * 1000
#: The low-disk test: each node's data directory on a tmpfs this big, refusing below this much free.
TMPFS_BYTES = 24 << 20
DISK_FREE_MIN_BYTES = 2 << 20
DISK_FREE_MIN = {"journal": {"disk_free_bytes_min": DISK_FREE_MIN_BYTES}}


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Load:
    """A pipelined client on its own thread and loop: submits until stopped, keeping every
    acknowledgement (seq -> payload)."""

    def __init__(self, endpoints: list[str], token: str, *, session: str) -> None:
        self.endpoints = endpoints
        self.token = token
        self.session = session
        self.acked: dict[int, bytes] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name=f"load-{session}", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the load did not end within {timeout_s} s"

    async def _run(self) -> None:
        async with SequencerClient(self.endpoints, session=self.session, token=self.token, in_flight_max=2000) as client:
            futures = []
            n = 0
            while not self._stop.is_set():
                await asyncio.wait_for(client.wait_for_room(), 600)
                n += 1
                payload = PAYLOAD + b"%d" % n
                future = client.submit_nowait(payload)
                future.add_done_callback(lambda f, p=payload: self._done(f, p))
                futures.append(future)
                if n % 200 == 0:
                    futures = [f for f in futures if not f.done()]
                    await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 300)

    def _done(self, future: asyncio.Future, payload: bytes) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            self.errors.append(future.exception())
        else:
            self.acked[future.result()] = payload


def _check_journals(cluster: ChaosCluster, acked: dict[int, bytes]) -> int:
    """Stop the nodes (their filesystems stay mounted) and check that every node's journal
    holds every acknowledged payload at its number. Returns the journals' last seq."""
    for node_id in cluster.node_ids:
        if cluster.is_running(node_id):
            cluster.kill(node_id, 15)
            cluster.reap(node_id)
    lasts = set()
    for node_id in cluster.node_ids:
        journal = Journal.open(cluster.journal_dir(node_id), readonly=True)
        try:
            assert not journal.holes, f"{node_id}: holes {journal.holes}"
            held = {record.seq: record.payload for record in journal.records()}
            lasts.add(journal.last_seq)
        finally:
            journal.close()
        lost = [seq for seq, payload in acked.items() if held.get(seq) != payload]
        assert not lost, f"{node_id}: {len(lost)} acknowledged messages lost or changed, first {sorted(lost)[:5]}"
    assert len(lasts) == 1, f"the journals end at different numbers: {lasts}"
    return lasts.pop()


@pytest.fixture
def disk_cluster(tmp_path):
    """``disk_cluster(durability, **options)``: a started ``ChaosCluster`` (every node on a
    powerfs unless `options` say otherwise), a list for the test's ``Load``s, the leader and
    the seed; the loads and the cluster are stopped at teardown."""
    made: list[tuple[ChaosCluster, list[Load]]] = []
    seed = chaos_seed()

    def make(durability: str, **options) -> tuple[ChaosCluster, list[Load], str, int]:
        ok, why = powerfs.supported()
        assert ok, f"the power-loss filesystem cannot run here: {why}"
        options.setdefault("powerfs", ["n1", "n2", "n3"])
        cluster = ChaosCluster(str(tmp_path / "cluster"), rng=random.Random(seed), network="none", durability=durability, **options)
        loads: list[Load] = []
        made.append((cluster, loads))
        leader = cluster.start()["node"]
        print(f"seed {seed} (RAFTSEQ_CHAOS_SEED={seed} replays): {durability} durability, leader {leader}", flush=True)
        return cluster, loads, leader, seed

    try:
        yield make
    finally:
        for cluster, loads in made:
            for load in loads:
                load._stop.set()
            # A node whose fsync is stalled cannot end (the call never returns): end the
            # faults before the nodes.
            for fs in cluster.powerfs.values():
                if fs.mounted:
                    try:
                        fs.fault("none")
                    except powerfs.PowerFSError:
                        pass
            cluster.stop()


def test_a_leader_whose_raft_log_disk_stalls_refuses_hands_over_stays_bounded_and_loses_nothing(disk_cluster):
    cluster, loads, leader, seed = disk_cluster("power")
    pid = cluster.pid(leader)
    load = Load(cluster.endpoints, cluster.token, session="stall").start()
    loads.append(load)
    wait_until(lambda: len(load.acked) >= 2000, timeout_s=60, what="the load under way")
    rss_before = _rss_bytes(pid)

    cluster.powerfs[leader].fault("stall", prefix=RAFT_LOG_SEGMENTS)
    stalled_at = time.monotonic()
    acked_at_stall = len(load.acked)
    # The leader's loop keeps answering (a scrape is served on it) while its writer is
    # stuck; once the writer's backlog passes its bound, it takes no new entries.
    wait_until(
        lambda: cluster.metrics(leader).get("raftseq_raft_log_writer_backlog_bytes", 0) > RAFT_LOG_WRITE_QUEUE_BYTES_MAX,
        timeout_s=BUSY_WITHIN_S,
        what=f"{leader}'s Raft log writer past its bound",
    )
    busy_after_s = time.monotonic() - stalled_at
    rss_at_busy = _rss_bytes(pid)
    acked_at_busy = len(load.acked)
    rss_peak = rss_at_busy
    watch_until = time.monotonic() + STALL_WATCH_S
    scrapes = 0
    while time.monotonic() < watch_until:
        started = time.monotonic()
        samples = cluster.metrics(leader)  # answers, within SCRAPE_TIMEOUT_S, every time
        scrapes += 1
        assert time.monotonic() - started < SCRAPE_TIMEOUT_S
        rss_peak = max(rss_peak, _rss_bytes(pid))
        time.sleep(0.5)
    backlog_during = samples["raftseq_raft_log_writer_backlog_bytes"]
    busy_count = samples["raftseq_busy_raft_log_backlog_total"]
    acked_during = len(load.acked) - acked_at_busy
    entry = cluster.status(nodes=[leader])["nodes"][0]
    # It refused what came meanwhile (Busy) and handed leadership to a healthy node, on which
    # the writes go on while its disk stalls.
    assert entry.get("role") != "leader", f"the stalled leader kept its leadership: {entry}"
    assert acked_during >= 100, f"only {acked_during} acknowledged in the {STALL_WATCH_S} s after the stalled leader's backlog"

    counters = cluster.powerfs[leader].fault("none")
    resumed_at = time.monotonic()
    acked_at_resume = len(load.acked)
    wait_until(
        lambda: cluster.metrics(leader)["raftseq_raft_log_writer_backlog_bytes"] == 0,
        timeout_s=120,
        what=f"{leader}'s writer catching up",
    )
    wait_until(lambda: len(load.acked) >= acked_at_resume + 2000, timeout_s=120, what="acknowledgements again")
    caught_up_s = time.monotonic() - resumed_at
    load.stop()
    assert not load.errors, f"{len(load.errors)} submits failed, first {load.errors[0]!r}"
    last = cluster.wait_converged(at_least=max(load.acked))
    print(
        f"seed {seed}: stalled {leader}'s Raft log fsyncs ({counters['stalled_calls']} held); past the bound after "
        f"{busy_after_s:.1f} s ({acked_at_stall} acked before the stall); backlog {backlog_during / 2**20:.0f} MiB (bound "
        f"{RAFT_LOG_WRITE_QUEUE_BYTES_MAX / 2**20:.0f} MiB), {busy_count:.0f} submits Busy, then {entry.get('role')}; "
        f"{acked_during} acknowledged by the others in {STALL_WATCH_S:.0f} s; {scrapes} scrapes answered; "
        f"RSS {rss_before / 2**20:.0f} MiB before, {rss_at_busy / 2**20:.0f} at the first Busy, peak {rss_peak / 2**20:.0f}; "
        f"caught up {caught_up_s:.1f} s after the disk came back; {len(load.acked)} acknowledged, last seq {last}",
        flush=True,
    )
    assert rss_peak - rss_before < RSS_GROWTH_MAX_BYTES, f"{leader} grew by {(rss_peak - rss_before) / 2**20:.0f} MiB"
    assert _check_journals(cluster, load.acked) >= max(load.acked)


def _one_node_fails_its_disk(
    disk_cluster, durability: str, *, victim_is_leader: bool, mode: str, prefix: str, says: tuple[str, ...]
) -> None:
    """Under load, one node's disk fails (`mode` on the paths under `prefix`): that node
    stops with DISK_FAILED and one CRITICAL line holding each of `says`, a code not restarted blindly
    (a restart would meet the same disk); the other two acknowledge on; once the disk is
    repaired (the fault ends) the node restarts on what it had and catches up, and every
    acknowledged message is in every journal."""
    cluster, loads, leader, seed = disk_cluster(durability)
    victim = leader if victim_is_leader else next(n for n in cluster.node_ids if n != leader)
    load = Load(cluster.endpoints, cluster.token, session=mode).start()
    loads.append(load)
    wait_until(lambda: len(load.acked) >= 1000, timeout_s=60, what="the load under way")
    cluster.powerfs[victim].fault(mode, prefix=prefix)
    code = wait_until(
        lambda: cluster.exit_code(victim) is not None and [cluster.exit_code(victim)], timeout_s=30, what=f"{victim} stopping"
    )[0]
    acked_at_exit = len(load.acked)
    wait_until(lambda: len(load.acked) >= acked_at_exit + 1000, timeout_s=60, what="the other two acknowledging")
    load.stop()
    assert not load.errors, f"{len(load.errors)} submits failed, first {load.errors[0]!r}"
    critical = [line for line in cluster.log_text(victim).splitlines() if "CRITICAL" in line]
    print(f"seed {seed}: {victim} exited {code}; its log: {critical}", flush=True)
    assert code == NodeExit.DISK_FAILED and operator_exit(code) is NodeExit.DISK_FAILED, code
    assert len(critical) == 1 and all(part in critical[0] for part in (*says, "never taken as written")), critical
    cluster.powerfs[victim].fault("none")
    cluster.restart(victim)
    cluster.wait_converged(at_least=max(load.acked))
    _check_journals(cluster, load.acked)


def test_a_failed_fsync_in_power_durability_stops_that_node_alone_with_one_clear_line(disk_cluster):
    """The leader's Raft-log fsync fails (EIO): never retried as if written (the kernel may
    have dropped what it could not write), the node stops; the hardest case is the leader."""
    _one_node_fails_its_disk(
        disk_cluster, "power", victim_is_leader=True, mode="eio", prefix=RAFT_LOG_SEGMENTS, says=("Input/output error",)
    )


def test_a_full_disk_under_a_followers_journal_stops_it_with_disk_failed_not_a_restart_loop(disk_cluster):
    """Crash durability: the follower's journal cannot be written (ENOSPC; its Raft log still
    can, and free space looks ample). Its machine applied the batch already, so it cannot go
    on: it stops with DISK_FAILED, not the broken-invariant code that ``cluster up`` restarts
    into the same failure again and again."""
    _one_node_fails_its_disk(
        disk_cluster,
        "crash",
        victim_is_leader=False,
        mode="enospc",
        prefix="/journal/",
        says=("cannot write the journal in", "the disk is full"),
    )


def test_a_follower_low_on_disk_takes_no_new_entries_stays_up_and_catches_up(disk_cluster):
    """Crash durability, a follower's tmpfs filled to below ``journal.disk_free_bytes_min``
    (not to the last byte): it takes no new entries (it does not write its disk full and
    stop), the others carry on, and once there is room again it catches up by itself."""
    ok, why = tmpfs_supported()
    assert ok, f"no tmpfs in a private mount namespace here (needs root): {why}"
    cluster, loads, leader, seed = disk_cluster(
        "crash", powerfs=[], tmpfs_bytes={n: TMPFS_BYTES for n in ("n1", "n2", "n3")}, overrides=DISK_FREE_MIN
    )
    victim = next(n for n in cluster.node_ids if n != leader)
    ballast = cluster.fill_disk(victim, leave_bytes=DISK_FREE_MIN_BYTES // 2)
    cluster.wait_for_metrics(victim, lambda m: m.get("raftseq_disk_low") == 1, what="notices its low disk", timeout_s=10)
    load = Load([cluster.endpoint(n) for n in cluster.node_ids if n != victim], cluster.token, session="low").start()
    loads.append(load)
    # Four times the room the victim has left goes through the other two.
    wait_until(lambda: len(load.acked) * len(PAYLOAD) >= 2 * DISK_FREE_MIN_BYTES, timeout_s=120, what="the other two acknowledging")
    load.stop()
    assert not load.errors, f"{len(load.errors)} submits failed, first {load.errors[0]!r}"
    samples = cluster.metrics(victim)
    print(
        f"seed {seed}: {victim} low on disk ({ballast} bytes of ballast, {cluster.disk_free(victim)} free): "
        f"{samples['raftseq_raft_appends_dropped_total']:.0f} appends dropped, last seq {samples['raftseq_last_seq']:.0f}; "
        f"{len(load.acked)} acknowledged by the others",
        flush=True,
    )
    assert cluster.is_running(victim), f"{victim} stopped (exit {cluster.exit_code(victim)}) instead of taking no new entries"
    assert samples["raftseq_raft_appends_dropped_total"] > 0
    assert samples["raftseq_last_seq"] < max(load.acked)
    cluster.free_disk(victim)
    cluster.wait_converged(at_least=max(load.acked))
    assert cluster.is_running(victim)
    _check_journals(cluster, load.acked)


def test_a_journal_sync_makes_every_segment_sealed_since_the_last_one_durable(tmp_path):
    """The node syncs its journal before it writes a Raft snapshot (everything the snapshot
    covers must be on disk before the Raft log drops it). With the default fsync policy
    ("never") a segment sealed since the last sync was never fsynced: a power cut of every
    node then left each journal short of what its durable snapshot covers, a hole no peer could
    fill though the log had held the entries (crash durability, ``chaos_tests/test_power.py``)."""
    ok, why = powerfs.supported()
    assert ok, f"the power-loss filesystem cannot run here: {why}"
    fs = powerfs.PowerFS(str(tmp_path / "disk"), str(tmp_path / "mnt"), log_path=str(tmp_path / "powerfs.log")).mount()
    try:
        os.mkdir(fs.path("journal"))
        directory = fs.path("journal")
        journal = Journal.open(directory, segment_bytes_max=SEGMENT_BYTES_MIN)
        records = [protocol.encode_delivered(seq, 1_000 + seq, "s", seq, b"p" * 100) for seq in range(1, 301)]
        for first in range(1, 301, 10):
            journal.append(b"".join(records[first - 1 : first + 9]), first, first + 9)
        assert journal.segment_count > 3, "several segments sealed"
        journal.sync()
        directory_fd = os.open(fs.path(), os.O_RDONLY | os.O_DIRECTORY)  # the journal's own name
        os.fsync(directory_fd)
        os.close(directory_fd)
        fs.cut()
        try:
            journal.close()  # its files must be closed for the unmount
        except OSError:
            pass
        fs.unmount()
        fs.mount()
        again = Journal.open(fs.path("journal"), readonly=True)
        try:
            found = [record.seq for record in again.records()]
            damage = list(again.damage)
        finally:
            again.close()
        assert not damage, f"after the cut: damage {damage}"
        assert found == list(range(1, 301)), f"after the cut the journal holds {len(found)} of the 300 records synced"
    finally:
        fs.stop()
