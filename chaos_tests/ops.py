"""The ``ops`` soak: a week of operations compressed (``raftseq chaos --scenario ops --duration 60m``).

Steady pipelined load (``OPS_LOAD``) with subscribers on n1 and n3, retention active on every
node (``OPS_OVERRIDES``: small segments, a byte bound, removed segments moved to an archive
directory of each node's own), and operations on a schedule drawn from the seed
(``plan_operations``):

* ``replace``: n2 is replaced by a new node (new ports, data directory, key) through
  ``membership_client.replace``, the code of ``raftseq member replace``; once; n2 must stop
  with the exit code of a removed node;
* ``rolling-restart``: ``cluster.up.rolling_restart``, the code of ``cluster up``'s rolling
  restart (followers first, the leader drained first);
* ``upgrade-restart``: one node (drained first if it leads) stopped with SIGTERM, left down a
  drawn time, started again with its data directory, as an upgrade does;
* ``leader-transfer``: ``maintenance.transfer_leadership``, the code of ``raftseq leader
  transfer`` (to a drawn follower or the leader's choice);
* the ordinary faults at a lower rate: a kill of the leader or of a follower, a paused leader,
  an isolated leader, a split. The Raft links of the node that replaces n2 do not go through
  the fault proxy, so isolate and split are drawn only before the replace; afterwards they
  become kills and pauses (said in the run's output).

Each operation is an entry of the history (``Nemesis.operation``), so it is shaded in the
timeline. Disk and memory are sampled (``sample_resources``) at the start, every
``sample_every_s`` (60 s; a sixth of a short run) between operations, and at the end: per node
the bytes of its data directory and of its journal (what retention bounds) and the RSS of its
process, and the RSS of the process running the workload (this one). The pass criteria
(``criteria``) are checked at the end; a failed one fails the run.

The unchanged checker needs every node's final read to start at seq 1, so the final read of
a node (``final_read_with_archive``) is its archive (removed segments, read from disk) followed
by what the node serves after it. The new node's journal starts where its peers' retention
had got to: its final read cannot start at 1, so it is compared record by record with the
longest final read instead (``compare_late_joiner``).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from chaos_tests.history import HistoryRecorder
from chaos_tests.workload import CONNECT_TIMEOUT_S, FINAL_READ_STALL_S, read_range
from raftseq.clients.errors import Truncated
from raftseq.cluster import membership_client
from raftseq.cluster.config import to_toml
from raftseq.cluster.maintenance import AdminFailed, drain_node, transfer_leadership
from raftseq.cluster.node_exit import NodeExit
from raftseq.cluster.status import node_status
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import Journal

MIB = 1 << 20
#: Journal segments of 1 MiB; at most 12 MiB of them per node (about 25 s of the load).
SEGMENT_BYTES = 1 * MIB
RETENTION_BYTES = 12 * MIB
RETENTION_CHECK_S = 2.0
OPS_OVERRIDES = {
    "journal": {"segment_bytes_max": SEGMENT_BYTES, "disk_free_bytes_min": 16 * MIB},
    "retention": {"journal_bytes_max": RETENTION_BYTES, "check_interval_s": RETENTION_CHECK_S},
}
#: Four clients of 1,300 submits/s each (5,200/s), up to 500 in flight each.
OPS_LOAD = {"clients": 4, "rate_per_client": 1300.0, "window": 500}
#: The run's length without ``--duration``.
OPS_DEFAULT_DURATION_S = 90.0
#: The node the run replaces.
REPLACED = "n2"
#: Mean seconds between leader transfers, and between ordinary faults.
TRANSFER_EVERY_S = 40.0
FAULT_EVERY_S = 90.0
#: One rolling restart per this many seconds of run (at least one), one upgrade restart per this many.
ROLLING_EVERY_S = 900.0
UPGRADE_EVERY_S = 1200.0
SAMPLE_EVERY_S = 60.0
#: After an operation, a sample waits this long (five retention checks): retention removes what
#: a node held for a peer that was down.
SETTLE_S = 5 * RETENTION_CHECK_S
#: RSS may grow this much from the baseline sample (minute 10; a third of a short run) to the end.
RSS_GROWTH_MAX = 0.10
#: Runs shorter than this compare RSS from their first third instead of from minute 10.
RSS_BASELINE_S = 600.0
RSS_MINUTE_10_RUN_MIN_S = 900.0
OPERATION_TIMEOUT_S = 60.0
UPGRADE_DOWN_S = (1.0, 3.0)
FAULTS = ("kill-leader", "kill-follower", "pause-leader", "isolate-leader", "split")
NETWORK_FAULTS = ("isolate-leader", "split")


# --- the schedule ------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    at_s: float
    name: str


def _poisson(rng: random.Random, mean_s: float, duration_s: float) -> list[float]:
    times, t = [], rng.expovariate(1 / mean_s)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(1 / mean_s)
    return times


def _spread(rng: random.Random, every_s: float, duration_s: float) -> list[float]:
    """One time drawn in each of max(1, duration / every) equal parts of the run's middle."""
    count = max(1, round(duration_s / every_s))
    part = duration_s * 0.8 / count
    return [duration_s * 0.1 + part * (i + rng.uniform(0.1, 0.9)) for i in range(count)]


