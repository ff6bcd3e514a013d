"""Abuse probes: the protocol fuzzer (``chaos_tests/fuzz.py``) against a real cluster.

Each fuzzer runs for ``FUZZ_BUDGET_S`` on a node's client port or on its authenticated Raft
link (the cluster's own password and link cipher), then asserts what a user relies on: every
node alive, its RSS within ``RSS_BYTES_MAX``, a legitimate client's submits acknowledged with
p99 within ``LEGIT_P99_S_MAX`` while the fuzz ran, every acknowledged message in the stream at
its number. The seed is printed; ``RAFTSEQ_FUZZ_SEED=N`` replays a run (``raftseq chaos fuzz
--seed N`` runs it longer, ``--replay TARGET:INDEX`` one case alone).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from abuse_probes import describe_latencies, percentile, rss_bytes
from cluster_harness import running_cluster  # noqa: F401

from chaos_tests import fuzz
from raftseq.cluster.raft.link_cipher import cipher_of
from raftseq.sequencer import protocol

ROOT = Path(__file__).resolve().parents[1]
#: How long each fuzzer runs in CI (the whole test stays well under a minute).
FUZZ_BUDGET_S = 20.0
#: Resident memory of a node after the fuzz (an idle node: ~60-140 MB).
RSS_BYTES_MAX = 400 * 1024 * 1024
#: A legitimate client's ack latency while the fuzz runs (generous: a slow, shared CI machine).
LEGIT_P99_S_MAX = 3.0


def fuzz_seed() -> int:
    """``RAFTSEQ_FUZZ_SEED`` or fresh; printed either way."""
    text = os.environ.get("RAFTSEQ_FUZZ_SEED", "")
    seed = int(text) if text else random.SystemRandom().randrange(1, 2**31)
    print(f"fuzz seed {seed} (replay: RAFTSEQ_FUZZ_SEED={seed})", flush=True)
    return seed


def assert_survived(h, report: fuzz.FuzzReport) -> None:
    findings = "\n".join(f.describe(report.seed) for f in report.findings)
    assert report.ok, f"{report.summary()}\n{findings}"
    for node in h.nodes:
        assert h.is_running(node.id), f"{node.id} exited with {h.exit_code(node.id)}"
        rss = rss_bytes(h.pid(node.id))
        print(f"{node.id}: RSS {rss / 2**20:.0f} MiB after the fuzz", flush=True)
        assert rss <= RSS_BYTES_MAX, f"{node.id}: RSS {rss / 2**20:.0f} MiB, above {RSS_BYTES_MAX / 2**20:.0f} MiB"
    assert report.acked, "the legitimate client got no ack"
    print(f"legitimate client during the fuzz: {describe_latencies(report.legit_latencies_s)}", flush=True)
    assert percentile(report.legit_latencies_s, 0.99) <= LEGIT_P99_S_MAX


def test_the_client_ports_survive_the_fuzzer(running_cluster, tmp_path):
    h = running_cluster
    report = fuzz.run_fuzz(h, seed=fuzz_seed(), duration_s=FUZZ_BUDGET_S, targets=("client",), marker_dir=str(tmp_path))
    assert_survived(h, report)
    assert report.cases["client"] > 100, report.summary()


def test_the_authenticated_raft_links_survive_the_fuzzer(running_cluster, tmp_path):
    h = running_cluster
    report = fuzz.run_fuzz(h, seed=fuzz_seed(), duration_s=FUZZ_BUDGET_S, targets=("raft",), marker_dir=str(tmp_path))
    assert_survived(h, report)
    assert report.cases["raft"] > 100, report.summary()
    # Most cases get through the handshake: if the links' handshake changes, fuzz.RaftLink must
    # speak the new one, or the fuzzer reaches nothing past it.
    assert report.handshakes > report.cases["raft"] / 2, report.summary()


def test_a_pickle_that_would_run_code_runs_none_through_an_authenticated_link(running_cluster, tmp_path):
    """A canary pickle (``io.open(marker, "a")``) as the first message of the handshake, and
    one inside an apply_command right after it (where a member says who it is: any holder of
    the password gets that far): no node may create the marker."""
    h = running_cluster
    marker = fuzz.marker_path(str(tmp_path))
    cipher = cipher_of(h.nodes[0].config)
    key = random.Random(1).randbytes(32)
    as_first = fuzz.RaftPlan(first=fuzz.RaftStep(fuzz.Canary(marker), "none", "none", 0, 1, wrapped=False))
    inside = fuzz.RaftPlan(
        first=fuzz.RaftStep(key, "none", "none", 0, 1, wrapped=False),
        steps=[fuzz.RaftStep({"type": "apply_command", "command": fuzz.Canary(marker), "request_id": 1}, "none", "none", 0, 1)],
    )
    for node in range(len(h.nodes)):
        fuzz.send_case(h, cipher, fuzz.Case("raft", 0, node, "canary first", raft=as_first))
        assert fuzz.send_case(h, cipher, fuzz.Case("raft", 0, node, "canary inside", raft=inside)), "no handshake"
    report = fuzz.run_fuzz(h, seed=1, duration_s=0, targets=(), canaries=True, marker_dir=str(tmp_path))
    assert not os.path.exists(marker), "a node ran code from a Raft peer's pickle"
    assert_survived(h, report)


def test_cases_are_a_function_of_seed_target_and_index():
    class Cluster:  # what make_case reads of a cluster
        token = "t0ken"
        nodes = [None, None, None]

    for target in fuzz.TARGETS:
        a, b, c = (fuzz.make_case(target, seed, 42, Cluster, "/tmp/marker") for seed in (7, 7, 8))
        if target == "client":
            assert a.client.wire(5) == b.client.wire(5) != c.client.wire(5)
        assert a.describe() == b.describe() != c.describe()


def test_every_mutation_of_a_client_frame_is_read_without_an_exception():
    """The node's own reader takes every client case whole (frames or one ``FrameError``)."""
    rng = random.Random(5)
    for index in range(2000):
        case = fuzz.client_case(rng.randrange(2**31), index, token="t", node_count=3)
        reader = protocol.FrameReader("client")
        reader.feed(case.client.wire(index))
        reader.close()


