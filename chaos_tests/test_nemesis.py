"""The nemesis against real three-node clusters: every Raft link through the fault proxy.

Each test starts its own cluster (stopped at teardown whatever happens: nodes, proxy, tmpfs
holders), applies faults through ``Nemesis``, and checks what a client and ``raftseq status``
see. The seed of the run (ports, every choice of the nemesis) is printed;
``RAFTSEQ_CHAOS_SEED=N`` replays it.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from types import SimpleNamespace

import pytest

from chaos_tests.cluster import ChaosCluster, netns_supported, tmpfs_supported, wait_until
from chaos_tests.nemesis import FLIPS_MAX, Nemesis
from chaos_tests.proxy import BACKWARD, DROP, FORWARD, HOLD, PASS
from raftseq.clients import BlockingSequencerClient, NotConnected, OutcomeUnknown
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import FsyncPolicy, Journal, list_segment_files, scan_segment, verify_journal

LEADER_TIMEOUT_S = 10.0
SUBMIT_DEADLINE_S = 10.0
MIB = 1 << 20
#: Nodes on a tmpfs refuse appends below this much free space (config default: 256 MiB).
DISK_FREE_MIN = {"journal": {"disk_free_bytes_min": 1 * MIB}}
TMPFS_BYTES = 24 * MIB


def run_seed() -> int:
    text = os.environ.get("RAFTSEQ_CHAOS_SEED", "")
    return int(text) if text else random.SystemRandom().randrange(1, 2**31)


class FaultLog:
    """The ``on_fault`` callback: keeps every report."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str, dict]] = []

    def __call__(self, name: str, phase: str, details: dict) -> None:
        print(f"fault {phase}: {name} {details}", flush=True)
        self.reports.append((name, phase, details))

    def check_paired(self) -> None:
        """Every start has exactly one end, with the same name and nemesis_id, after it."""
        open_faults: dict[int, str] = {}
        for name, phase, details in self.reports:
            fid = details["nemesis_id"]
            if phase == "start":
                assert fid not in open_faults, f"fault {fid} started twice"
                open_faults[fid] = name
            else:
                assert open_faults.pop(fid, None) == name, f"end of {name} {fid} without its start"
        assert not open_faults, f"faults never ended: {open_faults}"


@pytest.fixture
def chaos(tmp_path):
    """``chaos(**kwargs)`` builds and starts a ``ChaosCluster`` and its ``Nemesis``; everything
    is stopped at teardown."""
    made: list[ChaosCluster] = []
    seed = run_seed()

    def make(**kwargs) -> tuple[ChaosCluster, Nemesis, FaultLog]:
        rng = random.Random(seed)
        cluster = ChaosCluster(str(tmp_path / f"c{len(made)}"), rng=rng, **kwargs)
        made.append(cluster)
        print(f"chaos cluster: seed {seed} (RAFTSEQ_CHAOS_SEED={seed} replays)\n{cluster.describe()}", flush=True)
        started = time.monotonic()
        leader = cluster.start(leader_timeout_s=LEADER_TIMEOUT_S)
        print(f"leader {leader['node']} after {time.monotonic() - started:.2f} s", flush=True)
        log = FaultLog()
        return cluster, Nemesis(cluster, rng=rng, on_fault=log), log

    try:
        yield make
    finally:
        for cluster in made:
            try:
                print(cluster.log_tails(), flush=True)
            finally:
                cluster.stop()


def client(cluster: ChaosCluster, session: str, *, endpoints=None, **options) -> BlockingSequencerClient:
    options.setdefault("outcome_deadline_s", SUBMIT_DEADLINE_S)
    return BlockingSequencerClient(endpoints or cluster.endpoints, session=session, token=cluster.token, **options)