def plan_operations(rng: random.Random, duration_s: float) -> list[Planned]:
    """The run's operations in time order, drawn from `rng`: one replace (between 30% and 60%
    of the run), rolling and upgrade restarts spread over the run, leader transfers and faults
    at random times; at least one transfer and one kill."""
    plan = [Planned(rng.uniform(0.3, 0.6) * duration_s, "replace")]
    plan += [Planned(t, "rolling-restart") for t in _spread(rng, ROLLING_EVERY_S, duration_s)]
    plan += [Planned(t, "upgrade-restart") for t in _spread(rng, UPGRADE_EVERY_S, duration_s)]
    transfers = _poisson(rng, TRANSFER_EVERY_S, duration_s) or [rng.uniform(0.1, 0.9) * duration_s]
    plan += [Planned(t, "leader-transfer") for t in transfers]
    faults = [Planned(t, rng.choice(FAULTS)) for t in _poisson(rng, FAULT_EVERY_S, duration_s)]
    if not any(f.name.startswith("kill") for f in faults):
        faults.append(Planned(rng.uniform(0.1, 0.9) * duration_s, rng.choice(["kill-leader", "kill-follower"])))
    plan += faults
    return sorted(plan, key=lambda p: p.at_s)


# --- samples and criteria ----------------------------------------------------------------


def _rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _tree_bytes(path: str, *, allocated: bool) -> int:
    """Bytes of the files under `path`: allocated on disk (``du``), or their sizes."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed meanwhile (retention)
            total += st.st_blocks * 512 if allocated else st.st_size
    return total


def sample_resources(cluster, started_ns: int, label: str = "", *, archive_root: str = "") -> dict:
    """Disk and RSS now: ``{"at_ns", "at_s", "label", "nodes": {id: {"data_bytes",
    "journal_bytes", "archive_bytes", "rss_bytes", "pid"}}, "workload_rss_bytes"}``
    (``archive_bytes``: what retention moved to ``archive_root/ID``, outside the data
    directory)."""
    now = time.monotonic_ns()
    nodes = {}
    for node_id in cluster.node_ids:
        pid = cluster.pid(node_id)
        nodes[node_id] = {
            "data_bytes": _tree_bytes(cluster.node_data_dir(node_id), allocated=True),
            "journal_bytes": _tree_bytes(cluster.journal_dir(node_id), allocated=False),
            "archive_bytes": _tree_bytes(os.path.join(archive_root, node_id), allocated=False) if archive_root else 0,
            "rss_bytes": _rss_bytes(pid),
            "pid": pid,
        }
    return {
        "at_ns": now,
        "at_s": round((now - started_ns) / 1e9, 1),
        "label": label,
        "nodes": nodes,
        "workload_rss_bytes": _rss_bytes(os.getpid()),
    }


@dataclass
class Criterion:
    name: str
    ok: bool
    figure: str


def disk_criterion(samples: Sequence[dict], *, bound_bytes: int = RETENTION_BYTES, segment_bytes: int = SEGMENT_BYTES) -> Criterion:
    """Every node's journal within the retention bound + 2 segments in every sample."""
    limit = bound_bytes + 2 * segment_bytes
    worst = max(((n["journal_bytes"], node_id, s["at_s"]) for s in samples for node_id, n in s["nodes"].items()), default=(0, "", 0))
    figure = f"largest journal {worst[0] / MIB:.1f} MiB ({worst[1]} at {worst[2]:.0f} s), bound + 2 segments {limit / MIB:.1f} MiB"
    return Criterion("disk within retention + 2 segments", worst[0] <= limit, figure)


