"""Chaos scenarios: one per fault family, each a seeded run against a real three-node cluster.

A run (``run_scenario``):

1. prints its seed and the command that replays it;
2. starts a ``ChaosCluster`` (Raft links through the fault proxy) and the workload (clients
   submitting with pipelining, subscribers on two nodes), recording one history;
3. waits for the first acknowledgements, then repeats the scenario's *round* (one fault, its
   recovery) ``rounds`` times, or until ``duration_s`` has passed when a soak duration is given;
4. heals everything, restarts what is down, and requires acknowledgements again (the cluster
   must come back) and every node to agree on the stream;
5. stops the workload, reads every node's whole stream into the history, checks every journal
   with ``verify_journal``, and runs the checker (``chaos_tests.checker``).

Every choice — ports, which node, how long a fault lasts, which bit flips — comes from one
``random.Random(seed)`` and its children, so ``RAFTSEQ_CHAOS_SEED=N`` (or ``--seed N``) replays
the same schedule. (The cluster's own timing still varies from run to run: the seed replays the
faults, not the interleaving of the nodes' threads.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos_tests.checker import Report, check_file
from chaos_tests import ops, powerfs
from chaos_tests.cluster import ChaosCluster, tmpfs_supported
from chaos_tests.history import HistoryRecorder
from chaos_tests.nemesis import Nemesis
from chaos_tests.report import write_report
from chaos_tests.workload import Workload, WorkloadConfig, final_read
from raftseq.cluster import membership_client
from raftseq.cluster.certs import local_cluster_tls
from raftseq.cluster.credentials import ROLE_ADMIN, Quotas, new_credential, write_credentials
from raftseq.cluster.local import Watcher
from raftseq.cluster.node_exit import NodeExit
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import verify_journal

#: Acknowledgements the workload must reach before the first fault.
WARMUP_ACKS = 200
#: After a fault that leaves a majority (or after healing), acknowledgements must resume within this.
RECOVERY_TIMEOUT_S = 30.0
CONVERGE_TIMEOUT_S = 60.0
#: Node settings of every chaos cluster: small compaction thresholds, so that Raft snapshots and
#: journal catch-up happen within a short run.
CHAOS_OVERRIDES = {"raft": {"log_compaction_min_entries": 500, "log_compaction_min_time_s": 1.0}}
#: The credential of the workload's priority client (``priority_credential``).
PRIORITY_CREDENTIAL = "chaos-admin"


#: What ``verify_journal`` says of records a journal lacks and waits to fetch from a peer: after
#: a power cut in crash durability no node may have them any more (an expected loss).
JOURNAL_HOLE = "are missing (a hole waiting for catch-up)"


class ScenarioFailed(AssertionError):
    """The run could not do what the scenario needs (no recovery, no convergence)."""


@dataclass
class Context:
    """What a scenario's round works with."""

    cluster: ChaosCluster
    nemesis: Nemesis
    workload: Workload
    rng: random.Random
    say: Callable[[str], None]

    def hold(self, low_s: float, high_s: float) -> None:
        """Let a fault last a drawn time (the fault's length, not a synchronisation)."""
        time.sleep(self.rng.uniform(low_s, high_s))

    def acks_resume(self, what: str, *, timeout_s: float = RECOVERY_TIMEOUT_S) -> float:
        """Wait for an acknowledgement after now; returns how long it took."""
        started_ns = time.monotonic_ns()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.workload.ok_since(started_ns):
                return (time.monotonic_ns() - started_ns) / 1e9
            time.sleep(0.02)
        raise ScenarioFailed(f"no acknowledgement within {timeout_s:.0f} s {what}\n{self.cluster.log_tails()}")

    def converge(self, *, timeout_s: float = CONVERGE_TIMEOUT_S) -> int:
        """Wait, under load, until every node is up, agrees on one leader, and has caught up
        with what the leader held when the wait began. Returns that sequence number."""
        deadline = time.monotonic() + timeout_s
        target = None
        report: dict = {}
        while time.monotonic() < deadline:
            report = self.cluster.status()
            nodes = report["nodes"]
            leaders = {n.get("leader") for n in nodes}
            if all(n.get("role") != "unreachable" for n in nodes) and len(leaders) == 1 and None not in leaders:
                if target is None:
                    target = max(n["last_seq"] for n in nodes)
                if all(n["last_seq"] >= target for n in nodes):
                    return target
            time.sleep(0.05)
        raise ScenarioFailed(f"nodes did not catch up within {timeout_s:.0f} s (target {target}): {report}\n{self.cluster.log_tails()}")

    def restart_down_nodes(self) -> None:
        for node_id in self.cluster.node_ids:
            if not self.cluster.is_running(node_id):
                self.say(f"    {node_id} is down (exit {self.cluster.exit_code(node_id)}); restarting it")
                self.cluster.restart(node_id)


