"""``python -m benchmarks.bench_cluster --require-goals`` exits 1 when a goal is missed: the
elections workload under steady load then fails on any leader change. The workload itself is
replaced by its outcome here (a real one takes minutes; ``benchmarks/README_cluster.md``)."""

from __future__ import annotations

import pytest

from benchmarks import bench_cluster


def outcome_with(needless: int):
    def workload(args, root: str) -> dict:
        return {"needless_elections": needless, "goal_met": needless == 0}

    return workload


@pytest.mark.parametrize(("needless", "require", "code"), [(0, True, 0), (1, True, 1), (1, False, 0)])
def test_a_missed_elections_goal_fails_only_when_goals_are_required(monkeypatch, capsys, needless, require, code):
    monkeypatch.setitem(bench_cluster.WORKLOADS, "elections", ("4. needless elections", outcome_with(needless)))
    argv = ["--workload", "elections", "--elections-seconds", "1", *(["--require-goals"] if require else [])]
    assert bench_cluster.main(argv) == code
    out = capsys.readouterr().out
    assert f"needless elections {needless}: {'met' if needless == 0 else 'MISSED'}" in out