def read_stream(cluster: ChaosCluster, last_seq: int, *, node: str | None = None) -> dict[int, bytes]:
    """seq -> payload of 1..last_seq as a subscriber of `node` (or any node) receives them."""
    endpoints = [cluster.endpoint(node)] if node else cluster.endpoints
    with client(cluster, f"reader-{node or 'any'}", endpoints=endpoints) as reader:
        messages = list(reader.subscribe(1, limit=last_seq, timeout_s=10))
    stream = {m.seq: m.payload for m in messages}
    assert sorted(stream) == list(range(1, last_seq + 1)), f"stream from {node or 'any node'} is not 1..{last_seq}"
    return stream


def followers(cluster: ChaosCluster, leader: str) -> list[str]:
    return [n for n in cluster.node_ids if n != leader]


def sockets_of_port(port: int, *, netns: str = "", side: str = "dport") -> list[str]:
    """``ss`` lines of the established connections whose `side` (``dport``: the remote end,
    ``sport``: the local end) is `port` (in the network namespace file `netns`)."""
    prefix = ["nsenter", f"--net={netns}", "--"] if netns else []
    command = [*prefix, "ss", "-tnpH", "state", "established", f"( {side} = :{port} )"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=5)
    return [line for line in done.stdout.splitlines() if line.strip()]


_NETNS = {"checked": False, "ok": False, "why": ""}


def require_network(network: str) -> None:
    if network != "netns":
        return
    if not _NETNS["checked"]:
        _NETNS["ok"], _NETNS["why"] = netns_supported()
        _NETNS["checked"] = True
    if not _NETNS["ok"]:
        # .ci/run installs iptables; a machine where namespaces cannot be made fails loudly.
        pytest.fail(f"network namespaces with iptables do not work here: {_NETNS['why']}")


NETWORKS = ["proxy", "netns"]
#: Bound on every Raft link of a started cluster being up (a loaded CI machine).
LINKS_UP_WITHIN_S = 15.0


# --- choices ----------------------------------------------------------------------------------


def test_the_nemesis_draws_its_choices_from_its_seed_and_bounds_them():
    def schedule(seed: int, **kwargs) -> list:
        return Nemesis(None, rng=random.Random(seed)).flap_schedule(**kwargs)

    kwargs = {"duration_s": 10.0, "cut_s": (0.1, 1.0), "healed_s": (0.1, 1.0)}
    assert schedule(7, **kwargs) == schedule(7, **kwargs)
    assert schedule(7, **kwargs) != schedule(8, **kwargs)
    for cut_at, heal_at in schedule(7, **kwargs):
        assert 0 < cut_at < heal_at <= 10.0
    assert len(schedule(1, duration_s=1e6, cut_s=(0.01, 0.02), healed_s=(0.01, 0.02))) == FLIPS_MAX


class CutsTheLastRecord(random.Random):
    """Draws the size of the journal's last record as the number of bytes to cut."""

    def __init__(self, last_record_bytes: int) -> None:
        super().__init__(0)
        self.last_record_bytes = last_record_bytes

    def randint(self, a: int, b: int) -> int:
        return self.last_record_bytes


def test_a_truncated_journal_tail_is_always_a_torn_record(tmp_path):
    """A cut of exactly the last record's bytes left a journal that was only shorter, not
    damaged: the node had nothing to cut and said nothing, and the test of a damaged tail
    failed (CI, seed 106175090: 38 bytes cut, a 38-byte record). One byte more tears it."""
    journal = Journal.open(str(tmp_path), fsync=FsyncPolicy.parse("never"))
    records = [protocol.encode_delivered(seq, seq, "s", seq, b"record %d" % seq) for seq in range(1, 11)]
    for seq, record in enumerate(records, start=1):
        journal.append(record, seq, seq)
    journal.close()
    [(first_seq, path)] = list_segment_files(str(tmp_path))
    assert scan_segment(path, first_seq, check=True).count == 10
    cluster = SimpleNamespace(is_running=lambda node_id: False, journal_dir=lambda node_id: str(tmp_path))
    damage = Nemesis(cluster, rng=CutsTheLastRecord(len(records[-1]))).corrupt_journal_tail("n1", how="truncate")
    scan = scan_segment(path, first_seq, check=True)
    assert scan.problem.startswith("torn record") and scan.count == 8, (damage, scan)
    assert damage["bytes_cut"] == len(records[-1]) + 1, damage