@dataclass
class Scenario:
    name: str
    description: str
    round: Callable[[Context], None]
    rounds: int = 2
    workload: dict = field(default_factory=dict)
    tmpfs_bytes: dict[str, int] = field(default_factory=dict)
    #: Node settings on top of ``CHAOS_OVERRIDES``.
    overrides: dict = field(default_factory=dict)
    #: Why the scenario cannot run on this machine ("" when it can).
    unavailable: Callable[[], str] = lambda: ""
    #: Every node's data directory on a power-loss filesystem (the power-cut scenarios).
    powerfs: bool = False
    #: The nodes' durability setting ("crash": today's default; "power").
    durability: str = "crash"
    #: The operations soak (``chaos_tests.ops``): operations on a schedule instead of rounds,
    #: retention with an archive per node, disk and RSS samples, pass criteria.
    ops: bool = False


# --- the rounds -------------------------------------------------------------------------


def _leader_lost(ctx: Context, fault, what: str, outcome: str, hold_s: tuple[float, float]) -> None:
    """The leader is lost (killed, paused, cut off): acknowledgements must resume from a new
    leader; the fault ends after a drawn time and every node must catch up."""
    took = ctx.acks_resume(what)
    ctx.say(f"    leader {fault.details['nodes'][0]} {outcome} after {took:.2f} s")
    ctx.hold(*hold_s)
    ctx.nemesis.end(fault)
    ctx.converge()


def _kill_leader(ctx: Context) -> None:
    _leader_lost(ctx, ctx.nemesis.kill_on("leader"), "after the leader was killed", "killed; acknowledgements again", (0.2, 1.0))


def _kill_follower(ctx: Context) -> None:
    fault = ctx.nemesis.kill_on("follower")
    ctx.hold(0.5, 2.0)
    ctx.nemesis.end(fault)
    ctx.converge()


def _kill_majority(ctx: Context, fault, hold_s: tuple[float, float]) -> None:
    """A majority is down: no acknowledgement until it is restarted, then they must resume."""
    ctx.hold(*hold_s)
    ctx.nemesis.end(fault)
    took = ctx.acks_resume(f"after {fault.details['nodes']} were killed and restarted")
    ctx.say(f"    {fault.details['nodes']} killed and restarted; acknowledgements again after {took:.2f} s")
    ctx.converge()


def _kill_two(ctx: Context) -> None:
    _kill_majority(ctx, ctx.nemesis.kill_on("two"), (0.5, 1.5))


def _kill_all(ctx: Context) -> None:
    _kill_majority(ctx, ctx.nemesis.kill_on("all"), (0.2, 1.0))


def _rolling_restart(ctx: Context) -> None:
    order = list(ctx.cluster.node_ids)
    ctx.rng.shuffle(order)
    ctx.say(f"    rolling restart {order}")
    for node_id in order:
        leader = ctx.nemesis.leader()
        ctx.nemesis.crash([node_id], down_s=ctx.rng.uniform(0.1, 0.5), leader=leader)
        ctx.acks_resume(f"after restarting {node_id}")
        ctx.converge()


def _pause_leader(ctx: Context) -> None:
    # The fault's end wakes the stale leader up.
    fault = ctx.nemesis.pause_leader()
    _leader_lost(ctx, fault, "while the leader was paused", "paused; acknowledgements from a new leader", (0.5, 2.0))


def _isolate_leader(ctx: Context) -> None:
    # Held long enough for the new leader to compact its log: the deposed leader, holding
    # entries no majority has, then rejoins through a snapshot.
    fault = ctx.nemesis.isolate_leader()
    _leader_lost(ctx, fault, "with the leader cut off from both followers", "isolated; acknowledgements again", (2.0, 4.0))