def rss_baseline_s(duration_s: float) -> tuple[float, str]:
    """Where RSS growth is measured from: minute 10, or a third of a run shorter than ~15 min."""
    if duration_s >= RSS_MINUTE_10_RUN_MIN_S:
        return RSS_BASELINE_S, "from minute 10"
    return duration_s / 3, f"from the first third ({duration_s / 3:.0f} s: a run under {RSS_MINUTE_10_RUN_MIN_S / 60:.0f} min)"


def _rss_series(samples: Sequence[dict]) -> dict[str, list[tuple[float, int | None, int | None]]]:
    """Per process (a node id, or ``workload``): (at_s, rss, pid) in sample order."""
    series: dict[str, list] = {}
    for s in samples:
        for node_id, n in s["nodes"].items():
            series.setdefault(node_id, []).append((s["at_s"], n["rss_bytes"], n["pid"]))
        series.setdefault("workload", []).append((s["at_s"], s["workload_rss_bytes"], os.getpid()))
    return series


def rss_criterion(samples: Sequence[dict], duration_s: float, *, growth_max: float = RSS_GROWTH_MAX) -> Criterion:
    """The RSS of every process grows at most `growth_max` from the baseline to the last sample.
    A process is one pid: a node restarted since the baseline is measured from its own first
    sample after it (a fresh process), when that sample is not the last."""
    from_s, how = rss_baseline_s(duration_s)
    worst: tuple[float, str] = (-1.0, "")
    for name, points in _rss_series(samples).items():
        points = [p for p in points if p[1]]
        if not points:
            continue
        last_at, last_rss, last_pid = points[-1]
        same = [p for p in points[:-1] if p[2] == last_pid]
        base = next((p for p in same if p[0] >= from_s), None)
        if base is None:
            continue
        growth = last_rss / base[1] - 1
        if growth > worst[0]:
            worst = (growth, f"{name} {base[1] / MIB:.0f} MiB at {base[0]:.0f} s → {last_rss / MIB:.0f} MiB at {last_at:.0f} s")
    if worst[0] < 0 and not worst[1]:
        return Criterion(f"RSS growth ≤ {growth_max:.0%} {how}", True, "no process ran from the baseline to the end")
    return Criterion(
        f"RSS growth ≤ {growth_max:.0%} {how}", round(worst[0], 6) <= growth_max, f"largest growth {worst[0]:+.1%}: {worst[1]}"
    )


def subscribers_criterion(truncated: Sequence[str]) -> Criterion:
    """No subscriber fell behind retention (it would have had to skip records to go on)."""
    figure = f"{', '.join(truncated)} fell behind retention and stopped" if truncated else "none fell behind retention"
    return Criterion("every subscriber kept up", not truncated, figure)


def invariants_criterion(violations: int) -> Criterion:
    return Criterion("0 invariant violations", violations == 0, f"{violations} violation(s)")


# --- node configs: an archive directory each ---------------------------------------------


def give_own_archive(cluster, node, archive_root: str) -> None:
    """Point `node`'s retention at an archive directory of its own (``archive_root/ID``) and
    rewrite its config file (before it starts)."""
    directory = os.path.join(archive_root, node.id)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    config = node.config
    node.config = msgspec.structs.replace(config, retention=msgspec.structs.replace(config.retention, archive_dir=directory))
    with open(node.config_path, "w") as f:
        f.write(to_toml(node.config))


# --- the operations ----------------------------------------------------------------------


