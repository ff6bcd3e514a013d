"""Power cuts against a real three-node cluster whose data directories are on power-loss
filesystems (``chaos_tests/powerfs.py``): what the default ("crash") durability loses, and what
the power-safe one must not.

Each test prints its seed (``RAFTSEQ_CHAOS_SEED=N`` replays the fault schedule) and the figures
of its run. They fail, never skip, where FUSE cannot run.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from chaos_tests import powerfs, workload
from chaos_tests.cluster import ChaosCluster
from chaos_tests.history import HistoryRecorder, Note, load_history
from chaos_tests.scenarios import SCENARIOS, run_scenario
from chaos_tests.test_scenarios import chaos_seed
from raftseq.cluster.config import NodeConfig
from raftseq.cluster.local import local_configs


def _run(name, tmp_path, *, rounds, durability=None):
    scenario = SCENARIOS[name]
    why_not = scenario.unavailable()
    assert not why_not, f"{name} needs something this machine lacks: {why_not}"
    seed = chaos_seed()
    result = run_scenario(
        name, seed=seed, directory=str(tmp_path), rounds=rounds, durability=durability, say=lambda line: print(line, flush=True)
    )
    assert result.acked >= 200, f"seed {seed}: the workload barely ran ({result.acked} acknowledged)"
    assert result.journals_ok, f"seed {seed}: {result.journal_problems}"
    return seed, result


def test_durability_is_passed_through_to_the_node_configs(tmp_path):
    crash = local_configs(str(tmp_path), 20000, insecure=True, durability="crash")
    assert len(crash) == 3
    if "durability" in NodeConfig.__struct_fields__:
        assert {c.durability for c in local_configs(str(tmp_path), 20000, insecure=True, durability="power")} == {"power"}
    else:
        with pytest.raises(ValueError, match="durability 'power'"):
            local_configs(str(tmp_path), 20000, insecure=True, durability="power")


def test_a_power_cut_of_all_three_in_crash_durability_reports_the_acknowledged_loss(tmp_path):
    seed, result = _run("power-all-loaded", tmp_path, rounds=1, durability="crash")
    report = result.report
    print(f"crash durability, one power cut of all three under load: {report.loss.format()} of {result.acked} acknowledged")
    assert report.loss_expected
    assert report.loss.acked_lost > 0, f"seed {seed}: today's durability lost nothing in a power cut of every node?\n{report.format()}"
    assert report.excused_counts.get("acked-write-kept") == report.loss.acked_lost
    assert report.ok, f"seed {seed}: a violation beyond the expected loss: {report.format()}"
    assert result.ok


def test_a_power_cut_of_one_follower_loses_nothing(tmp_path):
    seed, result = _run("power-follower", tmp_path, rounds=2, durability="crash")
    report = result.report
    assert report.loss.acked_lost == 0, f"seed {seed}: {report.loss.format()}"
    assert report.excused_counts == {}, f"seed {seed}: {report.format()}"
    assert report.ok and result.ok, f"seed {seed}: {report.format()}"


def test_power_cuts_of_all_three_in_power_durability_lose_nothing(tmp_path):
    seed, result = _run("power-all-loaded", tmp_path, rounds=2, durability="power")
    report = result.report
    assert not report.loss_expected
    assert report.loss.acked_lost == 0, f"seed {seed}: {report.loss.format()}"
    assert report.ok and result.ok, f"seed {seed}: {report.format()}"
    assert len(set(report.counts.final_reads.values())) == 1, f"seed {seed}: journals differ: {report.counts.final_reads}"


def test_the_cluster_stops_every_filesystem_daemon_it_started(tmp_path):
    ok, why = powerfs.supported()
    assert ok, f"the power-loss filesystem cannot run here: {why}"
    cluster = ChaosCluster(str(tmp_path / "cluster"), rng=random.Random(3), network="none", powerfs=["n1", "n3"])
    try:
        pids = {node_id: fs.pid for node_id, fs in cluster.powerfs.items()}
        assert sorted(pids) == ["n1", "n3"] and all(os.path.exists(f"/proc/{pid}") for pid in pids.values())
        assert cluster.node("n1").command_prefix == ["nsenter", f"--mount=/proc/{pids['n1']}/ns/mnt", "--"]
        assert cluster.node("n2").command_prefix == []
        with open(os.path.join(cluster.node_data_dir("n1"), "probe"), "wb") as f:
            f.write(b"on the mount")
        assert not os.path.exists(os.path.join(cluster.node("n1").config.data_dir, "probe")), "only inside the daemon's namespace"
    finally:
        cluster.stop()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids.values())
    assert all(not fs.mounted for fs in cluster.powerfs.values())


def test_a_final_read_looks_past_what_no_node_can_serve(tmp_path, monkeypatch):
    """A node that can serve only seqs 31..50 of 1..50 (the stream's prefix lost from every
    journal): the read notes 1..30 and records 31..50, probing for where serving resumes."""
    served = range(31, 51)
    probes = []

    async def fake_read_range(endpoint, token, first, last_seq, *, stall_s, tls=None):
        probes.append(first)
        records = [(seq, "s", seq, b"p") for seq in range(first, last_seq + 1) if seq in served]
        if first not in served:
            return [], True
        return records, False

    monkeypatch.setattr(workload, "read_range", fake_read_range)
    with HistoryRecorder(str(tmp_path / "history.jsonl")) as history:
        records = asyncio.run(workload._read_node_past_holes("127.0.0.1:1", "token", 50, history, "n1", None))
    assert [r[0] for r in records] == list(served)
    assert len(probes) <= 2 + 7, f"a binary search, not a scan: {probes}"
    notes = [e for e in load_history(str(tmp_path / "history.jsonl")) if type(e) is Note]
    assert [(n.text, n.fields) for n in notes] == [("unservable", {"node": "n1", "first": 1, "last": 30})]