def _split(ctx: Context) -> None:
    fault = ctx.nemesis.split()
    ctx.acks_resume("on the majority side of a split")
    ctx.hold(0.5, 2.0)
    ctx.nemesis.end(fault)
    ctx.converge()


def _lasting(ctx: Context, fault, what: str) -> None:
    """A fault that leaves a majority lasts a drawn time; acknowledgements must flow while it
    lasts, and every node must catch up once it ended."""
    ctx.hold(1.0, 3.0)
    ctx.acks_resume(what)
    ctx.nemesis.end(fault)
    ctx.converge()


def _bridge(ctx: Context) -> None:
    _lasting(ctx, ctx.nemesis.bridge(), "with a bridge partition")


def _one_way(ctx: Context) -> None:
    _lasting(ctx, ctx.nemesis.one_way(), "with one direction of a link lost")


def _flap(ctx: Context) -> None:
    details = ctx.nemesis.flap(duration_s=ctx.rng.uniform(3.0, 6.0), cut_s=(0.1, 1.0), healed_s=(0.1, 0.8))
    ctx.say(f"    flapping: {details.get('cuts')} cuts")
    ctx.acks_resume("after a flapping partition")
    ctx.converge()


def _slow_links(ctx: Context) -> None:
    _lasting(ctx, ctx.nemesis.slow(ctx.rng.choice([5.0, 20.0, 50.0])), "with slow links")


def _disk_full(ctx: Context) -> None:
    node = "n2"  # the node on the tmpfs
    fault = ctx.nemesis.fill_disk(node)
    ctx.hold(1.0, 2.5)
    ctx.nemesis.end(fault)
    ctx.restart_down_nodes()  # a node may stop itself on a full disk; it must come back whole
    ctx.acks_resume("after the disk was freed")
    ctx.converge()


def _journal_damage(ctx: Context) -> None:
    leader = ctx.nemesis.leader()
    victim = ctx.rng.choice([n for n in ctx.cluster.node_ids if n != leader])
    fault = ctx.nemesis.kill([victim], leader=leader)
    ctx.cluster.reap(victim)
    ctx.nemesis.corrupt_journal_tail(victim, how=ctx.rng.choice(["truncate", "bitflip"]))
    ctx.hold(0.2, 1.0)
    ctx.nemesis.end(fault)
    ctx.converge()


def _client_faults(ctx: Context) -> None:
    # The workload resets client connections and drops subscribers on its own (see its config);
    # a leader kill in the middle makes the resubmits cross a leader change.
    ctx.hold(1.0, 2.0)
    _kill_leader(ctx)
    ctx.hold(1.0, 2.0)


def _power_summary(fault) -> str:
    dropped = fault.details["dropped"]
    pages = sum(d["dirty_pages"] for d in dropped.values())
    torn = sum(d["torn"] is not None for d in dropped.values())
    return f"power cut of {fault.details['nodes']}: {pages} unsynced pages dropped, {torn} write(s) torn, cut in {fault.details['cut_s']:.2f} s"


def _power_back(ctx: Context, fault) -> float:
    """End a power cut (mount on what was durable, restart); returns how long that took."""
    details = ctx.nemesis.end(fault)
    return details["restore_s"]


def _power_cut_follower(ctx: Context) -> None:
    fault = ctx.nemesis.power_cut_on("follower")
    ctx.acks_resume("with a follower's power cut")
    ctx.hold(0.2, 1.0)
    restore_s = _power_back(ctx, fault)
    ctx.say(f"    {_power_summary(fault)}; back in {restore_s:.2f} s")
    ctx.converge()


def _power_cut_leader(ctx: Context) -> None:
    fault = ctx.nemesis.power_cut_on("leader")
    took = ctx.acks_resume("after the leader's power cut")
    ctx.hold(0.2, 1.0)
    restore_s = _power_back(ctx, fault)
    ctx.say(f"    {_power_summary(fault)}; acknowledgements from a new leader after {took:.2f} s; back in {restore_s:.2f} s")
    ctx.converge()


def _power_cut_majority(ctx: Context, fault) -> None:
    """A majority lost its power: no acknowledgement until it is back, then they must resume."""
    ctx.hold(0.2, 1.0)
    restore_s = _power_back(ctx, fault)
    took = ctx.acks_resume(f"after the power of {fault.details['nodes']} came back")
    ctx.say(f"    {_power_summary(fault)}; back in {restore_s:.2f} s, acknowledgements again after {took:.2f} s")
    ctx.converge()


