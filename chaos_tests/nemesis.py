"""The nemesis: faults applied to a running ``ChaosCluster``, each reported as it starts and ends.

Every fault is started by a method that returns an ``ActiveFault`` and is ended by
``end(fault)`` (or ``heal_all()``, which ends everything still active, newest first). A few
verbs run a whole fault and return when it is over (``crash``, ``rolling_restart``, ``flap``,
``corrupt_journal_tail``). Every choice (which follower, which minority, the flapping schedule,
which bit) comes from the ``random.Random`` given to the nemesis, so a run replays from its seed.

Reporting: ``on_fault(name, phase, details)`` is called in the calling thread with ``phase``
``"start"`` once the fault is in effect and ``"end"`` once it is over. ``details`` is a JSON
object; every report carries ``nemesis_id`` (pairs a start with its end), ``nodes`` (the node
ids hit) and, where the nemesis knew the leader when it struck, ``role``: ``"leader"`` when the
fault hit the leader, else ``"follower"`` (the history's convention).

Network faults touch only the Raft links (client ports are never proxied), and they compose:
the state of each direction between two nodes is the strongest of the active faults on it
(``drop`` > ``hold`` > ``pass``; the largest delay). Ending one fault leaves the others.

Process faults signal only processes the cluster started, by pid. Disk faults need nodes on a
tmpfs (``ChaosCluster(tmpfs_bytes=...)``) or a node that is down (journal damage).

**Power cuts** (``power_cut``) need nodes on a power-loss filesystem (``ChaosCluster(powerfs=
...)``). A cut of several nodes is one instant: every victim is frozen (SIGSTOP) first, then
each filesystem drops what its node had not made durable (the last unsynced write torn to a
seeded prefix), then the nodes are killed (SIGKILL) and the filesystems unmounted (what the
kernel still flushes then is discarded). ``end`` mounts each filesystem again on what was
durable and restarts the node. The start report carries, per node, what was dropped
(``dropped``) and ``cut_s`` (freeze to unmounted); the end report ``restore_s``.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from chaos_tests.cluster import ChaosCluster
from chaos_tests.proxy import DROP, HOLD, PASS
from raftseq.sequencer.journal import list_segment_files, scan_segment

FaultCallback = Callable[[str, str, dict], None]

#: How long a restarted node may take to rejoin and catch up during a rolling restart.
SETTLE_TIMEOUT_S = 30.0
FLIPS_MAX = 200
#: Which nodes a kill or power cut hits (``Nemesis.targets``).
Targets = Literal["leader", "follower", "two", "all"]
_MODE_STRENGTH = {PASS: 0, HOLD: 1, DROP: 2}


@dataclass
class ActiveFault:
    """A fault in effect. ``details`` is what was reported at its start."""

    id: int
    name: str
    details: dict
    #: Network faults: (src, dst) -> (mode, delay_ms) this fault imposes.
    directions: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    #: Called (once) to undo a non-network fault; returns details for the end report.
    undo: Callable[[], dict] | None = None
    #: A fault on the Raft links: ending it recomputes every direction.
    network: bool = False
    ended: bool = False


class Nemesis:
    def __init__(self, cluster: ChaosCluster, *, rng: random.Random, on_fault: FaultCallback | None = None) -> None:
        self.cluster = cluster
        self.rng = rng
        self.on_fault = on_fault
        self.active: list[ActiveFault] = []
        self._ids = itertools.count(1)

    # --- reporting and bookkeeping --------------------------------------------------------

    def _report(self, name: str, phase: str, details: dict) -> None:
        if self.on_fault is not None:
            self.on_fault(name, phase, details)

    def _begin(self, name: str, details: dict, **kwargs) -> ActiveFault:
        fault = ActiveFault(next(self._ids), name, {**details}, **kwargs)
        fault.details["nemesis_id"] = fault.id
        self.active.append(fault)
        self._report(name, "start", dict(fault.details))
        return fault

    def end(self, fault: ActiveFault, **extra: object) -> dict:
        """End `fault` (idempotent). Returns the details of the end report."""
        if fault.ended:
            return {}
        fault.ended = True
        if fault in self.active:
            self.active.remove(fault)
        details = {"nemesis_id": fault.id, "nodes": fault.details.get("nodes", [])}
        if "role" in fault.details:
            details["role"] = fault.details["role"]
        if fault.network:
            self._apply_network()
        if fault.undo is not None:
            details.update(fault.undo())
        details.update(extra)
        self._report(fault.name, "end", details)
        return details

    def operation(self, name: str, **details: object) -> ActiveFault:
        """An operator's action in the history as a fault of its own (a membership change):
        nothing to undo; ``end`` records when it finished."""
        return self._begin(name, details)

    def heal_all(self) -> None:
        """End every active fault, newest first (partitions healed, paused nodes continued,
        killed nodes restarted, ballast removed)."""
        errors = []
        for fault in reversed(list(self.active)):
            try:
                self.end(fault)
            except Exception as exc:  # noqa: BLE001 - end the rest, then report
                errors.append(exc)
        if errors:
            raise errors[0]

    # --- who leads ------------------------------------------------------------------------

    def leader(self, *, timeout_s: float = 15.0, among: Sequence[str] | None = None) -> str:
        """The id of the current leader (waits for one): the leader of the highest term that a
        majority names, or, with `among`, the one every reachable node of `among` names."""
        if among is not None:
            return self.cluster.wait_for_leader(timeout_s=timeout_s, among=among)["node"]
        return self.cluster.wait_for_leader(timeout_s=timeout_s, majority=True)["node"]

    def _role_of(self, nodes: Sequence[str], leader: str | None) -> dict:
        if leader is None:
            return {}
        return {"role": "leader" if leader in nodes else "follower", "leader": leader}

    # --- network --------------------------------------------------------------------------

    def _apply_network(self) -> None:
        """Set every direction to the combination of the active network faults on it."""
        combined: dict[tuple[str, str], tuple[str, float]] = {}
        for fault in self.active:
            for pair, (mode, delay_ms) in fault.directions.items():
                old_mode, old_delay = combined.get(pair, (PASS, 0.0))
                combined[pair] = (max(old_mode, mode, key=_MODE_STRENGTH.__getitem__), max(old_delay, delay_ms))
        ids = self.cluster.node_ids
        changes = []
        for a in ids:
            for b in ids:
                if a != b:
                    mode, delay_ms = combined.get((a, b), (PASS, 0.0))
                    changes.append((a, b, mode, delay_ms))
        self.cluster.set_directions(changes)

    def _network_fault(
        self, name: str, pairs: Sequence[tuple[str, str]], details: dict, *, mode: str, delay_ms: float = 0.0
    ) -> ActiveFault:
        directions = {pair: (mode, delay_ms) for pair in pairs}
        fault = ActiveFault(
            next(self._ids), name, {**details, "mode": mode, "cut": sorted([list(p) for p in pairs])}, directions, network=True
        )
        fault.details["nemesis_id"] = fault.id
        self.active.append(fault)
        try:
            self._apply_network()
        except BaseException:
            self.active.remove(fault)
            raise
        self._report(name, "start", dict(fault.details))
        return fault

    def partition(
        self, groups: Sequence[Sequence[str]], *, mode: str = DROP, name: str = "partition", leader: str | None = None
    ) -> ActiveFault:
        """Cut every Raft link between nodes of different groups, both ways."""
        group_of = {n: i for i, g in enumerate(groups) for n in g}
        ids = self.cluster.node_ids
        pairs = [(a, b) for a in ids for b in ids if a != b and group_of.get(a, a) != group_of.get(b, b)]
        minority = min(groups, key=len) if groups else []
        details = {"groups": [sorted(g) for g in groups], "nodes": sorted(minority), **self._role_of(minority, leader)}
        return self._network_fault(name, pairs, details, mode=mode)

    def isolate(self, node_id: str, *, mode: str = DROP, leader: str | None = None) -> ActiveFault:
        """Cut `node_id` from every other node (its clients still reach it)."""
        others = [n for n in self.cluster.node_ids if n != node_id]
        return self.partition([[node_id], others], mode=mode, name="isolate", leader=leader)

    def isolate_leader(self, *, mode: str = DROP) -> ActiveFault:
        leader = self.leader()
        return self.isolate(leader, mode=mode, leader=leader)

    def split(self, *, minority: Sequence[str] | None = None, mode: str = DROP) -> ActiveFault:
        """A majority/minority split; the minority (``(n-1)//2`` nodes) is drawn unless given."""
        ids = self.cluster.node_ids
        leader = self.leader()
        if minority is None:
            minority = sorted(self.rng.sample(ids, (len(ids) - 1) // 2))
        majority = [n for n in ids if n not in minority]
        return self.partition([list(minority), majority], mode=mode, name="split", leader=leader)

    def bridge(self, *, bridge: str | None = None, mode: str = DROP) -> ActiveFault:
        """Cut the link between two nodes; the third (the bridge, drawn unless given) still
        sees both."""
        ids = self.cluster.node_ids
        leader = self.leader()
        bridge = bridge if bridge is not None else self.rng.choice(ids)
        a, b = [n for n in ids if n != bridge][:2]
        details = {"bridge": bridge, "nodes": sorted([a, b]), **self._role_of([a, b], leader)}
        return self._network_fault("bridge", [(a, b), (b, a)], details, mode=mode)

    def one_way(self, src: str | None = None, dst: str | None = None, *, mode: str = DROP) -> ActiveFault:
        """Lose the bytes from `src` to `dst` only (drawn unless given)."""
        ids = self.cluster.node_ids
        leader = self.leader()
        if src is None:
            src = self.rng.choice(ids)
        if dst is None:
            dst = self.rng.choice([n for n in ids if n != src])
        details = {"src": src, "dst": dst, "nodes": [src, dst], **self._role_of([src], leader)}
        return self._network_fault("one_way", [(src, dst)], details, mode=mode)

    def slow(self, delay_ms: float, *, pairs: Sequence[tuple[str, str]] | None = None) -> ActiveFault:
        """Add `delay_ms` to the given directed pairs (default: every direction)."""
        ids = self.cluster.node_ids
        pairs = list(pairs) if pairs is not None else [(a, b) for a in ids for b in ids if a != b]
        details = {"delay_ms": delay_ms, "nodes": sorted({n for p in pairs for n in p})}
        return self._network_fault("slow", pairs, details, mode=PASS, delay_ms=delay_ms)

    def flap_schedule(self, *, duration_s: float, cut_s: tuple[float, float], healed_s: tuple[float, float]) -> list[tuple[float, float]]:
        """``(cut_at, heal_at)`` offsets in seconds from the start, drawn from the rng, within
        `duration_s` and at most ``FLIPS_MAX`` cuts."""
        schedule = []
        t = self.rng.uniform(*healed_s)
        while t < duration_s and len(schedule) < FLIPS_MAX:
            end = min(duration_s, t + self.rng.uniform(*cut_s))
            schedule.append((round(t, 3), round(end, 3)))
            t = end + self.rng.uniform(*healed_s)
        return schedule

    def flap(
        self,
        *,
        duration_s: float,
        groups: Sequence[Sequence[str]] | None = None,
        cut_s: tuple[float, float] = (0.2, 1.0),
        healed_s: tuple[float, float] = (0.2, 1.0),
        mode: str = DROP,
        stop: threading.Event | None = None,
    ) -> dict:
        """Cut and heal a partition on a seeded schedule for `duration_s`; returns when it is
        over (or when `stop` is set), healed. ``groups`` default: a random node isolated.
        One ``flap`` fault is reported; its start details hold the whole schedule."""
        ids = self.cluster.node_ids
        if groups is None:
            alone = self.rng.choice(ids)
            groups = [[alone], [n for n in ids if n != alone]]
        group_of = {n: i for i, g in enumerate(groups) for n in g}
        pairs = [(a, b) for a in ids for b in ids if a != b and group_of.get(a, a) != group_of.get(b, b)]
        schedule = self.flap_schedule(duration_s=duration_s, cut_s=cut_s, healed_s=healed_s)
        stop = stop or threading.Event()
        minority = min(groups, key=len)
        fault = self._begin(
            "flap",
            {"groups": [sorted(g) for g in groups], "nodes": sorted(minority), "mode": mode, "schedule": [list(s) for s in schedule]},
            network=True,
        )
        started = time.monotonic()
        cuts_done = 0
        try:
            for cut_at, heal_at in schedule:
                if stop.wait(max(0.0, started + cut_at - time.monotonic())):
                    break
                fault.directions = {pair: (mode, 0.0) for pair in pairs}
                self._apply_network()
                cuts_done += 1
                if stop.wait(max(0.0, started + heal_at - time.monotonic())):
                    break
                fault.directions = {}
                self._apply_network()
        finally:
            fault.directions = {}
            details = self.end(fault, cuts=cuts_done, elapsed_s=round(time.monotonic() - started, 3))
        return details

    # --- processes ------------------------------------------------------------------------

    def _pick_follower(self, leader: str) -> str:
        return self.rng.choice([n for n in self.cluster.node_ids if n != leader])

    def kill(self, node_ids: Sequence[str], *, sig: int = signal.SIGKILL, leader: str | None = None) -> ActiveFault:
        """Kill the nodes (SIGKILL by default); ``end`` restarts them."""
        node_ids = list(node_ids)
        pids = {}
        for node_id in node_ids:
            pids[node_id] = self.cluster.kill(node_id, sig)

        def restart() -> dict:
            return {"pids": {n: self.cluster.restart(n) for n in node_ids if not self.cluster.is_running(n)}}

        details = {"nodes": node_ids, "signal": signal.Signals(sig).name, "pids": pids, **self._role_of(node_ids, leader)}
        return self._begin("kill", details, undo=restart)

    def targets(self, which: Targets) -> tuple[list[str], str | None]:
        """The nodes a fault on `which` hits and the leader before it: the leader, a follower
        or two nodes (a majority of three) drawn from the rng, or all (then the leader is None
        when none answers within 2 s)."""
        if which == "all":
            try:
                leader = self.leader(timeout_s=2.0)
            except AssertionError:
                leader = None
            return list(self.cluster.node_ids), leader
        leader = self.leader()
        if which == "leader":
            return [leader], leader
        if which == "follower":
            return [self._pick_follower(leader)], leader
        assert which == "two", which
        return sorted(self.rng.sample(self.cluster.node_ids, 2)), leader

    def kill_on(self, which: Targets) -> ActiveFault:
        """``kill`` the nodes ``targets(which)`` names."""
        node_ids, leader = self.targets(which)
        return self.kill(node_ids, leader=leader)

    def crash(self, node_ids: Sequence[str], *, down_s: float, leader: str | None = None) -> dict:
        """Kill, stay down `down_s`, restart. Returns the end details."""
        fault = self.kill(node_ids, leader=leader)
        time.sleep(down_s)  # the fault's duration, not a synchronisation
        return self.end(fault)

    def power_cut(self, node_ids: Sequence[str], *, tear: bool = True, leader: str | None = None) -> ActiveFault:
        """Cut the power of the nodes at one instant (see the module doc); ``end`` brings them
        back on what was durable."""
        node_ids = list(node_ids)
        began = time.monotonic()
        for node_id in node_ids:
            self.cluster.pause(node_id)
        dropped = {n: self.cluster.cut_power(n, tear_seed=self.rng.randrange(2**31) if tear else None) for n in node_ids}
        pids = {n: self.cluster.kill(n) for n in node_ids}
        for node_id in node_ids:
            self.cluster.unmount(node_id)
        cut_s = round(time.monotonic() - began, 3)

        def restore() -> dict:
            started = time.monotonic()
            new_pids = {}
            for node_id in node_ids:
                if not self.cluster.powerfs[node_id].mounted:
                    self.cluster.remount(node_id)
                if not self.cluster.is_running(node_id):
                    new_pids[node_id] = self.cluster.restart(node_id)
            return {"pids": new_pids, "restore_s": round(time.monotonic() - started, 3)}

        details = {"nodes": node_ids, "pids": pids, "dropped": dropped, "cut_s": cut_s, **self._role_of(node_ids, leader)}
        return self._begin("power_cut", details, undo=restore)

    def power_cut_on(self, which: Targets) -> ActiveFault:
        """``power_cut`` the nodes ``targets(which)`` names."""
        node_ids, leader = self.targets(which)
        return self.power_cut(node_ids, leader=leader)

    def rolling_restart(self, *, down_s: float = 0.2, settle_timeout_s: float = SETTLE_TIMEOUT_S) -> list[str]:
        """Kill and restart each node in turn (order drawn from the rng), waiting after each
        until the cluster has a leader and every node agrees on the stream again. Returns the
        order."""
        order = list(self.cluster.node_ids)
        self.rng.shuffle(order)
        fault = self._begin("rolling_restart", {"nodes": order, "order": order})
        try:
            for node_id in order:
                leader = self.leader(timeout_s=settle_timeout_s)
                self.crash([node_id], down_s=down_s, leader=leader)
                self.cluster.wait_converged(timeout_s=settle_timeout_s)
        finally:
            self.end(fault)
        return order

    def pause(self, node_id: str, *, leader: str | None = None) -> ActiveFault:
        """SIGSTOP the node; ``end`` sends SIGCONT."""
        pid = self.cluster.pause(node_id)

        def resume() -> dict:
            if node_id in self.cluster.paused:
                self.cluster.resume(node_id)
            return {"pid": pid}

        return self._begin("pause", {"nodes": [node_id], "pid": pid, **self._role_of([node_id], leader)}, undo=resume)

    def pause_leader(self) -> ActiveFault:
        leader = self.leader()
        return self.pause(leader, leader=leader)

    # --- disks ----------------------------------------------------------------------------

    def fill_disk(self, node_id: str, *, leave_bytes: int = 0) -> ActiveFault:
        """Fill the node's tmpfs (leaving `leave_bytes`); ``end`` frees it."""
        ballast = self.cluster.fill_disk(node_id, leave_bytes=leave_bytes)
        free = self.cluster.disk_free(node_id)

        def release() -> dict:
            self.cluster.free_disk(node_id)
            return {"free_bytes": self.cluster.disk_free(node_id)}

        details = {"nodes": [node_id], "ballast_bytes": ballast, "free_bytes": free}
        return self._begin("disk_full", details, undo=release)

    def corrupt_journal_tail(self, node_id: str, *, how: str, max_bytes: int = 64) -> dict:
        """Damage the end of the last journal segment of a node that is down: ``truncate``
        cuts 1..`max_bytes` bytes off; ``bitflip`` flips one bit in the last `max_bytes`.
        Reported as one fault (start and end at once). Returns its details."""
        if self.cluster.is_running(node_id):
            raise RuntimeError(f"{node_id} is running; stop it before damaging its journal")
        if how not in ("truncate", "bitflip"):
            raise ValueError(f"how must be truncate or bitflip, got {how!r}")
        segments = list_segment_files(self.cluster.journal_dir(node_id))
        if not segments:
            raise RuntimeError(f"{node_id} has no journal segment")
        first_seq, path = segments[-1]
        size = os.path.getsize(path)
        if size == 0:
            raise RuntimeError(f"{path} is empty")
        details: dict = {"nodes": [node_id], "how": how, "segment": os.path.basename(path), "size": size}
        if how == "truncate":
            cut = self.rng.randint(1, min(max_bytes, size))
            with open(path, "r+b") as f:
                f.truncate(size - cut)
            if cut < size and not scan_segment(path, first_seq, check=False).problem:
                # The cut fell between two records: the journal is only shorter, not damaged
                # (1 run in ~40 cut exactly the last record). One byte more tears that record.
                cut += 1
                with open(path, "r+b") as f:
                    f.truncate(size - cut)
            details["bytes_cut"] = cut
        else:
            offset = size - self.rng.randint(1, min(max_bytes, size))
            bit = self.rng.randrange(8)
            with open(path, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ (1 << bit)]))
            details.update(offset=offset, bit=bit)
        fault = self._begin("journal_damage", details)
        self.end(fault)
        return details
