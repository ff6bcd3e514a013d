"""`raftseq chaos` and `raftseq bench` hand every argument to their suite in the source checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def raftseq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raftseq.cluster.cli", *args],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_chaos_list_names_every_scenario():
    from chaos_tests.scenarios import SCENARIOS, SOAKS

    done = raftseq("chaos", "list")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == [*SCENARIOS, *SOAKS]


def test_chaos_options_reach_the_suite_and_bad_ones_are_refused():
    done = raftseq("chaos", "--rounds", "0", "kill-leader")
    assert done.returncode == 2 and "--rounds must be at least 1" in done.stderr
    done = raftseq("chaos", "run", "no-such-scenario")
    assert done.returncode == 2 and "unknown scenario(s): no-such-scenario" in done.stderr


def test_chaos_check_of_a_missing_history_exits_2():
    done = raftseq("chaos", "check", "/nonexistent/history.jsonl")
    assert done.returncode == 2, (done.stdout, done.stderr)