def _power_cut_two(ctx: Context) -> None:
    _power_cut_majority(ctx, ctx.nemesis.power_cut_on("two"))


def _power_cut_all(ctx: Context) -> None:
    _power_cut_majority(ctx, ctx.nemesis.power_cut_on("all"))


POWER_ROUNDS = {"follower": _power_cut_follower, "leader": _power_cut_leader, "two": _power_cut_two, "all": _power_cut_all}


def _power_round(ctx: Context) -> None:
    """A power cut of a follower, the leader, two nodes or all three, drawn from the rng."""
    which = ctx.rng.choice(sorted(POWER_ROUNDS))
    ctx.say(f"    power cut: {which}")
    POWER_ROUNDS[which](ctx)


#: Seconds a membership change may take (a new node starts, catches up and gets its vote).
MEMBERSHIP_CHANGE_TIMEOUT_S = 60.0
#: Seconds a removed node may take to notice and stop (it asks its peers once it hears no leader).
REMOVED_EXIT_TIMEOUT_S = 30.0


def _member_change(ctx: Context, op: str, node_id: str, **fields: str) -> None:
    fault = ctx.nemesis.operation(f"membership-{op}", nodes=[node_id])
    request = protocol.MemberRequest(op, node_id, **fields)
    started = time.monotonic()
    reply = asyncio.run(
        membership_client.change(
            ctx.cluster.endpoints, request, token=ctx.cluster.token, timeout_s=MEMBERSHIP_CHANGE_TIMEOUT_S, tls=ctx.cluster.tls
        )
    )
    ctx.nemesis.end(fault, number=reply.number)
    ctx.say(
        f"    {op} {node_id}: membership {reply.number} ({', '.join(m.id for m in reply.members)}) after {time.monotonic() - started:.2f} s"
    )


def _membership(ctx: Context) -> None:
    """Add-then-remove under load: a new node (new ports, data directory and key) joins as a
    learner and becomes a voter; the leader or a follower is killed while the cluster has four
    voters; then the new node is removed again (a leader hands over first) and must stop."""
    new_id = f"j{ctx.rng.randrange(10**6)}"
    node = ctx.cluster.joining_node(new_id, rng=ctx.rng)
    ctx.cluster.start_node(node)
    c = node.config
    _member_change(ctx, "add", new_id, raft_address=c.raft_address, client_address=c.client_address, raft_public_key=c.raft_public_key)
    ctx.acks_resume(f"after {new_id} was added")
    if ctx.rng.random() < 0.5:
        _kill_leader(ctx)
    else:
        _kill_follower(ctx)
    _member_change(ctx, "remove", new_id)
    deadline = time.monotonic() + REMOVED_EXIT_TIMEOUT_S
    while ctx.cluster.exit_code(new_id) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    code = ctx.cluster.exit_code(new_id)
    if code != NodeExit.REMOVED:
        raise ScenarioFailed(
            f"{new_id}, removed, did not stop with exit code {NodeExit.REMOVED:d} within {REMOVED_EXIT_TIMEOUT_S:.0f} s (exit {code})"
        )
    ctx.cluster.forget_node(new_id)
    ctx.acks_resume(f"after {new_id} was removed")
    ctx.converge()


def _random_round(ctx: Context) -> None:
    """One round of a fault family drawn from the whole catalogue (the soak; power cuts are a
    soak of their own, ``--scenario power``)."""
    name = ctx.rng.choice(sorted(n for n in SCENARIOS if n != "kill-leader-loaded" and not SCENARIOS[n].powerfs))
    ctx.say(f"    fault family: {name}")
    SCENARIOS[name].round(ctx)


def _tmpfs_unavailable() -> str:
    ok, why = tmpfs_supported()
    return "" if ok else f"no private tmpfs here: {why}"


def _powerfs_unavailable() -> str:
    ok, why = powerfs.supported()
    return "" if ok else f"no power-loss filesystem here: {why}"


#: The load of the power cuts "under pipelined load".
POWER_LOAD = {"clients": 3, "rate_per_client": 1500.0, "window": 400}
#: Log compaction all the time: a Raft snapshot every 50 entries, at most every 0.2 s.
COMPACTING = {"raft": {"log_compaction_min_entries": 50, "log_compaction_min_time_s": 0.2}}