def test_raftseq_chaos_fuzz_runs_a_tiny_budget_and_replays_a_case(tmp_path):
    """``raftseq chaos fuzz`` starts a cluster, fuzzes both targets for a second, prints its
    seed, progress and summary, and exits 0; ``--replay`` sends one case."""
    command = [sys.executable, "-m", "raftseq.cluster.cli", "chaos", "fuzz", "--seed", "3", "--no-canaries", "--dir", str(tmp_path)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    started = time.monotonic()
    done = subprocess.run([*command, "--duration", "1s"], cwd="/", capture_output=True, text=True, timeout=120, env=env)
    print(done.stdout[-3000:], done.stderr[-3000:], f"({time.monotonic() - started:.1f} s)", sep="\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fuzz: seed 3" in done.stdout and "0 finding(s)" in done.stdout
    done = subprocess.run([*command, "--replay", "client:5"], cwd="/", capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent client case 5" in done.stdout
    assert list(tmp_path.iterdir()) == [], "the fuzz directory was not removed"
    done = subprocess.run([*command, "--replay", "nonsense"], cwd="/", capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "--replay takes TARGET:INDEX" in done.stderr


def test_a_raft_term_beyond_the_wire_from_a_read_only_link_leaves_every_node_answering(running_cluster, tmp_path):
    """Found by the fuzzer: one request_vote with term 2**64 on an authenticated link that
    said it is a read-only node. Every node took the term (pysyncobj reads any message from any
    connection) and from then on failed to encode its status (``OverflowError``): ``raftseq
    status`` saw three unreachable nodes, for good (the term is persisted). A node now takes Raft
    messages from its cluster's members only, and refuses numbers that are not integers within
    ``limits.RAFT_NUMBER_MAX``."""
    h = running_cluster
    cipher = cipher_of(h.nodes[0].config)
    key = random.Random(2).randbytes(32)
    for term in (2**64, 2**62, float("inf")):
        plan = fuzz.RaftPlan(
            first=fuzz.RaftStep(key, "none", "none", 0, 1, wrapped=False),
            steps=[
                fuzz.RaftStep("readonly", "none", "none", 0, 1),
                fuzz.RaftStep({"type": "request_vote", "term": term, "last_log_index": 0, "last_log_term": 0}, "none", "none", 0, 1),
            ],
        )
        for node in range(len(h.nodes)):
            assert fuzz.send_case(h, cipher, fuzz.Case("raft", 0, node, f"request_vote term {term}", raft=plan)), "no handshake"
    report = fuzz.run_fuzz(h, seed=2, duration_s=0, targets=(), marker_dir=str(tmp_path))
    assert_survived(h, report)
    terms = [n["term"] for n in h.status()["nodes"]]
    print(f"terms after the probe: {terms}", flush=True)
    assert max(terms) < 2**62, terms


def test_links_that_claim_to_be_members_do_not_cut_the_cluster_apart(running_cluster, tmp_path):
    """Found by the fuzzer (``--impersonate``): an authenticated connection to node T that names
    member C's Raft address (a valid handshake, nothing else, then closed) takes C's place in
    T's table of connections. pysyncobj links two members over the one connection the member
    with the greater address opens; when C's address is the greater, T has no way to reach C
    after the impersonator closes, and never reconnects (C's own connection is still open).
    One such connection per pair (three here) and no node can reach a majority: the cluster
    acknowledges nothing, for good. A cluster must keep committing."""
    h = running_cluster
    cipher = cipher_of(h.nodes[0].config)
    for target, node in enumerate(h.nodes):
        for claimed in h.nodes:
            if claimed.config.raft_address > node.config.raft_address:
                plan = fuzz.RaftPlan(
                    first=fuzz.RaftStep(random.Random(3).randbytes(32), "none", "none", 0, 1, wrapped=False),
                    steps=[fuzz.RaftStep(claimed.config.raft_address, "none", "none", 0, 1)],
                )
                assert fuzz.send_case(h, cipher, fuzz.Case("raft", 0, target, f"claims to be {claimed.id}", raft=plan)), "no handshake"
    report = fuzz.run_fuzz(h, seed=3, duration_s=0, targets=(), marker_dir=str(tmp_path))
    assert_survived(h, report)


#: The memo index of the probe below: CPython's unpickler grows its memo array to twice the
#: index at once, 8 bytes a slot (512 MiB here; a fuzzed pickle named ~2**31 and stalled the
#: leader 21 s). Large enough to cross the RSS bound, small enough for a shared machine.
MEMO_BOMB_INDEX = 2**25


def test_a_pickle_naming_a_huge_memo_index_does_not_make_a_node_allocate_it(running_cluster, tmp_path):
    """Found by the fuzzer (seed 77, 8 min): a bit flip turned a memo opcode into LONG_BINPUT
    with an index near 2**31; the leader stopped answering for 21 s (system time: the memo array
    being zeroed) and lost its leadership. The minimal message is 9 bytes of pickle,
    ``80 05 4e 72 <u32 index> 2e`` (PROTO 5, NONE, LONG_BINPUT index, STOP), sent by any holder
    of the Raft password through an authenticated link. It names no class: the allow-list does
    not see it."""
    h = running_cluster
    follower = next(i for i, node in enumerate(h.nodes) if node.id != h.wait_for_leader()["node"])
    pid = h.pid(h.nodes[follower].id)
    before = rss_bytes(pid, field="VmHWM")
    first = fuzz.RaftStep(random.Random(4).randbytes(32), "none", "none", 0, 1, wrapped=False)
    link = fuzz.RaftLink(h.nodes[follower].config.raft_address, cipher_of(h.nodes[0].config))
    try:
        assert link.send_step(first) and link.receive_node_key(first.message) is not None, "no handshake"
        # The first message after the key exchange (where a member says who it is): every
        # holder of the password gets this far, with node keys or without.
        memo_bomb = b"\x80\x05N" + b"r" + MEMO_BOMB_INDEX.to_bytes(4, "little") + b"."
        data = (link.link_cipher or link.cipher).encrypt_at_time(memo_bomb, link.timestamp + 1)
        link.send_raw(len(data).to_bytes(4, sys.byteorder, signed=True) + data)
        report = fuzz.run_fuzz(h, seed=4, duration_s=0, targets=(), marker_dir=str(tmp_path))
    finally:
        link.close()
    after = rss_bytes(pid, field="VmHWM")
    print(f"{h.nodes[follower].id}: peak RSS {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after the memo bomb", flush=True)
    assert_survived(h, report)
    assert after <= RSS_BYTES_MAX, f"peak RSS {after / 2**20:.0f} MiB after one 9-byte pickle"