@dataclass
class OpsRun:
    """The operations of one run, its samples and its verdict."""

    ctx: object  # scenarios.Context
    duration_s: float
    archive_root: str
    started_ns: int = field(default_factory=time.monotonic_ns)
    sample_every_s: float = SAMPLE_EVERY_S
    samples: list[dict] = field(default_factory=list)
    done: dict[str, int] = field(default_factory=dict)
    stalls_s: dict[str, list[float]] = field(default_factory=dict)
    replaced_by: str = ""

    def __post_init__(self) -> None:
        self.sample_every_s = min(SAMPLE_EVERY_S, max(5.0, self.duration_s / 6))
        self._next_sample_s = 0.0
        self._settled_at = 0.0

    @property
    def cluster(self):
        return self.ctx.cluster

    def elapsed_s(self) -> float:
        return (time.monotonic_ns() - self.started_ns) / 1e9

    def sample(self, label: str = "") -> dict:
        s = sample_resources(self.cluster, self.started_ns, label, archive_root=self.archive_root)
        self.samples.append(s)
        journals = ", ".join(f"{i} {n['journal_bytes'] / MIB:.1f}" for i, n in s["nodes"].items())
        rss = ", ".join(f"{i} {(n['rss_bytes'] or 0) / MIB:.0f}" for i, n in s["nodes"].items())
        self.ctx.say(
            f"    sample at {s['at_s']:.0f} s{' (' + label + ')' if label else ''}: journal MiB {journals}; "
            f"RSS MiB {rss}, workload {(s['workload_rss_bytes'] or 0) / MIB:.0f}"
        )
        return s

    def _sample_if_due(self) -> None:
        if self.elapsed_s() >= self._next_sample_s and time.monotonic() >= self._settled_at + SETTLE_S:
            self.sample()
            self._next_sample_s = self.elapsed_s() + self.sample_every_s

    def _wait_until(self, at_s: float) -> None:
        """Idle (sampling when due) until `at_s` seconds into the run."""
        while self.elapsed_s() < at_s:
            self._sample_if_due()
            time.sleep(min(0.5, max(0.0, at_s - self.elapsed_s())))
        # A sample due now waits for the cluster to settle rather than for the next idle time.
        if self.elapsed_s() >= self._next_sample_s:
            time.sleep(max(0.0, self._settled_at + SETTLE_S - time.monotonic()))
            self._sample_if_due()

    def run(self, rng: random.Random) -> None:
        """Every planned operation at its time (late ones at once, in order); the run lasts
        until the last one is done and `duration_s` has passed."""
        plan = plan_operations(rng, self.duration_s)
        self.ctx.say(f"  ops: {len(plan)} operations planned over {self.duration_s:.0f} s: {_summary([p.name for p in plan])}")
        self.sample("start")
        self._next_sample_s = self.sample_every_s
        for index, planned in enumerate(plan, 1):
            self._wait_until(planned.at_s)
            name = planned.name
            if name in NETWORK_FAULTS and self.replaced_by:
                name = rng.choice(["kill-leader", "pause-leader"])
                self.ctx.say(f"    ({planned.name} drawn; {self.replaced_by}'s Raft links are not proxied: {name} instead)")
            self.ctx.say(
                f"  op {index} of {len(plan)}: {name} at {self.elapsed_s():.0f} s (planned {planned.at_s:.0f} s; "
                f"{self.ctx.workload.stats.ok} acknowledged so far)"
            )
            try:
                OPERATIONS[name](self, rng)
            finally:
                self.ctx.nemesis.heal_all()
                self._settled_at = time.monotonic()
            self.done[name] = self.done.get(name, 0) + 1
        self._wait_until(self.duration_s)

    def stall(self, name: str, what: str) -> None:
        took = self.ctx.acks_resume(what)
        self.stalls_s.setdefault(name, []).append(took)

    # --- pass criteria ------------------------------------------------------------------

    def criteria(self, violations: int) -> list[Criterion]:
        return [
            invariants_criterion(violations),
            disk_criterion(self.samples),
            rss_criterion(self.samples, self.duration_s),
            subscribers_criterion(self.ctx.workload.stats.truncated),
        ]

    def summary(self) -> dict:
        return {
            "operations": dict(sorted(self.done.items())),
            "replaced": {REPLACED: self.replaced_by} if self.replaced_by else {},
            "ack_resumed_after_s": {k: [round(v, 3) for v in vs] for k, vs in sorted(self.stalls_s.items())},
            "retention": {"journal_bytes_max": RETENTION_BYTES, "segment_bytes_max": SEGMENT_BYTES, "check_interval_s": RETENTION_CHECK_S},
            "samples": self.samples,
        }


def _failed(message: str) -> Exception:
    """A ``ScenarioFailed`` (imported here: ``scenarios`` imports this module)."""
    from chaos_tests.scenarios import ScenarioFailed

    return ScenarioFailed(message)