def _power(name: str, description: str, round: Callable[[Context], None], **options) -> Scenario:
    return Scenario(name, description, round, powerfs=True, unavailable=_powerfs_unavailable, **options)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("kill-leader", "SIGKILL the leader, restart it", _kill_leader),
        Scenario(
            "kill-leader-loaded",
            "SIGKILL the leader under heavy pipelined load (the load that made unmodified pysyncobj lose acknowledged entries)",
            _kill_leader,
            rounds=3,
            workload={"clients": 3, "rate_per_client": 1500.0, "window": 400},
        ),
        Scenario("kill-follower", "SIGKILL a follower, restart it", _kill_follower),
        Scenario("kill-two", "SIGKILL two nodes (a majority), restart them", _kill_two),
        Scenario("kill-all", "SIGKILL all three nodes, restart them", _kill_all),
        Scenario("rolling-restart", "kill and restart each node in turn", _rolling_restart, rounds=1),
        Scenario("pause-leader", "SIGSTOP the leader past the election timeout, then SIGCONT (a stale leader wakes)", _pause_leader),
        Scenario("isolate-leader", "cut the leader from both followers; clients still reach it", _isolate_leader),
        Scenario("split", "majority/minority partition", _split),
        Scenario("bridge", "cut n_a-n_b; the bridge node sees both", _bridge),
        Scenario("one-way", "lose one direction of one Raft link", _one_way),
        Scenario("flap", "a partition cut and healed on a seeded schedule", _flap, rounds=1),
        Scenario("slow-links", "delay on every Raft link (the proxy)", _slow_links, rounds=1),
        Scenario(
            "disk-full",
            "n2's data directory on a small tmpfs that fills up",
            _disk_full,
            tmpfs_bytes={"n2": 64 << 20},
            # The node refuses writes below 16 MiB free (the default, 256 MiB, is more than the tmpfs).
            overrides={"journal": {"disk_free_bytes_min": 16 << 20}},
            unavailable=_tmpfs_unavailable,
        ),
        Scenario("journal-damage", "a follower's journal tail truncated or bit-flipped while it is down", _journal_damage),
        Scenario("membership", "add a new node (learner, then voter), kill the leader or a follower, remove the new node", _membership),
        Scenario(
            "client-faults",
            "client connections reset mid-submit, subscribers dropped mid-stream, and a leader kill",
            _client_faults,
            rounds=1,
            workload={"client_resets_every_s": 0.7, "subscriber_drops_every_s": 1.0},
        ),
        # The power cuts: every node on a power-loss filesystem. In the "crash" durability a cut
        # that loses acknowledged messages is expected and reported; in "power", nothing may be lost.
        _power("power-follower", "cut the power of a follower (its unsynced writes dropped), bring it back", _power_cut_follower),
        _power("power-leader", "cut the power of the leader, bring it back", _power_cut_leader),
        _power("power-two", "cut the power of two nodes (a majority) at one instant", _power_cut_two),
        _power("power-all", "cut the power of all three nodes at one instant", _power_cut_all),
        _power("power-all-loaded", "cut the power of all three under heavy pipelined load", _power_cut_all, workload=POWER_LOAD),
        _power(
            "power-compaction",
            "cut the power of all three while the log is compacted all the time (a snapshot every 50 entries)",
            _power_cut_all,
            overrides=COMPACTING,
            workload=POWER_LOAD,
        ),
        _power(
            "power",
            "power cuts of a follower, the leader, two or all three, drawn each round, under load",
            _power_round,
            rounds=4,
            workload=POWER_LOAD,
        ),
    ]
}


#: The soak: faults drawn from the whole catalogue, on one cluster, for a given time. Not a
#: pytest scenario (``raftseq chaos --scenario all --duration 20m``).
SOAK = Scenario(
    "all",
    "random faults from the whole catalogue, one cluster",
    _random_round,
    rounds=len(SCENARIOS),
    workload={"client_resets_every_s": 6.0, "subscriber_drops_every_s": 8.0},
    # Room for the journal of a long soak (~100 MB in 20 minutes): a disk that fills up for
    # good is a fault of its own; the round fills it on purpose and frees it again.
    tmpfs_bytes={"n2": 512 << 20},
    overrides={"journal": {"disk_free_bytes_min": 16 << 20}},
    unavailable=_tmpfs_unavailable,
)