# --- wiring ---------------------------------------------------------------------------------


def test_every_raft_connection_goes_through_the_proxy(chaos):
    cluster, _, _ = chaos()
    assert {(link.initiator, link.acceptor) for link in cluster.links} == {("n2", "n1"), ("n3", "n1"), ("n3", "n2")}
    for link in cluster.links:
        wait_until(
            lambda: all(v > 0 for v in cluster.proxy.stats(link.name).bytes_forwarded.values()),
            timeout_s=5,
            what=f"traffic both ways on {link.name}",
        )
    # Every established connection to a node's Raft port comes from this process (the proxy):
    # two to n1, one to n2, none to n3 (nobody dials the greatest address).
    me = f"pid={os.getpid()},"
    for node in cluster.nodes:
        port = int(node.config.raft_address.rsplit(":", 1)[1])
        lines = sockets_of_port(port)
        expected = sum(1 for link in cluster.links if link.acceptor == node.config.id)
        assert len(lines) == expected, f"{len(lines)} connections to {node.config.id}'s Raft port, expected {expected}: {lines}"
        strangers = [line for line in lines if me not in line]
        assert not strangers, f"Raft connections to {node.config.id} that bypass the proxy: {strangers}"


def test_in_network_namespaces_raft_runs_over_the_veths_and_clients_over_forwarded_ports(chaos):
    require_network("netns")
    cluster, _, _ = chaos(network="netns")
    assert cluster.proxy is None and cluster.links == []
    for node in cluster.nodes:
        host, port = node.config.raft_address.rsplit(":", 1)
        assert host.startswith("10.231.0."), node.config.raft_address
        ns = cluster.netns_path(node.config.id)
        # Accepted Raft connections, seen from the node's side: pysyncobj's greater address dials.
        # A cluster with a leader need not have every link up yet (the link between the two
        # followers may still be connecting, or reconnecting after a refused early message):
        # wait for the count, within a bound.
        peers_dialling = sum(1 for p in cluster.node_ids if p > node.config.id)
        deadline = time.monotonic() + LINKS_UP_WITHIN_S
        while len(lines := sockets_of_port(int(port), netns=ns, side="sport")) != peers_dialling and time.monotonic() < deadline:
            time.sleep(0.1)  # polling ss: a socket's appearance is no event this test can await
        assert len(lines) == peers_dialling, f"{node.config.id} in {ns} after {LINKS_UP_WITHIN_S} s: {lines}"
        assert all(" 10.231.0." in line and f"pid={cluster.pid(node.config.id)}," in line for line in lines), lines
    with client(cluster, "netns") as c:
        assert c.submit_many([b"a", b"b"]) == [1, 2]
    assert cluster.wait_converged(at_least=2) == 2


# --- network partitions ---------------------------------------------------------------------


