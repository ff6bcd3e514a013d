"""Abuse probes of a careless operator against a real cluster (issue 14, defects 3 and 11).

* A second node started on a running node's data directory (other ports): it must exit at once
  with ``NodeExit.DATA_DIR_IN_USE`` naming the holder's pid, the first keeps serving, and every
  journal verifies. Before the lock both nodes appended to the same journal.
* After a cluster ran (journal segments, Raft log, snapshots, logs, configs), nothing in its data
  directory is readable by group or others: files 0600, directories 0700.

Each probe prints what it measured; the bounds are generous (a slow, shared CI machine).
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time

import msgspec
import pytest
from abuse_probes import describe_latencies, percentile, rss_bytes, submit_latencies
from cluster_harness import ClusterHarness, running_cluster  # noqa: F401

from raftseq.cluster.config import to_toml
from raftseq.cluster.local import CLIENT_PORT_OFFSET, METRICS_PORT_OFFSET, RAFT_PORT_OFFSET, free_base_port
from raftseq.cluster.node_exit import NodeExit

#: The intruding node must be refused within this (it is refused before it opens anything).
INTRUDER_EXIT_TIMEOUT_S = 20.0
#: A legitimate client's submits around the probe.
LEGIT_SUBMITS = 200
LEGIT_TIMEOUT_S = 30.0
#: Generous: the CI machine is slow and shared (unloaded, p99 is a few milliseconds).
LEGIT_P99_MAX_S = 0.5
#: Resident memory of the node whose directory was intruded on (about 60 MB when idle here).
NODE_RSS_MAX_BYTES = 400 * 1024 * 1024


def legit_latencies(cluster: ClusterHarness, session: str) -> list[float]:
    return asyncio.run(submit_latencies(cluster.endpoints, cluster.token, count=LEGIT_SUBMITS, session=session, timeout_s=LEGIT_TIMEOUT_S))


def test_a_second_node_on_a_data_directory_in_use_is_refused_and_the_first_keeps_serving(running_cluster, tmp_path):
    cluster = running_cluster
    holder = cluster.node("n1")
    holder_pid = cluster.pid("n1")
    before = legit_latencies(cluster, "legit-before")

    base = free_base_port()
    intruder_config = msgspec.structs.replace(
        holder.config,
        client_address=f"127.0.0.1:{base + CLIENT_PORT_OFFSET}",
        raft_address=f"127.0.0.1:{base + RAFT_PORT_OFFSET}",
        metrics_address=f"127.0.0.1:{base + METRICS_PORT_OFFSET}",
    )
    config_path = tmp_path / "intruder.toml"
    config_path.write_text(to_toml(intruder_config))
    started = time.monotonic()
    intruder = subprocess.Popen(
        [sys.executable, "-P", "-m", "raftseq.cluster.cli", "node", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = intruder.communicate(timeout=INTRUDER_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        intruder.kill()  # by the pid of the process this test started
        output, _ = intruder.communicate()
        pytest.fail(f"a second node ran on {holder.config.data_dir} for {INTRUDER_EXIT_TIMEOUT_S} s:\n{output[-3000:]}")
    refused_s = time.monotonic() - started
    print(f"intruder exit {intruder.returncode} after {refused_s:.2f} s:\n{output}")
    assert intruder.returncode == NodeExit.DATA_DIR_IN_USE, output[-3000:]
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output[-3000:]
    assert f"is in use by process {holder_pid} " in output, output

    after = legit_latencies(cluster, "legit-after")
    rss = rss_bytes(holder_pid)
    print(f"legit before: {describe_latencies(before)}; after: {describe_latencies(after)}; n1 RSS {rss / 2**20:.0f} MiB")
    assert cluster.is_running("n1") and cluster.pid("n1") == holder_pid, "the holder must keep serving"
    assert percentile(after, 0.99) <= LEGIT_P99_MAX_S
    assert rss <= NODE_RSS_MAX_BYTES
    last = cluster.wait_converged(at_least=2 * LEGIT_SUBMITS)

    cluster.stop()
    verified = subprocess.run(
        [sys.executable, "-P", "-m", "raftseq.cluster.cli", "journal", "verify", cluster.data_dir],
        capture_output=True,
        text=True,
        timeout=60,
    )
    print(verified.stdout, verified.stderr)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for node_id in cluster.node_ids:
        journal = cluster.read_journal(node_id)
        legit = [r for r in journal.records if r.session.startswith("legit-")]
        assert journal.last_seq == last and len(legit) == 2 * LEGIT_SUBMITS, (node_id, journal.last_seq, len(legit))


def private_modes(root: str) -> tuple[list[str], dict[str, int]]:
    """What under `root` is readable or writable by group or others, and how many files of
    each kind there are."""
    exposed, kinds = [], {}
    for directory, dirs, files in os.walk(root):
        mode = stat.S_IMODE(os.lstat(directory).st_mode)
        if mode != 0o700:
            exposed.append(f"{directory} {mode:o}")
        for name in files:
            path = os.path.join(directory, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                exposed.append(f"{path} {mode:o}")
            kind = os.path.splitext(name)[1] or name
            kinds[kind] = kinds.get(kind, 0) + 1
    return exposed, kinds


@pytest.mark.parametrize("running_cluster", [{"raft": {"log_compaction_min_entries": 20, "log_compaction_min_time_s": 0.5}}], indirect=True)
def test_after_a_cluster_ran_nothing_in_its_data_directory_is_open_to_others(running_cluster):
    cluster = running_cluster
    latencies = legit_latencies(cluster, "legit")
    print(f"legit: {describe_latencies(latencies)}")
    cluster.wait_converged(at_least=LEGIT_SUBMITS)
    cluster.stop()
    exposed, kinds = private_modes(cluster.data_dir)
    print(f"files under {cluster.data_dir} by kind: {kinds}")
    for expected in (".seg", ".log", ".toml", ".bin"):
        assert kinds.get(expected), f"no {expected} file: the probe saw less than it should ({kinds})"
    assert not exposed, "open to group or others:\n" + "\n".join(exposed)