#: A week of operations compressed (``raftseq chaos --scenario ops --duration 60m``): steady
#: pipelined load, retention, a membership replace, rolling, upgrade-shaped and leader-drained
#: restarts, leader transfers and the ordinary faults, disk and RSS sampled (``chaos_tests.ops``).
OPS = Scenario(
    "ops",
    "a week of operations compressed: replace n2, rolling and upgrade restarts, leader transfers, faults; retention on; disk and RSS sampled",
    lambda ctx: None,
    workload=ops.OPS_LOAD,
    overrides=ops.OPS_OVERRIDES,
    ops=True,
)
#: Runs of their own, not in the catalogue the soak draws from.
SOAKS = {SOAK.name: SOAK, OPS.name: OPS}


def scenario_named(name: str) -> Scenario:
    return SOAKS.get(name) or SCENARIOS[name]


# --- a run ------------------------------------------------------------------------------


class LeaderWatcher(Watcher):
    """Polls the cluster's status on a thread and notes every leader change in the history
    (``note`` events ``leader`` with ``leader`` and ``term``), for the timeline."""

    def __init__(self, cluster: ChaosCluster, history: HistoryRecorder, interval_s: float = 0.5) -> None:
        super().__init__(interval_s, name="chaos-leader-watch")
        self.cluster = cluster
        self.history = history
        self.changes = 0
        self._last: tuple[str, int] | None = None

    def poll(self) -> None:
        try:
            report = self.cluster.status(timeout_s=0.5)
        except Exception:  # noqa: BLE001 - a status poll during a fault may fail; try again
            return
        leaders = [n for n in report["nodes"] if n.get("role") == "leader"]
        if len(leaders) != 1:
            return
        current = (leaders[0].get("node", ""), leaders[0].get("term", 0))
        if current != self._last:
            self.history.note("leader", leader=current[0], term=current[1])
            self.changes += self._last is not None
            self._last = current


# --- a run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    scenario: str
    seed: int
    report: Report
    history_path: str
    acked: int
    journals_ok: bool
    journal_problems: list[str]
    seconds: float
    report_dir: str = ""
    #: The ops soak's pass criteria (none for the other scenarios).
    criteria: list[ops.Criterion] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report.ok and self.journals_ok and all(c.ok for c in self.criteria)


def replay_command(name: str, seed: int, *, tls: bool = False) -> str:
    if tls:
        return f"raftseq chaos {'--scenario ' if name in SOAKS else 'run '}{name} --seed {seed} --tls" + (
            " --duration ..." if name in SOAKS else ""
        )
    if name in SOAKS:
        return f"raftseq chaos --scenario {name} --seed {seed} --duration ..."
    if SCENARIOS[name].powerfs:
        return f"raftseq chaos run {name} --seed {seed}   (or RAFTSEQ_CHAOS_SEED={seed} with chaos_tests/test_power.py)"
    return f"RAFTSEQ_CHAOS_SEED={seed} python -m pytest chaos_tests/test_scenarios.py -k '{name}'   or   raftseq chaos run {name} --seed {seed}"


def priority_credential(directory: str) -> tuple[str, str]:
    """A credentials file holding one credential with ``priority`` (any session, every role),
    written in `directory`; its path and the credential's token. The shared token still serves
    every other client."""
    credential, secret = new_credential(PRIORITY_CREDENTIAL, [ROLE_ADMIN], [], priority=True, quotas=Quotas())
    path = os.path.join(directory, "credentials.json")
    write_credentials(path, [credential])
    return path, f"{PRIORITY_CREDENTIAL}:{secret}"


def priority_entries_proposed(cluster: ChaosCluster) -> float:
    """Submits the nodes proposed through the priority lane since they started (metrics)."""
    return sum(cluster.metrics(node.id).get("raftseq_priority_entries_proposed_total", 0.0) for node in cluster.nodes)