@pytest.mark.parametrize("network", NETWORKS)
def test_an_isolated_leader_is_replaced_cannot_commit_and_rejoins_after_the_heal(chaos, network):
    require_network(network)
    cluster, nemesis, log = chaos(network=network)
    with client(cluster, "warmup") as c:
        c.submit_many([b"w-%d" % i for i in range(10)])
    before = cluster.wait_converged(at_least=10)
    old = nemesis.leader()
    isolation = nemesis.isolate_leader()
    assert isolation.details["role"] == "leader" and isolation.details["nodes"] == [old]
    started = time.monotonic()
    new = cluster.wait_for_leader(among=followers(cluster, old), timeout_s=LEADER_TIMEOUT_S)
    print(f"new leader {new['node']} (term {new['term']}) {time.monotonic() - started:.2f} s after isolating {old}")
    assert new["node"] != old

    # The majority commits.
    with client(cluster, "majority", endpoints=[cluster.endpoint(n) for n in followers(cluster, old)]) as c:
        majority_seq = c.submit(b"majority-1")
    assert majority_seq == before + 1

    # The old leader, reached directly on its (unproxied) client port, commits nothing.
    stale = client(cluster, "stale", endpoints=[cluster.endpoint(old)], outcome_deadline_s=3.0, connect_timeout_s=1.0)
    outcome = "no connection"
    try:
        stale.connect()
        with pytest.raises(OutcomeUnknown):
            stale.submit(b"stale-1")
        outcome = "outcome unknown"
    except NotConnected:
        pass
    finally:
        stale.close()  # no resubmits after the heal
    old_status = cluster.status(nodes=[old])["nodes"][0]
    print(f"old leader {old}: submit -> {outcome}; status {old_status}")
    assert old_status["last_seq"] == before, f"the isolated old leader advanced: {old_status}"

    nemesis.end(isolation)
    healed = time.monotonic()
    last = cluster.wait_converged(at_least=majority_seq)
    print(f"converged at seq {last} {time.monotonic() - healed:.2f} s after the heal")
    assert cluster.wait_for_leader()["node"] != old or True  # any leader; all agree (wait_converged)
    stream = read_stream(cluster, last, node=old)
    assert stream[majority_seq] == b"majority-1"
    assert b"stale-1" not in stream.values(), "a submit to the isolated old leader was committed"
    log.check_paired()


@pytest.mark.parametrize("network", NETWORKS)
def test_partition_shapes_cut_exactly_their_links_and_heal(chaos, network):
    require_network(network)
    cluster, nemesis, log = chaos(network=network)
    ids = cluster.node_ids
    acked: dict[bytes, int] = {}
    with client(cluster, "shapes", outcome_deadline_s=20.0) as c:

        def under(fault, label: str) -> None:
            expected = {tuple(pair) for pair in fault.details["cut"]}
            for a in ids:
                for b in ids:
                    if a != b:
                        mode = cluster.direction_fault(a, b).mode
                        want = fault.details["mode"] if (a, b) in expected else PASS
                        assert mode == want, f"{label}: {a}->{b} is {mode}, expected {want}"
            started = time.monotonic()
            payload = label.encode()
            acked[payload] = c.submit(payload)
            print(f"{label}: cut {sorted(expected)}; a submit committed in {time.monotonic() - started:.2f} s")
            nemesis.end(fault)
            assert all(cluster.direction_fault(a, b).mode == PASS for a in ids for b in ids if a != b)

        under(nemesis.split(), "split")
        under(nemesis.bridge(), "bridge")
        under(nemesis.one_way(), "one-way")
        leader = nemesis.leader()
        under(nemesis.one_way(leader, followers(cluster, leader)[0]), "one-way-from-leader")
        if network == "proxy":  # namespaces have no hold and no delay
            under(nemesis.isolate(nemesis.leader(), mode=HOLD), "isolate-hold")
            slow = nemesis.slow(50)
            assert cluster.direction_fault("n1", "n2").delay_ms == 50
            started = time.monotonic()
            acked[b"slow"] = c.submit(b"slow")
            print(f"slow links (50 ms): a submit committed in {time.monotonic() - started:.3f} s")
            assert time.monotonic() - started >= 0.05 * 2 * 0.9, "a commit needs a round trip to a follower"
            nemesis.end(slow)
        else:
            with pytest.raises(ValueError):
                nemesis.slow(50)
        flap = nemesis.flap(duration_s=3.0, cut_s=(0.2, 0.6), healed_s=(0.2, 0.6))
        print(f"flapping: {flap}")
        assert flap["cuts"] >= 1
        acked[b"after"] = c.submit(b"after")
    last = cluster.wait_converged(at_least=len(acked))
    stream = read_stream(cluster, last)
    for payload, seq in acked.items():
        assert stream[seq] == payload
    log.check_paired()
    expected = ["split", "bridge", "one_way", "one_way"] + (["isolate", "slow"] if network == "proxy" else []) + ["flap"]
    assert [r[0] for r in log.reports if r[1] == "start"] == expected