def _summary(names: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def _replace(ops: OpsRun, rng: random.Random) -> None:
    ctx, cluster = ops.ctx, ops.cluster
    taken = set(cluster.node_ids) | {REPLACED}
    new_id = next(f"n{i}" for i in range(4, 100) if f"n{i}" not in taken)
    node = cluster.joining_node(new_id, rng=rng)
    give_own_archive(cluster, node, ops.archive_root)
    cluster.start_node(node)
    c = node.config
    fault = ctx.nemesis.operation("membership-replace", nodes=[REPLACED, new_id])
    started = time.monotonic()
    request = protocol.MemberRequest(
        "add", new_id, raft_address=c.raft_address, client_address=c.client_address, raft_public_key=c.raft_public_key
    )
    try:
        reply = asyncio.run(
            membership_client.replace(
                cluster.endpoints, REPLACED, request, token=cluster.token, timeout_s=OPERATION_TIMEOUT_S, tls=cluster.tls
            )
        )
    except membership_client.MemberCommandError as exc:
        raise _failed(f"member replace {REPLACED} --with {new_id}: {exc}\n{cluster.log_tails()}") from None
    ctx.nemesis.end(fault, number=reply.number)
    ctx.say(
        f"    replaced {REPLACED} by {new_id}: membership {reply.number} ({', '.join(m.id for m in reply.members)}) in {time.monotonic() - started:.2f} s"
    )
    deadline = time.monotonic() + OPERATION_TIMEOUT_S
    while cluster.exit_code(REPLACED) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    code = cluster.exit_code(REPLACED)
    if code != NodeExit.REMOVED:
        raise _failed(f"{REPLACED}, replaced, did not stop with exit code {NodeExit.REMOVED:d} (exit {code})")
    cluster.forget_node(REPLACED)
    ops.replaced_by = new_id
    ops.stall("replace", f"after {REPLACED} was replaced by {new_id}")
    ctx.converge()


def _admin(what: str, work) -> object:
    try:
        return asyncio.run(work)
    except AdminFailed as exc:
        raise _failed(f"{what}: {exc}") from None


def _rolling_restart(ops: OpsRun, rng: random.Random) -> None:
    from raftseq.cluster.up import RollingRestartFailed, rolling_restart

    fault = ops.ctx.nemesis.operation("rolling-restart", nodes=list(ops.cluster.node_ids))
    try:
        lines = rolling_restart(ops.cluster)
    except RollingRestartFailed as exc:
        raise _failed(f"rolling restart: {exc}\n{ops.cluster.log_tails()}") from None
    finally:
        ops.ctx.nemesis.end(fault)
    for line in lines:
        ops.ctx.say(f"    {line}")
    ops.stall("rolling-restart", "after a rolling restart")
    ops.ctx.converge()


def _upgrade_restart(ops: OpsRun, rng: random.Random) -> None:
    ctx, cluster = ops.ctx, ops.cluster
    node_id = rng.choice(cluster.node_ids)
    leader = ctx.nemesis.leader()
    fault = ctx.nemesis.operation("upgrade-restart", nodes=[node_id], role="leader" if node_id == leader else "follower")
    try:
        if node_id == leader:
            ctx.say(
                f"    {_admin('drain', drain_node(cluster.endpoints, node_id, token=cluster.token, timeout_s=OPERATION_TIMEOUT_S, tls=cluster.tls))}"
            )
        cluster.kill(node_id, signal.SIGTERM)
        down_s = rng.uniform(*UPGRADE_DOWN_S)
        time.sleep(down_s)  # the upgrade's downtime (a drawn length, not a synchronisation)
        pid = cluster.restart(node_id)
    finally:
        ctx.nemesis.end(fault)
    ctx.say(f"    {node_id} stopped, down {down_s:.1f} s, started again on its data directory (pid {pid})")
    ops.stall("upgrade-restart", f"after {node_id}'s upgrade restart")
    ctx.converge()


def _leader_transfer(ops: OpsRun, rng: random.Random) -> None:
    ctx, cluster = ops.ctx, ops.cluster
    leader = ctx.nemesis.leader()
    to = rng.choice([""] + [n for n in cluster.node_ids if n != leader])
    fault = ctx.nemesis.operation("leader-transfer", nodes=[leader], role="leader", to=to)
    try:
        _, answer = _admin(
            "leader transfer",
            transfer_leadership(cluster.endpoints, to=to, token=cluster.token, timeout_s=OPERATION_TIMEOUT_S, tls=cluster.tls),
        )
    finally:
        ctx.nemesis.end(fault)
    ctx.say(f"    leader transfer from {leader} to {to or 'its choice'}: {answer}")
    ops.stall("leader-transfer", "after a leader transfer")
    ctx.converge()


def _fault(round_name: str) -> Callable[[OpsRun, random.Random], None]:
    def run(ops: OpsRun, rng: random.Random) -> None:
        from chaos_tests.scenarios import SCENARIOS

        SCENARIOS[round_name].round(ops.ctx)  # its own output says how long acknowledgements stopped

    return run


OPERATIONS: dict[str, Callable[[OpsRun, random.Random], None]] = {
    "replace": _replace,
    "rolling-restart": _rolling_restart,
    "upgrade-restart": _upgrade_restart,
    "leader-transfer": _leader_transfer,
    **{name: _fault(name) for name in FAULTS},
}


# --- the final read ----------------------------------------------------------------------


def _archive_records(directory: str) -> list[tuple[int, str, int, bytes]]:
    """The records of an archive directory (none before retention removed anything)."""
    if not os.path.isdir(directory) or not os.listdir(directory):
        return []
    journal = Journal.open(directory, readonly=True, create=False)
    try:
        return [(r.seq, r.session, r.client_seq, bytes(r.payload)) for r in journal.records()]
    finally:
        journal.close()


def final_read_with_archive(
    cluster, archive_root: str, *, history: HistoryRecorder, attempts: int = 10
) -> tuple[dict[str, int], list, dict[str, list]]:
    """Every node's stream: its archive from disk, then what the node serves after it, up to
    the last seq it reports. Nodes whose archive and journal start at 1 are recorded as final
    reads; the others (a node that joined after retention removed the start) are returned for
    ``compare_late_joiner``. Returns (records read per node, the longest final read recorded,
    the late joiners' records)."""

    async def served(endpoint: str, first: int, last: int) -> list:
        records, stalled = await read_range(endpoint, cluster.token, first, last, stall_s=FINAL_READ_STALL_S, tls=cluster.tls)
        if stalled:
            raise ConnectionError(f"final read of {endpoint}: no record for {FINAL_READ_STALL_S} s after {len(records)} from seq {first}")
        return records

    counts: dict[str, int] = {}
    reference: list = []
    late: dict[str, list] = {}
    for node_id in cluster.node_ids:
        endpoint = cluster.endpoint(node_id)
        for attempt in range(attempts):
            status = asyncio.run(node_status(endpoint, token=cluster.token, timeout_s=CONNECT_TIMEOUT_S, tls=cluster.tls))
            last = status.get("last_seq", 0)
            archived = _archive_records(os.path.join(archive_root, node_id))
            first = archived[-1][0] + 1 if archived else 1
            try:
                records = archived + (asyncio.run(served(endpoint, first, last)) if first <= last else [])
                break
            except (Truncated, ConnectionError) as exc:
                # Retention moved a segment into the archive after it was read (answered as a
                # Truncated frame, or refused "truncated: ..."): read the archive again.
                if "truncated" not in str(exc) or attempt == attempts - 1:
                    raise ConnectionError(f"final read of {node_id}: {exc}") from None
                time.sleep(RETENTION_CHECK_S)
        counts[node_id] = len(records)
        if records and records[0][0] == 1:
            history.final_read(node_id, records)
            reference = records if len(records) > len(reference) else reference
        else:
            late[node_id] = records
    return counts, reference, late


def compare_late_joiner(node_id: str, records: list, reference: list) -> str:
    """ "" when `records` (a contiguous run of seqs) equal the reference stream's at the same
    seqs and end where it ends; else what differs."""
    if not records:
        return f"{node_id} serves no record"
    by_seq = {r[0]: r for r in reference}
    expected = records[0][0]
    for record in records:
        if record[0] != expected:
            return f"{node_id}'s stream is not contiguous: seq {record[0]} after {expected - 1}"
        if by_seq.get(record[0]) != record:
            return f"{node_id} has {record!r} at seq {record[0]}, the reference has {by_seq.get(record[0])!r}"
        expected += 1
    if reference and records[-1][0] != reference[-1][0]:
        return f"{node_id} ends at seq {records[-1][0]}, the reference at {reference[-1][0]}"
    return ""