def run_scenario(
    name: str,
    *,
    seed: int,
    directory: str,
    rounds: int | None = None,
    duration_s: float | None = None,
    report_dir: str | None = None,
    say: Callable[[str], None] = print,
    durability: str | None = None,
    tls: bool = False,
) -> RunResult:
    """Run one scenario (or the soak, ``"all"``) in `directory` (its cluster, logs and history
    stay there); with `report_dir`, also write ``report.json`` and ``timeline.png`` there.
    `durability` ("crash", "power") overrides the scenario's. `tls`: the nodes' client ports
    speak mutual TLS (``cluster up --tls --tls-mutual``'s certificates, ``cluster.certs``), and
    the workload, its subscribers, the final reads and the operations reach them over it."""
    scenario = scenario_named(name)
    durability = durability or scenario.durability
    why_not = scenario.unavailable()
    if why_not:
        raise ScenarioFailed(f"{name} cannot run here: {why_not}")
    started = time.monotonic()
    say(f"chaos {name}: seed {seed}, durability {durability}{', TLS' if tls else ''}  (replay: {replay_command(name, seed, tls=tls)})")
    rng = random.Random(seed)
    cluster_rng, nemesis_rng, workload_rng, round_rng = (random.Random(rng.random()) for _ in range(4))
    history_path = os.path.join(directory, "history.jsonl")
    with HistoryRecorder(history_path) as history:
        history.note("scenario", scenario=name, seed=seed, description=scenario.description, durability=durability, tls=tls)
        fault_ids: dict[int, int] = {}

        def on_fault(fault_name: str, phase: str, details: dict) -> None:
            nemesis_id = details.get("nemesis_id", 0)
            if phase == "start":
                fault_ids[nemesis_id] = history.fault_start(fault_name, **details)
            elif nemesis_id in fault_ids:
                history.fault_end(fault_ids.pop(nemesis_id), **details)

        overrides = {section: dict(values) for section, values in CHAOS_OVERRIDES.items()}
        for section, values in scenario.overrides.items():
            overrides.setdefault(section, {}).update(values)
        # The workload's first client submits through the leader's priority lane (read between
        # the loop's handles, proposed in batches of its own): that path meets every fault too.
        overrides["credentials_file"], priority_token = priority_credential(directory)
        cluster_dir = os.path.join(directory, "cluster")
        if tls:
            overrides["tls"] = local_cluster_tls(cluster_dir, mutual=True)
        cluster = ChaosCluster(
            cluster_dir,
            rng=cluster_rng,
            overrides=overrides,
            tmpfs_bytes=scenario.tmpfs_bytes,
            powerfs=["n1", "n2", "n3"] if scenario.powerfs else (),
            durability=durability,
        )
        workload = None
        ops_run = None
        archive_root = os.path.join(directory, "archive")
        if scenario.ops:
            for node in cluster.nodes:
                ops.give_own_archive(cluster, node, archive_root)
        try:
            cluster.start()
            say(f"  cluster up: {', '.join(cluster.endpoints)}")
            endpoints = cluster.endpoints
            config = WorkloadConfig(subscriber_nodes=[endpoints[0], endpoints[2]], **scenario.workload)
            workload = Workload(
                endpoints,
                token=cluster.token,
                history=history,
                rng=workload_rng,
                config=config,
                tls=cluster.tls,
                priority_token=priority_token,
            )
            workload.start()
            load_started = time.monotonic()
            if not workload.wait_for_acks(WARMUP_ACKS, timeout_s=RECOVERY_TIMEOUT_S):
                raise ScenarioFailed(f"only {workload.stats.ok} acknowledgements before any fault\n{cluster.log_tails()}")
            if not priority_entries_proposed(cluster):
                raise ScenarioFailed("no submit went through the priority lane before any fault (the priority client's)")
            nemesis = Nemesis(cluster, rng=nemesis_rng, on_fault=on_fault)
            ctx = Context(cluster, nemesis, workload, round_rng, say)
            planned = rounds if rounds is not None else scenario.rounds
            round_index = 0
            if scenario.ops:
                ops_run = ops.OpsRun(ctx, duration_s or ops.OPS_DEFAULT_DURATION_S, archive_root)
            with LeaderWatcher(cluster, history):
                while ops_run is None:
                    if duration_s is not None:
                        if time.monotonic() - started >= duration_s:
                            break
                    elif round_index >= planned:
                        break
                    round_index += 1
                    elapsed = f", {time.monotonic() - started:.0f} of {duration_s:.0f} s" if duration_s is not None else ""
                    say(
                        f"  round {round_index}{'' if duration_s is not None else f' of {planned}'} ({workload.stats.ok} acknowledged so far{elapsed})"
                    )
                    try:
                        scenario.round(ctx)
                    finally:
                        nemesis.heal_all()
                if ops_run is not None:
                    try:
                        ops_run.run(round_rng)
                    finally:
                        nemesis.heal_all()
                    round_index = sum(ops_run.done.values())
                ctx.restart_down_nodes()
                ctx.acks_resume("after healing")
                if ops_run is not None:
                    ctx.converge()
                    ops_run.sample("end")
            stats = workload.stop()
            load_s = time.monotonic() - load_started
            workload = None
            last_seq = cluster.wait_converged(timeout_s=CONVERGE_TIMEOUT_S)
            loss_expected = scenario.powerfs and durability == "crash"
            journal_problems = []
            if ops_run is not None:
                counts, reference, late = ops.final_read_with_archive(cluster, archive_root, history=history)
                for node_id, records in late.items():
                    problem = ops.compare_late_joiner(node_id, records, reference)
                    journal_problems += [problem] if problem else []
                    span = f"{records[0][0]}..{records[-1][0]}" if records else "none"
                    say(
                        f"  {node_id} holds seqs {span} (it joined after retention removed the start): {problem or 'as the longest final read'}"
                    )
                del reference, late
            else:
                counts = final_read(endpoints, token=cluster.token, history=history, past_holes=loss_expected, tls=cluster.tls)
            say(
                f"  healed; {stats.ok} acknowledged, {stats.invoked - stats.ok} not; stream of {last_seq}; final reads {list(counts.values())}"
            )
            for node_id in cluster.node_ids:
                report = verify_journal(cluster.journal_dir(node_id))
                if not report.ok and loss_expected and JOURNAL_HOLE in report.problem:
                    say(f"  {node_id}'s journal: {report.problem} (crash durability: part of the expected loss)")
                elif not report.ok:
                    journal_problems.append(f"{node_id}: {report}")
            if scenario.powerfs and len(set(counts.values())) != 1:
                if loss_expected:  # reported, not failed
                    say(f"  the journals differ after healing (crash durability): final reads of {list(counts.values())}")
                else:
                    journal_problems.append(f"the journals differ after healing: final reads of {counts}")
        finally:
            if workload is not None:
                workload.stop(drain_s=0)
            cluster.stop()
    report = check_file(history_path)
    seconds = time.monotonic() - started
    result = RunResult(name, seed, report, history_path, stats.ok, not journal_problems, journal_problems, seconds)
    say(report.format())
    if ops_run is not None:
        result.criteria = ops_run.criteria(sum(report.violation_counts.values()))
    if report_dir is not None:
        run = {
            "scenario": name,
            "seed": seed,
            "seconds": round(seconds, 1),
            "rounds": round_index,
            "acknowledged": stats.ok,
            "durability": durability,
            "acknowledged_lost": report.loss.acked_lost,
            "journals_verified": not journal_problems,
            "journal_problems": journal_problems,
            "replay": replay_command(name, seed, tls=tls),
            "tls": tls,
        }
        if ops_run is not None:
            run.update(ops_run.summary())
            run["acknowledged_per_s"] = round(stats.ok / load_s, 1)
            run["criteria"] = [dataclasses.asdict(c) for c in result.criteria]
        write_report(report_dir, history_path, report, run)
        result.report_dir = report_dir
        say(f"  report: {os.path.join(report_dir, 'report.json')} and timeline.png")
    for problem in journal_problems:
        say(f"  journal check failed: {problem}")
    if ops_run is not None:
        say(
            f"  operations: {ops._summary([n for n, k in ops_run.done.items() for _ in range(k)])}; {stats.ok / load_s:.0f} acknowledged/s under load ({load_s:.0f} s)"
        )
        for criterion in result.criteria:
            say(f"  criterion {'passed' if criterion.ok else 'FAILED'}: {criterion.name}: {criterion.figure}")
    verdict = "PASSED" if result.ok else "FAILED"
    if result.ok and report.loss.acked_lost:
        verdict += f" with the expected loss of power cuts in crash durability ({report.loss.acked_lost} acknowledged lost)"
    say(f"chaos {name}: {verdict} in {seconds:.1f} s (seed {seed}; history {history_path})")
    return result