def test_faults_compose_and_ending_one_keeps_the_other(chaos):
    cluster, nemesis, log = chaos()
    one = nemesis.one_way("n1", "n2")
    delay = nemesis.slow(30, pairs=[("n1", "n2"), ("n2", "n1")])
    assert delay in nemesis.active
    assert cluster.direction_fault("n1", "n2").mode == DROP
    assert cluster.direction_fault("n2", "n1").delay_ms == 30
    nemesis.end(one)
    assert cluster.direction_fault("n1", "n2").mode == PASS
    assert cluster.direction_fault("n1", "n2").delay_ms == 30
    nemesis.heal_all()
    assert cluster.direction_fault("n2", "n1").delay_ms == 0
    assert nemesis.active == []
    log.check_paired()
    link = cluster.link_between("n1", "n2")
    assert link.direction("n2", "n1") == FORWARD and link.direction("n1", "n2") == BACKWARD


# --- processes ------------------------------------------------------------------------------


def test_a_paused_leader_is_replaced_and_steps_down_when_continued(chaos):
    cluster, nemesis, log = chaos()
    old = nemesis.leader()
    pause = nemesis.pause_leader()
    started = time.monotonic()
    new = cluster.wait_for_leader(among=followers(cluster, old), timeout_s=LEADER_TIMEOUT_S)
    print(f"new leader {new['node']} {time.monotonic() - started:.2f} s after SIGSTOP of {old}")
    with client(cluster, "during-pause", endpoints=[cluster.endpoint(n) for n in followers(cluster, old)]) as c:
        seq = c.submit(b"while-paused")
    time.sleep(1.0)  # the pause must outlast the election timeout (0.2-0.4 s) by far
    nemesis.end(pause)
    continued = time.monotonic()
    report = wait_until(
        lambda: (s := cluster.status(nodes=[old])["nodes"][0]).get("role") == "follower" and s.get("leader") == new["address"] and s,
        timeout_s=LEADER_TIMEOUT_S,
        what=f"{old} follows {new['node']} after SIGCONT",
    )
    print(f"{old} stepped down {time.monotonic() - continued:.2f} s after SIGCONT: {report}")
    assert cluster.wait_converged(at_least=seq) >= seq
    assert read_stream(cluster, seq, node=old)[seq] == b"while-paused"
    log.check_paired()


def test_kills_and_restarts_keep_every_acknowledged_message(chaos):
    cluster, nemesis, log = chaos()
    acked: dict[bytes, int] = {}

    def submit(label: str, count: int = 20) -> None:
        payloads = [b"%s-%d" % (label.encode(), i) for i in range(count)]
        with client(cluster, label) as c:
            acked.update(zip(payloads, c.submit_many(payloads)))

    submit("start")
    nemesis.end(nemesis.kill_on("leader"))
    cluster.wait_for_leader()
    submit("after-leader-kill")
    follower_kill = nemesis.kill_on("follower")
    submit("follower-down")
    nemesis.end(follower_kill)
    two = nemesis.kill_on("two")
    assert len(two.details["nodes"]) == 2
    nemesis.end(two)
    cluster.wait_for_leader()
    submit("after-two")
    nemesis.end(nemesis.kill_on("all"))
    cluster.wait_for_leader()
    submit("after-all")
    order = nemesis.rolling_restart(down_s=0.2, settle_timeout_s=20)
    print(f"rolling restart order {order}")
    submit("after-rolling")
    last = cluster.wait_converged(at_least=len(acked))
    assert last == len(acked), f"{last} records for {len(acked)} acknowledged submits"
    for node in cluster.node_ids:
        stream = read_stream(cluster, last, node=node)
        wrong = [(p, s) for p, s in acked.items() if stream[s] != p]
        assert not wrong, f"{node}: acknowledged messages not at their seq: {wrong[:5]}"
    log.check_paired()
    kills = [d for name, phase, d in log.reports if name == "kill" and phase == "start"]
    assert kills[0]["role"] == "leader" and kills[1]["role"] == "follower"
    assert sorted(kills[3]["nodes"]) == cluster.node_ids


