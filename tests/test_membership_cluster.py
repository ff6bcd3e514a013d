"""``raftseq member`` against a real local cluster: bad input (an unknown node id, an address in
use, a cluster without quorum) is one line and exit 1 with nothing changed; a removed node stops,
says so, and is refused when it comes back; a member restarted after a change rejoins the
cluster as it is now (its config still names the old one)."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time

import pytest

from raftseq.cluster.local import LocalCluster
from raftseq.cluster.node_exit import NodeExit
from test_cluster_up import up  # noqa: F401 (a fixture)
from test_raft_member import free_address
from test_relay import scrape

COMMAND_TIMEOUT_S = 120
NODE_EXIT_TIMEOUT_S = 30.0


def member(cluster: LocalCluster, *args: str, endpoints: list[str] | None = None, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-P", "-m", "raftseq.cluster.cli", "member", *args]
    command += ["--endpoints", ",".join(endpoints or cluster.endpoints), "--token", cluster.token, "--timeout", str(timeout_s)]
    return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def refused(done: subprocess.CompletedProcess, text: str) -> None:
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], done.stderr


def members_of(done: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    assert done.returncode == 0, done
    rows = done.stdout.strip().splitlines()[1:-1]
    return [(row.split()[0], row.split()[1]) for row in rows]


def wait_exit(cluster: LocalCluster, node_id: str) -> int:
    deadline = time.monotonic() + NODE_EXIT_TIMEOUT_S
    while time.monotonic() < deadline:
        code = cluster.exit_code(node_id)
        if code is not None:
            cluster.reap(node_id)
            return code
        time.sleep(0.1)
    raise AssertionError(f"{node_id} did not exit within {NODE_EXIT_TIMEOUT_S:.0f} s")


@pytest.fixture
def cluster(tmp_path):
    started = LocalCluster.started(str(tmp_path / "cluster"), rng=random.Random(), insecure=False, restart=False)
    yield started
    started.stop()


def test_bad_membership_requests_are_one_line_and_change_nothing(cluster):
    before = members_of(member(cluster, "list"))
    assert before == [("n1", "voter"), ("n2", "voter"), ("n3", "voter")]
    refused(member(cluster, "remove", "n9"), "unknown node id n9 (members: n1, n2, n3)")
    n1 = cluster.node("n1").config
    key = "ab" * 32
    refused(
        member(cluster, "add", "n4", "--raft", n1.raft_address, "--client", free_address(), "--public-key", key),
        f"address {n1.raft_address} is in use by member n1",
    )
    refused(member(cluster, "add", "n4", "--raft", free_address(), "--client", free_address()), "a new member needs its public key")
    refused(member(cluster, "replace", "n7", "--with", "n4", "--raft", free_address(), "--client", free_address()), "unknown node id n7")
    assert members_of(member(cluster, "list")) == before


def test_no_change_without_a_quorum(cluster):
    cluster.kill("n2")
    cluster.kill("n3")
    # A leader that has not yet noticed refuses by its quorum check; else no leader answers.
    refused(member(cluster, "remove", "n3", timeout_s=3), "quorum")
    cluster.restart("n2")
    cluster.wait_for_leader(timeout_s=30)
    # n3 is down: removing n2 would leave n1 and n3, one of them reachable.
    refused(member(cluster, "remove", "n2"), "it would leave no quorum: 1 of the 2 voters after it are reachable (n1), a majority needs 2")
    assert [m for m, _ in members_of(member(cluster, "list"))] == ["n1", "n2", "n3"]


def test_a_removed_leader_hands_over_stops_and_is_refused_and_the_others_restart_into_the_new_membership(cluster):
    gone = cluster.wait_for_leader(timeout_s=30)["id"]
    stay = [n for n in ("n1", "n2", "n3") if n != gone]
    done = member(cluster, "remove", gone)
    assert members_of(done) == [(n, "voter") for n in stay], done
    # The leader handed leadership over first; it never got the entry that removed it, finds
    # out from its peers, and stops.
    assert wait_exit(cluster, gone) == NodeExit.REMOVED
    assert "was removed from the cluster" in cluster.log_text(gone)
    # The new leader counted the change it committed; its membership has two voters.
    leader = cluster.wait_for_leader(timeout_s=30)["id"]
    page = scrape(cluster.node(leader).config.metrics_address)
    assert page[f'raftseq_membership_changes_total{{kind="remove",node="{leader}",outcome="committed"}}'] == 1
    assert (page[f'raftseq_membership_voters{{node="{leader}"}}'], page[f'raftseq_membership_learners{{node="{leader}"}}']) == (2, 0)
    cluster.restart(gone)
    assert wait_exit(cluster, gone) == NodeExit.REMOVED
    last = cluster.log_text(gone, since=cluster.node(gone).log_offset).strip().splitlines()[-1]
    assert f"this node ({gone}) was removed from the cluster (membership change 1) and is refused" in last
    # A member restarts from its saved membership (its config still names the removed node).
    cluster.kill(stay[0])
    cluster.restart(stay[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        report = cluster.status(nodes=stay)
        if report["leader"] and all(n.get("leader") for n in report["nodes"]):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no leader after {stay[0]}'s restart: {report}")
    assert members_of(member(cluster, "list", endpoints=[cluster.endpoint(stay[0])])) == [(n, "voter") for n in stay]


def test_cluster_up_starts_a_node_that_member_add_local_writes_and_stops_it_when_removed(up):
    """The local path: ``raftseq member add n4 --local DIR`` writes n4's config into the data
    directory of a running ``cluster up``, which starts it; the add returns once n4 is a voter.
    Removed again, n4 stops with REMOVED and cluster up does not restart it."""
    cluster = up()
    cluster.wait_for("^Ctrl-C stops the cluster$")
    data_dir = cluster.process.args[cluster.process.args.index("--data-dir") + 1]
    endpoints, token = next(
        re.search(r"RAFTSEQ_ENDPOINTS=(\S+) RAFTSEQ_TOKEN=(\S+)", line).groups() for line in cluster.seen if "RAFTSEQ_TOKEN=" in line
    )
    common = ["--endpoints", endpoints, "--token", token, "--timeout", "60"]
    add = [sys.executable, "-P", "-m", "raftseq.cluster.cli", "member", "add", "n4", "--local", data_dir, *common]
    done = subprocess.run(add, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done
    assert "n4      voter" in done.stdout, done.stdout
    cluster.wait_for(r"^n4 joins \(config ")
    remove = [sys.executable, "-P", "-m", "raftseq.cluster.cli", "member", "remove", "n4", *common]
    done = subprocess.run(remove, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done
    line = cluster.wait_for(r"^n4 exited with code 11: ", timeout_s=60).string
    assert "was removed from the cluster" in line and "needs an operator" in line, line
