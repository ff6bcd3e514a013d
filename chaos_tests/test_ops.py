"""The ops soak (``raftseq chaos --scenario ops``): its schedule, its pass criteria, and a short
run (~75 s of load) with a replace, a rolling restart, a leader transfer and a kill."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from chaos_tests import ops

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _sample(at_s: float, journals: dict[str, int], rss: dict[str, tuple[int, int]], workload_rss: int = 40 * MIB) -> dict:
    """`rss`: node -> (rss bytes, pid)."""
    nodes = {n: {"data_bytes": j, "journal_bytes": j, "rss_bytes": rss[n][0], "pid": rss[n][1]} for n, j in journals.items()}
    return {"at_ns": int(at_s * 1e9), "at_s": at_s, "label": "", "nodes": nodes, "workload_rss_bytes": workload_rss}


def test_the_plan_is_drawn_from_the_seed_and_holds_every_kind_of_operation():
    for seed in range(20):
        for duration in (75.0, 600.0, 3600.0):
            plan = ops.plan_operations(random.Random(seed), duration)
            assert plan == ops.plan_operations(random.Random(seed), duration)
            names = [p.name for p in plan]
            assert names.count("replace") == 1
            assert "rolling-restart" in names and "upgrade-restart" in names and "leader-transfer" in names
            assert any(n.startswith("kill-") for n in names)
            assert all(0 <= p.at_s <= duration for p in plan) and [p.at_s for p in plan] == sorted(p.at_s for p in plan)
    hour = [p.name for p in ops.plan_operations(random.Random(1), 3600.0)]
    assert hour.count("rolling-restart") == 4 and hour.count("upgrade-restart") == 3
    assert 60 <= hour.count("leader-transfer") <= 120 and 20 <= sum(n in ops.FAULTS for n in hour) <= 60


def test_disk_criterion_fails_on_a_journal_over_the_bound_plus_two_segments():
    limit = ops.RETENTION_BYTES + 2 * ops.SEGMENT_BYTES
    rss = {"n1": (50 * MIB, 1), "n3": (50 * MIB, 3)}
    within = [_sample(0, {"n1": 0, "n3": 0}, rss), _sample(60, {"n1": limit, "n3": limit - 1}, rss)]
    assert ops.disk_criterion(within).ok
    over = [*within, _sample(120, {"n1": limit, "n3": limit + 1}, rss)]
    verdict = ops.disk_criterion(over)
    assert not verdict.ok and "n3 at 120 s" in verdict.figure and f"{(limit + 1) / MIB:.1f} MiB" in verdict.figure


def test_rss_criterion_from_minute_10_or_a_third_of_a_short_run():
    assert ops.rss_baseline_s(3600)[0] == 600 and "minute 10" in ops.rss_baseline_s(3600)[1]
    assert ops.rss_baseline_s(600)[0] == 200 and "first third" in ops.rss_baseline_s(600)[1]
    journals = {"n1": 0}
    # Growth before minute 10 does not count; 10% after it passes, 11% fails.
    steady = [_sample(0, journals, {"n1": (10 * MIB, 7)}), _sample(600, journals, {"n1": (100 * MIB, 7)})]
    assert ops.rss_criterion([*steady, _sample(3600, journals, {"n1": (110 * MIB, 7)})], 3600).ok
    grown = ops.rss_criterion([*steady, _sample(3600, journals, {"n1": (111 * MIB, 7)})], 3600)
    assert not grown.ok and "n1 100 MiB at 600 s → 111 MiB at 3600 s" in grown.figure and "+11.0%" in grown.figure
    # A node restarted since (another pid) is a fresh process: measured from its own samples.
    restarted = [*steady, _sample(1200, journals, {"n1": (60 * MIB, 8)}), _sample(3600, journals, {"n1": (64 * MIB, 8)})]
    assert ops.rss_criterion(restarted, 3600).ok
    leaking = ops.rss_criterion(
        [*steady, _sample(3600, journals, {"n1": (100 * MIB, 7)}, workload_rss=80 * MIB)], 3600
    )  # the workload's process: 40 → 80 MiB
    assert not leaking.ok and leaking.figure.startswith("largest growth +100.0%: workload")


def test_subscribers_and_invariants_criteria():
    assert ops.subscribers_criterion([]).ok and not ops.subscribers_criterion(["s2"]).ok
    assert ops.invariants_criterion(0).ok and not ops.invariants_criterion(1).ok


def test_a_late_joiner_is_compared_record_by_record():
    reference = [(seq, "s", seq, b"p%d" % seq) for seq in range(1, 11)]
    assert ops.compare_late_joiner("n4", reference[4:], reference) == ""
    assert "ends at seq 9" in ops.compare_late_joiner("n4", reference[4:9], reference)
    assert "not contiguous" in ops.compare_late_joiner("n4", reference[4:6] + reference[7:], reference)
    changed = reference[4:6] + [(7, "s", 7, b"other")] + reference[7:]
    assert "at seq 7" in ops.compare_late_joiner("n4", changed, reference)
    assert ops.compare_late_joiner("n4", [], reference)


def test_a_short_ops_soak_passes_its_criteria(tmp_path):
    runs, report = tmp_path / "runs", tmp_path / "report"
    runs.mkdir()
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "chaos_tests",
            "--scenario",
            "ops",
            "--duration",
            "75s",
            "--seed",
            "2",
            "--report",
            str(report),
            "--dir",
            str(runs),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    out = process.stdout
    assert process.returncode == 0, out[-4000:]
    document = json.loads((report / "report.json").read_text())
    run = document["run"]
    assert document["ok"] and set(document["invariants"].values()) == {"held"}
    assert [c["ok"] for c in run["criteria"]] == [True] * 4, run["criteria"]
    done = run["operations"]
    assert done["replace"] == 1 and done["rolling-restart"] >= 1 and done["leader-transfer"] >= 1, done
    assert any(name.startswith("kill-") for name in done), done
    assert run["replaced"] == {"n2": "n4"}
    samples = run["samples"]
    assert samples[0]["label"] == "start" and samples[-1]["label"] == "end" and len(samples) >= 5
    assert set(samples[-1]["nodes"]) == {"n1", "n3", "n4"}
    # Retention really moved segments out of every journal into the node's archive.
    assert all(n["archive_bytes"] > 0 for n in samples[-1]["nodes"].values()), samples[-1]
    assert all(n["journal_bytes"] <= ops.RETENTION_BYTES + 2 * ops.SEGMENT_BYTES for n in samples[-1]["nodes"].values())
    for line in ("criterion passed: disk within retention", "criterion passed: RSS growth", "chaos ops: PASSED"):
        assert line in out
    assert (report / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(runs.iterdir()) == []