# --- disks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_a_damaged_journal_tail_is_cut_on_restart_and_refilled_from_raft(chaos, how):
    cluster, nemesis, log = chaos()
    with client(cluster, "before") as c:
        seqs = c.submit_many([b"b-%d" % i for i in range(200)])
    cluster.wait_converged(at_least=seqs[-1])
    victim = followers(cluster, nemesis.leader())[0]
    down = nemesis.kill([victim])
    damage = nemesis.corrupt_journal_tail(victim, how=how)
    print(f"{how}: {damage}")
    nemesis.end(down)
    last = cluster.wait_converged(at_least=seqs[-1])
    assert last == seqs[-1]
    report = verify_journal(cluster.journal_dir(victim))
    assert report.ok and report.last_seq == last, f"{victim}'s journal after the restart: {report}"
    line = next((text for text in cluster.log_text(victim).splitlines() if "journal tail cut" in text), "")
    print(f"{victim} log: {line}")
    assert line, f"{victim} did not report cutting its damaged tail"
    log.check_paired()


def _require_tmpfs() -> None:
    ok, why = tmpfs_supported()
    if not ok:
        pytest.fail(f"no tmpfs in a private mount namespace here (needs root): {why}")


def test_a_follower_on_a_full_disk_stops_and_the_others_keep_serving(chaos):
    _require_tmpfs()
    cluster, nemesis, log = chaos(overrides=DISK_FREE_MIN, tmpfs_bytes={n: TMPFS_BYTES for n in ("n1", "n2", "n3")})
    with client(cluster, "before") as c:
        seqs = c.submit_many([b"b-%d" % i for i in range(100)])
    cluster.wait_converged(at_least=seqs[-1])
    leader = nemesis.leader()
    victim = followers(cluster, leader)[0]
    full = nemesis.fill_disk(victim)
    assert cluster.disk_free(victim) < 64 * 1024
    started = time.monotonic()
    with client(cluster, "during", endpoints=[cluster.endpoint(n) for n in cluster.node_ids if n != victim]) as c:
        more = c.submit_many([b"x" * 1000] * 3000)  # ~4 MiB of Raft log and journal
    print(f"3000 submits acknowledged by the other two in {time.monotonic() - started:.2f} s")
    code = wait_until(
        lambda: cluster.exit_code(victim) is not None and [cluster.exit_code(victim)], timeout_s=10, what=f"{victim} stops on the full disk"
    )[0]
    tail = [text for text in cluster.log_text(victim).splitlines() if "CRITICAL" in text or "ERROR" in text][-3:]
    print(f"{victim} on a full tmpfs exited with {code} ({'signal ' + str(-code) if code < 0 else 'code'}); log: {tail}")
    nemesis.end(full)
    cluster.restart(victim)
    last = cluster.wait_converged(at_least=more[-1])
    report = verify_journal(cluster.journal_dir(victim))
    assert report.ok and report.last_seq == last, f"{victim}'s journal after the full disk: {report}"
    log.check_paired()


def test_a_leader_low_on_disk_lets_the_others_serve(chaos):
    _require_tmpfs()
    cluster, nemesis, log = chaos(overrides=DISK_FREE_MIN, tmpfs_bytes={n: TMPFS_BYTES for n in ("n1", "n2", "n3")})
    leader = nemesis.leader()
    low = nemesis.fill_disk(leader, leave_bytes=MIB // 2)  # below disk_free_bytes_min, not full
    cluster.wait_for_metrics(leader, lambda m: m.get("raftseq_disk_low") == 1, what="notices its low disk", timeout_s=5)
    try:
        started = time.monotonic()
        with client(cluster, "low", outcome_deadline_s=5.0) as c:
            seq = c.submit(b"served")
        now_leading = nemesis.leader()
        print(f"{leader} low on disk; a submit committed in {time.monotonic() - started:.2f} s, leader now {now_leading}")
        assert seq >= 1
        assert now_leading != leader, f"{leader} kept leading with a low disk"
    finally:
        nemesis.end(low)
    assert cluster.wait_converged(at_least=seq) >= seq
    log.check_paired()
